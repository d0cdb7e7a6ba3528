"""``machinable.execution.multiprocess``: experiments in parallel worker processes.

Each experiment runs in its own worker process, at most ``processes`` at a
time, so a crash (a segfault, ``os._exit``) ends only that experiment's
worker and is recorded as its failure. When several run at once, every
output line is prefixed by the experiment's short id and written whole.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import tokenize
from multiprocessing.connection import wait
from typing import Any

from machinable.errors import ConfigError
from machinable.execution import Execution, _short_path
from machinable.executions.process import CtrlC, interrupt_once, stop

START_METHODS = ("fork", "spawn", "forkserver")


class Multiprocess(Execution):
    """A pool of worker processes, one fresh worker per experiment."""

    class Config:
        # parallel workers; 0: one per CPU core
        processes: int = 0
        # "", "fork", "spawn" or "forkserver"; "": fork where it is safe (Linux), else spawn
        start_method: str = ""
        # seconds a worker gets to record its interruption after Ctrl-C
        grace: float = 10.0

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.config.processes < 0:
            raise ConfigError(f"Invalid processes={self.config.processes!r} for {self.module}: give a number >= 1 (0: one per CPU core).")
        method = self.config.start_method
        if method and method not in multiprocessing.get_all_start_methods():
            raise ConfigError(
                f"Invalid start_method={method!r} for {self.module}: this platform offers "
                f"{', '.join(repr(m) for m in multiprocessing.get_all_start_methods())}."
            )
        if self.config.grace < 0:
            raise ConfigError(f"Invalid grace={self.config.grace!r} for {self.module}: give seconds >= 0.")

    @property
    def processes(self) -> int:
        return self.config.processes or os.cpu_count() or 1

    def context(self) -> Any:
        method = self.config.start_method
        if not method:
            # fork needs no `if __name__ == "__main__":` guard in the user's script
            method = "fork" if sys.platform.startswith("linux") else "spawn"
        return multiprocessing.get_context(method)

    def on_before_dispatch(self) -> bool | None:
        method = self.context().get_start_method()
        if method != "fork":
            where = unguarded_main_launch()
            if where is not None:
                raise ConfigError(
                    f"start_method={method!r} starts each worker by running the main script's top level again, and "
                    f"the script launches experiments there ({where}), outside `if __name__ == \"__main__\":`. "
                    "Put the launch under that guard, or use start_method='fork'. Nothing was started."
                )
        return None

    def on_dispatch(self) -> None:
        context = self.context()
        parallel = self.processes > 1 and len(self.experiments) > 1
        queue = list(self.experiments)
        running: dict[int, tuple[Any, Any]] = {}  # sentinel -> (worker, experiment)
        with CtrlC() as ctrl_c:
            try:
                while queue or running:
                    while queue and len(running) < self.processes:
                        ctrl_c.check()
                        experiment = queue.pop(0)
                        prefix = f"[{experiment.short_id}] " if parallel else ""
                        worker = context.Process(target=run, args=(experiment, prefix), name=f"machinable-{experiment.short_id}")
                        worker.start()
                        running[worker.sentinel] = (worker, experiment)
                    ready = wait(list(running) + ([ctrl_c.fd] if ctrl_c.fd is not None else []))
                    ctrl_c.check()  # first: after Ctrl-C, the report settles the workers that exited meanwhile
                    for sentinel in ready:
                        if sentinel in running:
                            worker, experiment = running.pop(sentinel)  # type: ignore[call-overload]
                            worker.join()
                            self.record_exit(experiment, worker.exitcode)
            except KeyboardInterrupt:
                stop([(worker.pid, worker.is_alive) for worker, _ in running.values()], self.config.grace, ctrl_c.hurried)
                for worker, _ in running.values():
                    worker.join(timeout=1.0)  # reaped: multiprocessing's exit handler joins its children without a timeout
                raise


def run(experiment: Any, prefix: str = "") -> None:
    """In the worker: run one experiment (module-level, so that it pickles)."""
    try:
        interrupt_once()
        if prefix:
            os.environ["MACHINABLE_OUTPUT_PREFIX"] = prefix
        experiment()
    except KeyboardInterrupt:
        sys.exit(130)


def unguarded_main_launch() -> str | None:
    """Where the main script's top level leads to this call outside ``if __name__ == "__main__":``
    ("run.py, line 3"), else None (no main script, as with ``python -c``, or the call is guarded).

    With spawn or forkserver, each worker runs the main script's top level
    again (as ``__mp_main__``): an unguarded launch would launch from every worker.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno):
                return None
    return f"{_short_path(path)}, line {line}"


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]
