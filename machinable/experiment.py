"""Experiments: get-or-create by content address, run-once launch, records, data.

An experiment's id is the digest of (config hash, code hash, seed): the same
module source, configuration and seed always name the same record. Launching
a finished experiment does nothing; launching a failed or interrupted one
resumes it in place.
"""

from __future__ import annotations

import os
import pickle
import secrets
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from machinable.config import canonical, config_class, make_config
from machinable.element import Element
from machinable.errors import CodeChangedError, ConfigError, ModuleNotFound, RecordError, StorageError, StorageFormatError
from machinable.hashing import CACHE, Closure, closure_of, digest, hex_of
from machinable.ledger import Ledger
from machinable.storage import (
    ATTEMPTS,
    DIR_MODE,
    FILE_MODE,
    OBJECTS_LOCK,
    Claim,
    Storage,
    atomic_write,
    begin_seal,
    complete_seal,
    document_problem,
    dumps_value,
    is_sealed,
    json_bytes,
    ledger_problems,
    loads_value,
    make_dirs,
    make_temp_dir,
    publish_dir,
    put_object,
    read_json,
    remove_temp_files,
    repair_torn_tail,
    seal,
    silence,
    sync_paths,
    write_unpublished,
)

SHORT = 12
#: the files in data/ that hold the value on_execute returns (one of them, or none)
RESULT_FILES = ("result.json", "result.pickle")


class ConfigView:
    """Read-only attribute/item access to a stored config (no user code)."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            value = self._values[key]
        except KeyError:
            raise AttributeError(key) from None
        return ConfigView(value) if isinstance(value, dict) else value

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("stored configs are read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigView) and other._values == self._values

    def keys(self) -> list[str]:
        return list(self._values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


# Seeds are ints in [0, 2**63): every one fits a signed 64-bit integer, as stored
# JSON, SQLite and torch.manual_seed take it; numpy's legacy seeding takes the
# seed modulo 2**32 (see seed_everything).
SEED_LIMIT = 2**63


def new_seed() -> int:
    return secrets.randbits(31)


def check_seed(seed: Any) -> int:
    """``seed`` as an int in [0, 2**63), or a ConfigError naming it."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ConfigError(f"Invalid seed {seed!r} ({type(seed).__name__}): a seed is an int from 0 to 2**63 - 1.")
    value = int(seed.__index__())  # numpy integers too
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"Invalid seed {value}: a seed is an int from 0 to 2**63 - 1 ({SEED_LIMIT - 1}).")
    return value


def config_hash_of(module: str, config: Any) -> str:
    return digest({"module": module, "config": canonical(config)})


def experiment_id_of(config_hash: str, code_hash: str, seed: int) -> str:
    return hex_of(digest({"config_hash": config_hash, "code_hash": code_hash, "seed": str(seed)}))


