"""Crash at any point: SIGKILL a real launching process at random moments.

Each iteration starts ``python -c "get('crashy', {'n': N}).launch()"`` and
kills it, either after a random delay or right after a chosen phase became
visible on disk (claimed and running, writing records, writing data,
finishing and sealing). After every kill, what a user can read must be
intact: every stored JSON parses, no half line of events.jsonl or
records.jsonl is visible to readers, the index agrees with a rebuild, and no
experiment that was finished before stops being finished. Finally every
experiment launched in the loop is launched once more without a kill and
must finish: crashed runs resume in place.

``MACHINABLE_CRASH_ITERATIONS`` sets the number of kills (CI: 50).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from conftest import git

ITERATIONS = int(os.environ.get("MACHINABLE_CRASH_ITERATIONS", "10"))

CRASHY = '''
from machinable import Experiment


class Crashy(Experiment):
    class Config:
        n: int = 0
        rows: int = 300

    def on_execute(self):
        for i in range(self.config.rows):
            self.record(step=i, value=(i * self.seed) % 97)
        self.save_data("table.json", {"n": self.config.n, "values": list(range(2000))})
        self.save_data("blob.txt", "x" * 200_000)
        return {"n": self.config.n, "seed": self.seed}
'''

LAUNCH = "import sys\nfrom machinable import get\nget('crashy', {'n': int(sys.argv[1])}).launch()\n"

# what to wait for before the kill: (file that must exist, text it must contain)
PHASES = {
    "random": None,
    "running": ("events.jsonl", b'"started"'),
    "records": ("records.jsonl", b"step"),
    "data": ("data/table.json", b""),
    "finishing": ("events.jsonl", b'"finished"'),
}


@pytest.fixture
def crash_project(project):
    (project / "crashy.py").write_text(CRASHY)
    git(project, "add", "crashy.py")
    git(project, "commit", "-q", "-m", "crashy")
    return project


def _spawn(project: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(n)], cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "MACHINABLE_HEARTBEAT_TIMEOUT": "30"},
    )


def _experiment_dirs(storage: Path) -> list[Path]:
    if not storage.is_dir():
        return []
    return sorted(p for p in storage.iterdir() if p.is_dir() and len(p.name) == 32)


def _sizes(storage: Path, name: str) -> dict[Path, int]:
    sizes = {}
    for directory in _experiment_dirs(storage):
        try:
            sizes[directory] = (directory / name).stat().st_size
        except OSError:
            pass
    return sizes


def _wait_for(proc: subprocess.Popen, storage: Path, phase: tuple[str, bytes], before: dict[Path, int], deadline: float) -> bool:
    """Wait until this launch wrote ``needle`` into ``name`` (of any experiment)."""
    name, needle = phase
    while proc.poll() is None and time.monotonic() < deadline:
        for directory in _experiment_dirs(storage):
            try:
                with open(directory / name, "rb") as f:
                    f.seek(before.get(directory, 0))
                    new = f.read()
            except OSError:
                continue
            if (needle in new) if needle else directory not in before:
                return True
        time.sleep(0.0005)
    return False


def _launch_and_kill(project: Path, n: int, rng: random.Random, typical: float, finished: bool) -> str:
    """Launch config ``n`` and SIGKILL it; returns the phase aimed at ('-' if it ended first).
    A finished experiment writes nothing more: its launch is killed at a random time."""
    storage = project / "storage"
    phase = "random" if finished else rng.choice(list(PHASES))
    target = PHASES[phase]
    before = _sizes(storage, target[0]) if target else {}
    proc = _spawn(project, n)
    if target is None:
        time.sleep(rng.uniform(0, typical))
    elif _wait_for(proc, storage, target, before, time.monotonic() + 20):
        time.sleep(rng.uniform(0, 0.004))
    if proc.poll() is not None:
        phase = "-"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return phase


def _complete_lines(path: Path) -> list[bytes]:
    """The lines a reader sees: every newline-terminated line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data.split(b"\n")[:-1]


