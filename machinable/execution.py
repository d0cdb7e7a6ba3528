"""Executions: strategy objects that run experiments, and the dispatch protocol.

An execution receives ``self.experiments`` in ``on_dispatch()`` and runs each
one by calling ``experiment()``, in-process, in a subprocess, in a pool
worker or on a cluster. Dispatch never fails silently: after ``on_dispatch``
returns, every experiment must have started (or, for non-blocking executions,
been submitted); the rest are reported by id with the likely cause.
"""

from __future__ import annotations

import ast
import inspect
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from machinable.config import canonical
from machinable.element import Element
from machinable.errors import ExecutionError
from machinable.hashing import digest


@dataclass
class DispatchReport:
    """What became of each experiment handed to one dispatch."""

    execution: str
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before dispatch
    submitted: list[str] = field(default_factory=list)  # non-blocking executions (or still running elsewhere)
    cancelled: list[str] = field(default_factory=list)  # on_before_dispatch() returned False
    errors: dict[str, str] = field(default_factory=dict)  # failed/interrupted id -> what happened
    reasons: dict[str, str] = field(default_factory=dict)  # not started id -> likely cause
    cause: str | None = None  # on_dispatch() itself raised

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_started and not self.interrupted

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        parts = [f"{len(self.finished)} finished", f"{len(self.failed)} failed", f"{len(self.not_started)} not started"]
        if self.submitted:
            parts.insert(0, f"{len(self.submitted)} submitted")
        if self.interrupted:
            parts.append(f"{len(self.interrupted)} interrupted")
        if self.skipped:
            parts.append(f"{len(self.skipped)} already finished")
        if self.cancelled:
            parts.append(f"{len(self.cancelled)} cancelled by on_before_dispatch()")
        return ", ".join(parts)

    def message(self) -> str:
        lines = [f"{self.execution}: {self.summary()}."]
        if self.cause and self.cause not in self.reasons.values():  # else it is named with the experiments
            lines.append(f"  {self.cause}")
        for experiment_id in self.failed:
            lines.append(f"  failed: {experiment_id[:12]}: {self.errors.get(experiment_id, 'see events.jsonl')}")
        for experiment_id in self.interrupted:
            lines.append(f"  interrupted: {experiment_id[:12]}: {self.errors.get(experiment_id, 'see events.jsonl')}")
        if self.failed:
            lines.append("  `machinable show ID` has the details (the traceback, if any); launching again resumes the failed ones.")
        by_reason: dict[str, list[str]] = {}
        for experiment_id in self.not_started:
            by_reason.setdefault(self.reasons.get(experiment_id) or NOT_STARTED_CAUSE, []).append(experiment_id)
        for reason, ids in by_reason.items():
            lines.append(f"  never started: {', '.join(i[:12] for i in ids)}")
            lines.append(f"  likely cause: {reason}")
        if self.not_started or self.interrupted:
            lines.append("  Launching again runs them (finished ones are not run twice).")
        return "\n".join(lines)


PICKLE_ADVICE = (
    "A lambda, or a function defined inside a method, cannot be pickled, so the pool sends nothing to its "
    "workers; imap(), imap_unordered(), map_async() and apply_async() keep that error to themselves unless "
    "their results are read. Pass a module-level function instead: `def run(experiment): experiment()` "
    "and `pool.map(run, self.experiments)`."
)

NOT_STARTED_CAUSE = (
    "on_dispatch() returned without calling experiment() for it, and never sent it to another process. "
    "Call experiment() for each of self.experiments, in this process or in a worker."
)

SENT_NOT_STARTED_CAUSE = (
    "it was sent to a worker process but never started: the pool was closed or terminated before it ran "
    "(leaving a `with Pool(...)` block terminates the workers). Read the results of imap()/imap_unordered()/"
    "map_async()/apply_async() before the block ends, or use pool.map()."
)

CRASHED = "the process running it exited without finishing (a crash, os._exit(), or a terminated worker)"

