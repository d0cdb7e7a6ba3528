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
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
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
        with CtrlC() as ctrl_c:
            for experiment in self.experiments:
                ctrl_c.check()
                child = spawn(experiment)
                try:
                    returncode = wait_for_child(child, ctrl_c)
                except KeyboardInterrupt:
                    stop([(child.pid, lambda child=child: child.poll() is None)], self.config.grace, ctrl_c.hurried)
                    raise
                self.record_exit(experiment, returncode)


class CtrlC:
    """Ctrl-C in the launching process while children run: noted, then acted on where it is safe.

    Python raises ``KeyboardInterrupt`` at whatever line runs when the signal
    arrives. Raised between a child's fork and its registration, it leaves a
    child that nobody stops (it holds the terminal's pipes, so the launch
    never seems to end); raised inside an at-fork callback or a ``__del__``,
    it is printed as "Exception ignored" and lost, and the launch waits for
    its workers forever. Inside this block, SIGINT only counts and wakes
    ``fd``; ``check()`` raises at the points the caller chooses.

    Installed only in the main thread and while SIGINT has Python's default
    handler (not when it is ignored or the program installed its own).
    """

    def __init__(self) -> None:
        self.count = 0
        self.fd: int | None = None  # readable after a Ctrl-C
        self._write_fd: int | None = None
        self._previous: Any = None

    def __enter__(self) -> "CtrlC":
        global _noted
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write_fd, False)
            _noted = 0
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        global _noted
        _noted += 1  # a forked child that has not installed its own handler yet checks this copy
        self.count += 1
        try:
            os.write(self._write_fd, b"\0")  # type: ignore[arg-type]
        except OSError:
            pass

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        for fd in (self.fd, self._write_fd):
            os.close(fd)  # type: ignore[arg-type]
        self.fd = self._write_fd = None
        if self.count and exc_type is None:
            raise KeyboardInterrupt  # pressed as the last child ended: the program still stops

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed (and empty the wake-up pipe)."""
        if self.fd is not None:
            try:
                while os.read(self.fd, 512):
                    pass
            except BlockingIOError:
                pass
        if self.count:
            raise KeyboardInterrupt

    def hurried(self) -> bool:
        """A second Ctrl-C: stop waiting for children to record their interruption."""
        return self.count > 1


_noted = 0  # Ctrl-C presses seen by the CtrlC handler of this process (inherited by forked children)


def wait_for_child(child: subprocess.Popen[bytes], ctrl_c: CtrlC) -> int:
    """The child's exit code; raises ``KeyboardInterrupt`` as soon as Ctrl-C is pressed."""
    if ctrl_c.fd is None:
        return child.wait()
    pidfd = _pidfd(child.pid)
    try:
        while True:
            ctrl_c.check()
            if pidfd is None:
                try:
                    return child.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    continue
            wait([pidfd, ctrl_c.fd])
            returncode = child.poll()
            if returncode is not None:
                ctrl_c.check()
                return returncode
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined,no-any-return]
    except (AttributeError, OSError):
        return None


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
    try:
        interrupt_once()
        for path in reversed(data["sys_path"]):
            if path not in sys.path:
                sys.path.insert(0, path)
        if data.get("prefix"):
            os.environ["MACHINABLE_OUTPUT_PREFIX"] = data["prefix"]
        from machinable.experiment import _restore_for_execution

        experiment = _restore_for_execution(data["project"], data["storage"], data["id"], data["execution"])
        state = experiment()
    except KeyboardInterrupt:
        return 130
    return 0 if state == "finished" else 1


def interrupt_once() -> None:
    """The first SIGINT raises KeyboardInterrupt; later ones are ignored.

    Ctrl-C reaches a worker twice (from the terminal and from the parent
    stopping its workers); a second KeyboardInterrupt could cut short the
    recording of the first. A SIGINT that reached a forked worker before this
    was installed (noted by the parent's ``CtrlC`` handler it inherited) is
    raised now.
    """

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    global _noted
    if _noted:
        _noted = 0
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt


def stop(children: list[tuple[int, Callable[[], bool]]], grace: float, hurried: Callable[[], bool] = lambda: False) -> None:
    """Interrupt running children (SIGINT), give them ``grace`` seconds to record it, then kill.

    ``children``: (pid, is_alive) pairs. ``hurried()`` turning True (a second
    Ctrl-C) cuts the grace period short.
    """
    for pid, alive in children:
        if alive():
            _signal(pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while any(alive() for _, alive in children) and time.monotonic() < deadline and not hurried():
        time.sleep(0.05)
    for sig, patience in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        remaining = [(pid, alive) for pid, alive in children if alive()]
        if not remaining:
            return
        for pid, _ in remaining:
            _signal(pid, sig)
        deadline = time.monotonic() + patience
        while any(alive() for _, alive in remaining) and time.monotonic() < deadline:
            time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