def _check_readable(storage: Path, finished_before: dict[str, object]) -> dict[str, object]:
    """Everything a reader can see parses; finished experiments stay finished."""
    from machinable.storage import Storage, verify_manifest

    finished_now: dict[str, object] = {}
    for directory in _experiment_dirs(storage):
        for path in directory.rglob("*"):
            if path.is_file() and (path.suffix == ".json" or path.name == "MANIFEST") and not path.name.startswith("."):
                orjson.loads(path.read_bytes())  # every stored JSON parses
        for name in ("events.jsonl", "records.jsonl"):
            for line in _complete_lines(directory / name):
                assert isinstance(orjson.loads(line), dict), f"{directory.name}/{name}: {line[:80]!r}"
        events = [orjson.loads(line)["event"] for line in _complete_lines(directory / "events.jsonl")]
        assert events and events[0] == "created"
        assert events.count("finished") <= 1, f"{directory.name} finished twice: {events}"
        if "finished" in events:
            assert events[-1] == "finished", events
            result = orjson.loads((directory / "data" / "result.json").read_bytes())
            finished_now[directory.name] = result
        if (directory / "MANIFEST").exists():
            assert verify_manifest(directory) == []
        elif "finished" in events:
            assert (directory / ".sealing").exists(), "finished unsealed only while sealing"
    for experiment_id, result in finished_before.items():
        assert finished_now.get(experiment_id) == result, f"finished experiment {experiment_id} was lost or changed"

    _check_index(storage)
    return finished_now


def _check_index(storage: Path) -> None:
    """The index agrees with a rebuild from the directories.

    Right after a kill it may lag behind a ledger by the events the killed
    process appended but had not yet copied into the index, never run ahead
    of it; readers (``find``, ``list``) settle such rows first, after which it
    agrees exactly.
    """
    from machinable.index import ledger_columns
    from machinable.storage import Storage

    reader = Storage({"directory": str(storage)})
    rebuilt = {d.name: reader.read_row(d.name) for d in _experiment_dirs(storage)}
    columns = ("state", "started", "finished", "execution")
    index = reader.fresh_index()
    seen = {row["id"]: row for row in index.query() if (storage / row["id"]).is_dir()}
    assert set(seen) == set(rebuilt)
    for experiment_id, row in rebuilt.items():
        mine = {c: seen[experiment_id][c] for c in columns}
        data = (storage / experiment_id / "events.jsonl").read_bytes()
        lines = data.split(b"\n")
        prefixes = [b"\n".join(lines[:n]) + b"\n" for n in range(max(len(lines) - 4, 1), len(lines))]
        allowed = [{c: ledger_columns(storage / experiment_id, p)[c] for c in columns} for p in prefixes]
        assert mine in allowed, f"index row of {experiment_id} runs ahead of its ledger: {mine} vs {allowed[-1]}"
    reader.settle()
    seen = {row["id"]: row for row in index.query() if (storage / row["id"]).is_dir()}
    for experiment_id, row in rebuilt.items():
        assert seen[experiment_id] == {k: v for k, v in row.items() if k in seen[experiment_id]}, experiment_id


def _storage_state(storage: Path) -> str:
    """What a failure report shows: every record's files (mode, size) and its ledger."""
    lines = []
    for directory in _experiment_dirs(storage):
        lines.append(f"{directory.name}:")
        for path in sorted(directory.rglob("*")):
            info = path.lstat()
            lines.append(f"  {oct(info.st_mode & 0o777)} {info.st_size:>8} {path.relative_to(directory)}")
        try:
            lines.append("  events: " + (directory / "events.jsonl").read_bytes()[-1500:].decode(errors="replace"))
        except OSError as e:
            lines.append(f"  events: {e}")
    return "\n".join(lines)


