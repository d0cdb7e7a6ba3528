"""The SQLite index agrees with the experiment folders, whatever happens to either.

The folders are the truth: every test compares what the index says with what
a rebuild from the folders alone says, or with what a user would check in the
folders themselves. Real projects, real git, real SQLite files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from machinable import Storage, get
from machinable.errors import ExecutionError, ExperimentNotFound, UsageError
from machinable.index import COLUMNS, PAGE, SCHEMA_VERSION, Index, read_row
from conftest import git, run_python

FLAKY = '''from machinable import Experiment


class Flaky(Experiment):
    class Config:
        x: int = 0
        lr: float = 0.1
        fail: bool = False

    def on_execute(self):
        self.record(step=1, loss=1.0 / (self.config.x + 1))
        if self.config.fail:
            raise RuntimeError("asked to fail")
        return self.config.x
'''


@pytest.fixture
def flaky(project):
    (project / "flaky.py").write_text(FLAKY)
    git(project, "add", "flaky.py")
    git(project, "commit", "-q", "-m", "flaky")
    return project


def make_writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def remove_by_hand(directory: Path) -> None:
    make_writable(directory)
    shutil.rmtree(directory)


def index_contents(index: Index) -> tuple[dict[str, tuple], set[tuple]]:
    rows = {r[0]: r for r in index.db.execute(f"SELECT {','.join(COLUMNS)} FROM experiments")}
    values = set(index.db.execute("SELECT id, key, value FROM config_values"))
    return rows, values


def rebuilt_contents(root: Path) -> tuple[dict[str, tuple], set[tuple]]:
    """What a rebuild from the folders alone holds, computed without the index."""
    from machinable.index import value_key

    rows, values = {}, set()
    for entry in os.scandir(root):
        if len(entry.name) == 32 and entry.is_dir():
            row = read_row(root, entry.name)
            rows[entry.name] = tuple(row.get(c) for c in COLUMNS)
            values |= {(entry.name, k, value_key(v)) for k, v in row["flat_config"].items()}
    return rows, values


# --- index == rebuild, under any sequence of operations ------------------------------


class IndexAgreesWithFolders(RuleBasedStateMachine):
    """Create, finish, fail, resume, delete the index, delete or copy folders by hand:
    after every step the index a reader sees equals a rebuild from the folders."""

    base: Path  # set by the test: outside the project, so that git sees no storage

    def __init__(self) -> None:
        super().__init__()
        self.root = self.base / f"storage-{uuid.uuid4().hex[:8]}"
        self.storage = Storage({"directory": str(self.root)})
        self.storage.__enter__()
        self.experiments: list = []

    def teardown(self) -> None:
        self.storage.__exit__(None, None, None)
        index = Index.at(self.root)
        if self.root.is_dir():
            # the explicit rebuild agrees too
            self.storage.rebuild_index()
            assert index_contents(index) == rebuilt_contents(self.root)

    @rule(x=st.integers(0, 3))
    def create(self, x: int) -> None:
        self.experiments.append(get.new("flaky", {"x": x}).commit())

    @rule(x=st.integers(0, 3))
    def launch(self, x: int) -> None:
        experiment = get("flaky", {"x": x})
        experiment.launch()
        self.experiments.append(experiment)

    @rule(x=st.integers(0, 3))
    def fail(self, x: int) -> None:
        experiment = get.new("flaky", {"x": x, "fail": True})
        with pytest.raises(ExecutionError):
            experiment.launch()
        self.experiments.append(experiment)

    @rule(i=st.integers(0, 20))
    def relaunch(self, i: int) -> None:
        """Launching again: nothing for a finished one, a resume for the others."""
        if not self.experiments:
            return
        experiment = self.experiments[i % len(self.experiments)]
        if not experiment.directory.is_dir():  # removed by hand
            return
        try:
            experiment.launch()
        except ExecutionError:
            pass

    @rule(with_wal=st.booleans())
    def delete_index(self, with_wal: bool) -> None:
        for suffix in ("", "-wal", "-shm") if with_wal else ("",):
            path = self.root / f"index.sqlite{suffix}"
            if path.exists():
                path.unlink()

    @rule(i=st.integers(0, 20))
    def delete_folder_by_hand(self, i: int) -> None:
        folders = sorted(p for p in self.root.glob("?" * 32) if p.is_dir()) if self.root.is_dir() else []
        if folders:
            remove_by_hand(folders[i % len(folders)])

    @rule(i=st.integers(0, 20))
    def append_event_behind_the_index(self, i: int) -> None:
        """A writer that does not update the index (an old version, a crash right after the append)."""
        folders = [p for p in sorted(self.root.glob("?" * 32)) if not (p / "MANIFEST").exists()] if self.root.is_dir() else []
        if folders:
            with open(folders[i % len(folders)] / "events.jsonl", "ab") as f:
                f.write(orjson.dumps({"format": 1, "event": "dispatched", "time": datetime.now(timezone.utc).isoformat()}) + b"\n")

    @invariant()
    def index_equals_rebuild(self) -> None:
        if not self.root.is_dir():
            return
        self.storage.settle()  # what find/list do before answering
        assert index_contents(self.storage.fresh_index()) == rebuilt_contents(self.root)


def test_index_equals_a_rebuild_after_any_sequence_of_operations(flaky, tmp_path):
    IndexAgreesWithFolders.base = tmp_path
    run_state_machine_as_test(
        IndexAgreesWithFolders,
        settings=settings(max_examples=25, stateful_step_count=10, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )


def test_every_write_keeps_the_index_equal_to_a_rebuild_without_any_repair(flaky):
    """Not only after settle(): the writers themselves keep rows exact."""
    storage = Storage.current()
    get("flaky", {"x": 1}).launch()
    with pytest.raises(ExecutionError):
        get.new("flaky", {"x": 2, "fail": True}).launch()
    get.new("flaky", {"x": 3}).commit()
    index = Index.at(storage.root)
    assert index_contents(index) == rebuilt_contents(storage.root)
    states = sorted(row[COLUMNS.index("state")] for row in index_contents(index)[0].values())
    assert states == ["created", "failed", "finished"]


# --- freshness: missing, damaged, other version, stale ---------------------------------------


def test_deleting_the_index_loses_nothing(flaky):
    for x in range(3):
        get("flaky", {"x": x}).launch()
    storage = Storage.current()
    before = index_contents(storage.fresh_index())
    for suffix in ("", "-wal", "-shm"):
        (storage.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    assert get("flaky", {"x": 1}).is_finished()  # found again, not created anew
    assert index_contents(storage.fresh_index()) == before
    assert len(list(storage.find("flaky"))) == 3


def test_a_damaged_index_file_is_replaced(flaky):
    get("flaky", {"x": 1}).launch()
    storage = Storage.current()
    storage.index.close()
    for suffix in ("-wal", "-shm"):
        (storage.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (storage.root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    result = run_python(flaky, "from machinable import Storage; print(Storage().find('flaky', x=1).count())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_an_index_of_another_schema_version_is_rebuilt(flaky):
    get("flaky", {"x": 1}).launch()
    storage = Storage.current()
    storage.index.close()
    db = sqlite3.connect(storage.root / "index.sqlite")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.execute("DELETE FROM experiments")  # an old index that knows nothing
    db.commit()
    db.close()
    result = run_python(flaky, "from machinable import Storage; s = Storage(); print(s.find('flaky').count(), "
                               "s.index.db.execute(\"SELECT value FROM meta WHERE key='schema'\").fetchone()[0])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", str(SCHEMA_VERSION)]


def test_folders_copied_in_or_removed_by_hand_are_noticed(flaky, tmp_path):
    storage = Storage.current()
    kept = get("flaky", {"x": 1})
    kept.launch()
    gone = get("flaky", {"x": 2})
    gone.launch()
    other = tmp_path / "other-storage"
    with Storage({"directory": str(other)}):
        copied = get("flaky", {"x": 3})
        copied.launch()
    assert {e.experiment_id for e in storage.find("flaky")} == {kept.experiment_id, gone.experiment_id}
    shutil.copytree(other / copied.experiment_id, storage.root / copied.experiment_id)
    remove_by_hand(storage.root / gone.experiment_id)
    assert {e.experiment_id for e in storage.find("flaky")} == {kept.experiment_id, copied.experiment_id}
    assert get("flaky", {"x": 3}).experiment_id == copied.experiment_id


def test_a_ledger_that_grew_behind_the_index_is_noticed_by_find(flaky):
    storage = Storage.current()
    experiment = get.new("flaky", {"x": 5}).commit()
    with open(experiment.directory / "events.jsonl", "ab") as f:  # as a writer that skips the index would
        f.write(orjson.dumps({"format": 1, "event": "dispatched", "time": datetime.now(timezone.utc).isoformat()}) + b"\n")
    assert [e.experiment_id for e in storage.find(state="dispatched")] == [experiment.experiment_id]
    assert list(storage.find(state="created")) == []


def test_a_run_whose_process_died_is_found_as_interrupted(flaky):
    script = (
        "import os\n"
        "from machinable import Experiment, get\n"
        "class Die(Experiment):\n"
        "    def on_execute(self):\n"
        "        os._exit(3)\n"
    )
    (flaky / "die.py").write_text(script)
    git(flaky, "add", "die.py")
    git(flaky, "commit", "-q", "-m", "die")
    result = run_python(flaky, "from machinable.experiment import get\ne = get('die').commit()\nprint(e.experiment_id, flush=True)\ne()")
    assert result.returncode == 3
    experiment_id = result.stdout.split()[0]
    storage = Storage.current()
    assert [row["id"] for row in storage.find(state="interrupted").rows()] == [experiment_id]
    assert list(storage.find(state="running")) == []


def test_a_second_process_finds_the_index_fresh(flaky):
    """The index keeps its WAL file when a process exits, so the storage folder's
    mtime stays put and the next process does not re-list every folder."""
    get("flaky", {"x": 1}).launch()
    code = "from machinable import Storage; s = Storage(); s.fresh_index(); print(s.index.fresh_mtime() is not None)"
    assert run_python(flaky, code).stdout.strip() == "True"
    mtime = (Storage.current().root).stat().st_mtime_ns
    assert run_python(flaky, "from machinable import Storage; print(Storage().index.fresh_mtime() is not None)").stdout.strip() == "True"
    assert Storage.current().root.stat().st_mtime_ns == mtime


# --- find -------------------------------------------------------------------------------------


def test_find_by_module_config_values_state_and_time(flaky):
    storage = Storage.current()
    one = get("flaky", {"x": 1, "lr": 0.5})
    one.launch()
    two = get("flaky", {"x": 2})
    two.launch()
    with pytest.raises(ExecutionError):
        get.new("flaky", {"x": 2, "fail": True}).launch()
    gravity = get("estimate_gravity", {"time_dilation": 1.5, "verbose": False})
    gravity.launch()

    assert [e.experiment_id for e in storage.find("flaky", x=1)] == [one.experiment_id]
    assert [e.experiment_id for e in storage.find("flaky", x=2, state="finished")] == [two.experiment_id]
    assert storage.find("flaky", x=2).count() == 2
    assert storage.find("flaky", lr=0.5).first() == one
    assert storage.find("estimate_gravity", time_dilation=1.5, state="finished").first() == gravity
    # loose by type: a float field stores 1.0, and 1 finds it; text finds the literal it spells
    assert storage.find(lr=0.1).count() == 2
    assert storage.find(x="2", fail="true").count() == 1
    assert storage.find("flaky", config={"x": 1.0}).count() == 1
    assert storage.find(state="failed").first().config.fail is True
    assert storage.find("nothing").count() == 0 and list(storage.find("nothing")) == []
    assert storage.find(since="1h").count() == 4
    assert storage.find(since=datetime.now(timezone.utc) + timedelta(hours=1)).count() == 0
    newest = [e.experiment_id for e in storage.find()]
    assert newest == [e.experiment_id for e in storage.find(order="oldest")][::-1]
    assert newest[0] == gravity.experiment_id
    assert [e.experiment_id for e in storage.find(limit=2, offset=1)] == newest[1:3]
    assert list(storage.find(limit=0)) == []


def test_find_objects_are_lazy_and_reusable(flaky):
    storage = Storage.current()
    found = storage.find("flaky", x=1)
    assert "x=..." in repr(found) and "flaky" in repr(found)
    assert list(found) == []  # evaluated when iterated, not when made
    get("flaky", {"x": 1}).launch()
    assert len(list(found)) == 1
    assert [row["config"] for row in found.rows()] == ['{"fail":false,"lr":0.1,"x":1}']


@pytest.mark.parametrize("kwargs, message", [
    ({"state": "done"}, "Invalid state 'done'"),
    ({"order": "best"}, "Invalid order 'best'"),
    ({"limit": -1}, "Invalid limit -1"),
    ({"since": "last tuesday"}, "Invalid time 'last tuesday'"),
])
def test_find_rejects_bad_arguments_with_a_clear_message(flaky, kwargs, message):
    with pytest.raises(UsageError, match=message):
        Storage.current().find(**kwargs)


def test_get_all_and_replicates_return_every_match(flaky):
    first = get("flaky", {"x": 1})
    first.launch()
    second = first.replicate()
    second.launch()
    get("flaky", {"x": 2}).launch()
    assert {e.experiment_id for e in first.replicates()} == {first.experiment_id, second.experiment_id}
    assert {e.experiment_id for e in get.all("flaky", x=1)} == {first.experiment_id, second.experiment_id}
    assert len(get.all("flaky")) == 3
    assert len(get.all()) == 3


def test_pages_return_every_row_in_order_without_a_cap(tmp_path):
    """Keyset pages: more rows than one page, in (created, id) order, none lost or repeated."""
    index = Index(tmp_path)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(PAGE * 2 + 7):
        created = (start + timedelta(seconds=i // 3)).isoformat(timespec="microseconds")  # ties in time
        rows.append({"id": uuid.uuid4().hex, "module": "m", "config_hash": "c", "code_hash": "h", "seed": str(i),
                     "state": "finished", "created": created, "config": "{}", "flat_config": {"i": i}})
    index.upsert_many(rows)
    expected = sorted(rows, key=lambda r: (r["created"], r["id"]), reverse=True)
    assert [r["id"] for r in index.pages("1", ())] == [r["id"] for r in expected]
    assert [r["id"] for r in index.pages("1", (), descending=False)] == [r["id"] for r in reversed(expected)]
    assert [r["id"] for r in index.pages("module=?", ("m",), offset=PAGE + 1)] == [r["id"] for r in expected[PAGE + 1:]]
    index.close()


def test_an_update_never_moves_a_row_back_to_an_older_ledger(tmp_path):
    index = Index(tmp_path)
    row = {"id": "a" * 32, "module": "m", "config_hash": "c", "code_hash": "h", "seed": "1", "created": "t",
           "config": "{}", "flat_config": {}}
    index.upsert({**row, "state": "running", "events_size": 300})
    index.upsert({**row, "state": "dispatched", "events_size": 200})  # a late refresh from an earlier read
    assert index.row("a" * 32)["state"] == "running"
    index.upsert({**row, "state": "finished", "events_size": 400})
    assert index.row("a" * 32)["state"] == "finished"
    index.close()


# --- id prefixes ----------------------------------------------------------------------------


def test_prefixes_resolve_when_unique_and_list_candidates_when_ambiguous(flaky):
    storage = Storage.current()
    experiments = [get.new("flaky", {"x": x}).commit() for x in range(17)]  # two must share a first digit
    ids = [e.experiment_id for e in experiments]
    for experiment_id in ids:
        unique = next(experiment_id[:n] for n in range(1, 33) if sum(i.startswith(experiment_id[:n]) for i in ids) == 1)
        assert storage.resolve(unique) == experiment_id
        assert storage.resolve(unique.upper()) == experiment_id
        assert storage.load(unique).experiment_id == experiment_id
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    with pytest.raises(ExperimentNotFound) as ambiguous:
        storage.resolve(shared)
    message = str(ambiguous.value)
    assert f"prefix {shared!r} is ambiguous" in message
    for experiment_id in ids:
        if experiment_id.startswith(shared):
            assert experiment_id[:12] in message
    assert "flaky" in message and "Give more characters" in message
    unknown = next(f"{n:06x}" for n in range(2**24) if not any(i.startswith(f"{n:06x}") for i in ids))
    for missing in (unknown, next(f"{n:032x}" for n in range(100) if f"{n:032x}" not in ids)):
        with pytest.raises(ExperimentNotFound, match="No experiment with id"):
            storage.resolve(missing)
    with pytest.raises(ExperimentNotFound, match="hexadecimal"):
        storage.resolve("xyz")


def test_a_damaged_record_is_listed_as_damaged_and_resolvable(flaky):
    storage = Storage.current()
    experiment = get("flaky", {"x": 1})
    experiment.launch()
    make_writable(experiment.directory)
    (experiment.directory / "experiment.json").write_text("{ not json")
    storage.rebuild_index()
    [row] = list(storage.find().rows())
    assert row["state"] == "damaged" and row["id"] == experiment.experiment_id
    assert list(storage.find()) == []  # cannot be restored as an experiment
    assert storage.resolve(experiment.experiment_id[:8]) == experiment.experiment_id


def test_reading_many_folders_in_parallel_chunks_gives_the_same_rows(flaky):
    """The path a rebuild of thousands of folders takes (threads, one chunk ahead)."""
    from machinable.index import _read_rows

    storage = Storage.current()
    for x in range(23):
        get.new("flaky", {"x": x}).commit()
    ids = sorted(p.name for p in storage.root.glob("?" * 32))
    progress, rows = [], []
    for done, part in _read_rows(storage.read_row, ids, chunk=5):
        progress.append(done)
        rows += part
    assert progress == [5, 10, 15, 20, 23]
    assert sorted(rows, key=lambda r: r["id"]) == [storage.read_row(i) for i in ids]
