"""Storage: the directory layout, format versions, atomic writes, objects, claims, sealing, location."""

from __future__ import annotations

import json
import os
import stat
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machinable import Project, Storage, get
from machinable.errors import ExperimentNotFound, StorageFormatError
from machinable.storage import (
    FORMAT,
    Claim,
    append_line,
    atomic_write,
    claim_is_held,
    dumps_value,
    get_object,
    loads_value,
    put_object,
    read_json,
    read_lines,
    repair_torn_tail,
    verify_manifest,
    write_json,
)

LAYOUT = {
    "experiment.json", "code.json", "git.json", "git.diff", "env.json", "events.jsonl",
    "output.log", "records.jsonl", "data", "MANIFEST",
}


def writable(path: Path) -> bool:
    return bool(stat.S_IMODE(path.stat().st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# --- the layout of a finished experiment ---------------------------------------------------------


def test_a_finished_experiment_has_every_file_of_the_layout(project):
    experiment = get("estimate_gravity")
    experiment.launch()
    directory = project / "storage" / experiment.experiment_id
    assert directory == experiment.directory
    names = {p.name for p in directory.iterdir()}
    assert LAYOUT <= names
    assert names - LAYOUT <= {"reproductions", ".claim"}

    record = read_json(directory / "experiment.json")
    assert {k: record[k] for k in ("format", "id", "module", "config", "config_hash", "code_hash", "seed", "algorithm")} == {
        "format": 1, "id": experiment.experiment_id, "module": "estimate_gravity",
        "config": {"time_dilation": 1.0, "verbose": True}, "config_hash": experiment.config_hash,
        "code_hash": experiment.code_hash, "seed": experiment.seed, "algorithm": "xxh3-128",
    }
    assert record["timestamp"] == experiment.timestamp.isoformat()

    code = read_json(directory / "code.json")
    assert list(code["files"]) == ["estimate_gravity.py"]
    source = (project / "estimate_gravity.py").read_bytes()
    assert get_object(project / "storage", code["files"]["estimate_gravity.py"]["object"]) == source
    assert code["code_hash"] == experiment.code_hash

    assert (directory / "output.log").read_text().startswith("Assuming height of 52")
    assert (directory / "records.jsonl").read_bytes() == b""
    assert orjson.loads((directory / "data" / "result.json").read_bytes()) == 1155.5555555555557
    assert (directory / "git.diff").read_bytes() == b""  # committed, clean tree


def test_every_stored_json_document_has_format_1(project):
    experiment = get("estimate_gravity")
    experiment.launch()
    storage = project / "storage"
    documents = [p for p in storage.rglob("*.json") if "data" not in p.relative_to(storage).parts]
    documents += list(storage.rglob("MANIFEST"))
    assert len(documents) >= 5
    for path in documents:
        assert json.loads(path.read_bytes())["format"] == 1, path
    events = [json.loads(line) for line in (experiment.directory / "events.jsonl").read_bytes().splitlines()]
    assert events and all(e["format"] == 1 for e in events)


def test_manifest_lists_every_file_with_its_digest_and_the_record_is_read_only(project):
    experiment = get("estimate_gravity")
    directory = experiment.directory
    experiment.commit()
    assert not (directory / "MANIFEST").exists()  # written at finish, not before
    assert writable(directory / "experiment.json")
    experiment.launch()

    manifest = read_json(directory / "MANIFEST")
    assert manifest["algorithm"] == "xxh3-128"
    from machinable.hashing import file_digest

    files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"MANIFEST", ".claim"}
    for rel, value in manifest["files"].items():
        assert value == file_digest(directory / rel)
    assert verify_manifest(directory) == []

    # read-only: the folder itself, its files and subfolders; reproductions/ stays writable
    for path in [directory, *directory.rglob("*")]:
        rel = path.relative_to(directory).parts
        if path.name == ".claim" or (rel and rel[0] == "reproductions"):
            continue
        assert not writable(path), path
    assert (directory / "reproductions").is_dir() and writable(directory / "reproductions")
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(PermissionError):
            (directory / "new-file").write_text("x")


def test_verify_reports_a_changed_file(project):
    experiment = get("estimate_gravity")
    experiment.launch()
    path = experiment.directory / "output.log"
    os.chmod(path, 0o644)
    path.write_text("tampered\n")
    assert verify_manifest(experiment.directory) == [f"{experiment.experiment_id}/output.log: content changed (digest differs from MANIFEST)"]


def test_source_objects_are_deduplicated(project):
    first = get("estimate_gravity", {"time_dilation": 2.0})
    first.commit()
    second = get("estimate_gravity", {"time_dilation": 3.0})
    second.commit()
    objects = [p for p in (project / "storage" / ".objects").rglob("*") if p.is_file()]
    assert len(objects) == 1
    assert objects[0].read_bytes() == (project / "estimate_gravity.py").read_bytes()


def test_dirty_tree_records_the_diff(project):
    path = project / "estimate_gravity.py"
    path.write_text(path.read_text().replace("height = 52", "height = 52.0"))
    experiment = get("estimate_gravity")
    experiment.commit()
    diff = (experiment.directory / "git.diff").read_bytes()
    assert b"-        height = 52\n+        height = 52.0\n" in diff
    assert read_json(experiment.directory / "git.json")["dirty"] is True


# --- where storage is ----------------------------------------------------------------------


def test_default_storage_is_under_the_project_root(project, tmp_path, monkeypatch):
    get("estimate_gravity").commit()
    assert len(list((project / "storage").glob("[0-9a-f]" * 32))) == 1
    # a Project(path) elsewhere than the cwd has its own storage
    other = tmp_path / "other"
    other.mkdir()
    (other / "estimate_gravity.py").write_text((project / "estimate_gravity.py").read_text())
    with Project(other):
        get("estimate_gravity").commit()
    assert len(list((other / "storage").glob("[0-9a-f]" * 32))) == 1


def test_machinable_storage_environment_variable(project, tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    monkeypatch.setenv("MACHINABLE_STORAGE", str(target))
    experiment = get("estimate_gravity")
    experiment.launch()
    assert experiment.directory == target / experiment.experiment_id
    assert (target / experiment.experiment_id / "MANIFEST").exists()
    assert not (project / "storage").exists()
    assert get("estimate_gravity").experiment_id == experiment.experiment_id


def test_storage_element_as_a_context(project, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    with get("machinable.storage", {"directory": str(a)}):
        first = get("estimate_gravity")
        first.launch()
    with get("machinable.storage", {"directory": str(b)}) as storage:
        assert isinstance(storage, Storage) and storage.root == b
        second = get("estimate_gravity")  # another storage: not the experiment in a
        assert second.experiment_id != first.experiment_id
        second.launch()
    assert [p.name for p in a.glob("[0-9a-f]" * 32)] == [first.experiment_id]
    assert [p.name for p in b.glob("[0-9a-f]" * 32)] == [second.experiment_id]
    assert not (project / "storage").exists()
    with get("machinable.storage", {"directory": "relative"}) as storage:
        assert storage.root == project / "relative"


def test_resolve_load_and_find(project):
    experiment = get("estimate_gravity", {"time_dilation": 2.0})
    experiment.launch()
    other = get("estimate_gravity", {"time_dilation": 3.0})
    other.commit()
    storage = Storage.current()
    assert storage.resolve(experiment.experiment_id[:8]) == experiment.experiment_id
    loaded = storage.load(experiment.experiment_id[:10])
    assert loaded.experiment_id == experiment.experiment_id and loaded.is_finished()
    assert loaded.config.time_dilation == 2.0 and loaded.seed == experiment.seed
    assert {e.experiment_id for e in storage.find("estimate_gravity")} == {experiment.experiment_id, other.experiment_id}
    assert [e.experiment_id for e in storage.find("estimate_gravity", time_dilation=3.0)] == [other.experiment_id]
    with pytest.raises(ExperimentNotFound, match="'zz'"):
        storage.resolve("zz")
    with pytest.raises(ExperimentNotFound, match="No experiment"):
        storage.resolve("f" * 31)


# --- primitives ----------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_documents_carry_their_format_and_future_formats_are_refused(tmp_path):
    path = tmp_path / "doc.json"
    write_json(path, {"a": 1})
    assert read_json(path) == {"format": FORMAT, "a": 1}
    path.write_bytes(orjson.dumps({"format": FORMAT + 1}))
    with pytest.raises(StorageFormatError, match="Upgrade machinable"):
        read_json(path)
    path.write_bytes(b'{"format": 1, "a": ')
    with pytest.raises(StorageFormatError, match="damaged"):
        read_json(path)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=8), max_size=4), max_size=6),
       st.binary(max_size=20))