def test_sigkill_at_random_moments_loses_nothing(crash_project):
    storage = crash_project / "storage"
    seed = int(os.environ.get("MACHINABLE_CRASH_SEED", random.randrange(2**32)))
    print(f"MACHINABLE_CRASH_SEED={seed}")
    rng = random.Random(seed)

    start = time.monotonic()
    calibration = _spawn(crash_project, 0)
    assert calibration.wait(timeout=60) == 0, calibration.stderr.read().decode()
    typical = time.monotonic() - start
    finished = _check_readable(storage, {})
    assert len(finished) == 1

    configs = [0]
    phases: list[str] = []
    for _ in range(ITERATIONS):
        unfinished = [n for n in configs if not _is_finished(storage, n, finished)]
        if not unfinished or rng.random() < 0.15:
            n = rng.choice(configs) if rng.random() < 0.3 else len(configs)
        else:
            n = rng.choice(unfinished)
        if n == len(configs):
            configs.append(n)
        phases.append(_launch_and_kill(crash_project, n, rng, typical, _is_finished(storage, n, finished)))
        try:
            finished = _check_readable(storage, finished)
        except AssertionError:
            print(f"after kill {len(phases)} of config {n} (phase aimed at: {phases[-1]}):\n{_storage_state(storage)}")
            raise

    # the next launch of each config sees it finished or resumes it
    for n in configs:
        proc = _spawn(crash_project, n)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    print(f"after the final launches (phases aimed at: {phases}):\n{_storage_state(storage)}")
    finished = _check_readable(storage, finished)
    for directory in _experiment_dirs(storage):
        assert (directory / "MANIFEST").exists() and not (directory / ".sealing").exists(), f"{directory.name} not sealed"
        assert not list(directory.rglob(".*.tmp")), "temp files of interrupted writes are cleaned up"
    results = sorted(r["n"] for r in finished.values())  # type: ignore[index]
    assert results == sorted(configs), "every config ends with exactly one finished experiment"
    assert len(_experiment_dirs(storage)) == len(configs), "crashed launches were resumed in place, not duplicated"
    for directory in _experiment_dirs(storage):
        rows = [orjson.loads(line) for line in _complete_lines(directory / "records.jsonl")]
        assert [r["step"] for r in rows[-300:]] == list(range(300)), "the finishing attempt recorded every row"
    from collections import Counter

    print(f"crash loop: {ITERATIONS} kills, phases {dict(Counter(phases))}, {len(configs)} experiments")


def _is_finished(storage: Path, n: int, finished: dict[str, object]) -> bool:
    return any(r["n"] == n for r in finished.values())  # type: ignore[index]


KILL_AFTER_MANIFEST = """import os, signal, sys
import machinable.storage as storage
write_manifest = storage.write_manifest
def killed_after(directory):
    write_manifest(directory)
    os.kill(os.getpid(), signal.SIGKILL)  # MANIFEST published, the seal not complete yet
storage.write_manifest = killed_after
from machinable import get
get('crashy', {'n': 7}).launch()
"""


def test_sigkill_right_after_the_manifest_is_completed_by_the_next_launch(crash_project):
    """The one moment the random loop rarely hits: MANIFEST written, record not yet read-only."""
    storage = crash_project / "storage"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_MANIFEST], cwd=crash_project, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    (directory,) = _experiment_dirs(storage)
    assert (directory / "MANIFEST").exists() and (directory / ".sealing").exists()
    finished = _check_readable(storage, {})

    proc = _spawn(crash_project, 7)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    assert _check_readable(storage, finished) == finished
    assert not (directory / ".sealing").exists(), "the next launch completes the seal"
    assert all(not path.stat().st_mode & 0o222 for path in [directory, *directory.rglob("*")]
               if path.name != ".claim" and "reproductions" not in path.relative_to(directory).parts)


def test_a_sealed_record_left_writable_is_made_read_only_by_the_next_launch(crash_project):
    """A kill between removing .sealing and clearing the folder's write bit."""
    storage = crash_project / "storage"
    proc = _spawn(crash_project, 7)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    (directory,) = _experiment_dirs(storage)
    os.chmod(directory, directory.stat().st_mode | 0o200)  # the state such a kill leaves
    finished = _check_readable(storage, {})
    proc = _spawn(crash_project, 7)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    assert _check_readable(storage, finished) == finished
    assert not directory.stat().st_mode & 0o222, "the next launch clears the folder's write bit"
