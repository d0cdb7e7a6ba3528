"""`machinable list/find/show/diff/index` through real subprocesses.

Output piped to a file is plain (tab-separated or JSON lines); on a terminal
(a real pseudo-terminal here) `list` prints a table.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from machinable import Storage, get
from machinable.errors import ExecutionError
from conftest import git, run_in_terminal, run_machinable

FLAKY = '''from machinable import Experiment


class Flaky(Experiment):
    class Config:
        x: int = 0
        lr: float = 0.1
        fail: bool = False

    def on_execute(self):
        print("running", self.config.x)
        self.record(loss=1.0 / (self.config.x + 1))
        if self.config.fail:
            raise RuntimeError("asked to fail")
        return self.config.x
'''


@pytest.fixture
def stored(project):
    """Four flaky experiments (x=1, x=2, x=3 finished; x=2 failed) and one estimate_gravity."""
    (project / "flaky.py").write_text(FLAKY)
    git(project, "add", "flaky.py")
    git(project, "commit", "-q", "-m", "flaky")
    experiments = {}
    for x in (1, 2, 3):
        experiments[x] = get("flaky", {"x": x})
        experiments[x].launch()
    experiments["failed"] = get.new("flaky", {"x": 2, "fail": True})
    with pytest.raises(ExecutionError):
        experiments["failed"].launch()
    experiments["gravity"] = get("estimate_gravity", {"time_dilation": 1.5, "verbose": False})
    experiments["gravity"].launch()
    return project, experiments


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --- list ------------------------------------------------------------------------------------


def test_list_piped_prints_one_tab_separated_line_per_experiment(stored):
    project, experiments = stored
    lines = ok(run_machinable(project, "list")).splitlines()
    assert len(lines) == 5
    newest = lines[0].split("\t")
    assert newest[0] == experiments["gravity"].experiment_id
    assert newest[1:3] == ["estimate_gravity", "finished"]
    assert newest[-1] == "time_dilation=1.5 verbose=false"
    states = sorted(line.split("\t")[2] for line in lines)
    assert states == ["failed", "finished", "finished", "finished", "finished"]


def test_list_filters_by_module_config_state_and_time(stored):
    project, experiments = stored

    def ids(*args: str) -> list[str]:
        return [line.split("\t")[0] for line in ok(run_machinable(project, "list", *args)).splitlines()]

    assert ids("flaky", "x=2") == [experiments["failed"].experiment_id, experiments[2].experiment_id]
    assert ids("flaky", "x=2", "--state", "finished") == [experiments[2].experiment_id]
    assert ids("--state", "failed") == [experiments["failed"].experiment_id]
    assert ids("estimate_gravity", "time_dilation=1.5") == [experiments["gravity"].experiment_id]
    assert ids("flaky", "lr=0.1", "fail=false", "--oldest") == [experiments[x].experiment_id for x in (1, 2, 3)]
    assert len(ids("--since", "1h")) == 5
    assert ids("--since", "2999-01-01") == []
    assert ids("--limit", "2") == ids()[:2]
    assert [line.split("\t")[0] for line in ok(run_machinable(project, "find", "flaky", "x=3")).splitlines()] == [
        experiments[3].experiment_id
    ]


def test_list_json_streams_one_object_per_line(stored):
    project, experiments = stored
    rows = [orjson.loads(line) for line in ok(run_machinable(project, "list", "flaky", "--json")).splitlines()]
    assert [row["id"] for row in rows][-1] == experiments[1].experiment_id
    first = rows[-1]
    assert first["config"] == {"x": 1, "lr": 0.1, "fail": False}
    assert first["state"] == "finished" and first["module"] == "flaky"
    assert first["seed"] == experiments[1].seed
    assert first["execution"] == "machinable.execution.local"
    for key in ("created", "started", "finished", "config_hash", "code_hash", "git_commit"):
        assert first[key], key


def test_list_says_why_nothing_matched(stored):
    project, _ = stored
    result = run_machinable(project, "list", "depth=3")
    assert result.returncode == 0 and result.stdout == ""
    assert "no experiment has config key 'depth'" in result.stderr
    # with a module, a key its Config does not have is the launch's error
    result = run_machinable(project, "list", "flaky", "depth=3")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: Unknown config key 'depth' (value '3') for flaky.")
    result = run_machinable(project, "list", "train")
    assert "no experiment of module 'train' (stored: estimate_gravity, flaky)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--state", "done"], "Invalid state 'done'"),
    (["--since", "soon"], "Invalid time 'soon'"),
    (["flaky", "estimate_gravity"], "Unexpected 'estimate_gravity'"),
    (["x-y=1"], "Invalid config key 'x-y'"),
])
def test_list_usage_errors_exit_2_with_the_bad_value(stored, args, message):
    project, _ = stored
    result = run_machinable(project, "list", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_list_on_a_terminal_is_a_table_with_the_varying_config_values(stored):
    project, experiments = stored
    code, text = run_in_terminal(project, "list", "flaky")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].strip() == "module flaky"
    assert lines[1].split() == ["id", "state", "started", "duration", "config"]
    rows = [line.split() for line in lines[2:] if line.strip()]
    assert [row[0] for row in rows] == [experiments[k].short_id for k in ("failed", 3, 2, 1)]
    assert [row[1] for row in rows] == ["failed", "finished", "finished", "finished"]
    assert [row[-2:] for row in rows] == [["fail=true", "x=2"], ["fail=false", "x=3"], ["fail=false", "x=2"], ["fail=false", "x=1"]]


def test_list_on_a_terminal_shows_the_newest_50_and_says_so(stored):
    project, _ = stored
    for x in range(10, 56):
        get.new("flaky", {"x": x}).commit()
    code, text = run_in_terminal(project, "list")
    assert code == 0, text
    assert "50 of 51 shown (newest first); --limit N or --no-limit for more." in text
    for every in ("--no-limit", "--all"):  # --all: the old name, kept as a hidden alias
        code, text = run_in_terminal(project, "list", every)
        assert "shown" not in text and len([line for line in text.splitlines() if re.match(r"^[0-9a-f]{12} ", line)]) == 51
    assert "--all" not in ok(run_machinable(project, "list", "--help"))


def test_list_filters_read_values_as_the_config_types(stored):
    """With a module, filter values go through its Config like a launch's values (and fail the same way)."""
    project, experiments = stored

    def ids(*args: str) -> list[str]:
        return [line.split("\t")[0] for line in ok(run_machinable(project, "list", *args)).splitlines()]

    finished = [experiments[x].experiment_id for x in (3, 2, 1)]
    assert ids("flaky", "fail=no") == ids("flaky", "fail=false") == ids("flaky", "fail=0") == finished
    assert ids("flaky", "fail=yes") == [experiments["failed"].experiment_id]
    assert ids("flaky", "x=2.0", "--state", "finished") == [experiments[2].experiment_id]  # an int, as launch reads it
    for args, message in [
        (["lr=abc"], "Invalid value 'abc' for config key 'lr' of flaky: expected a float."),
        (["fail=maybe"], "expected a bool (true/false, yes/no, on/off, 1/0)"),
        (["LR=0.1"], "Unknown config key 'LR' (value '0.1') for flaky. Did you mean 'lr'?"),
    ]:
        launch = run_machinable(project, "flaky", *args)
        listed = run_machinable(project, "list", "flaky", *args)
        assert listed.returncode == launch.returncode == 2, listed.stderr
        assert message in listed.stderr and listed.stderr == launch.stderr
    # a key the Config no longer has still finds the records that have it
    (project / "flaky.py").write_text(FLAKY.replace("        fail: bool = False\n", "").replace("self.config.fail", "False"))
    assert ids("flaky", "fail=true") == [experiments["failed"].experiment_id]