# pool / executor methods whose first argument is sent to worker processes
_POOL_METHODS = {
    "map", "map_async", "imap", "imap_unordered", "starmap", "starmap_async", "apply", "apply_async", "submit",
}


class Execution(Element):
    """Base class of executions. Override ``on_dispatch`` (and optionally the hooks).

    ``on_dispatch()`` runs every experiment of ``self.experiments`` by calling
    it (``experiment()``), in this process or in another one: experiments
    pickle by address, so a worker reloads them from storage.
    """

    _machinable_abstract = True
    kind = "execution"
    #: False for executions that submit and return (a cluster): dispatch then
    #: checks that every experiment was submitted rather than started.
    blocking: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any] | None = None, *, module: str | None = None, project: Any = None) -> None:
        super().__init__(config, module=module or _builtin_name(type(self).__module__), project=project)
        self.experiments: list[Any] = []
        self._pending: list[Any] = []
        self._depth = 0
        self.last_report: DispatchReport | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.module}>"

    def describe(self) -> dict[str, Any]:
        """How runs record the execution (it never changes an experiment's id)."""
        return {
            "module": self.module,
            "config": self.config_json(),
            "config_hash": digest({"module": self.module, "config": canonical(self.config)}),
        }

    # --- context: launches inside ``with`` are dispatched together at exit ---------

    def __enter__(self) -> "Execution":
        super().__enter__()
        self._depth += 1
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        super().__exit__(exc_type, *rest)
        self._depth -= 1
        if self._depth == 0 and self._pending:
            pending, self._pending = self._pending, []
            if exc_type is None:
                self.dispatch(pending)

    def add(self, experiment: Any) -> None:
        """Queue ``experiment`` inside ``with execution:``; dispatch it now otherwise."""
        if self._depth > 0:
            self._pending.append(experiment)
        else:
            self.dispatch([experiment])

    # --- dispatch -------------------------------------------------------------------

    def dispatch(self, experiments: list[Any], *, raise_on_failure: bool = True) -> DispatchReport:
        """Run ``experiments`` (finished ones are skipped) and check what became of each.

        Raises ``ExecutionError`` (carrying the ``DispatchReport``) when any
        failed, was interrupted, or never started.
        """
        _refuse_in_bootstrapping_worker()
        report = DispatchReport(execution=self.module)
        self.last_report = report
        todo = self._runnable(experiments, report)
        if not todo:
            return report
        self.experiments = todo
        if self.on_before_dispatch() is False:
            report.cancelled = [e.experiment_id for e in todo]
            self.experiments = []
            return report
        marks = self._mark_dispatched(todo, report)
        if not todo:
            return report
        _flush_standard_streams()  # forked workers would print the parent's buffered output again
        raised: Exception | None = None
        with _watch_pickling() as pickling_failures:
            try:
                self.on_dispatch()
                self.on_after_dispatch()
            except KeyboardInterrupt:
                self._settle(todo, marks, report, pickling_failures, interrupted=True)
                hint = "; launching again resumes them" if report.interrupted or report.not_started else ""
                sys.stderr.write(f"machinable: {self.module} interrupted: {report.summary()}{hint}.\n")
                # raised anew: the program stops as usual, and its traceback ends here rather than in
                # the execution's internals (each experiment's own traceback is in its events.jsonl)
                raise KeyboardInterrupt from None
            except Exception as e:
                report.cause = f"on_dispatch() of {self.module} raised {type(e).__name__}: {e}" + _pickling_hint(e)
                raised = e
        self._settle(todo, marks, report, pickling_failures, raised=report.cause)
        if raised is not None or not report.ok:
            if raise_on_failure:
                raise ExecutionError(report.message(), report) from raised
        elif len(todo) > 1:
            sys.stderr.write(f"machinable: {self.module}: {report.summary()}.\n")
        return report

    def _runnable(self, experiments: list[Any], report: DispatchReport) -> list[Any]:
        todo, seen = [], set()
        for experiment in experiments:
            if not experiment.is_finished():
                experiment.commit()  # first: get() may adopt a concurrently created twin (its id)
            if experiment.experiment_id in seen:
                continue
            seen.add(experiment.experiment_id)
            if experiment.is_finished():
                experiment._complete_seal()  # if a crash interrupted the finishing run
                report.skipped.append(experiment.experiment_id)
                continue
            experiment._runnable()._check_code_unchanged()
            todo.append(experiment)
        return todo

    def _mark_dispatched(self, todo: list[Any], report: DispatchReport) -> dict[str, int]:
        """Record the dispatch in each ledger; returns each ledger's length after it."""
        info = self.describe()
        marks = {}
        for experiment in list(todo):
            experiment._execution_info = info
            experiment._execution = self
            experiment._pickled = False
            if not experiment._mark_dispatched(info):  # finished meanwhile, by a concurrent launch
                todo.remove(experiment)
                report.skipped.append(experiment.experiment_id)
                continue
            marks[experiment.experiment_id] = len(experiment.ledger.events())
        return marks

    def _settle(self, todo: list[Any], marks: dict[str, int], report: DispatchReport,
                pickling_failures: list[str], *, interrupted: bool = False, raised: str | None = None) -> None:
        """Sort each experiment into the report by the events since its dispatch."""
        for experiment in todo:
            experiment_id = experiment.experiment_id
            ledger = experiment.ledger
            events = ledger.events()
            since = events[marks[experiment_id]:]
            last = ledger.last(since)
            event = last["event"] if last is not None else None
            if ledger.state(events, check_claim=False) == "finished":
                report.finished.append(experiment_id)
            elif event == "failed":
                report.failed.append(experiment_id)
                report.errors[experiment_id] = last.get("error", "failed")  # type: ignore[union-attr]
            elif event in ("interrupted", "cancelled"):
                report.interrupted.append(experiment_id)
                report.errors[experiment_id] = last.get("reason", "interrupted")  # type: ignore[union-attr]
            elif event == "started":
                self._settle_started(experiment, report, interrupted)
            elif not self.blocking and self.is_submitted(experiment):
                report.submitted.append(experiment_id)
            elif interrupted:
                reason = "Ctrl-C stopped the dispatch before it started"
                if _append_unless_running(experiment, "cancelled", reason=reason):
                    report.interrupted.append(experiment_id)
                    report.errors[experiment_id] = reason
                else:
                    report.submitted.append(experiment_id)
            else:
                reason = raised or self._why_not_started(experiment, pickling_failures)
                if _append_unless_running(experiment, "cancelled", reason=f"never started: {reason}"):
                    report.not_started.append(experiment_id)
                    report.reasons[experiment_id] = reason
                else:
                    report.submitted.append(experiment_id)  # started by now, elsewhere

    def _settle_started(self, experiment: Any, report: DispatchReport, interrupted: bool) -> None:
        experiment_id = experiment.experiment_id
        if interrupted:
            reason = "Ctrl-C stopped the dispatch while it ran; launching again resumes it"
            if _append_unless_running(experiment, "interrupted", reason=reason):
                report.interrupted.append(experiment_id)
                report.errors[experiment_id] = reason
            else:
                report.submitted.append(experiment_id)  # its worker is still running
        elif _append_unless_running(experiment, "failed", error=CRASHED):
            report.failed.append(experiment_id)
            report.errors[experiment_id] = CRASHED
        else:
            report.submitted.append(experiment_id)  # still running elsewhere

    def _why_not_started(self, experiment: Any, pickling_failures: list[str]) -> str:
        # the source is read first: whether the pool got round to pickling before
        # it was closed is a race, and the message should not depend on it
        unpicklable = unpicklable_tasks(type(self))
        if unpicklable:
            return f"on_dispatch() passes {unpicklable[0]}, which cannot be pickled. {PICKLE_ADVICE}"
        if pickling_failures:
            return (
                f"on_dispatch() tried to send an object that cannot be pickled to a worker process "
                f"({pickling_failures[0]}). {PICKLE_ADVICE}"
            )
        if getattr(experiment, "_pickled", False):
            return SENT_NOT_STARTED_CAUSE
        lazy = lazy_calls(type(self))
        if lazy:
            return (
                f"on_dispatch() calls the builtin {lazy[0]}, which is lazy: it runs nothing until its result is "
                "iterated. Use a for loop: `for experiment in self.experiments: experiment()`."
            )
        return NOT_STARTED_CAUSE

    def is_submitted(self, experiment: Any) -> bool:
        """Non-blocking executions: True once ``experiment`` is handed to its scheduler."""
        return False

    def record_exit(self, experiment: Any, returncode: int | None) -> None:
        """After the process that ran ``experiment`` exited: record what it could not.

        A process that crashed (a segfault, ``os._exit``, a kill) wrote no
        ``finished``/``failed`` event; this records the failure with the
        exit code or signal, so the experiment shows as failed (resumable).
        """
        ledger = experiment.ledger
        last = ledger.last()
        if last is None or last["event"] not in ("started", "dispatched"):
            return  # the process recorded the outcome itself
        if last["event"] == "dispatched" and returncode == 0:
            return
        when = "before it finished" if last["event"] == "started" else "before it started"
        error = f"its process {describe_exit(returncode)} {when}"
        _append_unless_running(experiment, "failed", error=error, exit_code=returncode, attempt=last.get("attempt"))

    @classmethod
    def reconcile(cls, experiments: list[Any]) -> dict[str, dict[str, Any]]:
        """Ask the scheduler about dispatched experiments (``machinable status``).

        Returns ``{experiment_id: {"state": ..., "reason": ..., ...}}`` and may
        append events (for example ``interrupted`` for a vanished job) so that
        ``launch()`` resubmits. Blocking executions have nothing to reconcile.
        """
        return {}

    # --- hooks ------------------------------------------------------------------------

    def on_before_dispatch(self) -> bool | None:
        """Before ``on_dispatch``; return False to dispatch nothing."""
        return None

    def on_dispatch(self) -> None:
        """Run every experiment in ``self.experiments`` by calling it."""
        for experiment in self.experiments:
            experiment()

    def on_after_dispatch(self) -> None:
        """After ``on_dispatch`` returned."""

    def on_before_execute(self, experiment: Any) -> None:
        """Before one experiment runs, in the process that runs it."""

    def on_after_execute(self, experiment: Any, state: str) -> None:
        """After one experiment ran (``state``: finished, failed, ...), in the process that ran it."""


