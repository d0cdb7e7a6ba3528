"""Shared fixtures: real projects in temp folders, real git repos, real subprocesses."""

from __future__ import annotations

import faulthandler
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".machinable-template"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _as_on_a_terminal() -> None:
    """The suite runs the same from a terminal, from CI and on a fresh machine.

    - Started in the background by a non-interactive shell (``bash test.sh &``),
      the run inherits SIGINT ignored, and so would every process the tests
      start: the Ctrl-C tests would wait for an interrupt that never comes.
      A handler here gives the children the default disposition back.
    - Docs pages and scripts run ``git commit`` as their reader would; on a
      machine whose git has no identity yet, the session lends one through
      git's own variables (tests of the no-identity path remove them).
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    known = subprocess.run(["git", "config", "user.email"], capture_output=True, text=True).stdout.strip()
    if not known and not os.environ.get("GIT_AUTHOR_EMAIL"):
        for key, value in GIT_IDENTITY.items():
            os.environ.setdefault(key, value)


_as_on_a_terminal()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
        env={**os.environ, **GIT_IDENTITY},
    ).stdout


def write(root: Path, rel: str, source: str) -> Path:
    """Write a dedented source file into the project (folders made as needed)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def commit_all(root: Path, message: str = "more") -> None:
    """Commit every change in the repository."""
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll until condition() holds (a bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def add_modules(root: Path, **modules: str) -> None:
    """Write project modules and commit them (experiments record a clean tree)."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "modules")


def events(experiment, name: str) -> list[dict]:
    return [e for e in experiment.events() if e["event"] == name]


# an experiment module shared by the execution tests: BATCH_FAIL=1,3 makes those indices raise
BATCH = '''
import os

from machinable import Experiment


class Batch(Experiment):
    class Config:
        index: int = 0

    def on_execute(self):
        if str(self.config.index) in os.environ.get("BATCH_FAIL", "").split(","):
            raise RuntimeError(f"experiment {self.config.index} failed on purpose")
        print(f"batch {self.config.index} done")
        return self.config.index
'''


@pytest.fixture
def _bounded():
    """Every wait is bounded: a test that hangs dumps every thread's stack and ends the run.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("_bounded")``."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    monkeypatch.delenv("MACHINABLE_STORAGE", raising=False)
    monkeypatch.setenv("MACHINABLE_FSYNC", os.environ.get("MACHINABLE_FSYNC", "1"))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project from .machinable-template in a committed git repo; cwd is its root."""
    root = tmp_path / "project"
    shutil.copytree(TEMPLATE, root)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    monkeypatch.chdir(root)
    from machinable.project import Project

    with Project(root):
        yield root


@pytest.fixture
def plain_project(tmp_path, monkeypatch):
    """A project folder from the template, not a git repository."""
    root = tmp_path / "plain"
    shutil.copytree(TEMPLATE, root)
    monkeypatch.chdir(root)
    from machinable.project import Project

    with Project(root):
        yield root


def run_machinable(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `machinable` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "machinable.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, input=input,
    )


def run_python(cwd: Path, code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter inside the project."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MACHINABLE_REQUIRE_SLURM=1 (CI) a skipped Slurm test is a failure, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("slurm") and os.environ.get("MACHINABLE_REQUIRE_SLURM") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"Slurm test skipped, but MACHINABLE_REQUIRE_SLURM=1 requires it to run: {reason}"


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(cwd: Path, *args: str, columns: int = 120, term: str = "xterm") -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; (exit code, text without colors)."""
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "TERM": term}
    process = subprocess.Popen([sys.executable, "-m", "machinable.cli", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = process.wait(timeout=120)
    return code, ANSI.sub("", b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"))
