"""Damaged records are found, named by file, and never mistaken for intact ones.

Each test damages one finished record the way disks and people do (a
truncated experiment.json, garbage in events.jsonl, a deleted MANIFEST, a
modified data file, a missing source object), then checks what a user sees:
``machinable verify`` lists the problem with its file and exits 1, ``get()``
of that config says what is wrong and how to start over, and nothing is
re-executed into the damaged record.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest

from conftest import git, run_machinable


def _writable(path: Path) -> None:
    """Sealed records are read-only: give the test (not root) write access."""
    for target in (path.parent, path):
        if target.exists():
            os.chmod(target, stat.S_IMODE(target.stat().st_mode) | stat.S_IWUSR)


def _launch(time_dilation: float):
    from machinable import get

    experiment = get("estimate_gravity", {"time_dilation": time_dilation, "verbose": False})
    experiment.launch()
    assert experiment.is_finished()
    return experiment


def _verify(project: Path, *ids: str):
    result = run_machinable(project, "verify", *ids)
    assert "Traceback" not in result.stderr
    return result


def _damaged_get_message(time_dilation: float) -> str:
    from machinable import get
    from machinable.errors import StorageError

    with pytest.raises(StorageError) as info:
        get("estimate_gravity", {"time_dilation": time_dilation, "verbose": False})
    return str(info.value)


def test_intact_storage_verifies(project):
    experiment = _launch(1.0)
    result = _verify(project)
    assert result.returncode == 0, result.stdout
    assert "1 experiment intact" in result.stdout
    assert _verify(project, experiment.short_id).returncode == 0


def test_truncated_experiment_json(project):
    damaged, intact = _launch(1.0), _launch(2.0)
    path = damaged.directory / "experiment.json"
    _writable(path)
    path.write_bytes(path.read_bytes()[:40])

    result = _verify(project)
    assert result.returncode == 1
    assert f"{damaged.experiment_id}/experiment.json: damaged: not valid JSON" in result.stdout
    assert f"{damaged.experiment_id}/experiment.json: content changed (digest differs from MANIFEST)" not in result.stdout
    assert "1 of 2 experiments" in result.stdout
    assert intact.experiment_id not in result.stdout
    assert _verify(project, intact.short_id).returncode == 0

    message = _damaged_get_message(1.0)
    assert f"{damaged.experiment_id}/experiment.json" in message
    assert f"machinable verify {damaged.short_id}" in message
    assert "get.new('estimate_gravity'" in message

    from machinable import get

    fresh = get.new("estimate_gravity", {"time_dilation": 1.0, "verbose": False})
    fresh.launch()
    assert fresh.is_finished() and fresh.experiment_id != damaged.experiment_id


def test_garbage_events(project):
    damaged = _launch(1.0)
    path = damaged.directory / "events.jsonl"
    _writable(path)
    path.write_bytes(b"\x00\x17garbage{{{\nnot json either\n")

    result = _verify(project, damaged.short_id)
    assert result.returncode == 1
    assert f"{damaged.experiment_id}/events.jsonl: 2 lines are not valid events (damaged): lines 1, 2" in result.stdout
    assert f"{damaged.experiment_id}/events.jsonl: has no 'finished' event, yet the record is sealed" in result.stdout
    assert result.stdout.count("events.jsonl") == 2  # one line per problem, not a third "content changed"

    assert "events.jsonl" in _damaged_get_message(1.0)

    # launching the damaged experiment never executes into its sealed record
    from machinable.experiment import Experiment
    from machinable.storage import Storage

    before = sorted(p.name for p in damaged.directory.rglob("*"))
    Experiment.restore(Storage.current(), damaged.experiment_id).launch()
    assert sorted(p.name for p in damaged.directory.rglob("*")) == before
    assert path.read_bytes() == b"\x00\x17garbage{{{\nnot json either\n"

    # on the command line: the same message, and --force-new starts over
    args = ("estimate_gravity", "time_dilation=1.0", "verbose=false", "--launch")
    result = run_machinable(project, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{damaged.short_id} for estimate_gravity with this config is damaged" in result.stderr
    assert "--force-new" in result.stderr
    result = run_machinable(project, *args, "--force-new")
    assert result.returncode == 0, result.stderr
    assert run_machinable(project, *args).returncode == 0, "the new experiment is the one get() finds now"


def test_deleted_manifest(project):
    damaged = _launch(1.0)
    manifest = damaged.directory / "MANIFEST"
    _writable(manifest)
    manifest.unlink()

    result = _verify(project)
    assert result.returncode == 1
    assert f"{damaged.experiment_id}/MANIFEST: missing: the record is finished but its MANIFEST was deleted" in result.stdout
    assert "MANIFEST" in _damaged_get_message(1.0)

    # a launch does not quietly write a new MANIFEST over files nobody can vouch for
    from machinable.experiment import Experiment
    from machinable.storage import Storage

    Experiment.restore(Storage.current(), damaged.experiment_id).launch()
    assert not manifest.exists()


def test_modified_data_file(project):
    damaged = _launch(1.0)
    path = damaged.directory / "data" / "result.json"
    _writable(path)
    path.write_bytes(b"42.0")

    result = _verify(project)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"{damaged.experiment_id}/data/result.json: content changed (digest differs from MANIFEST)"
    )


def test_added_file_after_sealing(project):
    damaged = _launch(1.0)
    _writable(damaged.directory / "data" / "x")
    (damaged.directory / "data" / "extra.txt").write_text("sneaked in")
    result = _verify(project)
    assert result.returncode == 1
    assert f"{damaged.experiment_id}/data/extra.txt: not in MANIFEST (added after sealing)" in result.stdout


def test_missing_and_altered_source_objects(project):
    (project / "other.py").write_text(
        "from machinable import Experiment\n\nclass Other(Experiment):\n    def on_execute(self):\n        return 1\n"
    )
    git(project, "add", "other.py")
    git(project, "commit", "-q", "-m", "other")
    from machinable import get

    other = get("other")
    other.launch()
    gravity = _launch(1.0)
    code = orjson.loads((other.directory / "code.json").read_bytes())
    digest = code["files"]["other.py"]["object"]
    hexd = digest.split(":", 1)[1]
    obj = project / "storage" / ".objects" / hexd[:2] / hexd[2:]
    obj.unlink()

    result = _verify(project)
    assert result.returncode == 1
    assert f".objects/{hexd[:2]}/{hexd[2:]}: missing (the stored source of other.py for {other.experiment_id})" in result.stdout
    assert gravity.experiment_id not in result.stdout

    gcode = orjson.loads((gravity.directory / "code.json").read_bytes())
    ghex = gcode["files"]["estimate_gravity.py"]["object"].split(":", 1)[1]
    gobj = project / "storage" / ".objects" / ghex[:2] / ghex[2:]
    _writable(gobj)
    gobj.write_bytes(b"print('not the recorded source')\n")
    result = _verify(project, gravity.short_id)
    assert result.returncode == 1
    assert f"content changed (the stored source of estimate_gravity.py for {gravity.experiment_id})" in result.stdout


def test_verify_json_and_bad_ids(project):
    damaged = _launch(1.0)
    path = damaged.directory / "data" / "result.json"
    _writable(path)
    path.write_bytes(b"0")
    result = run_machinable(project, "verify", "--json")
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert report["checked"] == 1
    assert report["problems"] == [{
        "experiment": damaged.experiment_id,
        "file": f"{damaged.experiment_id}/data/result.json",
        "problem": "content changed (digest differs from MANIFEST)",
    }]

    result = run_machinable(project, "verify", "ffffffffff")
    assert result.returncode == 2
    assert "No experiment with id 'ffffffffff'" in result.stderr and "Traceback" not in result.stderr


def test_torn_last_event_is_not_damage(project):
    """A crash mid-append leaves an unterminated last line: readers skip it,
    the next append cuts it, and verify does not count it as damage."""
    from machinable import get

    experiment = get("estimate_gravity", {"time_dilation": 3.0, "verbose": False})
    experiment.commit()
    events = experiment.directory / "events.jsonl"
    with open(events, "ab") as f:
        f.write(b'{"format":1,"event":"disp')
    assert [e["event"] for e in experiment.events()] == ["created"]
    assert _verify(project).returncode == 0
    experiment.launch()
    assert experiment.is_finished()
    lines = events.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(orjson.loads(line) for line in lines[:-1])


def test_list_and_show_keep_working_and_mark_damaged_records(project):
    experiments = [_launch(t) for t in (1.0, 2.0, 3.0, 4.0, 5.0)]
    truncated, garbage, unsealed, modified, intact = experiments
    damage = {
        truncated: ("experiment.json", lambda p: p.write_bytes(p.read_bytes()[:30])),
        garbage: ("events.jsonl", lambda p: p.write_bytes(b"garbage\n")),
        unsealed: ("MANIFEST", lambda p: p.unlink()),
        modified: ("data/result.json", lambda p: p.write_bytes(b"1")),
    }
    for experiment, (name, spoil) in damage.items():
        path = experiment.directory / name
        _writable(path)
        spoil(path)

    listed = run_machinable(project, "list", "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    states = {row["id"]: row["state"] for row in map(orjson.loads, listed.stdout.splitlines())}
    assert states == {
        truncated.experiment_id: "damaged", garbage.experiment_id: "damaged", unsealed.experiment_id: "damaged",
        modified.experiment_id: "finished",  # found only by re-hashing: `machinable verify`
        intact.experiment_id: "finished",
    }
    table = run_machinable(project, "list")
    assert table.returncode == 0 and table.stdout.count("damaged") == 3

    for experiment in (truncated, garbage, unsealed):
        shown = run_machinable(project, "show", experiment.short_id)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert "DAMAGED" in shown.stdout.splitlines()[1], shown.stdout
    shown = run_machinable(project, "show", intact.short_id)
    assert shown.returncode == 0 and "DAMAGED" not in shown.stdout

    from machinable import get

    found = {e.experiment_id for e in get.all("estimate_gravity")}
    assert found == {e.experiment_id for e in experiments} - {truncated.experiment_id}, "readable records are still found"
