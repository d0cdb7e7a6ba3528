"""A full disk and read-only storage: clear errors, no half-written records.

The storage lives on a small tmpfs the test mounts (root only: CI runs as
root; elsewhere these tests skip and say why) and unmounts afterwards.
Launches go through the real command line in subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from conftest import git, run_machinable, run_python

FILLER = '''
import os
from pathlib import Path

from machinable import Experiment


class Filler(Experiment):
    class Config:
        size: int = 10

    def on_execute(self):
        Path(os.environ["FILLER_MARKS"], f"ran-{self.config.size}").touch()
        self.record(step=1)
        self.save_data("big.bin", b"x" * self.config.size)
        return self.config.size
'''


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs these tests as root)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount not installed"
    return None


@pytest.fixture
def small_disk(tmp_path):
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mountpoint)], capture_output=True)
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


@pytest.fixture
def disk_project(project, small_disk, tmp_path):
    (project / "filler.py").write_text(FILLER)
    git(project, "add", "filler.py")
    git(project, "commit", "-q", "-m", "filler")
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"MACHINABLE_STORAGE": str(small_disk / "storage"), "FILLER_MARKS": str(marks)}
    return project, small_disk / "storage", marks, env


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk, then give back about ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _assert_whole(storage: Path) -> None:
    """No half-written file anywhere: JSON parses, JSON lines are whole, no temp files."""
    assert not list(storage.rglob(".*.tmp")), list(storage.rglob(".*.tmp"))
    tmp = storage / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())
    for path in storage.rglob("*"):
        if path.is_file() and (path.suffix == ".json" or path.name == "MANIFEST") and ".cache" not in path.parts:
            orjson.loads(path.read_bytes())
        if path.is_file() and path.suffix == ".jsonl":
            for line in path.read_bytes().split(b"\n")[:-1]:
                orjson.loads(line)


def _experiments(storage: Path) -> list[Path]:
    return [p for p in storage.iterdir() if p.is_dir() and len(p.name) == 32]


def test_full_disk_during_a_run_fails_clearly_and_resumes(disk_project):
    project, storage, marks, env = disk_project
    assert run_machinable(project, "filler", "size=10", "--launch", env=env).returncode == 0
    filler = _fill(storage.parent, leave=256 * 1024)

    result = run_machinable(project, "filler", "size=1000000", "--launch", env=env)
    assert result.returncode == 1, result
    assert "No space left on device while writing data file big.bin" in result.stderr
    assert "launch again" in result.stderr
    assert (marks / "ran-1000000").exists()
    _assert_whole(storage)
    [directory] = [d for d in _experiments(storage) if b"1000000" in (d / "experiment.json").read_bytes()]
    assert not (directory / "data" / "big.bin").exists()
    assert not (directory / "MANIFEST").exists()

    filler.unlink()
    result = run_machinable(project, "filler", "size=1000000", "--launch", env=env)
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line)["event"] for line in (directory / "events.jsonl").read_bytes().splitlines()]
    assert events.count("started") == 2 and events[-1] == "finished", events
    assert (directory / "data" / "big.bin").stat().st_size == 1000000
    assert len(_experiments(storage)) == 2, "resumed in place, no new record"
    assert run_machinable(project, "verify", env=env).returncode == 0


def test_full_disk_when_creating_a_record_leaves_nothing_behind(disk_project):
    project, storage, marks, env = disk_project
    assert run_machinable(project, "filler", "size=10", "--launch", env=env).returncode == 0
    filler = _fill(storage.parent)

    result = run_machinable(project, "filler", "size=20", "--launch", env=env)
    assert result.returncode == 1, result
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr  # the dirty-tree note at most, then the error
    assert not (marks / "ran-20").exists(), "nothing ran"
    assert len(_experiments(storage)) == 1
    _assert_whole(storage)

    filler.unlink()
    result = run_machinable(project, "filler", "size=20", "--launch", env=env)
    assert result.returncode == 0, result.stderr
    assert len(_experiments(storage)) == 2
    assert run_machinable(project, "verify", env=env).returncode == 0


def test_read_only_storage_refuses_before_any_execution(disk_project):
    project, storage, marks, env = disk_project
    assert run_machinable(project, "filler", "size=10", "--launch", env=env).returncode == 0
    stored = run_python(project, "from machinable import get; get('filler', {'size': 30}).commit()", env=env)
    assert stored.returncode == 0, stored.stderr  # stored, never run
    subprocess.run(["mount", "-o", "remount,ro", str(storage.parent)], check=True)
    before = sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*"))

    for size in ("20", "30"):  # a new config, and one already stored
        result = run_machinable(project, "filler", f"size={size}", "--launch", env=env)
        assert result.returncode == 1, result
        assert "Storage is not writable" in result.stderr and "Traceback" not in result.stderr
        assert not (marks / f"ran-{size}").exists(), "nothing executed"

    result = run_machinable(project, "verify", env=env)  # reading still works
    assert result.returncode == 0, result
    assert "2 experiments intact" in result.stdout
    assert run_machinable(project, "gc", "--dry-run", env=env).returncode == 0
    assert sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*")) == before
