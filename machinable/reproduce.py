"""Status and reproduction: are recorded results still what the code produces?

``status()`` compares each record's code hash with the current working tree
(hashing every module's import closure once) and reconciles experiments that
an execution dispatched with that execution's scheduler.

``reproduce()`` re-executes a finished experiment in isolation: a temporary
``git worktree`` at the recorded commit with the recorded uncommitted diff
applied, the same config and seed, a scratch storage, a separate process.
It compares the new outputs with the recorded ones and records the attempt
beside the original in ``<id>/reproductions/<time>/`` (the original record
itself is never modified).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from machinable.errors import ExperimentNotFound, MachinableError, ModuleNotFound, ReproductionError, UsageError
from machinable.hashing import closure_of, digest_bytes, file_digest
from machinable.ledger import Ledger
from machinable.storage import DIR_MODE, REPRODUCTIONS, Storage, atomic_write, dumps_value, loads_value, read_json, read_lines, write_json
from machinable.experiment import RESULT_FILES

SHORT = 12


# ======================================================================================
# status
# ======================================================================================


@dataclass
class StatusRow:
    """One experiment (or the representative of one config) and its freshness."""

    id: str
    module: str
    config: dict[str, Any]
    config_hash: str
    seed: int | None
    created: str
    state: str
    code: str  # "fresh", "stale", or "unknown" (a damaged record)
    changed: list[str] = field(default_factory=list)  # closure files that differ, e.g. "helper.py changed"
    finished: bool = False  # a finished record with the current code exists (for this config)
    reason: str | None = None  # scheduler reason, or the error of a failed run
    execution: str | None = None
    experiments: int = 1  # records of this config (per-config rows)
    damage: str | None = None  # what is wrong with a damaged record (``machinable verify`` lists all)

    @property
    def verdict(self) -> str:
        if self.damage is not None:
            return "damaged"
        if self.code == "stale":
            return "stale"
        return "fresh" if self.finished else "unfinished"

    @property
    def ok(self) -> bool:
        return self.verdict == "fresh"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class StatusReport:
    """What ``machinable status`` prints; ``ok`` is what ``--check`` tests."""

    storage: Path
    per: str  # "config" or "experiment"
    rows: list[StatusRow]
    drift: dict[str, list[str]] = field(default_factory=dict)  # module -> package/python changes
    exists: bool = True  # whether the storage folder exists at all
    modules: list[str] = field(default_factory=list)  # the module filter, if any

    @property
    def ok(self) -> bool:
        """No stale or unfinished row (``--check`` also fails when there is no row: see ``empty``)."""
        return all(row.ok for row in self.rows)

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def stale(self) -> list[StatusRow]:
        return [row for row in self.rows if row.verdict == "stale"]

    @property
    def unfinished(self) -> list[StatusRow]:
        return [row for row in self.rows if row.verdict == "unfinished"]

    @property
    def damaged(self) -> list[StatusRow]:
        return [row for row in self.rows if row.verdict == "damaged"]

    def as_json(self) -> dict[str, Any]:
        return {
            "storage": str(self.storage),
            "exists": self.exists,
            "per": self.per,
            "ok": self.ok,
            "rows": [row.as_json() for row in self.rows],
            "drift": self.drift,
        }

    def nothing_found(self) -> str:
        """Why there are no rows: where status looked, for whom."""
        if not self.exists:
            return missing_storage(self.storage)
        of = f" of {', '.join(self.modules)}" if self.modules else ""
        return f"no experiments{of} recorded in {self.storage}"

    def render(self, width: int | None = None) -> str:
        """The table; ``width`` (a terminal's) caps the REASON column, the only unbounded one."""
        if not self.rows:
            text = self.nothing_found()
            return text[0].upper() + text[1:] + "."
        varying = _varying_keys(self.rows)
        headers = ["ID", "MODULE", "CONFIG", "STATE", "STATUS"]
        cells = [
            [row.id[:SHORT], row.module or "?", _config_text(row.config, varying.get(row.module, [])), row.state, _status_text(row)]
            for row in self.rows
        ]
        if any(row.reason for row in self.rows):
            # its own last column, so that a long reason widens no other column
            used = sum(max(len(h), *(len(c[i]) for c in cells)) + 2 for i, h in enumerate(headers))
            limit = max(24, width - used) if width else 100
            headers.append("REASON")
            for row, line in zip(self.rows, cells):
                line.append(_shorten(row.reason, limit) if row.reason else "")
        lines = _table(headers, cells)
        unit = ("config" if self.per == "config" else "experiment") + ("s" if len(self.rows) != 1 else "")
        counts = [f"{sum(r.verdict == v for r in self.rows)} {v}" for v in ("fresh", "stale", "unfinished")]
        if self.damaged:
            counts.append(f"{len(self.damaged)} damaged")
        lines.append(f"{len(self.rows)} {unit}: {', '.join(counts)}.")
        if self.damaged:
            first = self.damaged[0].id[:SHORT]
            lines.append(f"damaged records: `machinable verify {first}` lists every problem; "
                         f"`machinable gc --include-finished {first}` removes one, and launching its config again creates a new one.")
        for module, changes in sorted(self.drift.items()):
            lines.append(f"environment drift since the newest {module} record: {'; '.join(changes)}")
        return "\n".join(lines)


def _status_text(row: StatusRow, most: int = 3) -> str:
    if row.verdict == "damaged":
        return f"damaged: {row.damage}"
    if row.verdict == "stale":
        named = ", ".join(row.changed[:most]) or "code changed"
        more = f" (+{len(row.changed) - most} more)" if len(row.changed) > most else ""
        return f"stale: {named}{more}"
    return "fresh" if row.verdict == "fresh" else "no finished run"


def missing_storage(root: Path) -> str:
    return f"no storage at {root} (run machinable from the project root, or pass --storage PATH if the records are elsewhere)"


def nothing_to_check(found: str) -> str:
    """The ``--check`` failure when there is nothing to check (``found`` says where it looked)."""
    return (
        f"Nothing to check: {found}. In CI, commit the records to check (git add --force storage "
        "':!storage/index.sqlite*') or restore them in an earlier step, and point --storage (or MACHINABLE_STORAGE) "
        "at them if they are elsewhere. Pass --allow-empty if no records are expected."
    )


def check_modules(project: Any, storage: Storage, modules: Sequence[str] | None) -> list[str]:
    """Normalised module names; an unknown one (neither recorded nor in the project) is a usage error."""
    import difflib

    names = [project.normalize_name(m) for m in modules or []]
    if not names:
        return names
    stored = stored_modules(storage)
    for name in names:
        if name in stored:
            continue
        try:
            project.module_file(name)
            continue
        except ModuleNotFound:
            pass
        known = sorted(set(stored) | set(project.available_modules()))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known modules: {', '.join(known)}." if known else ""
        where = f"no experiments of it in {storage.root}" if storage.root.is_dir() else missing_storage(storage.root)
        raise ModuleNotFound(
            f"Unknown module {name!r}: no {name.replace('.', '/')}.py in the project {project.path}, and {where}.{hint}"
        )
    return names


def stored_modules(storage: Storage) -> set[str]:
    """The modules with experiments in ``storage`` (none if it does not exist; never creates it)."""
    if not storage.root.is_dir():
        return set()
    db = storage.fresh_index().db
    return {row[0] for row in db.execute("SELECT DISTINCT module FROM experiments WHERE module != ''")}


def status(modules: Sequence[str] | None = None, *, every: bool = False, reconcile: bool = True,
           storage: Storage | None = None, project: Any = None) -> StatusReport:
    """Freshness of the recorded experiments against the current working tree.

    By default one row per config (its newest record, preferring one with the
    current code): *fresh* when a finished record with the current code
    exists, *stale* when the code changed since (naming the changed files of
    the import closure), *unfinished* otherwise. ``every=True`` gives one row
    per experiment. Experiments that an execution dispatched are reconciled
    with it first (``Execution.reconcile``), so their state is the scheduler's.
    """
    from machinable.project import Project

    project = project or Project.get()
    storage = storage or Storage.current()
    names = check_modules(project, storage, modules)
    report = StatusReport(storage=storage.root, per="experiment" if every else "config", rows=[],
                          exists=storage.root.is_dir(), modules=names)
    if not report.exists:
        return report
    records = _load_rows(storage, names)
    if not records:
        return report
    damaged = {rec["id"]: problem for rec in records if (problem := _damage(storage, rec)) is not None}
    _refresh_states(storage, project, [rec for rec in records if rec["id"] not in damaged], reconcile)
    code = _CodeCache(project, storage)
    if every:
        for rec in records:
            if rec["id"] in damaged:
                report.rows.append(_damaged_row(rec, damaged[rec["id"]]))
                continue
            fresh = code.current_hash(rec["module"]) == rec["code_hash"]
            report.rows.append(_row(rec, code, fresh, finished=fresh and rec["state"] == "finished"))
    else:
        groups: dict[str, list[dict[str, Any]]] = {}
        for rec in records:  # newest first
            if rec["id"] not in damaged:  # a damaged record is a row of its own, never a config's representative
                groups.setdefault(rec["config_hash"], []).append(rec)
        for group in groups.values():
            current = code.current_hash(group[0]["module"])
            same_code = [r for r in group if r["code_hash"] == current]
            finished = [r for r in same_code if r["state"] == "finished"]
            chosen = (finished or same_code or group)[0]
            row = _row(chosen, code, bool(same_code), finished=bool(finished))
            row.experiments = len(group)
            report.rows.append(row)
        report.rows.extend(_damaged_row(rec, damaged[rec["id"]]) for rec in records if rec["id"] in damaged)
    report.drift = _drift(storage, [rec for rec in records if rec["id"] not in damaged])
    return report


def _load_rows(storage: Storage, modules: list[str]) -> list[dict[str, Any]]:
    where, params = "1", ()
    if modules:
        # with the records whose module cannot be read: they may be of these modules, and hiding them would pass a check
        where = f"(module IN ({','.join('?' * len(modules))}) OR module = '')"
        params = tuple(modules)
    rows = []
    for row in storage.fresh_index().iter_query(where, params, order="created DESC"):
        if storage.directory(row["id"]).is_dir():
            row["config"] = orjson.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
            row["reason"] = None
            rows.append(row)
    return rows


def _refresh_states(storage: Storage, project: Any, records: list[dict[str, Any]], reconcile: bool) -> None:
    """States from the ledgers (the index may lag), then from the schedulers.

    Asked are the experiments an execution dispatched that are still
    dispatched or running by their ledger, and the interrupted ones whose last
    dispatch was non-blocking (a cancelled cluster job leaves an interrupted
    run behind; the scheduler can say why).
    """
    by_execution: dict[str, list[dict[str, Any]]] = {}
    blocking: dict[str, bool] = {}
    for rec in records:
        if rec["state"] == "finished":
            continue  # terminal, and sealed: the index cannot lag behind it
        ledger = Ledger(storage.directory(rec["id"]))
        events = ledger.events()
        raw = ledger.state(events, check_claim=False)
        rec["state"] = ledger.state(events)
        last = ledger.last(events) or {}
        if rec["state"] == "failed":
            rec["reason"] = last.get("error")
        elif rec["state"] == "interrupted":
            rec["reason"] = last.get("reason")
        rec["execution"] = _dispatched_by(events)
        module = rec["execution"]
        if module and (raw in ("dispatched", "running") or raw == "interrupted" and not _is_blocking(project, module, blocking)):
            by_execution.setdefault(module, []).append(rec)
    if not reconcile:
        return
    for module, group in by_execution.items():
        for rec, info in zip(group, _reconcile(storage, project, module, group)):
            if info:
                rec["state"] = str(info.get("state") or rec["state"])
                rec["reason"] = info.get("reason") or rec["reason"]


def _is_blocking(project: Any, module: str, cache: dict[str, bool]) -> bool:
    """Whether an execution waits for its experiments (one that cannot be loaded counts as blocking)."""
    if module not in cache:
        try:
            cache[module] = bool(execution_class(project, module).blocking)
        except Exception:  # gone or broken: its interrupted runs keep their recorded reason
            cache[module] = True
    return cache[module]


def _dispatched_by(events: list[dict[str, Any]]) -> str | None:
    """The execution module of the last ``dispatched`` event."""
    for kind in ("dispatched", "started"):
        for event in reversed(events):
            if event.get("event") == kind and isinstance(event.get("execution"), dict):
                return event["execution"].get("module")
    return None


def _reconcile(storage: Storage, project: Any, module: str, group: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    from machinable.experiment import Experiment

    try:
        cls = execution_class(project, module)
        experiments = [Experiment.restore(storage, rec["id"], project=project) for rec in group]
        answer = cls.reconcile(experiments) or {}
    except MachinableError as e:
        return [{"reason": f"cannot reconcile with {module}: {e}"} for _ in group]
    except Exception as e:  # a scheduler query failing must not hide the other rows
        return [{"reason": f"cannot reconcile with {module}: {type(e).__name__}: {e}"} for _ in group]
    return [answer.get(rec["id"]) for rec in group]


def execution_class(project: Any, module: str) -> type:
    """The Execution class of a module name as recorded in a ``dispatched`` event."""
    import importlib

    from machinable.execution import Execution
    from machinable.project import BUILTINS

    if module.startswith("machinable.") and module not in BUILTINS:
        alias = next((name for name, target in BUILTINS.items() if target == module), None)
        if alias is None:
            try:
                loaded = importlib.import_module(module)
            except ImportError as e:
                raise ModuleNotFound(f"Execution module {module!r} cannot be imported: {e}") from None
            found = [v for v in vars(loaded).values()
                     if isinstance(v, type) and issubclass(v, Execution) and v.__module__ == module]
            if len(found) != 1:
                raise ModuleNotFound(f"Module {module!r} does not define exactly one Execution class.")
            return found[0]
        module = alias
    return project.element_class(module, Execution)


class _CodeCache:
    """Current closure hash per module and recorded closure per code hash, each computed once."""

    def __init__(self, project: Any, storage: Storage) -> None:
        self.project, self.storage = project, storage
        self._current: dict[str, Any] = {}
        self._recorded: dict[str, dict[str, Any]] = {}

    def closure(self, module: str) -> Any:
        if module not in self._current:
            try:
                entry = self.project.module_file(module)
            except ModuleNotFound:
                self._current[module] = None
            else:
                self._current[module] = closure_of(self.project.path, entry, exclude=(self.storage.root,))
        return self._current[module]

    def current_hash(self, module: str) -> str | None:
        closure = self.closure(module)
        return closure.code_hash if closure is not None else None

    def changed(self, rec: dict[str, Any]) -> list[str]:
        key = rec["code_hash"]
        if key not in self._recorded:
            try:
                self._recorded[key] = read_json(self.storage.directory(rec["id"]) / "code.json").get("files", {})
            except (FileNotFoundError, MachinableError):
                self._recorded[key] = {}
        recorded = self._recorded[key]
        closure = self.closure(rec["module"])
        if closure is None:
            return [f"{rec['module'].replace('.', '/')}.py removed"]
        now = {path: info.normalized for path, info in closure.files.items()}
        out = []
        for path in sorted(set(recorded) | set(now)):
            if path not in now:
                out.append(f"{path} removed")
            elif path not in recorded:
                out.append(f"{path} added")
            elif recorded[path].get("normalized") != now[path]:
                out.append(f"{path} changed")
        return out


def _damage(storage: Storage, rec: dict[str, Any]) -> str | None:
    """What is wrong with a record that the index or a few ``stat`` calls show damaged (None if intact)."""
    from machinable.index import DAMAGED, live_state
    from machinable.storage import record_problems

    if rec["state"] != DAMAGED and live_state(storage.root, rec) != DAMAGED:
        return None
    problems = record_problems(storage.root, rec["id"], rehash=False)
    if not problems:
        return "damaged"
    first = problems[0]
    name = first.file.split("/", 1)[-1]
    message = first.message.removeprefix("damaged: ")  # the status column says it already
    return f"{name}: {message}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def _damaged_row(rec: dict[str, Any], damage: str) -> StatusRow:
    row = _row(rec, None, True, finished=False)
    row.code, row.damage = "unknown", damage
    return row


def _seed(value: Any) -> int | None:
    text = str(value)
    return int(text) if text.lstrip("-").isdigit() else None


def _row(rec: dict[str, Any], code: _CodeCache | None, fresh: bool, *, finished: bool) -> StatusRow:
    return StatusRow(
        id=rec["id"],
        module=rec["module"],
        config=rec["config"],
        config_hash=rec["config_hash"],
        seed=_seed(rec["seed"]),
        created=rec["created"],
        state=rec["state"],
        code="fresh" if fresh else "stale",
        changed=[] if fresh or code is None else code.changed(rec),
        finished=finished,
        reason=rec.get("reason"),
        execution=rec.get("execution"),
    )


def _drift(storage: Storage, records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Package and Python changes since each module's newest record."""
    import platform

    from machinable.environment import _version

    newest: dict[str, str] = {}
    for rec in records:
        newest.setdefault(rec["module"], rec["id"])
    drift: dict[str, list[str]] = {}
    for module, experiment_id in newest.items():
        try:
            env = read_json(storage.directory(experiment_id) / "env.json")
        except (FileNotFoundError, MachinableError):
            continue
        now = {"python": platform.python_version(), "packages": {name: _version(name) for name in env.get("packages", {})}}
        changes = environment_differences(env, now, keys=("python",))
        if changes:
            drift[module] = changes
    return drift


def environment_differences(recorded: dict[str, Any], now: dict[str, Any],
                            keys: Sequence[str] = ("python", "implementation", "machine", "platform", "machinable")) -> list[str]:
    """``"numpy 1.26.4 -> 2.0.0"`` lines for what differs between two env.json documents."""
    out = []
    for key in keys:
        if recorded.get(key) != now.get(key):
            out.append(f"{key} {recorded.get(key)} -> {now.get(key)}")
    before, after = recorded.get("packages") or {}, now.get("packages") or {}
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            out.append(f"{name} {before.get(name) or 'absent'} -> {after.get(name) or 'absent'}")
    return out


# ======================================================================================
# reproduce
# ======================================================================================


@dataclass
class Comparison:
    """One compared output: ``item`` is "run", "code", "result", "records", "data/x.npy", "output"."""

    item: str
    match: bool
    detail: str = ""


@dataclass
class ReproductionReport:
    """The facts of one reproduction; ``ok`` is what ``--check`` tests."""

    experiment_id: str
    module: str
    commit: str | None
    dirty: bool
    rtol: float = 0.0
    atol: float = 0.0
    checked: bool = True
    state: str | None = None  # of the re-execution: finished, failed, ...
    reproduced_id: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)  # recorded -> reproduction
    error: str | None = None  # why it could not be re-executed at all
    record: Path | None = None  # <id>/reproductions/<time>/
    kept: Path | None = None  # the worktree, with --keep
    output_tail: str = ""
    interrupted: bool = False  # Ctrl-C stopped it before its verdict

    @property
    def ok(self) -> bool:
        return (self.error is None and not self.interrupted and self.state == "finished"
                and all(c.match for c in self.comparisons))

    @property
    def mismatches(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.match]

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        if self.interrupted:
            return "interrupted"
        if not self.checked:
            return "re-executed" if self.state == "finished" else "failed"
        return "reproduced" if self.ok else "mismatch"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ok=self.ok, verdict=self.verdict, record=str(self.record) if self.record else None,
                    kept=str(self.kept) if self.kept else None)
        return data

    def render(self) -> str:
        where = f"commit {self.commit[:SHORT] if self.commit else '?'}" + (" + recorded uncommitted changes" if self.dirty else "")
        lines = [f"{self.experiment_id[:SHORT]} {self.module} at {where}"]
        if self.error is not None:
            lines.append(f"  cannot reproduce: {self.error}")
        if self.interrupted:
            lines.append("  interrupted (Ctrl-C): no verdict; the attempt is recorded as interrupted")
            return "\n".join(lines)
        rows = [[c.item, "match" if c.match else "MISMATCH", c.detail] for c in self.comparisons]
        if rows:
            lines.extend("  " + line for line in _table(["OUTPUT", "", "DETAIL"], rows, header=False))
        if self.environment:
            lines.append(f"  environment differs: {'; '.join(self.environment)}")
        if self.kept is not None:
            lines.append(f"  kept: {self.kept} (remove with: git worktree remove --force {self.kept / 'worktree'})")
        if self.error is None and self.checked:
            tolerance = f" (rtol={self.rtol:g}, atol={self.atol:g})" if self.rtol or self.atol else ""
            lines.append(f"  {'reproduced' if self.ok else 'NOT reproduced'}: "
                         f"{len(self.comparisons) - len(self.mismatches)} of {len(self.comparisons)} match{tolerance}")
        return "\n".join(lines)


@dataclass
class _Original:
    id: str
    directory: Path
    record: dict[str, Any]
    git: dict[str, Any]
    diff: bytes

    @property
    def project_rel(self) -> Path:
        try:
            return Path(self.record["project"]).relative_to(Path(self.git["worktree"]))
        except (KeyError, TypeError, ValueError):
            return Path()

    @property
    def checkout_key(self) -> tuple[str, str, str]:
        return (str(self.git.get("commit")), digest_bytes(self.diff), self.project_rel.as_posix())


def reproduce(experiment: Any, *, check: bool = True, rtol: float = 0.0, atol: float = 0.0, keep: bool = False,
              compare_output: bool = False, execution: str | None = None, execution_config: dict[str, Any] | None = None,
              storage: Storage | None = None, project: Any = None, echo: bool = True) -> ReproductionReport:
    """Re-execute a finished experiment (object, id or id prefix) in isolation and compare.

    ``check=False`` re-executes without comparing. Raises ``ReproductionError``
    when it cannot be re-executed at all (recorded commit gone, no git
    history, the recorded diff does not apply); the attempt is still recorded.
    """
    storage, project = _context(experiment, storage, project)
    spec = _execution_spec(project, execution, execution_config)  # a bad one fails before any worktree exists
    if not storage.root.is_dir():
        raise ExperimentNotFound(f"No experiment {experiment if isinstance(experiment, str) else experiment.experiment_id!r}: "
                                 f"{missing_storage(storage.root)}.")
    original = _original(storage, experiment if isinstance(experiment, str) else experiment.experiment_id)
    report = _reproduce_group([original], storage=storage, project=project, check=check, rtol=rtol, atol=atol,
                              keep=keep, compare_output=compare_output, execution=spec, echo=echo)[0]
    if report.error is not None:
        raise ReproductionError(report.error)
    return report


def reproduce_all(modules: Sequence[str] | None = None, *, sample: int | None = None, check: bool = True,
                  rtol: float = 0.0, atol: float = 0.0, keep: bool = False, compare_output: bool = False,
                  execution: str | None = None, execution_config: dict[str, Any] | None = None,
                  storage: Storage | None = None, project: Any = None, echo: bool = True,
                  on_report: Callable[[ReproductionReport], None] | None = None) -> list[ReproductionReport]:
    """Reproduce every finished experiment (of ``modules``), or a random ``sample`` of them.

    Experiments recorded from the same commit and diff share one worktree;
    with ``execution`` each worktree's experiments run through that execution
    (in one separate process), otherwise each in its own process. Reports
    come back in order and, as each is ready, to ``on_report``. Ctrl-C stops
    at once: the attempts under way are recorded as interrupted.
    """
    import random

    from machinable.project import Project

    project = project or Project.get()
    storage = storage or Storage.current()
    if sample is not None and sample < 1:
        raise UsageError(f"Invalid --sample {sample}: give a positive number of experiments.")
    spec = _execution_spec(project, execution, execution_config)
    ids: list[str] = []
    for module in check_modules(project, storage, modules) or [None]:
        if storage.root.is_dir():  # find() would create it
            ids.extend(e.experiment_id for e in storage.find(module, state="finished"))
    if sample is not None and sample < len(ids):
        ids = random.sample(ids, sample)
    groups: dict[tuple[str, str, str], list[_Original]] = {}
    for experiment_id in ids:
        original = _original(storage, experiment_id)
        groups.setdefault(original.checkout_key, []).append(original)
    reports: list[ReproductionReport] = []
    for group in groups.values():
        reports.extend(_reproduce_group(group, storage=storage, project=project, check=check, rtol=rtol, atol=atol,
                                        keep=keep, compare_output=compare_output, execution=spec, echo=echo,
                                        on_report=on_report))
    return reports


def reproductions(experiment: Any, storage: Storage | None = None) -> list[dict[str, Any]]:
    """The recorded reproduction attempts of an experiment (verdict.json documents), oldest first."""
    storage = storage or getattr(experiment, "storage", None) or Storage.current()
    experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
    return read_reproductions(storage.directory(storage.resolve(experiment_id)))


def read_reproductions(directory: Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``<directory>/reproductions/``, oldest first (for ``show``)."""
    folder = directory / REPRODUCTIONS
    out = []
    for attempt in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            verdict = read_json(attempt / "verdict.json")
        except (FileNotFoundError, NotADirectoryError, MachinableError):
            events = read_lines(attempt / "events.jsonl")
            verdict = {"verdict": "incomplete", "ok": False, "time": events[0].get("time") if events else None}
        out.append({**verdict, "directory": str(attempt)})
    return out


def describe_attempt(verdict: dict[str, Any]) -> str:
    """One line for a recorded attempt: ``reproduced: 4 of 4 match`` or what went wrong."""
    comparisons = [c for c in verdict.get("comparisons") or [] if isinstance(c, dict)]
    matched = sum(1 for c in comparisons if c.get("match"))
    tolerance = f" (rtol={verdict.get('rtol'):g}, atol={verdict.get('atol'):g})" if verdict.get("rtol") or verdict.get("atol") else ""
    kind = verdict.get("verdict")
    if kind == "error":
        return f"could not run: {_shorten(verdict.get('error'), 120)}"
    if kind == "incomplete":
        return "incomplete (the attempt stopped before its verdict)"
    if kind == "interrupted":
        return "interrupted (Ctrl-C) before its verdict"
    first = next((c for c in comparisons if not c.get("match")), None)
    if first is not None:
        return f"{kind}: {matched} of {len(comparisons)} match{tolerance}; {first.get('item')}: {_shorten(first.get('detail'), 100)}"
    return f"{kind}: {matched} of {len(comparisons)} match{tolerance}"


def _context(experiment: Any, storage: Storage | None, project: Any) -> tuple[Storage, Any]:
    from machinable.project import Project

    if not isinstance(experiment, str):
        storage = storage or experiment.storage
        project = project or experiment.project
    return storage or Storage.current(), project or Project.get()


def _original(storage: Storage, experiment_id: str) -> _Original:
    experiment_id = storage.resolve(experiment_id)
    directory = storage.directory(experiment_id)
    record = read_json(directory / "experiment.json")
    ledger = Ledger(directory)
    events = ledger.events()
    state = ledger.state(events)
    if state != "finished":
        raise UsageError(
            f"Experiment {experiment_id[:SHORT]} ({record['module']}) is {state}: only finished experiments can be "
            "reproduced. Launch it to finish it first."
        )
    git_json, git_diff = ledger.git_files(events)  # the state the finishing attempt ran with (a resume may differ from git.json)
    try:
        git_info = read_json(directory / git_json)
    except FileNotFoundError:
        git_info = {"repository": False}
    try:
        diff = (directory / git_diff).read_bytes()
    except FileNotFoundError:
        diff = b""
    return _Original(experiment_id, directory, record, git_info, diff)


def _execution_spec(project: Any, name: str | None, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Resolve and validate ``--execution NAME key=value...`` here, before any worktree exists.

    NAME is a project module or a built-in (``multiprocess`` for
    ``machinable.execution.multiprocess``); its config is checked as
    ``get()`` checks it. The spec carries the config as given: the
    reproduction process may hold an older version of a project execution
    (the one at the recorded commit), whose defaults are its own.
    """
    if not name:
        if config:
            raise UsageError("key=value pairs configure an execution: give --execution NAME before them.")
        return None
    module, cls = resolve_execution(project, name)
    cls(dict(config or {}), module=module, project=project)  # ConfigError names a bad key or value
    if not cls.blocking:
        raise UsageError(
            f"Execution {module!r} does not wait for its experiments (it submits them, like a cluster): "
            "reproduce compares the outputs when the run ends, so give an execution that waits, such as process or multiprocess."
        )
    return {"module": module, "config": dict(config or {})}


def resolve_execution(project: Any, name: str) -> tuple[str, type]:
    """``(module, Execution class)`` for a project module or a built-in execution's (short) name."""
    import difflib

    from machinable.execution import Execution
    from machinable.project import BUILTINS

    name = project.normalize_name(name)
    builtins = {n.rsplit(".", 1)[1]: n for n in BUILTINS if n.startswith("machinable.execution.")}
    try:
        project.module_file(name)
    except ModuleNotFound:
        if name in builtins:
            name = builtins[name]
        elif name not in BUILTINS:
            known = sorted(set(project.available_modules()) | set(builtins))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModuleNotFound(
                f"Unknown execution {name!r}: no {name.replace('.', '/')}.py in the project {project.path} and no built-in "
                f"of that name (built-ins: {', '.join(sorted(builtins))}).{hint}"
            ) from None
    try:
        cls = project.element_class(name)
    except MachinableError:
        raise
    except Exception as e:  # the user's module fails to import
        raise ModuleNotFound(f"Execution module {name!r} cannot be imported: {type(e).__name__}: {e}") from e
    if not issubclass(cls, Execution):
        raise ModuleNotFound(f"{name!r} holds {cls.__name__}, which is not an execution: --execution takes an execution "
                             "module, such as multiprocess or one of the project's.")
    return name, cls


# --- one worktree ---------------------------------------------------------------------


class _Checkout:
    """A temporary worktree at a commit with a diff applied; always removed unless kept."""

    def __init__(self, repo: Path, commit: str, diff: bytes, project_rel: Path, keep: bool) -> None:
        self.repo, self.commit, self.diff, self.keep = repo, commit, diff, keep
        self.root = Path(tempfile.mkdtemp(prefix="machinable-reproduce-"))
        self.worktree = self.root / "worktree"
        self.project = self.worktree / project_rel
        self.storage = self.root / "storage"
        self._added = False

    def __enter__(self) -> "_Checkout":
        from machinable import git

        try:
            git.create_worktree(self.repo, self.commit, self.worktree)
            self._added = True
            git.apply_diff(self.worktree, self.diff)
        except BaseException as e:
            self.remove()
            if isinstance(e, MachinableError):
                raise ReproductionError(str(e)) from None
            if isinstance(e, Exception):
                raise ReproductionError(f"Could not create a worktree at commit {self.commit[:SHORT]}: {e}") from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            with _deferred_interrupts():  # a second Ctrl-C must not leave a worktree behind
                self.remove()

    def remove(self) -> None:
        from machinable import git

        if self._added:
            try:
                git.remove_worktree(self.repo, self.worktree)
            except Exception:
                pass  # a pruned or half-made worktree: the folder goes below either way
        shutil.rmtree(self.root, ignore_errors=True)


def _reproduce_group(group: list[_Original], *, storage: Storage, project: Any, check: bool, rtol: float,
                     atol: float, keep: bool, compare_output: bool, execution: dict[str, Any] | None,
                     echo: bool, on_report: Callable[[ReproductionReport], None] | None = None) -> list[ReproductionReport]:
    """Reproduce experiments recorded from one commit + diff, sharing one worktree.

    Each experiment runs in its own process, or with ``execution`` the whole
    group in one process through that execution; ``on_report`` receives each
    report as soon as its experiment is compared.
    """
    reports = {
        o.id: ReproductionReport(experiment_id=o.id, module=o.record["module"], commit=o.git.get("commit"),
                                 dirty=bool(o.diff.strip()), rtol=rtol, atol=atol, checked=check)
        for o in group
    }
    attempts: dict[str, _Attempt] = {}
    begun: set[str] = set()

    def done(original: _Original) -> None:
        attempt = attempts.pop(original.id, None)
        if attempt is not None:
            attempt.close()
            if on_report is not None and not reports[original.id].interrupted:
                on_report(reports[original.id])

    try:
        for original in group:
            attempts[original.id] = _Attempt(original.directory, reports[original.id], execution)
        repo, commit = _checkout_source(project, group[0])
        with _Checkout(repo, commit, group[0].diff, group[0].project_rel, keep) as checkout:
            batches = [group] if execution is not None else [[o] for o in group]
            for i, batch in enumerate(batches):
                begun.update(o.id for o in batch)
                _run(checkout, i, batch, reports, execution, project.path, echo)
                for original in batch:
                    report = reports[original.id]
                    report.kept = checkout.root if keep else None
                    if report.reproduced_id:
                        reproduced = checkout.storage / report.reproduced_id
                        _compare(original, reproduced, report, check=check, compare_output=compare_output)
                        attempts[original.id].keep_output(reproduced / "output.log")
                    done(original)
    except ReproductionError as e:
        for original in group:
            if original.id in attempts:
                reports[original.id].error = str(e)
    except KeyboardInterrupt:
        # no verdict for the runs under way (recorded as interrupted); the rest were never attempted
        with _deferred_interrupts():
            for original in group:
                if original.id in attempts and original.id not in begun:
                    attempts.pop(original.id).discard()
                elif original.id in attempts:
                    reports[original.id].interrupted = True
        if echo and attempts:
            print(f"machinable: reproduce interrupted; {len(attempts)} attempt{'s' if len(attempts) != 1 else ''} "
                  "recorded as interrupted.", file=sys.stderr, flush=True)
        raise
    finally:
        with _deferred_interrupts():
            for original in group:
                done(original)
    return [reports[o.id] for o in group]


def _checkout_source(project: Any, original: _Original) -> tuple[Path, str]:
    from machinable import git

    name = f"Experiment {original.id[:SHORT]} ({original.record['module']})"
    if not original.git.get("repository"):
        raise ReproductionError(f"{name} was recorded outside a git repository: there is no commit to re-execute it at.")
    commit = original.git.get("commit")
    if not commit:
        raise ReproductionError(f"{name} was recorded before the repository's first commit: there is no commit to re-execute it at.")
    head = git.read_head(project.path)
    if head is None:
        raise ReproductionError(f"{project.path} is not inside a git repository: reproduce needs the history that holds commit {commit[:SHORT]}.")
    if not git.commit_exists(head.worktree, commit):
        raise ReproductionError(
            f"{name} was recorded at commit {commit[:SHORT]}, which is not in the repository {head.worktree}: it was "
            "rebased or amended away, or not fetched (in CI, check out the full history, e.g. fetch-depth: 0). "
            "Without it the experiment cannot be re-executed at its recorded code."
        )
    return head.worktree, commit


def _run(checkout: _Checkout, index: int, batch: list[_Original], reports: dict[str, ReproductionReport],
         execution: dict[str, Any] | None, origin: Path, echo: bool) -> None:
    """Execute a batch in one separate process (through ``execution`` if given)."""
    spec = {
        "project": str(checkout.project),
        "storage": str(checkout.storage),
        "execution": execution,
        "origin": str(origin),
        "experiments": [
            {"id": o.id, "module": o.record["module"], "config": o.record["config"], "seed": int(o.record["seed"])}
            for o in batch
        ],
    }
    prefix = f"[{batch[0].id[:SHORT]}] " if len(batch) == 1 else "[reproduce] "
    results, rc, tail = _child(checkout.root / f"spec-{index}.json", spec, checkout.project, prefix, echo)
    for original in batch:
        report = reports[original.id]
        report.output_tail = tail
        found = results.get(original.id)
        if found is None:
            report.state = "failed"
            report.comparisons.append(Comparison(
                "run", False, f"the reproduction process exited with code {rc} before running it: {_last_line(tail)}"))
            continue
        report.reproduced_id = found.get("id")
        if not report.reproduced_id:
            report.state = "failed"
            report.comparisons.append(Comparison("run", False, found.get("error") or _last_line(tail)))
            continue
        # the scratch ledger, not the child's word: the child may have died mid-run
        report.state = Ledger(checkout.storage / report.reproduced_id).state(check_claim=False)


def _child(spec_path: Path, spec: dict[str, Any], cwd: Path, prefix: str, echo: bool) -> tuple[dict[str, Any], int, str]:
    results_path = spec_path.with_suffix(".results.json")
    spec["results"] = str(results_path)
    atomic_write(spec_path, orjson.dumps(spec))
    env = {**os.environ, "MACHINABLE_STORAGE": spec["storage"], "PYTHONUNBUFFERED": "1"}
    env.pop("MACHINABLE_OUTPUT_PREFIX", None)
    command = [sys.executable, "-c", "from machinable.reproduce import _child_main; _child_main()", str(spec_path)]
    if not cwd.is_dir():
        return {}, -1, f"the project folder {cwd} does not exist at the recorded commit"
    tail: deque[str] = deque(maxlen=40)
    # its own process group: Ctrl-C reaches it (and its workers) once, from here, see _stop
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if echo:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
        rc = proc.wait()
    except KeyboardInterrupt:
        _stop(proc, prefix if echo else None)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    try:
        results = orjson.loads(results_path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        results = {}
    return results, rc, "".join(tail)


STOP_GRACE = 10.0  # seconds the reproduction process gets to end its run after Ctrl-C


def _stop(proc: subprocess.Popen[str], prefix: str | None) -> None:
    """Pass Ctrl-C on to the reproduction process group and let it end its run;
    kill it after ``STOP_GRACE`` seconds or at a second Ctrl-C."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=STOP_GRACE)
        if prefix is not None and rest:
            sys.stdout.write("".join(prefix + line for line in rest.splitlines(keepends=True)))
            sys.stdout.flush()
    except (KeyboardInterrupt, subprocess.TimeoutExpired, ProcessLookupError):
        pass
    finally:
        with _deferred_interrupts():
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """End the reproduction process and whatever it started (workers run in the worktree about to be removed)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class _deferred_interrupts:
    """Hold Ctrl-C back while cleanup runs (in the main thread); it is raised right after."""

    def __enter__(self) -> None:
        import signal
        import threading

        self.caught = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._catch)

    def _catch(self, *args: object) -> None:
        self.caught = True

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        import signal

        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
        if self.caught and exc_type is None:
            raise KeyboardInterrupt


def _child_main() -> None:
    """Entry point of the reproduction process (cwd: the worktree's project folder)."""
    os.environ["MACHINABLE_INTERRUPTED_HINT"] = "this reproduction attempt stopped; the original record is unchanged"
    try:
        _child_run(Path(sys.argv[1]))
    except KeyboardInterrupt:  # passed on by the parent, which records the attempt as interrupted
        sys.exit(130)


def _child_run(spec_path: Path) -> None:
    from machinable.experiment import Experiment
    from machinable.project import Project

    spec = orjson.loads(spec_path.read_bytes())
    results: dict[str, dict[str, Any]] = {}
    project = Project(spec["project"])
    storage = Storage.at(spec["storage"])
    made = []
    with project, storage:
        for item in spec["experiments"]:
            try:
                cls = project.element_class(item["module"], Experiment)
                experiment = cls(item["config"], module=item["module"], project=project, seed=item["seed"], storage=storage)
                experiment.commit()
                results[item["id"]] = {"id": experiment.experiment_id}
                made.append((item["id"], experiment))
            except Exception as e:
                traceback.print_exc()
                results[item["id"]] = {"error": f"{type(e).__name__}: {e}"}
        # written before running, so that the parent finds the runs even if this process dies in one
        atomic_write(Path(spec["results"]), orjson.dumps(results))
        if spec["execution"] is None:
            for _, experiment in made:
                try:
                    experiment()
                except Exception:  # the ledger's failed event has it; keep going
                    traceback.print_exc()
        elif made:
            _child_dispatch(project, spec["execution"], spec["origin"], [e for _, e in made])


def _child_dispatch(project: Any, spec: dict[str, Any], origin: str, experiments: list[Any]) -> None:
    from machinable.execution import Execution
    from machinable.project import BUILTINS

    name = spec["module"]
    try:
        cls = project.element_class(name, Execution)
    except ModuleNotFound:
        if name in BUILTINS:
            raise
        # an execution added after the recorded commit: take it from the working tree
        cls = type(project)(origin).element_class(name, Execution)
    execution = cls(spec["config"], module=name, project=project)
    try:
        with execution:
            for experiment in experiments:
                experiment.launch()
    except MachinableError as e:
        print(f"machinable: {e}", file=sys.stderr)


# --- comparing ------------------------------------------------------------------------


def _compare(original: _Original, reproduced: Path, report: ReproductionReport, *, check: bool, compare_output: bool) -> None:
    recorded = original.directory
    report.comparisons.append(_compare_run(report, reproduced))
    report.comparisons.append(_compare_code(recorded, reproduced))
    integrity = _original_integrity(recorded)
    if integrity is not None:  # only shown when something is wrong: an intact original is the norm
        report.comparisons.append(integrity)
    try:
        report.environment = environment_differences(read_json(recorded / "env.json"), read_json(reproduced / "env.json"))
    except (FileNotFoundError, MachinableError):
        pass
    if not check or report.state != "finished":
        return
    rtol, atol = report.rtol, report.atol
    report.comparisons.append(_compare_result(recorded / "data", reproduced / "data", rtol, atol))
    report.comparisons.append(_compare_records(recorded, reproduced, rtol, atol))
    names = sorted(set(_data_files(recorded / "data")) | set(_data_files(reproduced / "data")))
    for name in names:
        report.comparisons.append(_compare_file(f"data/{name}", recorded / "data" / name, reproduced / "data" / name, rtol, atol))
    if compare_output:
        report.comparisons.append(_compare_output(recorded / "output.log", reproduced / "output.log"))


def _original_integrity(recorded: Path) -> Comparison | None:
    """A mismatch when the original record fails ``verify``: outputs compared
    against a damaged or altered record prove nothing."""
    from machinable.storage import record_problems

    problems = record_problems(recorded.parent, recorded.name)
    if not problems:
        return None
    first = problems[0]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return Comparison("original", False, f"the original record fails verify: {first.file.split('/', 1)[-1]}: "
                                         f"{first.message}{more}; `machinable verify {recorded.name[:SHORT]}` lists every problem")


def _compare_run(report: ReproductionReport, reproduced: Path) -> Comparison:
    if report.state == "finished":
        same = report.reproduced_id == report.experiment_id
        return Comparison("run", True, "finished, same id" if same else f"finished as {report.reproduced_id}")
    events = read_lines(reproduced / "events.jsonl")
    failed = next((e for e in reversed(events) if e.get("event") == "failed"), None)
    detail = failed.get("error", "failed") if failed else f"did not finish (state {report.state})"
    if report.state in ("dispatched", "created"):
        detail += ": reproduce needs an execution that waits for its experiments"
    return Comparison("run", False, detail)


def _compare_code(recorded: Path, reproduced: Path) -> Comparison:
    try:
        before = read_json(recorded / "code.json").get("files", {})
        after = read_json(reproduced / "code.json").get("files", {})
    except (FileNotFoundError, MachinableError) as e:
        return Comparison("code", False, f"cannot compare: {e}")
    problems = [f"{p} missing" for p in sorted(set(before) - set(after))]
    problems += [f"{p} extra" for p in sorted(set(after) - set(before))]
    problems += [f"{p} differs" for p in sorted(set(before) & set(after)) if before[p].get("object") != after[p].get("object")]
    if problems:
        return Comparison("code", False, "the worktree's import closure is not the recorded one: " + ", ".join(problems))
    return Comparison("code", True, f"{len(before)} file{'s' if len(before) != 1 else ''} identical")


def _compare_result(recorded: Path, reproduced: Path, rtol: float, atol: float) -> Comparison:
    kind_a = next((n for n in RESULT_FILES if (recorded / n).exists()), None)
    kind_b = next((n for n in RESULT_FILES if (reproduced / n).exists()), None)
    if kind_a is None and kind_b is None:
        return Comparison("result", True, "none returned")
    if kind_a != kind_b and not (kind_a and kind_b):
        return Comparison("result", False, f"recorded {kind_a or 'none'}, reproduced {kind_b or 'none'}")
    if kind_a != kind_b:
        # a record from before array results were pickled holds them as JSON lists: compare the values
        a, b = _load_result(recorded / kind_a), _load_result(reproduced / kind_b)
        if a is _UNLOADABLE or b is _UNLOADABLE:
            return Comparison("result", False, f"recorded {kind_a}, reproduced {kind_b} (cannot be loaded here to compare)")
        return _verdict("result", list(_differences(_listed(a), _listed(b), rtol, atol, "result")), "values match")
    if kind_a == "result.json":
        a = loads_value((recorded / kind_a).read_bytes())
        b = loads_value((reproduced / kind_a).read_bytes())
        return _verdict("result", list(_differences(a, b, rtol, atol, "result")), _short(a))
    exact = _compare_digest("result", recorded / kind_a, reproduced / kind_a)
    if exact.match:
        return exact
    # a pickled result holding numpy arrays: compared by value, within the tolerances, as .npy data files are
    loaded = _load_pickles(recorded / kind_a, reproduced / kind_a)
    if loaded is None or not (_holds_array(loaded[0]) or _holds_array(loaded[1])):
        return exact
    a, b = loaded
    return _verdict("result", list(_differences(a, b, rtol, atol, "result")), "array values match")


def _compare_records(recorded: Path, reproduced: Path, rtol: float, atol: float) -> Comparison:
    a = read_lines(recorded / "records.jsonl")
    b = read_lines(reproduced / "records.jsonl")
    if len(a) != len(b):
        return Comparison("records", False, f"recorded {len(a)} rows, reproduced {len(b)}")
    return _verdict("records", list(_differences(a, b, rtol, atol, "records")), f"{len(a)} row{'s' if len(a) != 1 else ''}")


def _data_files(folder: Path) -> list[str]:
    """The saved data files, without the returned result's own files (data/result.json, data/result.pickle)."""
    if not folder.is_dir():
        return []
    return [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in RESULT_FILES
        and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    ]


def _compare_file(item: str, a: Path, b: Path, rtol: float, atol: float) -> Comparison:
    if not b.exists():
        return Comparison(item, False, "missing in the reproduction")
    if not a.exists():
        return Comparison(item, False, "only in the reproduction")
    suffix = a.suffix.lower()
    if suffix == ".json":
        try:
            x, y = loads_value(a.read_bytes()), loads_value(b.read_bytes())
        except orjson.JSONDecodeError:
            return _compare_digest(item, a, b)
        return _verdict(item, list(_differences(x, y, rtol, atol, item)), "values match")
    if suffix == ".npy":
        try:
            return _compare_npy(item, a, b, rtol, atol)
        except ImportError:
            pass
    return _compare_digest(item, a, b)


def _compare_digest(item: str, a: Path, b: Path) -> Comparison:
    same = file_digest(a) == file_digest(b)
    return Comparison(item, same, "identical bytes" if same else "content differs (exact comparison)")


def _compare_npy(item: str, a: Path, b: Path, rtol: float, atol: float) -> Comparison:
    import numpy

    return _compare_arrays(item, numpy.load(a, allow_pickle=False), numpy.load(b, allow_pickle=False), rtol, atol)


def _is_array(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _holds_array(value: Any) -> bool:
    if _is_array(value):
        return True
    if isinstance(value, dict):
        return any(_holds_array(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_array(v) for v in value)
    return False


_UNLOADABLE = object()


def _load_result(path: Path) -> Any:
    if path.name == "result.json":
        return loads_value(path.read_bytes())
    loaded = _load_pickles(path, path)
    return _UNLOADABLE if loaded is None else loaded[0]


def _listed(value: Any) -> Any:
    """Arrays as the lists JSON stored them as (tuples too), to compare a pickled result with a JSON one."""
    if _is_array(value):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    return value


def _load_pickles(a: Path, b: Path) -> tuple[Any, Any] | None:
    """Both pickled results, or None if either cannot be loaded here (a class of
    the recorded commit's code, say): then only their bytes are compared."""
    import pickle

    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return pickle.load(fa), pickle.load(fb)  # noqa: S301 - the record's own result and its re-execution's
    except Exception:
        return None


def _compare_arrays(item: str, x: Any, y: Any, rtol: float, atol: float) -> Comparison:
    import numpy

    if x.shape != y.shape or x.dtype != y.dtype:
        return Comparison(item, False, f"recorded {x.dtype}{list(x.shape)}, reproduced {y.dtype}{list(y.shape)}")
    if x.dtype.kind in "fc":
        bound = numpy.maximum(rtol * numpy.maximum(numpy.abs(x), numpy.abs(y)), atol)
        with numpy.errstate(invalid="ignore"):
            close = (x == y) | (numpy.abs(x - y) <= bound) | (numpy.isnan(x) & numpy.isnan(y))
    else:
        close = x == y
    bad = int(close.size - numpy.count_nonzero(close))
    if bad:
        where = tuple(int(i) for i in numpy.argwhere(~close)[0])
        return Comparison(item, False, f"{bad} of {close.size} values differ; first at {list(where)}: "
                                       f"recorded {x[where].item()!r}, reproduced {y[where].item()!r}")
    return Comparison(item, True, f"{x.dtype}{list(x.shape)} values match")


def _compare_output(a: Path, b: Path) -> Comparison:
    def last_attempt(path: Path) -> list[str]:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        starts = [i for i, line in enumerate(lines) if line.startswith("--- attempt ")]
        return lines[starts[-1] + 1:] if starts else lines

    x, y = last_attempt(a), last_attempt(b)
    for i, (left, right) in enumerate(zip(x, y)):
        if left != right:
            return Comparison("output", False, f"line {i + 1}: recorded {left!r}, reproduced {right!r}")
    if len(x) != len(y):
        return Comparison("output", False, f"recorded {len(x)} lines, reproduced {len(y)}")
    return Comparison("output", True, f"{len(x)} lines identical")


def _verdict(item: str, differences: list[str], detail: str) -> Comparison:
    if not differences:
        return Comparison(item, True, detail)
    shown = "; ".join(differences[:3])
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    return Comparison(item, False, shown + more)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def close(a: float, b: float, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """``math.isclose`` semantics: |a-b| <= max(rtol * max(|a|, |b|), atol); NaN equals NaN."""
    if a == b:
        return True
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    except OverflowError:
        return False


def _differences(a: Any, b: Any, rtol: float, atol: float, path: str) -> Iterator[str]:
    if _is_array(a) or _is_array(b):
        if not (_is_array(a) and _is_array(b)):
            yield f"{path}: recorded {type(a).__name__}, reproduced {type(b).__name__}"
            return
        compared = _compare_arrays(path, a, b, rtol, atol)
        if not compared.match:
            yield f"{path}: {compared.detail}"
        return
    if isinstance(a, tuple) and isinstance(b, tuple):  # from a pickled result
        a, b = list(a), list(b)
    if _is_number(a) and _is_number(b):
        if not close(a, b, rtol, atol):
            yield f"{path}: recorded {a!r}, reproduced {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}"
            if key not in b:
                yield f"{where}: missing in the reproduction"
            elif key not in a:
                yield f"{where}: only in the reproduction"
            else:
                yield from _differences(a[key], b[key], rtol, atol, where)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}: recorded {len(a)} items, reproduced {len(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _differences(x, y, rtol, atol, f"{path}[{i}]")
    elif type(a) is not type(b) or a != b:
        yield f"{path}: recorded {_short(a)}, reproduced {_short(b)}"


# --- the attempt record -----------------------------------------------------------------


class _Attempt:
    """``<id>/reproductions/<time>/``: events.jsonl, verdict.json, output.log of one attempt."""

    def __init__(self, directory: Path, report: ReproductionReport, execution: dict[str, Any] | None) -> None:
        self.report = report
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self.path = _reproductions_folder(directory) / f"{stamp}-{uuid.uuid4().hex[:6]}"
        try:
            self.path.mkdir(mode=DIR_MODE)
        except OSError as e:
            from machinable.storage import _storage_error

            raise _storage_error(e, "reproduction record", self.path) from e
        report.record = self.path
        self.ledger = Ledger(self.path)
        self.ledger.append("started", commit=report.commit, dirty=report.dirty, rtol=report.rtol, atol=report.atol,
                           execution=execution)

    def keep_output(self, log: Path) -> None:
        if log.is_file():
            atomic_write(self.path / "output.log", log.read_bytes(), what="reproduction output")  # storage file modes

    def discard(self) -> None:
        """Remove the record of an attempt that never ran (Ctrl-C stopped the ones before it)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        report = self.report
        write_json(self.path / "verdict.json", {"time": _now(), **report.as_json()})
        if report.error is not None:
            self.ledger.append("failed", error=report.error)
        elif report.interrupted:
            self.ledger.append("interrupted", reason="Ctrl-C")
        else:
            self.ledger.append("finished", verdict=report.verdict, ok=report.ok)


def _reproductions_folder(directory: Path) -> Path:
    """The writable folder beside a sealed (read-only) record."""
    import stat

    folder = directory / REPRODUCTIONS
    if folder.is_dir():
        return folder
    try:
        folder.mkdir(mode=DIR_MODE)
    except PermissionError:
        # a record sealed before reproductions/ was made at seal time
        mode = stat.S_IMODE(directory.stat().st_mode)
        os.chmod(directory, mode | stat.S_IWUSR)
        try:
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
        finally:
            os.chmod(directory, mode)
    except FileExistsError:
        pass
    return folder


# --- formatting -------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else dumps_value(value).decode()
    return _shorten(text, limit)


def _shorten(text: str | None, limit: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _table(headers: list[str], rows: list[list[str]], *, header: bool = True) -> list[str]:
    """Plain aligned columns (no wrapping, so CI logs and pipes stay readable)."""
    widths = [max([len(h) if header else 0, *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers] if header else []
    lines.extend(rows)
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]


def _varying_keys(rows: list[StatusRow]) -> dict[str, list[str]]:
    """Per module, the config keys whose values differ between the rows (the rest is noise)."""
    from machinable.config import flatten

    values: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        flat = flatten(row.config)
        keys = values.setdefault(row.module, {})
        for key, value in flat.items():
            keys.setdefault(key, set()).add(orjson.dumps(value).decode())
    return {module: [k for k, v in keys.items() if len(v) > 1] for module, keys in values.items()}


def _config_text(config: dict[str, Any], keys: list[str]) -> str:
    from machinable.config import flatten
    from machinable.diff import format_value  # as list/show/diff print values (NaN as nan)

    flat = flatten(config)
    text = " ".join(f"{k}={format_value(flat[k])}" for k in keys if k in flat)
    return _shorten(text, 40) or "-"