def test_nan_shows_the_same_in_list_show_and_status(stored):
    project, _ = stored
    nan = get("flaky", {"x": 9, "lr": float("nan")})
    nan.launch()
    (line,) = ok(run_machinable(project, "list", "flaky", "x=9")).splitlines()
    assert line.endswith("fail=false lr=nan x=9")
    assert ok(run_machinable(project, "list", "flaky", "lr=nan")).split("\t")[0] == nan.experiment_id
    assert re.search(r"^  lr +nan$", ok(run_machinable(project, "show", nan.experiment_id)), re.M)
    status = ok(run_machinable(project, "status", "flaky", "--all"))
    assert "lr=nan" in status and "'nan'" not in status and '"nan"' not in status


RESUMED = '''import time
from pathlib import Path
from machinable import Experiment


class Resumed(Experiment):
    def on_execute(self):
        marker = Path(__file__).parent / "failed-once"
        time.sleep(0.2)
        if not marker.exists():
            marker.write_text("")
            raise RuntimeError("first attempt fails")
'''


def test_the_duration_of_a_resumed_run_is_the_sum_of_its_attempts(project):
    import time
    from datetime import datetime

    (project / "resumed.py").write_text(RESUMED)
    experiment = get("resumed")
    with pytest.raises(ExecutionError):
        experiment.launch()
    time.sleep(1.5)  # idle between the attempts: not part of the duration
    experiment.launch()
    events = experiment.events()
    starts = [datetime.fromisoformat(e["time"]) for e in events if e["event"] == "started"]
    ends = [datetime.fromisoformat(e["time"]) for e in events if e["event"] in ("failed", "finished")]
    attempts = [(end - start).total_seconds() for start, end in zip(starts, ends)]
    assert len(attempts) == 2 and (ends[-1] - starts[0]).total_seconds() > sum(attempts) + 1
    (row,) = [orjson.loads(line) for line in ok(run_machinable(project, "list", "resumed", "--json")).splitlines()]
    assert row["duration"] == pytest.approx(sum(attempts))
    (line,) = ok(run_machinable(project, "list", "resumed")).splitlines()
    assert line.split("\t")[4] == f"{sum(attempts):.1f}s"
    shown = ok(run_machinable(project, "show", experiment.experiment_id))
    assert f"(took {sum(attempts):.1f}s running, over 2 attempts: {attempts[0]:.1f}s + {attempts[1]:.1f}s)" in shown