class _Tee:
    """Writes to the terminal and to output.log at once (live and saved).

    A terminal side that goes away (``machinable train --launch | head``) stops
    the echo, not the run: output.log still gets every line.
    """

    def __init__(self, stream: Any, log: Any, prefix: str = "") -> None:
        self._stream, self._log, self._prefix = stream, log, prefix
        self._partial = ""
        self._closed = False

    def write(self, text: str) -> int:
        try:
            self._log.write(text)
            self._log.flush()
        except (OSError, ValueError):
            pass
        if self._prefix:
            return self._write_lines(text)
        self._echo(text, flush="\n" in text)  # live, line by line, even when stdout is a pipe (CI logs, job logs)
        return len(text)

    def _write_lines(self, text: str) -> int:
        # Parallel workers share one terminal: a prefixed line goes out whole,
        # in one write, so another worker's output cannot split it.
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if len(self._partial) > 65536:  # no newline in sight (a progress bar): do not hold it forever
            lines.append(self._partial)
            self._partial = ""
        if lines:
            self._echo("".join(f"{self._prefix}{line}\n" for line in lines), flush=True)
        return len(text)

    def _echo(self, text: str, flush: bool) -> None:
        if self._closed:
            return
        try:
            if text:
                self._stream.write(text)
            if flush:
                self._stream.flush()
        except BrokenPipeError:
            self._closed = True
            silence(self._stream)

    def finish(self) -> None:
        """Write out a last line that did not end in a newline."""
        if self._partial:
            self._echo(f"{self._prefix}{self._partial}\n", flush=False)
            self._partial = ""
        self._echo("", flush=True)

    def flush(self) -> None:
        self._echo("", flush=True)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Experiment(Element):
    """Base class of experiments: subclass it in a project module.

    Override ``on_execute`` (and optionally the other ``on_*`` hooks). Inside,
    ``self.config``, ``self.seed``, ``self.record(...)``, ``self.save_data(...)``
    are available.
    """

    _machinable_abstract = True
    kind = "experiment"

    def __init__(self, config: dict[str, Any] | None = None, *, module: str | None = None, project: Any = None,
                 seed: int | None = None, storage: Storage | None = None) -> None:
        super().__init__(config, module=module, project=project)
        self._seed = check_seed(seed) if seed is not None else new_seed()
        self._storage = storage
        self._timestamp = datetime.now(timezone.utc)
        self._closure: Closure | None = None
        self._record: dict[str, Any] | None = None
        self._code_hash: str | None = None
        self._execution_info: dict[str, Any] | None = None
        self._adopt_existing = False  # set by get(): see commit()
        self._created_git: tuple[dict[str, Any], bytes] | None = None  # git.json and git.diff, when written here

    # --- identity ----------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage.current(self.project)
        return self._storage

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def timestamp(self) -> datetime:
        return self._timestamp

    @property
    def config_hash(self) -> str:
        if self._record is not None:
            return self._record["config_hash"]
        return config_hash_of(self.module, self._config)

    @property
    def closure(self) -> Closure:
        if self._closure is None:
            entry = self.project.module_file(self.module)
            if self.module.startswith("machinable."):
                root = Path(entry).parents[len(self.module.split(".")) - 1]
            else:
                root = self.project.path
            self._closure = closure_of(root, entry, exclude=(self.storage.root,), cache_dir=self.storage.root / CACHE)
        return self._closure

    @property
    def code_hash(self) -> str:
        if self._code_hash is None:
            self._code_hash = self._record["code_hash"] if self._record is not None else self.closure.code_hash
        return self._code_hash

    @property
    def experiment_id(self) -> str:
        if self._record is not None:
            return self._record["id"]
        return experiment_id_of(self.config_hash, self.code_hash, self._seed)

    id = experiment_id

    @property
    def short_id(self) -> str:
        return self.experiment_id[:SHORT]

    @property
    def directory(self) -> Path:
        return self.storage.directory(self.experiment_id)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.directory)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.short_id} {self.module} ({self.state})>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Experiment) and other.experiment_id == self.experiment_id

    def __hash__(self) -> int:
        return hash(self.experiment_id)

    # --- lookup / restore ---------------------------------------------------------

    @classmethod
    def restore(cls, storage: Storage, experiment_id: str, *, element_class: type | None = None, project: Any = None) -> "Experiment":
        """An experiment object for a stored record.

        Without ``element_class`` no user code is imported: the config is a
        read-only view of the stored values (enough to inspect, diff, list).
        """
        directory = storage.directory(experiment_id)
        try:
            record = read_json(directory / "experiment.json")
        except FileNotFoundError:
            raise StorageError(f"Experiment {experiment_id} has no experiment.json in {directory}.") from None
        target = element_class or Experiment
        obj = target.__new__(target)
        from machinable.project import Project

        obj.project = project or Project.get()
        obj.module = record["module"]
        obj._seed = int(record["seed"])
        obj._storage = storage
        obj._timestamp = datetime.fromisoformat(record["timestamp"])
        obj._closure = None
        obj._record = record
        obj._code_hash = record["code_hash"]
        obj._execution_info = None
        obj._adopt_existing = False
        obj._created_git = None
        if element_class is not None:
            try:
                obj._config = make_config(config_class(element_class), record["config"], where=record["module"])
            except ConfigError:
                obj._config = ConfigView(record["config"])
        else:
            obj._config = ConfigView(record["config"])
        return obj

    def _runnable(self) -> "Experiment":
        """This experiment as an instance of its module's class (imports user code)."""
        if type(self) is not Experiment:
            return self
        cls = self.project.element_class(self.module, Experiment)
        return Experiment.restore(self.storage, self.experiment_id, element_class=cls, project=self.project)

    @property
    def stale_siblings(self) -> list["Experiment"]:
        """Experiments with this config but another code hash (older code)."""
        if not self.storage.root.is_dir():
            return []
        rows = self.storage.fresh_index().with_config(self.config_hash)
        return [
            Experiment.restore(self.storage, row["id"])
            for row in rows
            if row["code_hash"] != self.code_hash and self.storage.directory(row["id"]).is_dir()
        ]

    def replicate(self) -> "Experiment":
        """A new experiment with the same config (and code): new seed, new id."""
        cls = type(self) if type(self) is not Experiment else self.project.element_class(self.module, Experiment)
        config = self._config.as_dict() if hasattr(self._config, "as_dict") else dict(self._config)
        return cls(config, module=self.module, project=self.project, storage=self.storage)

    def replicates(self) -> list["Experiment"]:
        """Every stored experiment with this config hash (any seed), newest first."""
        if not self.storage.root.is_dir():
            return []
        rows = self.storage.fresh_index().with_config(self.config_hash)
        return [Experiment.restore(self.storage, r["id"]) for r in rows if self.storage.directory(r["id"]).is_dir()]

    def diff(self, other: "Experiment | str") -> Any:
        """What differs between this stored experiment and ``other`` (an experiment
        or an id prefix), section by section: config, code, git, environment,
        outputs; ``.verdict`` says why the ids differ. Print it, or read
        ``.sections`` / ``.as_json()``."""
        from machinable.diff import diff

        return diff(self, other, self.storage)

    def reproduce(self, check: bool = True, *, rtol: float = 0.0, atol: float = 0.0, keep: bool = False,
                  compare_output: bool = False) -> Any:
        """Re-execute this finished experiment in isolation (recorded commit + diff, same
        config and seed, scratch storage, separate process) and compare its outputs.

        Returns a ``ReproductionReport`` (``report.ok``, ``report.mismatches``);
        ``check=False`` re-executes without comparing. See ``machinable.reproduce``.
        """
        from machinable.reproduce import reproduce

        return reproduce(self, check=check, rtol=rtol, atol=atol, keep=keep, compare_output=compare_output)

    # --- state --------------------------------------------------------------------

    def is_committed(self) -> bool:
        return self._record is not None or (self.directory / "experiment.json").exists()

    @property
    def state(self) -> str:
        """created (or 'new' if not stored yet), dispatched, running, finished, failed, interrupted."""
        if not self.is_committed():
            return "new"
        return self.ledger.state()

    def is_finished(self) -> bool:
        return self.is_committed() and self.ledger.state(check_claim=False) == "finished"

    def is_failed(self) -> bool:
        return self.state == "failed"

    def is_started(self) -> bool:
        return self.is_committed() and self.ledger.attempts() > 0

    def is_active(self) -> bool:
        return self.state == "running"

    def events(self) -> list[dict[str, Any]]:
        return self.ledger.events() if self.is_committed() else []

    def wait(self, timeout: float | None = None, *, poll: float = 1.0) -> "Experiment":
        """Block until the experiment is finished, failed or interrupted; returns it.

        For a non-blocking execution (a cluster) the execution's ``reconcile``
        is asked while the experiment is dispatched, so a cancelled or vanished
        job ends the wait too. Raises ``WaitTimeout`` after ``timeout`` seconds.
        """
        from machinable.errors import UsageError, WaitTimeout
        from machinable.ledger import TERMINAL

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.state
            if state in ("new", "created"):
                raise UsageError(f"Experiment {self.short_id} ({self.module}) was never launched: nothing to wait for. Call launch() first.")
            if state == "dispatched":
                self._reconcile()
                state = self.state
            if state in TERMINAL:
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"Experiment {self.short_id} ({self.module}) is still {state} after {timeout:g} s.")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, poll)

    def _reconcile(self) -> dict[str, Any]:
        """Ask the execution that last dispatched this experiment about it (a scheduler, say)."""
        from machinable.execution import Execution

        dispatched = next((e for e in reversed(self.events()) if e.get("event") == "dispatched"), None)
        module = ((dispatched or {}).get("execution") or {}).get("module")
        if not module:
            return {}
        cls = self.project.element_class(module, Execution)
        if cls.blocking:
            return {}
        return cls.reconcile([self]).get(self.experiment_id, {})

    # --- storing ------------------------------------------------------------------

    def commit(self) -> "Experiment":
        """Write the record (idempotent). Launch does this for you.

        An experiment made by ``get()`` (get-or-create) re-checks under a lock
        whether another process created one with the same config and code in
        the meantime, and becomes that one (its id and seed) if so: N
        processes calling ``get(m, c).launch()`` at once run one experiment.
        """
        if self._record is not None:
            return self
        storage = self.storage
        if (self.directory / "experiment.json").exists():
            self._load_record()
            return self
        storage.ensure_writable()
        closure = self.closure
        if not getattr(self, "_adopt_existing", False):
            with storage.lock(OBJECTS_LOCK, shared=True):  # gc sweeps objects only between commits
                self._write_record(closure)
            return self
        # 256 lock stripes, not one lock file per config: the same config always takes
        # the same stripe, and storage/.locks stays small at any number of configs
        with storage.lock(f"create-{hex_of(self.config_hash)[:2]}"):
            found = storage.fresh_index().newest(self.config_hash, closure.code_hash)
            if found is not None and (storage.directory(found) / "experiment.json").exists():
                self._load_record(found)
            else:
                with storage.lock(OBJECTS_LOCK, shared=True):
                    self._write_record(closure)
        return self

    def _write_record(self, closure: Closure) -> None:
        storage = self.storage
        directory = self.directory
        experiment_id = self.experiment_id
        self.on_create()
        from machinable import environment, git

        record = {
            "id": experiment_id,
            "module": self.module,
            "config": self.config_json(),
            "config_hash": self.config_hash,
            "code_hash": closure.code_hash,
            "seed": self._seed,
            "timestamp": self._timestamp.isoformat(timespec="microseconds"),
            "algorithm": "xxh3-128",
            "project": str(self.project.path),
        }
        for path, info in closure.files.items():
            put_object(storage.root, info.raw, info.source)
        git_info, git_diff = git.capture(self.project.path, exclude=[storage.root])
        self._created_git = (git_info, git_diff)
        tmp = make_temp_dir(storage.root)
        try:
            # the folder is published by one rename: its files need no renames of their
            # own, only to be durable before it (one concurrent fsync of all of them)
            contents = {
                "experiment.json": json_bytes(record),
                "code.json": json_bytes(closure.as_json()),
                "git.json": json_bytes(git_info),
                "git.diff": git_diff,  # empty for a clean tree
                "env.json": json_bytes(environment.capture(closure.third_party)),
                "output.log": b"",
                "records.jsonl": b"",
            }
            for name, data in contents.items():
                write_unpublished(tmp / name, data)
            Ledger(tmp).append("created", sync=False)
            (tmp / "data").mkdir(mode=DIR_MODE)
            sync_paths([*(tmp / name for name, data in contents.items() if data), tmp / "events.jsonl", tmp / "data", tmp])
            index = storage.index
            row = storage.read_row(experiment_id, directory=tmp)  # exactly what a rebuild derives
            index.upsert(row)  # before the rename: a directory never exists unindexed
            before = index.fresh_mtime()
            published = publish_dir(tmp, directory)
            index.note_published(before, row if published else None)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if published:
            self._record = record
        else:  # the same id (an explicit seed) was stored concurrently: use that record
            row = storage.read_row(experiment_id)
            if row is not None:
                storage.index.upsert(row)
            self._load_record()

    def _load_record(self, experiment_id: str | None = None) -> None:
        record = read_json(self.storage.directory(experiment_id or self.experiment_id) / "experiment.json")
        self._record = record
        self._seed = int(record["seed"])
        self._code_hash = record["code_hash"]
        self._timestamp = datetime.fromisoformat(record["timestamp"])

    # --- launching ----------------------------------------------------------------

    def launch(self) -> None:
        """Run the experiment through the active execution (in-process by default).

        Finished: nothing happens. Failed or interrupted: resumes in place.
        Inside ``with execution:`` the launch is queued and dispatched when
        the block exits. Returns None, so that ``experiment.launch()`` in a
        REPL shows the experiment's own output and nothing else.
        """
        from machinable.execution import Execution

        execution = Element.current(Execution)
        if execution is None:
            from machinable.executions.local import Local

            execution = Local()
        execution.add(self)

    def __call__(self) -> str:
        """Execute now, in this process (what executions call). Returns the state.

        The dispatching execution's ``on_before_execute``/``on_after_execute``
        hooks run around it, here (in a worker: on a copy of the execution
        rebuilt from its module and config).
        """
        runnable = self._runnable()
        runnable._execution_info = self._execution_info
        execution = getattr(self, "_execution", None)
        if execution is None and self._execution_info:
            from machinable.execution import rebuild

            execution = self._execution = rebuild(self._execution_info, self.project)
        if execution is not None:
            execution.on_before_execute(runnable)
        state = runnable._execute()
        if execution is not None:
            execution.on_after_execute(runnable, state)
        return state

    def __reduce__(self) -> Any:
        # Experiments travel to workers by address, not by value: the worker
        # reloads the record and imports the module from the project.
        self._pickled = True  # lets dispatch tell "sent but never started" from "never sent"
        return (_restore_for_execution, (str(self.project.path), str(self.storage.root), self.experiment_id, self._execution_info))

    def _mark_dispatched(self, info: dict[str, Any] | None) -> bool:
        """Append a ``dispatched`` event unless the experiment finished meanwhile.

        Checked under the claim, because the finishing run seals the record
        while holding it: an event appended after the seal would change a
        sealed record. False when the experiment is finished.
        """
        if is_sealed(self.directory):
            return False
        claim = Claim(self.directory)
        if not claim.try_acquire():
            return True  # it is running elsewhere right now; that run writes its own events
        try:
            if self.ledger.state(check_claim=False) == "finished":
                return False
            # not synced: durable with the "started" event (same file) that follows;
            # lost in a power cut before it, the experiment is simply not dispatched yet
            self.ledger.append("dispatched", execution=info, sync=False)
            return True
        finally:
            claim.release()

    def _complete_seal(self) -> None:
        """Seal a finished record whose run was killed while sealing it."""
        if complete_seal(self.directory):
            self.storage.refresh_state(self.experiment_id)  # finished

    def _check_code_unchanged(self) -> None:
        current = closure_of(self.project.path, self.project.module_file(self.module), exclude=(self.storage.root,), cache_dir=self.storage.root / CACHE) if not self.module.startswith("machinable.") else None
        if current is not None and current.code_hash != self.code_hash:
            recorded = read_json(self.directory / "code.json").get("files", {})
            changed = sorted(
                set(recorded) ^ set(current.files)
                | {p for p in recorded if p in current.files and recorded[p]["normalized"] != current.files[p].normalized}
            )
            raise CodeChangedError(
                f"Experiment {self.short_id} ({self.module}) cannot resume: its code changed since it was created "
                f"(changed: {', '.join(changed) or 'import closure'}). Resuming would mix code versions. "
                f"Restore the code, or start a new experiment with get.new({self.module!r}, ...) / `--force-new`."
            )

    def _execute(self) -> str:
        self.commit()
        directory, ledger = self.directory, self.ledger
        claim = Claim(directory)
        waited_since: float | None = None
        delay = 0.02
        while True:
            if is_sealed(directory):
                return "finished"
            if claim.try_acquire():
                break
            if waited_since is None:
                waited_since = time.time()
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        try:
            events = ledger.events()
            state = ledger.state(events, check_claim=False)
            if state == "finished":
                complete_seal(directory)  # a crash interrupted the finishing run's seal
                self.storage.refresh_state(self.experiment_id)  # finished
                return "finished"
            last = ledger.last(events)
            if waited_since is not None and state == "failed" and last and _after(last.get("time"), waited_since):
                return "failed"  # the run we waited for failed: do not rerun it unasked
            self._check_code_unchanged()
            return self._run_claimed(ledger, claim, events)
        finally:
            claim.release()

    def _run_claimed(self, ledger: Ledger, claim: Claim, events: list[dict[str, Any]]) -> str:
        """Run the next attempt; ``events`` are the ledger as read under the claim
        (a torn last line, which the repair below cuts, is not among them)."""
        storage = self.storage
        attempt = ledger.attempts(events) + 1
        ledger.repair()
        repair_torn_tail(self.directory / "records.jsonl")  # a row torn by a crash would swallow the next one
        remove_temp_files(self.directory)  # of atomic writes a crash interrupted
        if ledger.attempt_is_open(events):
            ledger.append("interrupted", reason="the process running it stopped without finishing")
        git_state = self._record_attempt_git(attempt)
        try:  # where this attempt's record() rows begin, for records(attempt=...)
            records_from = os.stat(self.directory / "records.jsonl").st_size
        except FileNotFoundError:
            records_from = 0
        ledger.append("started", attempt=attempt, execution=self._execution_info, git=git_state, records_from=records_from)
        storage.refresh_state(self.experiment_id)  # running
        claim.start_heartbeat()
        log = open(self.directory / "output.log", "a", encoding="utf-8", errors="replace", opener=_private_opener)
        if attempt > 1:
            log.write(f"--- attempt {attempt} ({_now()}) ---\n")
        prefix = os.environ.get("MACHINABLE_OUTPUT_PREFIX", "")
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, log, prefix), _Tee(stderr, log, prefix)
        try:
            try:
                imported = set(sys.modules)
                self.on_before_execute()
                result = self.on_execute()
                saved = self._save_result(result)
                self.on_success()
                self.on_after_execute()
                self._warn_untracked_imports(imported)
            except (KeyboardInterrupt, SystemExit) as e:
                # the traceback goes to events.jsonl; the terminal gets one line per experiment
                ledger.append("interrupted", reason=type(e).__name__, attempt=attempt, traceback=traceback.format_exc())
                storage.refresh_state(self.experiment_id)  # interrupted
                if isinstance(e, KeyboardInterrupt):
                    cause = "Ctrl-C"
                elif type(e) is SystemExit:
                    cause = f"sys.exit({e.code!r})"
                else:  # a named exit, such as the Slurm job's TerminatedBySlurm on SIGTERM
                    cause = f"{type(e).__name__}, exit {e.code!r}"
                # a reproduction runs in a scratch storage: relaunching there resumes nothing of the user's
                hint = os.environ.get("MACHINABLE_INTERRUPTED_HINT") or "launching again resumes it"
                line = f"machinable: interrupted: {self.short_id} ({cause}); {hint}\n"
                for tee in (sys.stdout, sys.stderr):
                    if isinstance(tee, _Tee):
                        tee.finish()
                log.write(line)
                stderr.write(line)  # not through the tee: the line names the experiment, no prefix needed
                raise
            except BaseException as e:
                text = traceback.format_exc()
                sys.stderr.write(text)
                try:
                    self.on_failure(e)
                    self.on_after_execute()
                except Exception:
                    sys.stderr.write(traceback.format_exc())
                ledger.append("failed", attempt=attempt, error=f"{type(e).__name__}: {e}", traceback=text)
                storage.refresh_state(self.experiment_id)  # failed
                return "failed"
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee):
                    tee.finish()
            sys.stdout, sys.stderr = stdout, stderr
            log.close()
        claim.stop_heartbeat()  # no heartbeat may land after the seal
        if not claim.holds():
            # our heartbeat went stale (a frozen process) and another launch took over: it owns the record now
            sys.stderr.write(
                f"machinable: experiment {self.short_id} was taken over by another launch while this process "
                "was unresponsive; this attempt's result is discarded.\n"
            )
            return "interrupted"
        begin_seal(self.directory)  # from here on, a crash is completed by the next launch
        ledger.append("finished", attempt=attempt, result=saved, sync=False)  # synced by the seal, with the rest
        storage.refresh_state(self.experiment_id)  # finished
        seal(self.directory)
        return "finished"

    def _warn_untracked_imports(self, before: set[str]) -> None:
        """Say so when the run imported project files that its code hash does not cover.

        The code hash is the import closure as the source shows it; a project
        module imported while the run executes (``importlib.import_module(name)``,
        an import inside a function the closure cannot see) is not part of it, so
        a change to that file would not give a new experiment.
        """
        if self.module.startswith("machinable."):
            return
        try:
            from machinable.element import Element

            root = os.fspath(self.project.path) + os.sep
            outside = tuple(os.path.join(p, "") for p in {os.fspath(self.storage.root), sys.prefix, sys.base_prefix})
            found = set()
            for name in set(sys.modules) - before:
                module = sys.modules.get(name)
                file = getattr(module, "__file__", None)
                if not file or not file.endswith(".py") or not file.startswith(root) or file.startswith(outside):
                    continue
                parts = os.path.relpath(file, root)[: -len(".py")].split(os.sep)
                if not all(part.isidentifier() for part in parts) or "site-packages" in file:
                    continue  # not importable as a project module (a virtualenv inside the project, say)
                if any(isinstance(v, type) and issubclass(v, Element) and v.__module__ == module.__name__
                       for v in vars(module).values()):
                    continue  # an experiment or execution of its own (get() inside a run): it has its own code hash
                found.add(Path(os.path.relpath(file, root)).as_posix())
            if not found:
                return
            untracked = sorted(found - set(self.closure.files))
        except Exception:  # a diagnostic only: never fail a finished run over it
            return
        if untracked:
            shown = ", ".join(untracked[:5]) + (f" (+{len(untracked) - 5} more)" if len(untracked) > 5 else "")
            example = untracked[0][: -len(".py")].replace("/", ".").removesuffix(".__init__")
            sys.stderr.write(
                f"machinable: warning: {self.module} imported project files while it ran that are not part of its code "
                f"hash: {shown}. A change to them does not give a new experiment; import them at the top of the module "
                f"(import {example}) so that they are tracked.\n"
            )

    def _record_attempt_git(self, attempt: int) -> dict[str, Any]:
        """The git state this attempt runs with, for its ``started`` event.

        git.json and git.diff hold the state at creation; an attempt that runs
        with another one (a commit or an edit since, say before resuming a failed
        run) stores its own in ``attempts/<n>/``, before it starts. The event names
        the files, so reproduce and show use the state the finishing attempt ran with.
        """
        from machinable import git

        try:
            info, diff = git.capture(self.project.path, exclude=[self.storage.root])
        except Exception as e:  # for example no git on a cluster node: run, and say why the state is unknown
            info, diff = {"repository": None, "note": f"the git state could not be read when attempt {attempt} started: {e}"}, b""
        folder = self.directory / ATTEMPTS / str(attempt)
        if (info, diff) == self._creation_git():
            if folder.exists():  # left by a launch that crashed before its started event
                import shutil

                shutil.rmtree(folder)
            files = ("git.json", "git.diff")
        else:
            make_dirs(folder)
            atomic_write(folder / "git.json", json_bytes(info), what=f"git state of attempt {attempt}")
            atomic_write(folder / "git.diff", diff, what=f"git diff of attempt {attempt}")
            files = (f"{ATTEMPTS}/{attempt}/git.json", f"{ATTEMPTS}/{attempt}/git.diff")
        return {"commit": info.get("commit"), "dirty": bool(info.get("dirty")), "json": files[0], "diff": files[1]}

    def _creation_git(self) -> tuple[dict[str, Any], bytes] | None:
        created = getattr(self, "_created_git", None)
        if created is not None:
            return created
        try:
            stored = read_json(self.directory / "git.json")
            diff = (self.directory / "git.diff").read_bytes()
        except (OSError, StorageError):
            return None  # unreadable: the attempt records its own state
        stored.pop("format", None)
        return stored, diff

    def _save_result(self, result: Any) -> str | None:
        if result is None:
            return None
        data: bytes | None = None
        if not _holds_ndarray(result):  # as JSON an array would come back as nested lists, its dtype lost
            try:
                data = dumps_value(result)  # NaN and infinity kept (see dumps_value)
            except TypeError:
                pass
        if data is None:
            self._write_data("result.pickle", result)
            return "pickle"
        atomic_write(self._data_dir() / "result.json", data)
        return "json"

    # --- hooks ----------------------------------------------------------------------

    def on_create(self) -> None:
        """Before the record is first written."""

    def on_before_execute(self) -> None:
        """Before ``on_execute`` (every attempt)."""

    def on_execute(self) -> Any:
        """The experiment itself. A returned value is saved as ``result``."""

    def on_success(self) -> None:
        """After ``on_execute`` returned."""

    def on_failure(self, exception: BaseException) -> None:
        """After ``on_execute`` raised."""

    def on_after_execute(self) -> None:
        """After success or failure."""

    # --- outputs --------------------------------------------------------------------

    @property
    def result(self) -> Any:
        data = self.directory / "data"
        if (data / "result.json").exists():
            return loads_value((data / "result.json").read_bytes())
        if (data / "result.pickle").exists():
            return self.load_data("result.pickle")
        return None

    def output(self) -> str:
        try:
            return (self.directory / "output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def record(self, **row: Any) -> None:
        """Append a row to ``records.jsonl`` (for example one per epoch)."""
        from machinable.storage import append_line

        self._check_writable("record()")
        try:
            append_line(self.directory / "records.jsonl", row, what="record", sync=False)
        except TypeError as e:
            raise _record_error(row, e) from None

    def records(self, attempt: int | str | None = None) -> "Records":
        """The rows written with ``record()``: of every attempt (the default: a run
        resumed from a checkpoint continues its rows), of ``attempt`` N (1 is the
        first), or of the ``"last"`` attempt (a failed run relaunched from scratch)."""
        from machinable.errors import UsageError
        from machinable.storage import parse_rows, read_lines

        path = self.directory / "records.jsonl"
        if attempt is None:
            return Records(read_lines(path))
        starts = [e.get("records_from") for e in self.ledger.events() if e.get("event") == "started"]
        count = len(starts)
        if attempt == "last" and count == 0:
            return Records([])  # never started: no rows
        number = count if attempt == "last" else attempt
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= max(count, 1):
            raise UsageError(
                f"Invalid attempt {attempt!r} for experiment {self.short_id}: it has {count} attempt"
                f"{'s' if count != 1 else ''}; give a number from 1 to {max(count, 1)}, 'last', or None for every row."
            )
        if count == 0:
            return Records([])
        begin, end = starts[number - 1], starts[number] if number < count else None
        if not isinstance(begin, int) or (end is not None and not isinstance(end, int)):
            raise UsageError(
                f"Experiment {self.short_id} was recorded by a machinable that did not mark where each attempt's rows "
                "begin; records() without an attempt gives every row."
            )
        try:
            with open(path, "rb") as f:
                f.seek(begin)
                data = f.read() if end is None else f.read(max(end - begin, 0))
        except FileNotFoundError:
            return Records([])
        return Records(parse_rows(data))

    def _check_writable(self, what: str) -> None:
        if not self.is_committed():
            raise StorageError(
                f"{what}: experiment {self.short_id} ({self.module}) is not stored yet; "
                "call it from on_execute(), or launch() the experiment first."
            )
        if is_sealed(self.directory):
            raise StorageError(
                f"{what}: experiment {self.short_id} ({self.module}) is finished and its record is sealed (read-only). "
                "Write records and data from on_execute(), or start a new experiment with replicate()."
            )

    def _data_dir(self) -> Path:
        path = self.directory / "data"
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        return path

    def _data_path(self, name: str) -> Path:
        # resolved against the experiment folder itself, so that neither ``..``,
        # an absolute name, nor a symlink (data/ itself included) leads outside it
        base = self.directory.resolve() / "data"
        path = (base / name).resolve()
        if not name or path == base or not path.is_relative_to(base):
            raise ConfigError(f"Invalid data file name {name!r}: it must stay inside the experiment's data/ folder.")
        return path

    def save_data(self, name: str, value: Any) -> Path:
        """Save ``value`` as data/<name>: .txt (str), .json, .npy (numpy), .p/.pkl/.pickle, else bytes/str.

        ``result.json`` and ``result.pickle`` are refused: they hold the value
        ``on_execute`` returns."""
        self._check_writable(f"save_data({name!r})")
        path = self._data_path(name)
        # compared without case: on a case-insensitive disk Result.JSON is the result's file too
        reserved = path.relative_to(self.directory.resolve() / "data").as_posix().lower()
        if reserved in RESULT_FILES:
            raise ConfigError(
                f"Invalid data file name {name!r}: data/{reserved} holds the experiment's returned result "
                "(what on_execute() returns); save your file under another name."
            )
        return self._write_data(name, value)

    def _write_data(self, name: str, value: Any) -> Path:
        path = self._data_path(name)
        self._data_dir()
        make_dirs(path.parent)
        suffix = path.suffix.lower()
        if suffix == ".json":
            data = dumps_value(value, indent=True)
        elif suffix == ".npy":
            import io

            import numpy

            buffer = io.BytesIO()
            numpy.save(buffer, value, allow_pickle=False)
            data = buffer.getvalue()
        elif suffix in (".p", ".pkl", ".pickle"):
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        elif isinstance(value, bytes):
            data = value
        else:
            data = str(value).encode()
        atomic_write(path, data, what=f"data file {name}")
        return path

    def load_data(self, name: str, default: Any = None) -> Any:
        """Load data/<name> by extension (.json, .npy, .p/.pkl/.pickle, else text).

        Pickle files are trusted input: unpickling runs code the file names, so
        load pickles only from records you (or someone you trust) wrote. Names
        that lead outside this experiment's data/ folder are refused.
        """
        path = self._data_path(name)
        if not path.exists():
            return default
        suffix = path.suffix.lower()
        if suffix == ".json":
            return loads_value(path.read_bytes())
        if suffix == ".npy":
            import numpy

            return numpy.load(path, allow_pickle=False)
        if suffix in (".p", ".pkl", ".pickle"):
            with open(path, "rb") as f:
                return pickle.load(f)  # noqa: S301 - documented: trusted, own files only
        return path.read_text()

    def seed_everything(self) -> int:
        """Seed random, numpy and torch (when installed) from ``self.seed``
        (numpy's global seed is ``self.seed % 2**32``: its legacy seeding takes 32 bits)."""
        import random

        random.seed(self.seed)
        if "numpy" in sys.modules or _importable("numpy"):
            import numpy

            numpy.random.seed(self.seed % 2**32)
        if "torch" in sys.modules:
            sys.modules["torch"].manual_seed(self.seed)
        return self.seed


class Records(list):  # type: ignore[type-arg]
    """Rows written with ``record()``, one dict each, in order."""

    def columns(self) -> list[str]:
        """Every key of any row, in order of first appearance."""
        columns: dict[str, None] = {}
        for row in self:
            columns.update(dict.fromkeys(row))
        return list(columns)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per key: count and last value, and for numbers min, max and mean
        (NaN and infinity included: see ``summarize_records``)."""
        return summarize_records(list(self))

    def as_table(self) -> Any:
        """The rows as a table: a pandas DataFrame when pandas is installed, else a
        ``RecordsTable`` that prints as aligned text (and as a rich table in rich)."""
        try:
            import pandas
        except ImportError:
            return RecordsTable(self.columns(), list(self))
        return pandas.DataFrame(list(self), columns=self.columns() or None)


def summarize_records(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per key: count and last value; for numbers (bools aside) also min, max and mean.

    Non-finite values stay visible, so that a diverged run does not look
    healthy: min and max include infinities, and the mean is the IEEE one over
    every number (inf when an inf is among them, NaN with both +inf and -inf).
    A key with NaN values gets their count as ``nan`` and a NaN mean; min and
    max skip NaN (Python's min and max with a NaN depend on the order), and are
    NaN only when every number is.
    """
    stats: dict[str, dict[str, Any]] = {}
    for row in rows:
        for key, value in row.items():
            entry = stats.setdefault(key, {"count": 0, "numbers": 0, "nan": 0, "sum": 0.0, "min": None, "max": None, "last": None})
            entry["count"] += 1
            entry["last"] = value
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            entry["numbers"] += 1
            if value != value:
                entry["nan"] += 1
                continue
            entry["sum"] += value
            entry["min"] = value if entry["min"] is None else min(entry["min"], value)
            entry["max"] = value if entry["max"] is None else max(entry["max"], value)
    out: dict[str, dict[str, Any]] = {}
    for key, entry in stats.items():
        summary: dict[str, Any] = {"count": entry["count"], "last": entry["last"]}
        if entry["numbers"]:
            nan = float("nan")
            ordered = entry["numbers"] - entry["nan"]
            summary.update(
                min=nan if entry["min"] is None else entry["min"],
                max=nan if entry["max"] is None else entry["max"],
                mean=nan if entry["nan"] else entry["sum"] / ordered,
            )
            if entry["nan"]:
                summary["nan"] = entry["nan"]
        out[key] = summary
    return out


class RecordsTable:
    """Rows under their column names; ``print()`` it (or echo it in a REPL) to see it."""

    def __init__(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.columns = columns
        self.rows = rows

    def cells(self) -> list[list[str]]:
        def cell(value: Any) -> str:
            if value is None:
                return ""
            if isinstance(value, float):
                return f"{value:.6g}"
            return value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()

        return [[cell(row.get(c)) for c in self.columns] for row in self.rows]

    def __str__(self) -> str:
        if not self.columns:
            return f"(no records: {len(self.rows)} empty rows)" if self.rows else "(no records)"
        cells = self.cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(self.columns, widths)).rstrip()]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join(lines)

    __repr__ = __str__

    def __len__(self) -> int:
        return len(self.rows)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(*self.columns)
        for row in self.cells():
            table.add_row(*row)
        return table