def rebuild(info: dict[str, Any] | None, project: Any) -> Execution | None:
    """The execution described by ``info`` (``Execution.describe()``), made anew in a worker."""
    if not info:
        return None
    cls = project.element_class(info["module"], Execution)
    return cls(info.get("config") or {}, module=info["module"], project=project)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "vanished"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _refuse_in_bootstrapping_worker() -> None:
    """Stop a spawn/forkserver worker that is running the main script's top level again.

    Such a worker imports the main script before it receives its task; a
    launch at the script's top level, outside ``if __name__ == "__main__":``,
    would dispatch every experiment again from each worker.
    """
    process = sys.modules.get("multiprocessing.process")
    if process is not None and getattr(process.current_process(), "_inheriting", False):
        raise SystemExit(
            "machinable: a worker process started with spawn or forkserver runs the main script's top level again, "
            "and this script launches experiments there: put the launch under `if __name__ == \"__main__\":`."
        )


def _builtin_name(module: str) -> str | None:
    from machinable.project import BUILTINS

    for name, target in BUILTINS.items():
        if target == module:
            return name
    return None


def _append_unless_running(experiment: Any, event: str, **fields: Any) -> bool:
    """Append ``event`` under the experiment's claim; False if another process holds it or it finished."""
    from machinable.storage import Claim, is_sealed

    if is_sealed(experiment.directory):
        return False
    claim = Claim(experiment.directory)
    if not claim.try_acquire():
        return False
    try:
        if experiment.ledger.state(check_claim=False) == "finished":
            return False
        experiment.ledger.append(event, **fields)
    finally:
        claim.release()

    experiment.storage.refresh_state(experiment.experiment_id)
    return True


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


