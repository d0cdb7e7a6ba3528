"""``machinable gc``: unfinished experiments by age, leftovers, unreferenced objects.

Finished records are never touched unless named by id with
``--include-finished``; running experiments (claim held) never; a dry run
changes nothing; what remains verifies and the index agrees with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from conftest import git, run_machinable

MODULES = {
    "failing.py": "from machinable import Experiment\n\nclass Failing(Experiment):\n    def on_execute(self):\n        raise RuntimeError('no')\n",
    "gated.py": (
        "import time\nfrom pathlib import Path\nfrom machinable import Experiment\n\n"
        "class Gated(Experiment):\n    def on_execute(self):\n"
        "        Path('gated-started').touch()\n"
        "        while not Path('gate').exists():\n            time.sleep(0.05)\n"
    ),
}


@pytest.fixture
def gc_project(project):
    for name, text in MODULES.items():
        (project / name).write_text(text)
    (project / ".gitignore").write_text((project / ".gitignore").read_text() + "gate\ngated-started\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "modules")
    return project


def _snapshot(storage: Path) -> dict[str, bytes]:
    return {p.relative_to(storage).as_posix(): p.read_bytes() for p in sorted(storage.rglob("*"))
            if p.is_file() and not p.name.startswith("index.sqlite") and not {".locks", ".cache"} & set(p.parts)}


def _experiments(storage: Path) -> set[str]:
    return {p.name for p in storage.iterdir() if p.is_dir() and len(p.name) == 32}


def _populate(project: Path):
    from machinable import get
    from machinable.errors import ExecutionError

    finished = get("estimate_gravity", {"verbose": False})
    finished.launch()
    failed = get("failing")
    with pytest.raises(ExecutionError):
        failed.launch()
    created = get("estimate_gravity", {"time_dilation": 2.0})
    created.commit()
    storage = project / "storage"
    stray = storage / ".objects" / "ff" / ("0" * 30)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"print('no experiment refers to me')\n")
    crashed_commit = storage / ".tmp" / "5f3a"
    crashed_commit.mkdir(parents=True, exist_ok=True)
    (crashed_commit / "experiment.json").write_bytes(b'{"format": 1, "id": "half')
    torn_object = storage / ".objects" / "ff" / ".abc.1234.tmp"
    torn_object.write_bytes(b"half")
    return finished, failed, created, stray, crashed_commit, torn_object


def test_young_unfinished_experiments_are_kept_by_default(gc_project):
    finished, failed, created, *_ = _populate(gc_project)
    result = run_machinable(gc_project, "gc")
    assert result.returncode == 0, result.stderr
    assert _experiments(gc_project / "storage") == {finished.experiment_id, failed.experiment_id, created.experiment_id}
    assert "removed 1 unreferenced source object" in result.stdout


def test_dry_run_lists_and_changes_nothing_then_gc_removes_exactly_that(gc_project):
    storage = gc_project / "storage"
    finished, failed, created, stray, crashed_commit, torn_object = _populate(gc_project)
    for leftover in (crashed_commit, torn_object):
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    before = _snapshot(storage)

    dry = run_machinable(gc_project, "gc", "--older-than", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _snapshot(storage) == before
    assert f"would remove experiment {failed.experiment_id}" in dry.stdout
    assert f"would remove experiment {created.experiment_id}" in dry.stdout
    assert finished.experiment_id not in dry.stdout
    assert "would remove 1 unreferenced source object" in dry.stdout
    assert "would remove 2 leftovers of interrupted writes" in dry.stdout
    assert "Dry run: nothing removed" in dry.stdout

    result = run_machinable(gc_project, "gc", "--older-than", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert sorted(r["path"] for r in report["removed"] if r["kind"] == "experiment") == sorted([failed.experiment_id, created.experiment_id])
    assert _experiments(storage) == {finished.experiment_id}
    assert not stray.exists() and not crashed_commit.exists() and not torn_object.exists()
    assert run_machinable(gc_project, "verify").returncode == 0

    from machinable.storage import Storage

    reader = Storage.current()
    reader.settle()
    assert [row["id"] for row in reader.fresh_index().query()] == [finished.experiment_id]
    from machinable import get

    assert get("estimate_gravity", {"verbose": False}).is_finished()  # still found, still finished


def test_finished_records_need_include_finished_and_their_ids(gc_project):
    storage = gc_project / "storage"
    finished, failed, created, *_ = _populate(gc_project)
    before = _snapshot(storage)

    result = run_machinable(gc_project, "gc", finished.short_id)
    assert result.returncode == 2 and "--include-finished" in result.stderr and "Traceback" not in result.stderr
    result = run_machinable(gc_project, "gc", "--include-finished")
    assert result.returncode == 2 and "explicit id" in result.stderr
    result = run_machinable(gc_project, "gc", "--include-finished", "--older-than", "0")
    assert result.returncode == 2
    assert _snapshot(storage) == before

    result = run_machinable(gc_project, "gc", "--include-finished", finished.short_id, failed.short_id)
    assert result.returncode == 0, result.stderr
    assert _experiments(storage) == {created.experiment_id}, "only the named ones, whatever their age"
    assert run_machinable(gc_project, "verify").returncode == 0


def test_a_running_experiment_is_never_removed(gc_project):
    storage = gc_project / "storage"
    proc = subprocess.Popen([sys.executable, "-c", "from machinable import get; get('gated').launch()"], cwd=gc_project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (gc_project / "gated-started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        [running] = _experiments(storage)
        for args in (("gc", "--older-than", "0"), ("gc", running[:12]), ("gc", "--dry-run", "--older-than", "0")):
            result = run_machinable(gc_project, *args)
            assert result.returncode == 0, result.stderr
            assert f"kept {running[:12]}: running" in result.stdout
            assert _experiments(storage) == {running}
    finally:
        (gc_project / "gate").touch()
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_gc_during_concurrent_launches_never_removes_a_needed_object(gc_project):
    """Each launch adds a new source object; gc sweeping objects at the same
    time must not take one of them for garbage (commits hold the objects lock)."""
    launcher = (
        "from pathlib import Path\nfrom machinable import get\n"
        "for i in range(8):\n"
        "    Path(f'fresh{i}.py').write_text(f'from machinable import Experiment\\n\\nclass F(Experiment):\\n    def on_execute(self):\\n        return {i}\\n')\n"
        "    get(f'fresh{i}').launch()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=gc_project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sweeps = 0
    while proc.poll() is None:
        result = run_machinable(gc_project, "gc", "--older-than", "1h")
        assert result.returncode == 0, result.stderr
        sweeps += 1
    assert proc.returncode == 0, proc.stderr.read()
    assert sweeps >= 1
    result = run_machinable(gc_project, "verify")
    assert result.returncode == 0, result.stdout
    assert "8 experiments intact" in result.stdout


def test_bad_age_is_a_usage_error(gc_project):
    result = run_machinable(gc_project, "gc", "--older-than", "soon")
    assert result.returncode == 2 and "Invalid age 'soon'" in result.stderr and "Traceback" not in result.stderr


def test_an_experiment_queued_on_a_scheduler_is_kept_by_age(gc_project):
    """A Slurm job may wait in the queue for days: gc keeps what was submitted
    and not heard of since (reconciliation records vanished jobs), unless named."""
    from machinable import get

    queued = get("estimate_gravity", {"time_dilation": 4.0})
    queued.commit()
    queued.ledger.append("dispatched", execution={"module": "machinable.execution.slurm"})
    queued.ledger.append("submitted", job_id="4711", log="-", script="-")
    result = run_machinable(gc_project, "gc", "--older-than", "0")
    assert result.returncode == 0, result.stderr
    assert f"kept {queued.short_id}: submitted to a scheduler" in result.stdout
    assert queued.directory.is_dir()
    assert run_machinable(gc_project, "gc", queued.short_id).returncode == 0
    assert not queued.directory.exists()