def _record_error(row: dict[str, Any], error: TypeError) -> RecordError:
    """Name the key (``loss``, ``metrics.val``) and the type of what JSON cannot hold."""
    for key, value in row.items():
        found = _unstorable(value, key)
        if found is not None:
            path, what = found
            return RecordError(
                f"record(): {path!r} holds {what}, which cannot be stored as JSON. Record numbers, strings, "
                "bools, None, lists and dicts with string keys (numpy values work); save other objects with save_data()."
            )
    return RecordError(f"record() values must be JSON-serialisable: {error}")


def _unstorable(value: Any, path: str) -> tuple[str, str] | None:
    """Where in ``value`` is the first part JSON cannot hold, and what it is; None if nowhere."""
    try:
        dumps_value(value)
        return None
    except TypeError:
        pass
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"a dict key of type {type(key).__name__} ({key!r})"
            found = _unstorable(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _unstorable(item, f"{path}[{i}]")
            if found is not None:
                return found
    return path, f"a value of type {type(value).__module__ + '.' if type(value).__module__ != 'builtins' else ''}{type(value).__qualname__}"


def _holds_ndarray(value: Any) -> bool:
    """Whether ``value`` is, or its dicts, lists and tuples hold, a numpy array
    (numpy is not imported for this: without it loaded, no value holds an array)."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return False
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, numpy.ndarray):
            return True
        if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _after(iso: str | None, since: float) -> bool:
    if not iso:
        return False
    try:
        return datetime.fromisoformat(iso).timestamp() >= since - 0.001
    except ValueError:
        return False


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


def _restore_for_execution(project_root: str, storage_root: str, experiment_id: str, execution: Any) -> Experiment:
    from machinable.project import Project

    project = Project(project_root)
    storage = Storage.at(storage_root)
    cls = project.element_class(Experiment.restore(storage, experiment_id, project=project).module, Experiment)
    obj = Experiment.restore(storage, experiment_id, element_class=cls, project=project)
    obj._execution_info = execution
    return obj


# --- get ---------------------------------------------------------------------------


def _resolve(module: str, config: dict[str, Any] | None, seed: int | None, project: Any, storage: Storage | None) -> Element:
    from machinable.project import Project

    project = project or Project.get()
    cls = project.element_class(module)
    name = project.normalize_name(module)
    if not issubclass(cls, Experiment):
        if seed is not None:
            raise ConfigError(f"{name!r} is not an experiment; it takes no seed.")
        return cls(config, module=name, project=project)
    return cls(config, module=name, project=project, seed=seed, storage=storage)


class _Get:
    """``get(module, config)``: get-or-create; ``get.new(...)``: always a new one."""

    def __call__(self, module: str, config: dict[str, Any] | None = None, *, seed: int | None = None,
                 project: Any = None, storage: Storage | None = None) -> Any:
        element = _resolve(module, config, seed, project, storage)
        if not isinstance(element, Experiment):
            return element
        if seed is not None:
            if element.is_committed():
                element._load_record()
            return element
        existing = _newest(element)
        if existing is not None:
            return existing
        element._adopt_existing = True
        return element

    def new(self, module: str, config: dict[str, Any] | None = None, *, seed: int | None = None,
            project: Any = None, storage: Storage | None = None) -> Any:
        return _resolve(module, config, seed, project, storage)

    def all(self, module: str | None = None, **config: Any) -> list[Experiment]:
        """Every stored experiment (of ``module`` and matching config values), newest first."""
        return list(Storage.current().find(module, **config))


def _newest(element: Experiment) -> Experiment | None:
    storage = element.storage
    if not storage.root.is_dir():
        return None
    index = storage.fresh_index()
    found = index.newest(element.config_hash, element.code_hash)
    if found is not None and not storage.directory(found).is_dir():
        # a row whose folder never appeared (a crash mid-create): look past it
        found = next((row["id"] for row in index.with_config(element.config_hash)
                      if row["code_hash"] == element.code_hash and storage.directory(row["id"]).is_dir()), None)
    if found is None:
        return None
    try:
        restored = Experiment.restore(storage, found, element_class=type(element), project=element.project)
    except (StorageError, KeyError, TypeError, ValueError) as e:
        problem = document_problem(storage.directory(found) / "experiment.json")
        raise _damaged(element, found, f"{found}/experiment.json: {problem}" if problem else str(e)) from None
    problems = ledger_problems(storage.directory(found))
    if problems:
        raise _damaged(element, found, f"{found}/{problems[0]}")
    restored._closure = element._closure
    return restored


def _damaged(element: Experiment, experiment_id: str, problem: str) -> StorageFormatError:
    config = element.config_json()
    return StorageFormatError(
        f"The stored experiment {experiment_id[:SHORT]} for {element.module} with this config is damaged: {problem}. "
        f"`machinable verify {experiment_id[:SHORT]}` lists every problem. To start over with this config, create a new "
        f"experiment: get.new({element.module!r}, {config!r}) (command line: --force-new); "
        f"`machinable gc --include-finished {experiment_id[:SHORT]}` removes the damaged record."
    )


get = _Get()