def test_list_json_of_many_is_streamed_in_pages(stored):
    project, _ = stored
    for x in range(100, 700):  # more than one page of the index
        get.new("flaky", {"x": x}).commit()
    lines = ok(run_machinable(project, "list", "--json")).splitlines()
    assert len(lines) == 605
    assert len({orjson.loads(line)["id"] for line in lines}) == 605


# --- show -------------------------------------------------------------------------------------


def test_show_by_prefix(stored):
    project, experiments = stored
    experiment = experiments[2]
    text = ok(run_machinable(project, "show", experiment.experiment_id[:10]))
    assert text.startswith(f"experiment {experiment.experiment_id}\n")
    assert re.search(r"^  x +2$", text, re.M) and re.search(r"^  lr +0\.1  \(default\)$", text, re.M)
    assert "flaky.py  xxh3-128:" in text
    assert "on main, clean" in text
    assert "finished" in text and "records (1 row)" in text
    assert "running 2" in text.split("output (")[1]
    document = orjson.loads(ok(run_machinable(project, "show", experiment.experiment_id[:10], "--json")))
    assert document["id"] == experiment.experiment_id
    assert document["config"]["fail"] == {"value": False, "default": True}


def test_show_of_a_failed_run_shows_the_error(stored):
    project, experiments = stored
    text = ok(run_machinable(project, "show", experiments["failed"].experiment_id))
    assert "RuntimeError: asked to fail" in text and "state        failed" in text


def test_show_of_a_damaged_record_does_not_crash(stored):
    project, experiments = stored
    directory = experiments[1].directory
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    (directory / "experiment.json").write_text("{ damaged")
    (directory / "records.jsonl").write_text("not json\n")
    result = run_machinable(project, "show", experiments[1].experiment_id[:12])
    assert result.returncode == 0, result.stderr
    assert "DAMAGED: experiment.json is damaged" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # listed as damaged too (after the index notices: rebuild)
    ok(run_machinable(project, "index", "--rebuild"))
    assert f"{experiments[1].experiment_id}\t?\tdamaged" in ok(run_machinable(project, "list"))


def test_prefixes_unknown_and_ambiguous(stored):
    project, experiments = stored
    for x in range(20, 37):  # 17 more: two ids must share a first digit
        get.new("flaky", {"x": x}).commit()
    ids = [row["id"] for row in Storage.current().find().rows()]
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    result = run_machinable(project, "show", shared)
    assert result.returncode == 2
    assert f"Experiment id prefix {shared!r} is ambiguous" in result.stderr
    assert sum(1 for i in ids if i.startswith(shared) and i[:12] in result.stderr) >= 2
    unknown = next(f"{n:06x}" for n in range(2**24) if not any(i.startswith(f"{n:06x}") for i in ids))
    result = run_machinable(project, "show", unknown)
    assert result.returncode == 2 and f"No experiment with id {unknown!r}" in result.stderr
    result = run_machinable(project, "diff", "zz", ids[0])
    assert result.returncode == 2 and "Invalid experiment id 'zz'" in result.stderr


