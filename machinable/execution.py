"""Executions: strategy objects that run experiments, and the dispatch protocol.

An execution receives ``self.experiments`` in ``on_dispatch()`` and runs each
one by calling ``experiment()``, in-process, in a subprocess, in a pool
worker or on a cluster. Dispatch never fails silently: after ``on_dispatch``
returns, every experiment must have started (or, for non-blocking executions,
been submitted); the rest are reported by id with the likely cause.
"""

from __future__ import annotations

import traceback
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
    not_started: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before dispatch
    submitted: list[str] = field(default_factory=list)  # non-blocking executions
    errors: dict[str, str] = field(default_factory=dict)
    cause: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_started

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        parts = [f"{len(self.finished)} finished", f"{len(self.failed)} failed", f"{len(self.not_started)} not started"]
        if self.submitted:
            parts.insert(0, f"{len(self.submitted)} submitted")
        if self.skipped:
            parts.append(f"{len(self.skipped)} already finished")
        return ", ".join(parts)

    def message(self) -> str:
        lines = [f"{self.execution}: {self.summary()}."]
        for experiment_id in self.failed:
            lines.append(f"  failed: {experiment_id[:12]}: {self.errors.get(experiment_id, 'see events.jsonl')}")
        if self.failed:
            lines.append("  `machinable show ID` has the traceback; launching again resumes the failed ones.")
        if self.not_started:
            lines.append(f"  never started: {', '.join(i[:12] for i in self.not_started)}")
            lines.append(f"  likely cause: {self.cause or NOT_STARTED_CAUSE}")
        return "\n".join(lines)


NOT_STARTED_CAUSE = (
    "on_dispatch() returned without calling experiment() for each of self.experiments. "
    "With multiprocessing, check that the function given to the pool is a module-level function "
    "(a lambda or local function cannot be pickled, and the pool then runs nothing) and that "
    "imap/imap_unordered results are consumed before the pool closes."
)


class Execution(Element):
    """Base class of executions. Override ``on_dispatch`` (and optionally the hooks)."""

    _machinable_abstract = True
    kind = "execution"
    #: False for executions that submit and return (a cluster): dispatch then
    #: checks that every experiment was submitted rather than started.
    blocking: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any] | None = None, *, module: str | None = None, project: Any = None) -> None:
        super().__init__(config, module=module, project=project)
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
        if self._depth > 0:
            self._pending.append(experiment)
        else:
            self.dispatch([experiment])

    # --- dispatch -------------------------------------------------------------------

    def dispatch(self, experiments: list[Any], *, raise_on_failure: bool = True) -> DispatchReport:
        report = DispatchReport(execution=self.module)
        todo, seen = [], set()
        for experiment in experiments:
            if not experiment.is_finished():
                experiment.commit()  # first: get() may adopt a concurrently created twin (its id)
            if experiment.experiment_id in seen:
                continue
            seen.add(experiment.experiment_id)
            if experiment.is_finished():
                report.skipped.append(experiment.experiment_id)
                continue
            experiment._runnable()._check_code_unchanged()
            todo.append(experiment)
        self.last_report = report
        if not todo:
            return report
        info = self.describe()
        before = {}
        for experiment in list(todo):
            experiment._execution_info = info
            before[experiment.experiment_id] = experiment.ledger.attempts()
            if not experiment._mark_dispatched(info):  # finished meanwhile, by a concurrent launch
                todo.remove(experiment)
                report.skipped.append(experiment.experiment_id)
        if not todo:
            return report
        self.experiments = todo
        try:
            self.on_before_dispatch()
            self.on_dispatch()
            self.on_after_dispatch()
        except KeyboardInterrupt:
            self._settle(todo, before, report)
            raise
        except Exception as e:
            report.cause = f"on_dispatch() of {self.module} raised {type(e).__name__}: {e}" + _pickling_hint(e)
            self._settle(todo, before, report)
            if raise_on_failure:
                raise ExecutionError(report.message(), report) from e
            return report
        self._settle(todo, before, report)
        if raise_on_failure and not report.ok:
            raise ExecutionError(report.message(), report)
        return report

    def _settle(self, todo: list[Any], before: dict[str, int], report: DispatchReport) -> None:
        for experiment in todo:
            experiment_id = experiment.experiment_id
            ledger = experiment.ledger
            events = ledger.events()
            started = ledger.attempts(events) > before[experiment_id]
            state = ledger.state(events)
            if state == "finished":
                report.finished.append(experiment_id)
            elif state == "failed" and started:
                report.failed.append(experiment_id)
                last = ledger.last(events) or {}
                report.errors[experiment_id] = last.get("error", "failed")
            elif not self.blocking and self.is_submitted(experiment):
                report.submitted.append(experiment_id)
            elif started and state == "interrupted" and self.blocking:
                ledger.append("failed", error="the process running it exited without finishing (crash or os._exit)")
                report.failed.append(experiment_id)
                report.errors[experiment_id] = "the process running it exited without finishing (crash or os._exit)"
            elif started and state == "running":
                report.submitted.append(experiment_id)  # still running elsewhere
            else:
                report.not_started.append(experiment_id)

    def is_submitted(self, experiment: Any) -> bool:
        """Non-blocking executions: True once ``experiment`` is handed to its scheduler."""
        return False

    @classmethod
    def reconcile(cls, experiments: list[Any]) -> dict[str, dict[str, Any]]:
        """Ask the scheduler about dispatched experiments (``machinable status``).

        Returns ``{experiment_id: {"state": ..., "reason": ..., ...}}`` and may
        append events (for example ``interrupted`` for a vanished job) so that
        ``launch()`` resubmits. Blocking executions have nothing to reconcile.
        """
        return {}

    # --- hooks ------------------------------------------------------------------------

    def on_before_dispatch(self) -> None:
        """Before ``on_dispatch``."""

    def on_dispatch(self) -> None:
        """Run every experiment in ``self.experiments`` by calling it."""
        for experiment in self.experiments:
            experiment()

    def on_after_dispatch(self) -> None:
        """After ``on_dispatch`` returned."""


def _pickling_hint(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if "pickle" in text.lower() or "lambda" in text:
        return (
            ". A lambda or local function cannot be sent to a worker process: "
            "pass a module-level function (def run(experiment): experiment()) instead."
        )
    return ""


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))