def test_json_lines_round_trip_and_a_torn_tail_is_never_read(tmp_path_factory, rows, torn):
    path = tmp_path_factory.mktemp("lines") / "rows.jsonl"
    for row in rows:
        append_line(path, row, sync=False)
    assert read_lines(path) == rows
    with open(path, "ab") as f:
        f.write(torn.replace(b"\n", b""))  # a crash mid-append: no newline at the end
    assert read_lines(path) == rows
    repair_torn_tail(path)
    assert read_lines(path) == rows
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN and 0.0 told from -0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return repr(a) == repr(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=8) | st.sampled_from(["NaN", "Infinity", "-Infinity", "\x00machinable-nonfinite-NaN", "null"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_user_values_round_trip_exactly_nan_and_infinity_included(value, indent):
    data = dumps_value(value, indent=indent)
    assert _same(loads_value(data), value)
    assert _same(json.loads(data), value)  # the stdlib reads what is written, NaN and infinity included
    if b"NaN" not in data and b"Infinity" not in data:
        orjson.loads(data)  # documents without them stay strict JSON


def test_numpy_values_round_trip_nan_and_infinity_included():
    numpy = pytest.importorskip("numpy")
    value = {"f32": numpy.float32("nan"), "f64": numpy.float64("-inf"), "array": numpy.array([[1.5, numpy.nan], [numpy.inf, 0.0]]),
             "ints": numpy.arange(3), "nested": [{"x": numpy.float16("inf")}]}
    data = dumps_value(value)
    assert data == b'{"f32":NaN,"f64":-Infinity,"array":[[1.5,NaN],[Infinity,0.0]],"ints":[0,1,2],"nested":[{"x":Infinity}]}'
    assert _same(loads_value(data), {"f32": float("nan"), "f64": -float("inf"), "array": [[1.5, float("nan")], [float("inf"), 0.0]],
                                     "ints": [0, 1, 2], "nested": [{"x": float("inf")}]})
    with pytest.raises(TypeError):
        dumps_value({"p": object()})
    with pytest.raises(orjson.JSONDecodeError):
        loads_value(b'{"a": NaN')  # damaged stays damaged


def test_objects_are_content_addressed(tmp_path):
    from machinable.hashing import digest_bytes

    key = digest_bytes(b"source")
    put_object(tmp_path, key, b"source")
    put_object(tmp_path, key, b"source")
    assert get_object(tmp_path, key) == b"source"
    assert get_object(tmp_path, digest_bytes(b"other")) is None


# --- claims ----------------------------------------------------------------------------------


def test_a_claim_is_exclusive_until_released(tmp_path):
    first, second = Claim(tmp_path), Claim(tmp_path)
    assert first.try_acquire()
    assert claim_is_held(tmp_path)
    assert not second.try_acquire()
    first.release()
    assert not claim_is_held(tmp_path)
    assert second.try_acquire()
    second.release()


def test_a_stale_claim_may_be_taken_over_and_its_holder_notices(tmp_path, monkeypatch):
    monkeypatch.setenv("MACHINABLE_HEARTBEAT_TIMEOUT", "5")
    holder = Claim(tmp_path)
    assert holder.try_acquire()
    assert not Claim(tmp_path).try_acquire()
    past = time.time() - 60
    os.utime(tmp_path / ".claim", (past, past))  # the holder stopped beating a minute ago
    assert not claim_is_held(tmp_path)
    taker = Claim(tmp_path)
    assert taker.try_acquire()
    assert taker.holds() and not holder.holds()
    holder.release()
    taker.release()


def test_heartbeat_keeps_a_long_claim_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MACHINABLE_HEARTBEAT_TIMEOUT", "2")
    holder = Claim(tmp_path)
    assert holder.try_acquire()
    past = time.time() - 60
    os.utime(tmp_path / ".claim", (past, past))
    holder.start_heartbeat(interval=0.05)
    deadline = time.monotonic() + 30
    while time.time() - (tmp_path / ".claim").stat().st_mtime > 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim_is_held(tmp_path)
    holder.release()


def test_storage_is_not_created_by_importing_or_getting(project):
    get("estimate_gravity")
    assert not (project / "storage").exists()


def test_experiments_of_a_storage_in_another_project_folder(project, tmp_path):
    """Records can be loaded from a storage whose project is elsewhere (no user code imported)."""
    experiment = get("estimate_gravity")
    experiment.launch()
    elsewhere = tmp_path / "reader"
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        from machinable import Storage
        e = Storage.at({str(project / 'storage')!r}).load({experiment.short_id!r})
        print(e.experiment_id, e.state, e.config.time_dilation, e.result)
    """)
    from conftest import run_python

    proc = run_python(elsewhere, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [experiment.experiment_id, "finished", "1.0", "1155.5555555555557"]


def test_storage_from_a_path_and_inside_a_storage_context(project, tmp_path):
    other = tmp_path / "other-runs"
    with get("machinable.storage", {"directory": str(other)}):
        get("estimate_gravity", {"time_dilation": 2.0}).launch()
        inside = Storage()  # the storage in use, as get.all() sees it
        assert inside.root == other
        assert [e.config.time_dilation for e in inside.find("estimate_gravity")] == [2.0]
    assert Storage(other).root == other and Storage(str(other)).find("estimate_gravity").count() == 1
    assert Storage().root == project / "storage"  # outside the context: the project's default
    assert not (project / "storage").exists()  # nothing was launched there


def test_find_with_a_config_key_no_stored_experiment_has_is_a_typo(project):
    from machinable.errors import UsageError

    assert Storage().find("estimate_gravity", time_diliation=1.0).count() == 0  # nothing stored yet: no error
    get("estimate_gravity", {"time_dilation": 2.0}).launch()
    with pytest.raises(UsageError, match=r"No stored experiment of estimate_gravity has the config key 'time_diliation'\. "
                                         r"Did you mean 'time_dilation'\? Stored keys: time_dilation, verbose\."):
        Storage().find("estimate_gravity", time_diliation=2.0)
    with pytest.raises(UsageError, match=r"No stored experiment has the config key 'lr'"):
        Storage().find(lr=0.1)
    assert Storage().find("estimate_gravity", time_dilation=3.0).count() == 0  # a known key, no match: empty
    assert Storage().find("estimate_gravity", verbose=True).count() == 1  # a default counts as stored
    assert Storage().find("elsewhere", lr=0.1).count() == 0  # a module with nothing stored: empty
