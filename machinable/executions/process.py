"""``machinable.execution.process``: each experiment in a fresh Python subprocess.

A crash in user code (a segfault, ``os._exit``, an out-of-memory kill) ends
only the subprocess; the experiment is recorded as failed with the exit code
or signal, and the caller carries on with the next experiment. Output is
inherited by the subprocess, so it streams live.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from machinable.errors import ConfigError
from machinable.execution import Execution


class Process(Execution):
    """One fresh interpreter per experiment, one after another."""

    class Config:
        # seconds a subprocess gets to record its interruption after Ctrl-C
        grace: float = 10.0

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.config.grace < 0:
            raise ConfigError(f"Invalid grace={self.config.grace!r} for {self.module}: give seconds >= 0.")

    def on_dispatch(self) -> None:
        for experiment in self.experiments:
            child = spawn(experiment)
            try:
                returncode = child.wait()
            except KeyboardInterrupt:
                stop([(child.pid, lambda child=child: child.poll() is None)], self.config.grace)
                raise
            self.record_exit(experiment, returncode)


def spawn(experiment: Any, prefix: str = "") -> subprocess.Popen[bytes]:
    """Start ``python -c 'run(...)'`` for one experiment; it inherits stdout and stderr."""
    payload = {
        "project": str(experiment.project.path),
        "storage": str(experiment.storage.root),
        "id": experiment.experiment_id,
        "execution": experiment._execution_info,
        "sys_path": [p for p in sys.path if p],
        "prefix": prefix,
    }
    code = "import sys; from machinable.executions.process import main; sys.exit(main(sys.argv[1]))"
    # -u: unbuffered, so the output streams live even through a pipe
    return subprocess.Popen([sys.executable, "-u", "-c", code, orjson.dumps(payload).decode()])


def main(payload: str) -> int:
    """The subprocess: reload the experiment by address and run it. 0 when it finished."""
    data = orjson.loads(payload)
    interrupt_once()
    for path in reversed(data["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    if data.get("prefix"):
        os.environ["MACHINABLE_OUTPUT_PREFIX"] = data["prefix"]
    from machinable.experiment import _restore_for_execution

    try:
        experiment = _restore_for_execution(data["project"], data["storage"], data["id"], data["execution"])
        state = experiment()
    except KeyboardInterrupt:
        return 130
    return 0 if state == "finished" else 1


def interrupt_once() -> None:
    """The first SIGINT raises KeyboardInterrupt; later ones are ignored.

    Ctrl-C reaches a worker twice (from the terminal and from the parent
    stopping its workers); a second KeyboardInterrupt could cut short the
    recording of the first.
    """

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def stop(children: list[tuple[int, Callable[[], bool]]], grace: float) -> None:
    """Interrupt running children (SIGINT), give them ``grace`` seconds to record it, then kill.

    ``children``: (pid, is_alive) pairs.
    """
    for pid, alive in children:
        if alive():
            _signal(pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while any(alive() for _, alive in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        remaining = [(pid, alive) for pid, alive in children if alive()]
        if not remaining:
            return
        for pid, _ in remaining:
            _signal(pid, sig)
        deadline = time.monotonic() + wait
        while any(alive() for _, alive in remaining) and time.monotonic() < deadline:
            time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