# --- finding why experiments never reached a worker ------------------------------------

_watch_lock = threading.Lock()
_watchers: list[list[str]] = []
_original_dumps: Any = None


@contextmanager
def _watch_pickling() -> Iterator[list[str]]:
    """Collect errors raised while pickling objects for worker processes.

    A pool pickles tasks in a background thread and keeps a pickling error on
    the task's result object; when nobody reads the result (``imap_unordered``
    without iterating), the error is lost and nothing runs. Observing
    ``ForkingPickler.dumps`` (used by pools, queues and process executors)
    during dispatch lets the report name that error.
    """
    global _original_dumps
    from multiprocessing.reduction import ForkingPickler

    failures: list[str] = []
    with _watch_lock:
        if not _watchers:
            _original_dumps = ForkingPickler.__dict__["dumps"]
            ForkingPickler.dumps = classmethod(_observed_dumps)  # type: ignore[method-assign,assignment]
        _watchers.append(failures)
    try:
        yield failures
    finally:
        with _watch_lock:
            for i, watcher in enumerate(_watchers):
                if watcher is failures:
                    del _watchers[i]
                    break
            if not _watchers:
                ForkingPickler.dumps = _original_dumps  # type: ignore[method-assign]


def _observed_dumps(cls: Any, obj: Any, protocol: Any = None) -> Any:
    try:
        return _original_dumps.__func__(cls, obj, protocol)
    except Exception as e:
        with _watch_lock:
            for watcher in _watchers:
                watcher.append(f"{type(e).__name__}: {e}")
        raise


