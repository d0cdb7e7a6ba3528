"""``machinable.execution.local``: run experiments one after another, in-process (the default)."""

from __future__ import annotations

from machinable.execution import Execution


class Local(Execution):
    """In this process, in order. Output streams live and is saved per experiment."""

    def on_dispatch(self) -> None:
        for experiment in self.experiments:
            experiment()
