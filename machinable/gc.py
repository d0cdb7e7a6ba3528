"""Garbage collection: remove what no finished record needs.

``collect()`` (``machinable gc``) removes

- unfinished experiments (created, dispatched, failed, interrupted, or with an
  unreadable record) whose last activity is older than an age; never one whose
  claim is held (it is running), nor by age one submitted to a cluster
  scheduler and not heard of since (it may still be queued);
- the leftovers of interrupted writes (``.tmp/`` folders, ``.*.tmp`` files)
  older than that age;
- source objects that no stored experiment refers to.

A finished record is removed only when its id is given explicitly *and*
``include_finished`` is set. ``dry_run`` reports the same plan and changes
nothing. Everything is decided from the directories (the index is updated
after each removal, as a derived copy).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from machinable.errors import UsageError
from machinable.storage import (
    OBJECTS,
    OBJECTS_LOCK,
    TMP,
    Claim,
    Storage,
    claim_is_held,
    is_sealed,
    read_json,
)

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
DEFAULT_AGE = "7d"


def parse_age(text: str | float | int) -> float:
    """Seconds of an age such as ``30m``, ``12h``, ``7d``, ``2w`` or ``0``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 0:
        return float(text)
    match = _AGE.match(str(text).strip().lower())
    if not match:
        raise UsageError(f"Invalid age {text!r}: give a number with a unit, such as 30m, 12h, 7d or 2w (0 for any age).")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Removal:
    kind: str  # "experiment", "temp", "object"
    path: str  # relative to the storage root
    size: int
    reason: str

    def describe(self) -> str:
        return f"{self.kind} {self.path} ({_size(self.size)}): {self.reason}"


@dataclass
class GcReport:
    root: Path
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # "id: why" for experiments that stay

    @property
    def freed(self) -> int:
        return sum(r.size for r in self.removed)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.removed if r.kind == kind)

    def render(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {r.describe()}" for r in self.removed if r.kind == "experiment"]
        labels = {
            "object": ("unreferenced source object", "unreferenced source objects"),
            "temp": ("leftover of an interrupted write", "leftovers of interrupted writes"),
        }
        for kind, (one, many) in labels.items():
            n = self.count(kind)
            if n:
                size = sum(r.size for r in self.removed if r.kind == kind)
                lines.append(f"{verb} {n} {one if n == 1 else many} ({_size(size)})")
        lines.extend(f"kept {line}" for line in self.kept)
        total = (f"{self.count('experiment')} experiment(s), {self.count('object')} object(s), "
                 f"{self.count('temp')} temp item(s), {_size(self.freed)}")
        if self.dry_run:
            lines.append(f"Dry run: nothing removed from {self.root}. Without --dry-run gc removes {total}.")
        else:
            lines.append(f"Removed {total} from {self.root}.")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "storage": str(self.root),
            "dry_run": self.dry_run,
            "removed": [r.__dict__ for r in self.removed],
            "kept": self.kept,
            "freed": self.freed,
        }


def collect(storage: Storage, *, older_than: str | float = DEFAULT_AGE, ids: list[str] | None = None,
            include_finished: bool = False, dry_run: bool = False) -> GcReport:
    """Remove (or with ``dry_run`` list) what no finished record needs; see the module doc."""
    age = parse_age(older_than)
    if include_finished and not ids:
        raise UsageError("--include-finished removes finished records only by explicit id: give their ids (machinable gc --include-finished ID...).")
    report = GcReport(root=storage.root, dry_run=dry_run)
    if not storage.root.is_dir():
        return report
    if not dry_run:
        storage.ensure_writable()
    cutoff = time.time() - age
    targets = [storage._resolve_without_writing(i) for i in ids] if ids else storage.experiment_ids()
    if ids:
        finished = [i for i in targets if _is_finished(storage.directory(i))]
        if finished and not include_finished:
            raise UsageError(
                f"Experiment {finished[0][:12]} is finished: gc removes a finished record only with --include-finished "
                "(and its explicit id). Nothing was removed."
            )
    for experiment_id in targets:
        _collect_experiment(storage, experiment_id, report, cutoff=None if ids else cutoff, dry_run=dry_run)
    _collect_temp(storage, report, cutoff, dry_run)
    _collect_objects(storage, report, dry_run)
    return report


# --- experiments ----------------------------------------------------------------------


def _is_finished(directory: Path, events: list[dict[str, Any]] | None = None) -> bool:
    from machinable.ledger import Ledger

    return is_sealed(directory) or Ledger(directory).state(events, check_claim=False) == "finished"