# --- diff -------------------------------------------------------------------------------------


def test_diff_names_the_cause(stored):
    project, experiments = stored
    a, b = experiments[1], experiments[3]
    text = ok(run_machinable(project, "diff", a.experiment_id[:8], b.experiment_id[:8]))
    lines = text.splitlines()
    assert lines[0] == f"diff a={a.short_id} (flaky) b={b.short_id} (flaky)"
    assert lines[1] == f"why: The ids differ because of config key x (1 -> 3); seed ({a.seed} -> {b.seed})."
    assert "config\n  x: 1 -> 3\n" in text
    assert "outputs\n" in text and "result: 1 -> 3" in text
    document = orjson.loads(ok(run_machinable(project, "diff", a.experiment_id, b.experiment_id, "--json")))
    assert document["sections"]["config"] == {"changed": {"x": [1, 3]}}
    assert document["causes"] == ["config key x (1 -> 3)", f"seed ({a.seed} -> {b.seed})"]


def test_diff_of_a_code_change(stored):
    project, experiments = stored
    (project / "flaky.py").write_text(FLAKY.replace('print("running"', 'print("now running"'))
    git(project, "commit", "-q", "-am", "reword")
    changed = get("flaky", {"x": 1})
    changed.launch()
    text = ok(run_machinable(project, "diff", experiments[1].experiment_id, changed.experiment_id))
    assert "why: The ids differ because of file flaky.py (changed); seed" in text
    assert '-        print("running", self.config.x)' in text
    assert '+        print("now running", self.config.x)' in text
    assert "reword" in text  # the commit in between


# --- index ------------------------------------------------------------------------------------


def test_index_sync_and_rebuild(stored):
    project, _ = stored
    text = ok(run_machinable(project, "index"))
    assert "index.sqlite: 5 experiments (schema 4); already up to date." in text
    (project / "storage" / "index.sqlite").unlink()
    assert "5 experiments" in ok(run_machinable(project, "index"))
    text = ok(run_machinable(project, "index", "--rebuild"))
    assert re.search(r"Rebuilt .*index.sqlite from 5 experiment folders in \d+\.\d+s\.", text)
    assert len(ok(run_machinable(project, "list")).splitlines()) == 5


def test_index_rebuild_shows_progress_on_a_terminal(stored):
    project, _ = stored
    code, text = run_in_terminal(project, "index", "--rebuild")
    assert code == 0, text
    assert "Reading the folders of" in text and "100%" in text


def test_commands_work_without_any_storage(project):
    assert ok(run_machinable(project, "list")) == ""
    assert "No storage at" in ok(run_machinable(project, "index"))
    result = run_machinable(project, "show", "abc")
    assert result.returncode == 2 and "No experiment with id 'abc'" in result.stderr


def test_global_storage_option_applies(stored, tmp_path):
    project, _ = stored
    other = tmp_path / "elsewhere"
    assert ok(run_machinable(project, "--storage", str(other), "list")) == ""
    assert len(ok(run_machinable(project, "list", "--storage", str(project / "storage"))).splitlines()) == 5


def _read_only_mount_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a read-only bind mount needs root (CI runs these tests as root)"
    if not shutil.which("mount") or not shutil.which("umount"):
        return "mount/umount are not installed"
    return None


@pytest.mark.skipif(_read_only_mount_unavailable() is not None, reason=str(_read_only_mount_unavailable()))
def test_list_show_and_diff_work_on_a_read_only_storage(stored, tmp_path):
    """An archive on a read-only share: the index lives in the user's cache instead."""
    project, experiments = stored
    mount = tmp_path / "archive"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(project / "storage"), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
        listed = ok(run_machinable(project, "--storage", str(mount), "list", "flaky", "x=2", env=env))
        assert [line.split("\t")[0] for line in listed.splitlines()] == [experiments["failed"].experiment_id, experiments[2].experiment_id]
        assert ok(run_machinable(project, "--storage", str(mount), "show", experiments[3].experiment_id[:10], env=env)).startswith(
            f"experiment {experiments[3].experiment_id}")
        text = ok(run_machinable(project, "--storage", str(mount), "diff", experiments[1].experiment_id, experiments[3].experiment_id, env=env))
        assert "config key x (1 -> 3)" in text
        assert list((tmp_path / "cache" / "machinable" / "indexes").glob("*.sqlite"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
