"""Concurrent launches: every experiment runs exactly once.

16 processes launch an overlapping, shuffled mix of 50 configs (each process
repeats some of its own) through ``get(...).launch()`` at the same time.
Each execution appends one line to a side-effect file outside the storage,
so the count is taken from what the experiments did, not from what
machinable says: every config must have run exactly once, in one experiment.

The same holds when the processes reach one storage folder through two
different paths (the folder and a symlink to it).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from conftest import git

PROCESSES = 16
CONFIGS = 50
PER_PROCESS = 10

COUNTED = '''
import os

from machinable import Experiment


class Counted(Experiment):
    class Config:
        k: int = 0

    def on_execute(self):
        line = f"{self.config.k} {self.experiment_id} {os.getpid()}\\n".encode()
        fd = os.open(os.environ["COUNTED_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return self.config.k
'''

LAUNCHER = """
import sys
from machinable import get

for k in sys.argv[1:]:
    get("counted", {"k": int(k)}).launch()
"""


@pytest.fixture
def counted_project(project):
    (project / "counted.py").write_text(COUNTED)
    git(project, "add", "counted.py")
    git(project, "commit", "-q", "-m", "counted")
    return project


def _plans(seed: int) -> list[list[int]]:
    """Per process: PER_PROCESS configs, overlapping between processes, with repeats;
    together they cover every config."""
    rng = random.Random(seed)
    plans = []
    for i in range(PROCESSES):
        own = [(i * 3 + j) % CONFIGS for j in range(PER_PROCESS - 3)]
        own += rng.sample(own, 3)  # repeats within one process
        rng.shuffle(own)
        plans.append(own)
    assert set().union(*plans) == set(range(CONFIGS))
    return plans


def _run_all(project: Path, storages: list[Path], log: Path, seed: int) -> None:
    procs = []
    for i, plan in enumerate(_plans(seed)):
        env = {**os.environ, "MACHINABLE_STORAGE": str(storages[i % len(storages)]), "COUNTED_LOG": str(log),
               "MACHINABLE_FSYNC": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", LAUNCHER, *map(str, plan)], cwd=project, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()


def _check_exactly_once(storage: Path, log: Path) -> None:
    lines = log.read_text().splitlines()
    runs = Counter(int(line.split()[0]) for line in lines)
    assert sorted(runs) == list(range(CONFIGS)), "every config ran"
    assert set(runs.values()) == {1}, f"configs that ran more than once: {[k for k, n in runs.items() if n > 1]}"
    ids = {line.split()[1] for line in lines}
    directories = [p for p in storage.iterdir() if p.is_dir() and len(p.name) == 32]
    assert {p.name for p in directories} == ids, "one experiment per config, each the one that ran"
    for directory in directories:
        events = [orjson.loads(line)["event"] for line in (directory / "events.jsonl").read_bytes().splitlines()]
        assert events.count("started") == 1 and events.count("finished") == 1, events
        assert (directory / "MANIFEST").exists()

    from machinable.storage import Storage

    reader = Storage({"directory": str(storage)})
    reader.settle()
    rows = {row["id"]: row for row in reader.fresh_index().query()}
    assert set(rows) == ids
    for experiment_id in ids:
        expected = reader.read_row(experiment_id)
        assert rows[experiment_id] == {k: v for k, v in expected.items() if k in rows[experiment_id]}
    reader.index.close()


def test_sixteen_processes_launch_overlapping_configs_once(counted_project, tmp_path):
    storage = counted_project / "storage"
    log = tmp_path / "runs.log"
    _run_all(counted_project, [storage], log, seed=1)
    _check_exactly_once(storage, log)

    # launching everything again runs nothing
    _run_all(counted_project, [storage], log, seed=2)
    _check_exactly_once(storage, log)


def test_two_paths_to_one_storage_through_a_symlink(counted_project, tmp_path):
    real = tmp_path / "real-storage"
    real.mkdir()
    link = tmp_path / "linked-storage"
    link.symlink_to(real, target_is_directory=True)
    log = tmp_path / "runs.log"
    _run_all(counted_project, [real, link], log, seed=3)
    _check_exactly_once(real, log)