def _last_activity(directory: Path, events: list[dict[str, Any]]) -> float:
    """When the experiment last changed: its newest event, else the folder's mtime."""
    for row in reversed(events):
        try:
            return datetime.fromisoformat(row["time"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
    try:
        return directory.stat().st_mtime
    except OSError:
        return time.time()


def _queued(ledger: Any, events: list[dict[str, Any]]) -> bool:
    """Handed to a cluster scheduler and not heard of since: it may still be
    queued (reconciliation records a vanished job as interrupted)."""
    last = ledger.last(events)
    return last is not None and last.get("event") == "submitted"


def _describe(ledger: Any, events: list[dict[str, Any]]) -> tuple[str, str]:
    """(module, state) for the report, tolerating damage."""
    try:
        module = str(read_json(ledger.directory / "experiment.json").get("module", "?"))
    except Exception:
        module = "unreadable record"
    return module, ledger.state(events, check_claim=False)


def _collect_experiment(storage: Storage, experiment_id: str, report: GcReport, *, cutoff: float | None, dry_run: bool) -> None:
    from machinable.ledger import Ledger

    directory = storage.directory(experiment_id)
    ledger = Ledger(directory)
    events = ledger.events()  # read once here; re-read under the claim below
    finished = _is_finished(directory, events)
    if finished and cutoff is not None:
        return  # finished records are never collected by age
    activity = _last_activity(directory, events)
    if cutoff is not None and activity > cutoff:
        return
    if cutoff is not None and _queued(ledger, events):
        report.kept.append(f"{experiment_id[:12]}: submitted to a scheduler (`machinable status` reconciles it; or name its id)")
        return
    module, state = _describe(ledger, events)
    when = datetime.fromtimestamp(activity).isoformat(sep=" ", timespec="seconds")
    removal = Removal("experiment", experiment_id, _tree_size(directory), f"{module}, {state}, last activity {when}")
    if dry_run:
        if claim_is_held(directory):
            report.kept.append(f"{experiment_id[:12]}: running (its claim is held)")
        else:
            report.removed.append(removal)
        return
    claim = Claim(directory)
    try:
        acquired = claim.try_acquire()
    except Exception:
        acquired = False
    if not acquired:
        report.kept.append(f"{experiment_id[:12]}: running (its claim is held)")
        return
    try:
        if not finished and _is_finished(directory):  # it finished while we looked
            report.kept.append(f"{experiment_id[:12]}: finished meanwhile")
            return
        _remove_tree(storage, directory)
    finally:
        claim.release()
    storage.refresh_state(experiment_id)  # drops the index row
    report.removed.append(removal)


def _remove_tree(storage: Storage, directory: Path) -> None:
    """Take the folder out of sight with one rename, then delete it (write
    permission restored first: sealed records are read-only)."""
    from machinable.storage import make_dirs

    make_dirs(storage.root / TMP)
    _make_writable(directory, recursive=False)
    trash = storage.root / TMP / f"gc-{uuid.uuid4().hex}"
    os.rename(directory, trash)
    _make_writable(trash, recursive=True)
    shutil.rmtree(trash)


def _make_writable(path: Path, *, recursive: bool) -> None:
    paths = [path, *path.rglob("*")] if recursive else [path]
    for item in paths:
        mode = item.lstat().st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IWUSR:
            os.chmod(item, stat.S_IMODE(mode) | stat.S_IWUSR)


# --- leftovers of interrupted writes ---------------------------------------------------------


def _collect_temp(storage: Storage, report: GcReport, cutoff: float, dry_run: bool) -> None:
    tmp = storage.root / TMP
    leftovers: list[Path] = []
    if tmp.is_dir():
        leftovers.extend(tmp.iterdir())
    objects = storage.root / OBJECTS
    if objects.is_dir():
        leftovers.extend(objects.glob("*/.*.tmp"))
    for path in sorted(leftovers):
        try:
            if path.lstat().st_mtime > cutoff:
                continue  # may belong to a write in progress
        except FileNotFoundError:
            continue
        report.removed.append(Removal("temp", path.relative_to(storage.root).as_posix(), _tree_size(path), "interrupted write"))
        if not dry_run:
            if path.is_dir():
                _make_writable(path, recursive=True)
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --- source objects ------------------------------------------------------------------------------


def _collect_objects(storage: Storage, report: GcReport, dry_run: bool) -> None:
    """Remove objects no experiment's code.json refers to.

    Under the exclusive objects lock: commits hold it shared from their first
    object until their folder is published, so no object of a commit in
    progress is taken for garbage.
    """
    objects = storage.root / OBJECTS
    if not objects.is_dir():
        return
    from contextlib import nullcontext

    lock: Any = storage.lock(OBJECTS_LOCK, shared=dry_run)
    if dry_run and not os.access(storage.root, os.W_OK):
        lock = nullcontext()  # a report about read-only storage: nothing can change under it
    with lock:
        referenced: set[str] = set()
        for experiment_id in storage.experiment_ids():
            code = storage.directory(experiment_id) / "code.json"
            try:
                files = read_json(code).get("files", {})
            except FileNotFoundError:
                continue
            except Exception:
                report.kept.append(f"all source objects: {experiment_id[:12]}/code.json is unreadable, so what it refers to is unknown")
                return
            for info in files.values():
                digest = info.get("object") if isinstance(info, dict) else None
                if isinstance(digest, str) and ":" in digest:
                    hexd = digest.split(":", 1)[1]
                    referenced.add(f"{hexd[:2]}/{hexd[2:]}")
        for path in sorted(objects.glob("*/*")):
            rel = f"{path.parent.name}/{path.name}"
            if path.name.startswith(".") or rel in referenced or not path.is_file():
                continue
            report.removed.append(Removal("object", f"{OBJECTS}/{rel}", path.stat().st_size, "referenced by no experiment"))
            if not dry_run:
                path.unlink(missing_ok=True)
        if not dry_run:
            for folder in objects.iterdir():
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    pass


# --- helpers --------------------------------------------------------------------------------------


def _tree_size(path: Path) -> int:
    try:
        if not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"