def unpicklable_tasks(cls: type) -> list[str]:
    """Lambdas and local functions that ``cls.on_dispatch`` hands to a pool (read from its source)."""
    source = _on_dispatch_source(cls)
    if source is None:
        return []
    tree, first, filename = source
    body = tree.body[0] if tree.body else None
    local = {
        node.name for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not body
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        method = isinstance(node.func, ast.Attribute)
        name = node.func.attr if method else getattr(node.func, "id", "")
        candidates = list(node.args[:1]) if method and name in _POOL_METHODS else []
        candidates += [k.value for k in node.keywords if k.arg in ("target", "func", "fn")]
        for arg in candidates:
            where = f"{filename}, line {first + arg.lineno - 1}"
            if isinstance(arg, ast.Lambda):
                found.append(f"a lambda to {name}() ({where})")
            elif isinstance(arg, ast.Name) and arg.id in local:
                found.append(f"the local function {arg.id}() to {name}() ({where})")
    return found


def lazy_calls(cls: type) -> list[str]:
    """Builtin ``map()``/``filter()`` calls in ``cls.on_dispatch``: lazy, they run nothing unless iterated."""
    source = _on_dispatch_source(cls)
    if source is None:
        return []
    tree, first, filename = source
    return [
        f"{node.func.id}() ({filename}, line {first + node.lineno - 1})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("map", "filter")
    ]


def _on_dispatch_source(cls: type) -> tuple[ast.Module, int, str] | None:
    """The parsed source of ``cls.on_dispatch`` with its first line and file (None if unavailable)."""
    function = getattr(cls, "on_dispatch", None)
    if function is None or function is Execution.on_dispatch:
        return None
    try:
        lines, first = inspect.getsourcelines(function)
        filename = inspect.getsourcefile(function) or "?"
        return ast.parse(textwrap.dedent("".join(lines))), first, _short_path(filename)
    except (OSError, TypeError, SyntaxError):
        return None


def _short_path(filename: str) -> str:
    import os

    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


def _pickling_hint(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if "pickle" in text.lower() or "lambda" in text:
        return ". " + PICKLE_ADVICE
    return ""


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))
