"""Experiments: launch, hooks, output, identity, get-or-create, run-once, resume, replicates, data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from machinable import Storage, get
from machinable.errors import CodeChangedError, ConfigError, ExecutionError, StorageError, UsageError

from conftest import commit_all, git, run_python, wait_for, write


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for folders)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def every_json_parses(storage: Path) -> int:
    """Parse every stored JSON and JSON-lines file; returns how many were read."""
    count = 0
    for path in storage.rglob("*"):
        if path.suffix == ".json" or path.name == "MANIFEST":
            json.loads(path.read_bytes())
            count += 1
        elif path.suffix == ".jsonl":
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), f"{path} ends with a torn line"
            for line in data.splitlines():
                json.loads(line)
            count += 1
    return count


HOOKS = """
from machinable import Experiment

def note(name):
    with open("hooks.txt", "a") as f:
        f.write(name + "\\n")

class Hooked(Experiment):
    class Config:
        fail: bool = False

    def on_create(self):
        note("on_create")

    def on_before_execute(self):
        note("on_before_execute")

    def on_execute(self):
        note("on_execute")
        if self.config.fail:
            raise RuntimeError("failing on purpose")

    def on_success(self):
        note("on_success")

    def on_failure(self, exception):
        note(f"on_failure {type(exception).__name__}: {exception}")

    def on_after_execute(self):
        note("on_after_execute")
"""

# Fails until the file "fixed" exists in the project: a failure the user repairs outside the code.
FLAKY = """
import os
from machinable import Experiment

class Flaky(Experiment):
    class Config:
        n: int = 1

    def on_execute(self):
        print("attempt with seed", self.seed)
        with open("executions.txt", "a") as f:
            f.write(self.experiment_id + "\\n")
        if not os.path.exists("fixed"):
            raise RuntimeError("not fixed yet")
        return self.config.n * 2
"""

# Runs until the file "go" exists; marks its start in "started.txt".
WAITING = """
import os, time
from machinable import Experiment

class Waiting(Experiment):
    class Config:
        label: str = "x"

    def on_execute(self):
        with open("started.txt", "a") as f:
            f.write(f"{os.getpid()} {self.experiment_id}\\n")
        print("first line", flush=False)
        while not os.path.exists("go"):
            time.sleep(0.02)
        print("second line")
        with open("executions.txt", "a") as f:
            f.write(self.experiment_id + "\\n")
        return self.config.label
"""


# --- launch, output, properties --------------------------------------------------------


def test_launch_runs_prints_saves_output_and_finishes(project, capsys):
    experiment = get("estimate_gravity")
    assert experiment.state == "new" and not experiment.is_finished()
    assert experiment.launch() is None
    out = capsys.readouterr().out
    assert out == "Assuming height of 52 and time of 0.3\nThe gravity on the exoplanet is:  1155.5555555555557\n"
    assert experiment.is_finished() and experiment.state == "finished"
    assert experiment.output() == out
    assert (experiment.directory / "output.log").read_text() == out
    assert experiment.result == 1155.5555555555557
    events = [e["event"] for e in experiment.events()]
    assert events == ["created", "dispatched", "started", "finished"]


def test_stdout_is_streamed_live_and_saved(project):
    write(project, "waiting.py", WAITING)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from machinable import get; get('waiting').launch()"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the first line arrives through the pipe while on_execute still waits
        assert proc.stdout.readline() == "first line\n"
        assert proc.poll() is None
        assert not (project / "executions.txt").exists()
        (project / "go").touch()
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert rest == "second line\n", err
    (experiment,) = Storage.current().find("waiting")
    assert experiment.output() == "first line\nsecond line\n"


def test_stderr_and_traceback_are_saved_too(project, capsys):
    write(project, "loud.py", """
        import sys
        from machinable import Experiment

        class Loud(Experiment):
            def on_execute(self):
                print("to stderr", file=sys.stderr)
                raise ValueError("boom")
    """)
    experiment = get("loud")
    with pytest.raises(ExecutionError, match="boom"):
        experiment.launch()
    err = capsys.readouterr().err
    assert "to stderr" in err and "ValueError: boom" in err
    log = experiment.output()
    assert "to stderr\n" in log and "Traceback" in log and "ValueError: boom" in log


def test_properties(project):
    before = datetime.now(timezone.utc)
    experiment = get("estimate_gravity", {"time_dilation": 2})
    experiment.launch()
    assert len(experiment.experiment_id) == 32 and int(experiment.experiment_id, 16) >= 0
    assert isinstance(experiment.seed, int) and not isinstance(experiment.seed, bool)
    assert experiment.timestamp.tzinfo is not None and experiment.timestamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= experiment.timestamp <= datetime.now(timezone.utc)
    assert experiment.config.time_dilation == 2.0 and experiment.config["verbose"] is True
    assert experiment.config_hash.startswith("xxh3-128:") and len(experiment.config_hash) == 9 + 32
    assert experiment.code_hash.startswith("xxh3-128:") and len(experiment.code_hash) == 9 + 32

    # the same facts from the stored record, in a fresh process
    code = (
        "from machinable import get\n"
        "e = get('estimate_gravity', {'time_dilation': 2.0})\n"
        "print(e.experiment_id, e.seed, e.timestamp.isoformat(), e.config_hash, e.code_hash, e.is_finished())\n"
    )
    proc = run_python(project, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        experiment.experiment_id, str(experiment.seed), experiment.timestamp.isoformat(),
        experiment.config_hash, experiment.code_hash, "True",
    ]


def test_seed_is_random_unless_given(project):
    seeds = {get.new("estimate_gravity").seed for _ in range(5)}
    assert len(seeds) == 5
    fixed = get("estimate_gravity", seed=42)
    assert fixed.seed == 42
    assert get("estimate_gravity", seed=42).experiment_id == fixed.experiment_id
    assert get("estimate_gravity", seed=43).experiment_id != fixed.experiment_id
    with pytest.raises(ConfigError, match="seed"):
        get("estimate_gravity", seed="42")


@pytest.mark.parametrize("fail", [False, True])
def test_hooks_run_in_order(project, fail):
    write(project, "hooked.py", HOOKS)
    experiment = get("hooked", {"fail": fail})
    if fail:
        with pytest.raises(ExecutionError):
            experiment.launch()
    else:
        experiment.launch()
    expected = ["on_create", "on_before_execute", "on_execute"]
    expected += ["on_failure RuntimeError: failing on purpose"] if fail else ["on_success"]
    expected += ["on_after_execute"]
    assert (project / "hooks.txt").read_text().splitlines() == expected
    assert experiment.state == ("failed" if fail else "finished")


# --- get-or-create ------------------------------------------------------------------------


def test_get_returns_the_same_experiment_for_the_same_config(project):
    first = get("estimate_gravity", {"time_dilation": 1.5})
    first.launch()
    again = get("estimate_gravity", {"time_dilation": "1.5"})
    assert again.experiment_id == first.experiment_id and again.seed == first.seed
    assert again.is_finished()
    assert get("estimate_gravity").experiment_id != first.experiment_id
    # an explicitly given default is the same config as leaving it out
    assert get("estimate_gravity", {"time_dilation": 1.5, "verbose": True}).experiment_id == first.experiment_id


def test_get_returns_the_newest_matching_experiment(project):
    older = get.new("estimate_gravity")
    older.commit()
    newer = older.replicate()
    newer.commit()
    assert newer.timestamp > older.timestamp
    assert get("estimate_gravity").experiment_id == newer.experiment_id


def test_get_in_a_second_process_finds_the_record_of_the_first(project):
    first = run_python(project, "from machinable import get\ne = get('estimate_gravity')\ne.launch()\nprint(e.experiment_id)")
    assert first.returncode == 0, first.stderr
    experiment_id = first.stdout.splitlines()[-1]
    second = run_python(project, "from machinable import get\ne = get('estimate_gravity')\ne.launch()\nprint(e.experiment_id)")
    assert second.returncode == 0, second.stderr
    assert second.stdout == experiment_id + "\n"  # the same experiment, and nothing ran again
    assert get("estimate_gravity").experiment_id == experiment_id


def test_comment_whitespace_and_docstring_edits_keep_the_experiment(project):
    experiment = get("estimate_gravity")
    experiment.launch()
    path = project / "estimate_gravity.py"
    source = path.read_text()
    edited = (
        '"""Module docstring added."""\n# a comment\n\n'
        + source.replace('"""An experiment to estimate gravity"""', '"""Another docstring."""')
        .replace("height = 52", "height = 52  # metres")
        .replace("g = 2 * height / time**2", "g = 2 * height / time ** 2")
        + "\n\n# trailing comment\n"
    )
    assert edited != source
    path.write_text(edited)
    again = get("estimate_gravity")
    assert again.experiment_id == experiment.experiment_id and again.is_finished()
    assert again.stale_siblings == []


def test_code_edit_gives_a_new_experiment_and_lists_the_old_one_as_stale(project, capsys):
    experiment = get("estimate_gravity")
    experiment.launch()
    path = project / "estimate_gravity.py"
    path.write_text(path.read_text().replace("height = 52", "height = 53"))
    edited = get("estimate_gravity")
    assert edited.experiment_id != experiment.experiment_id
    assert edited.config_hash == experiment.config_hash and edited.code_hash != experiment.code_hash
    assert [e.experiment_id for e in edited.stale_siblings] == [experiment.experiment_id]
    capsys.readouterr()
    edited.launch()  # and the edited code is what runs, in this same process
    assert capsys.readouterr().out.startswith("Assuming height of 53 ")


def test_helper_module_edit_gives_a_new_experiment(project, capsys):
    write(project, "helpers/__init__.py", "")
    write(project, "helpers/physics.py", "HEIGHT = 52\n")
    write(project, "uses_helper.py", """
        from machinable import Experiment
        from helpers.physics import HEIGHT

        class UsesHelper(Experiment):
            def on_execute(self):
                print("height", HEIGHT)
    """)
    experiment = get("uses_helper")
    experiment.launch()
    assert capsys.readouterr().out == "height 52\n"
    recorded = json.loads((experiment.directory / "code.json").read_text())["files"]
    assert set(recorded) == {"uses_helper.py", "helpers/__init__.py", "helpers/physics.py"}

    write(project, "helpers/physics.py", "# only a comment added\nHEIGHT = 52\n")
    assert get("uses_helper").experiment_id == experiment.experiment_id

    write(project, "helpers/physics.py", "HEIGHT = 99\n")
    edited = get("uses_helper")
    assert edited.experiment_id != experiment.experiment_id
    assert [e.experiment_id for e in edited.stale_siblings] == [experiment.experiment_id]
    edited.launch()
    assert capsys.readouterr().out == "height 99\n"  # the helper was re-imported


def test_third_party_versions_are_recorded_but_not_part_of_the_id(project, tmp_path):
    site = tmp_path / "site"

    def install(version: str, value: int) -> None:
        write(site, "fakepkg/__init__.py", f"VALUE = {value}\n")
        for old in site.glob("fakepkg-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        dist = site / f"fakepkg-{version}.dist-info"
        write(dist, "METADATA", f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n")
        write(dist, "top_level.txt", "fakepkg\n")
        write(dist, "RECORD", "fakepkg/__init__.py,,\n")

    write(project, "uses_pkg.py", """
        import fakepkg
        import json
        from machinable import Experiment

        class UsesPkg(Experiment):
            def on_execute(self):
                return fakepkg.VALUE
    """)
    code = "from machinable import get\ne = get('uses_pkg')\ne.launch()\nprint(e.experiment_id, e.result)"
    env = {"PYTHONPATH": str(site)}
    install("1.0", 1)
    first = run_python(project, code, env=env)
    assert first.returncode == 0, first.stderr
    experiment_id, result = first.stdout.split()
    assert result == "1"
    environment = json.loads((project / "storage" / experiment_id / "env.json").read_text())
    assert environment["packages"]["fakepkg"] == "1.0"
    assert "json" not in environment["packages"]  # stdlib is not a package
    assert environment["format"] == 1 and environment["python"]

    install("2.0", 2)  # an upgrade, with changed package code
    second = run_python(project, code, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [experiment_id, "1"]  # same experiment, still finished, not rerun


# --- run once, resume -----------------------------------------------------------------------


def test_launch_of_a_finished_experiment_does_nothing(project, capsys):
    experiment = get("estimate_gravity")
    experiment.launch()
    capsys.readouterr()
    storage = project / "storage"
    before = tree(storage)
    experiment.launch()
    get("estimate_gravity").launch()
    Storage.current().load(experiment.experiment_id).launch()
    assert capsys.readouterr() == ("", "")
    after = tree(storage)
    assert {k: v for k, v in after.items() if "index.sqlite" not in k} == {
        k: v for k, v in before.items() if "index.sqlite" not in k
    }


def test_failed_experiment_resumes_in_place(project, capsys):
    write(project, "flaky.py", FLAKY)
    experiment = get("flaky", {"n": 21})
    with pytest.raises(ExecutionError, match="not fixed yet"):
        experiment.launch()
    assert experiment.state == "failed" and experiment.is_failed()
    failed = [e for e in experiment.events() if e["event"] == "failed"]
    assert "RuntimeError: not fixed yet" in failed[0]["traceback"]

    (project / "fixed").touch()
    again = get("flaky", {"n": 21})  # get() returns the failed one: same id, seed, config
    assert (again.experiment_id, again.seed) == (experiment.experiment_id, experiment.seed)
    again.launch()
    assert again.is_finished() and again.result == 42
    assert (project / "executions.txt").read_text().splitlines() == [experiment.experiment_id] * 2
    started = [e for e in again.events() if e["event"] == "started"]
    assert [e["attempt"] for e in started] == [1, 2]
    assert [e["event"] for e in again.events()][-1] == "finished"
    assert len(list((project / "storage").glob("[0-9a-f]" * 32))) == 1
    log = again.output()
    assert log.count(f"attempt with seed {experiment.seed}") == 2 and "--- attempt 2" in log


def test_resume_is_refused_when_the_code_changed(project):
    write(project, "flaky.py", FLAKY)
    experiment = get("flaky")
    with pytest.raises(ExecutionError):
        experiment.launch()
    path = project / "flaky.py"
    path.write_text(path.read_text().replace("self.config.n * 2", "self.config.n * 3"))
    (project / "fixed").touch()

    stored = Storage.current().load(experiment.experiment_id)
    with pytest.raises(CodeChangedError) as raised:
        stored.launch()
    message = str(raised.value)
    assert experiment.short_id in message and "flaky.py" in message and "get.new" in message
    with pytest.raises(CodeChangedError):
        experiment.launch()
    assert stored.state == "failed"
    assert (project / "executions.txt").read_text().splitlines() == [experiment.experiment_id]

    fresh = get("flaky")  # the current code is a new experiment
    assert fresh.experiment_id != experiment.experiment_id
    assert [e.experiment_id for e in fresh.stale_siblings] == [experiment.experiment_id]
    fresh.launch()
    assert fresh.result == 3


def _spawn(project: Path, code: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("seed", [42, None], ids=["explicit-seed", "get-or-create"])
def test_concurrent_launches_execute_once(project, seed):
    """4 processes launch the same new experiment at once: one execution, all return after it."""
    write(project, "waiting.py", WAITING)
    code = textwrap.dedent(f"""
        import os, time
        from machinable import get
        while not os.path.exists("start"):
            time.sleep(0.005)
        experiment = get("waiting", {{"label": "same"}}, seed={seed!r})
        experiment.launch()
        print(experiment.experiment_id, experiment.state, experiment.result)
    """)
    procs = [_spawn(project, code) for _ in range(4)]
    try:
        (project / "start").touch()
        wait_for(lambda: (project / "started.txt").exists(), "the execution to start")
        (project / "go").touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    lines = {out.splitlines()[-1] for out, _ in outputs}
    assert len(lines) == 1, lines  # all agree on the id, and all saw it finished
    experiment_id, state, result = lines.pop().split()
    assert (state, result) == ("finished", "same")
    assert (project / "executions.txt").read_text().splitlines() == [experiment_id]
    assert len((project / "started.txt").read_text().splitlines()) == 1
    assert [d.name for d in (project / "storage").glob("[0-9a-f]" * 32)] == [experiment_id]
    if seed is not None:
        assert experiment_id == get("waiting", {"label": "same"}, seed=42).experiment_id


def test_sigkill_mid_run_then_the_next_launch_resumes(project):
    write(project, "waiting.py", WAITING)
    proc = _spawn(project, "from machinable import get\nget('waiting').launch()")
    try:
        wait_for(lambda: (project / "started.txt").exists(), "the execution to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    storage = project / "storage"
    assert every_json_parses(storage) >= 6
    (experiment,) = Storage.current().find("waiting")
    assert experiment.state == "interrupted"
    assert not experiment.is_finished()

    (project / "go").touch()
    resumed = run_python(project, "from machinable import get\ne = get('waiting')\ne.launch()\nprint(e.experiment_id, e.state)")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[-1] == f"{experiment.experiment_id} finished"
    events = [e["event"] for e in experiment.events()]
    assert events == ["created", "dispatched", "started", "dispatched", "interrupted", "started", "finished"]
    assert [e.get("attempt") for e in experiment.events() if e["event"] == "started"] == [1, 2]
    assert every_json_parses(storage) >= 8
    assert (project / "executions.txt").read_text().splitlines() == [experiment.experiment_id]


def test_a_claim_with_a_stale_heartbeat_counts_as_interrupted(project, monkeypatch):
    """A frozen holder (SIGSTOP) stops beating; after the timeout its run may be taken over."""
    write(project, "waiting.py", WAITING)
    env = {"MACHINABLE_HEARTBEAT_TIMEOUT": "1"}
    monkeypatch.setenv("MACHINABLE_HEARTBEAT_TIMEOUT", "1")
    frozen = _spawn(project, "from machinable import get\nget('waiting').launch()", env=env)
    try:
        wait_for(lambda: (project / "started.txt").exists(), "the execution to start")
        (experiment,) = Storage.current().find("waiting")
        assert experiment.state == "running"
        frozen.send_signal(signal.SIGSTOP)
        wait_for(lambda: experiment.state == "interrupted", "the heartbeat to go stale")
        (project / "go").touch()
        resumed = run_python(project, "from machinable import get\ne = get('waiting')\ne.launch()\nprint(e.state)", env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.splitlines()[-1] == "finished"
    finally:
        frozen.kill()
        frozen.wait(timeout=60)
    assert [e.get("attempt") for e in experiment.events() if e["event"] == "started"] == [1, 2]
    assert experiment.is_finished()


# --- replicates ---------------------------------------------------------------------------


def test_replicate_and_get_new_give_new_seed_and_id_with_the_same_config_hash(project):
    experiment = get("estimate_gravity", {"time_dilation": 3.0})
    experiment.launch()
    replica = experiment.replicate()
    other = get.new("estimate_gravity", {"time_dilation": 3.0})
    ids = {experiment.experiment_id, replica.experiment_id, other.experiment_id}
    seeds = {experiment.seed, replica.seed, other.seed}
    assert len(ids) == 3 and len(seeds) == 3
    assert replica.config_hash == other.config_hash == experiment.config_hash
    assert replica.config.time_dilation == 3.0 and not replica.is_finished()
    replica.launch()
    assert replica.is_finished() and replica.result == experiment.result
    assert {e.experiment_id for e in experiment.replicates()} == {experiment.experiment_id, replica.experiment_id}


# --- outputs ------------------------------------------------------------------------------


def test_save_and_load_data_records_and_result(project):
    numpy = pytest.importorskip("numpy")
    write(project, "outputs.py", """
        import numpy
        from machinable import Experiment

        class Outputs(Experiment):
            def on_execute(self):
                self.save_data("notes.txt", "hello")
                self.save_data("stats.json", {"mean": 1.5, "n": [1, 2]})
                self.save_data("array.npy", numpy.arange(6).reshape(2, 3))
                self.save_data("things.pickle", {"a set": {1, 2}})
                self.save_data("nested/raw.bin", b"\\x00\\xff")
                for epoch in range(3):
                    self.record(epoch=epoch, loss=1.0 / (epoch + 1))
                return {"accuracy": 0.9}
    """)
    experiment = get("outputs")
    experiment.launch()
    assert experiment.load_data("notes.txt") == "hello"
    assert experiment.load_data("stats.json") == {"mean": 1.5, "n": [1, 2]}
    assert numpy.array_equal(experiment.load_data("array.npy"), numpy.arange(6).reshape(2, 3))
    assert experiment.load_data("things.pickle") == {"a set": {1, 2}}
    assert (experiment.directory / "data" / "nested" / "raw.bin").read_bytes() == b"\x00\xff"
    assert experiment.load_data("missing.json", default="none") == "none"
    assert list(experiment.records()) == [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 1.0 / 3}]
    assert experiment.result == {"accuracy": 0.9}
    assert experiment.events()[-1]["result"] == "json"
    with pytest.raises(ConfigError, match="inside"):
        experiment.load_data("../experiment.json")


def test_a_result_that_is_not_json_is_pickled_and_says_so(project):
    write(project, "pickled.py", """
        from fractions import Fraction
        from machinable import Experiment

        class Pickled(Experiment):
            def on_execute(self):
                return Fraction(1, 3)
    """)
    experiment = get("pickled")
    experiment.launch()
    from fractions import Fraction

    assert experiment.result == Fraction(1, 3)
    assert experiment.events()[-1]["result"] == "pickle"
    assert (experiment.directory / "data" / "result.pickle").is_file()


def test_writing_to_a_finished_or_unstored_experiment_is_refused(project):
    experiment = get("estimate_gravity")
    with pytest.raises(StorageError, match="not stored yet"):
        experiment.record(x=1)
    experiment.launch()
    with pytest.raises(StorageError, match="sealed"):
        experiment.record(x=1)
    with pytest.raises(StorageError, match="sealed"):
        experiment.save_data("late.txt", "x")
    assert experiment.records() == []


# --- bad input ------------------------------------------------------------------------------


def test_unknown_key_is_an_error_and_nothing_is_stored(project):
    with pytest.raises(ConfigError) as raised:
        get("estimate_gravity", {"time_diliation": 2})
    message = str(raised.value)
    assert "'time_diliation'" in message and "2" in message and "'time_dilation'" in message
    assert not (project / "storage").exists()

    get("estimate_gravity").launch()
    before = tree(project / "storage")
    for bad in ({"time_diliation": 2}, {"time_dilation": "fast"}, {"verbose": "maybe"}):
        with pytest.raises(ConfigError):
            get("estimate_gravity", bad).launch()
    assert tree(project / "storage") == before


def test_bad_input_never_leaves_a_half_made_record(project):
    get("estimate_gravity").launch()
    write(project, "broken_create.py", """
        from machinable import Experiment

        class BrokenCreate(Experiment):
            def on_create(self):
                raise RuntimeError("refusing to be created")
    """)
    write(project, "syntax_error.py", "from machinable import Experiment\nclass X(Experiment:\n    pass\n")
    storage = project / "storage"
    def record_files() -> set[str]:  # what makes up records (not source objects, locks, the index)
        return {k for k in tree(storage) if not k.startswith((".objects", ".locks", "index.sqlite"))}

    before = record_files()
    with pytest.raises(RuntimeError, match="refusing"):
        get("broken_create").launch()
    from machinable.errors import ModuleNotFound

    with pytest.raises(ModuleNotFound, match="syntax_error"):
        get("syntax_error")
    with pytest.raises(ModuleNotFound):
        get("no_such_module")
    assert record_files() == before
    assert [d.name for d in storage.glob("[0-9a-f]" * 32)] == [get("estimate_gravity").experiment_id]
    assert not any((storage / ".tmp").iterdir())


# --- the git state of each attempt ------------------------------------------------------------

READER = """
    from pathlib import Path
    from machinable import Experiment

    class Reader(Experiment):
        def on_execute(self):
            return Path("value.txt").read_text().strip()
"""


def test_a_resume_at_a_later_commit_records_that_commit_with_its_attempt(project):
    write(project, "reader.py", READER)
    commit_all(project, "reader")
    created = git(project, "rev-parse", "HEAD").strip()
    experiment = get("reader")
    with pytest.raises(ExecutionError, match="value.txt"):
        experiment.launch()
    (project / "value.txt").write_text("42\n")
    commit_all(project, "value")
    resumed = git(project, "rev-parse", "HEAD").strip()
    experiment.launch()

    assert experiment.result == "42"
    directory = experiment.directory
    started = [e["git"] for e in experiment.events() if e["event"] == "started"]
    assert started == [
        {"commit": created, "dirty": False, "json": "git.json", "diff": "git.diff"},
        {"commit": resumed, "dirty": False, "json": "attempts/2/git.json", "diff": "attempts/2/git.diff"},
    ]
    assert json.loads((directory / "attempts/2/git.json").read_text())["commit"] == resumed
    assert (directory / "attempts/2/git.diff").read_bytes() == b""
    assert not (directory / "attempts/1").exists()  # attempt 1 ran with the state at creation
    assert json.loads((directory / "git.json").read_text())["commit"] == created  # git.json: the state at creation
    _, problems = Storage.current().verify([experiment.experiment_id])
    assert problems == []  # the attempt's files are sealed with the record
    assert "attempts/2/git.json" in json.loads((directory / "MANIFEST").read_text())["files"]


def test_a_resume_with_uncommitted_changes_records_them_with_its_attempt(project):
    write(project, "reader.py", READER)
    commit_all(project, "reader")
    commit = git(project, "rev-parse", "HEAD").strip()
    experiment = get("reader")
    with pytest.raises(ExecutionError):
        experiment.launch()
    (project / "value.txt").write_text("uncommitted 42\n")
    experiment.launch()

    assert experiment.result == "uncommitted 42"
    directory = experiment.directory
    resumed = [e["git"] for e in experiment.events() if e["event"] == "started"][-1]
    assert resumed == {"commit": commit, "dirty": True, "json": "attempts/2/git.json", "diff": "attempts/2/git.diff"}
    state = json.loads((directory / "attempts/2/git.json").read_text())
    assert (state["dirty"], state["untracked_files"], state["changed_files"]) == (True, ["value.txt"], [])
    assert b"+uncommitted 42" in (directory / "attempts/2/git.diff").read_bytes()
    assert json.loads((directory / "git.json").read_text())["dirty"] is False
    assert (directory / "git.diff").read_bytes() == b""


def test_a_resume_with_the_state_at_creation_writes_no_attempt_folder(project):
    write(project, "once.py", """
        from pathlib import Path
        from machinable import Experiment

        class Once(Experiment):
            def on_execute(self):
                marker = Path("__pycache__") / "failed-once"  # ignored by git: the tree stays as it was
                if not marker.exists():
                    marker.parent.mkdir(exist_ok=True)
                    marker.touch()
                    raise RuntimeError("the first attempt fails")
                return "second attempt"
    """)
    commit_all(project, "once")
    commit = git(project, "rev-parse", "HEAD").strip()
    experiment = get("once")
    with pytest.raises(ExecutionError, match="first attempt"):
        experiment.launch()
    get("once").launch()  # from a fresh object: compared with the stored git.json and git.diff

    assert experiment.result == "second attempt"
    started = [e["git"] for e in experiment.events() if e["event"] == "started"]
    assert started == [{"commit": commit, "dirty": False, "json": "git.json", "diff": "git.diff"}] * 2
    assert not (experiment.directory / "attempts").exists()


# --- NaN and infinity -------------------------------------------------------------------------

DIVERGING = """
    import numpy
    from machinable import Experiment

    class Diverging(Experiment):
        class Config:
            bare: bool = False

        def on_execute(self):
            self.record(step=0, loss=float("nan"), grad=float("inf"))
            self.record(step=1, loss=numpy.float32("nan"), weights=numpy.array([numpy.inf, 0.5]),
                        stats={"low": -float("inf"), "history": [1.0, float("nan")], "label": "NaN"})
            self.save_data("metrics.json", {"loss": float("nan"), "ok": None})
            if self.config.bare:
                return float("nan")
            return {"loss": float("nan"), "bounds": (float("-inf"), float("inf")), "scale": numpy.float64("inf"), "none": None}
"""


def test_nan_and_infinity_come_back_from_results_records_and_json_data(project):
    import math

    pytest.importorskip("numpy")
    write(project, "diverging.py", DIVERGING)
    experiment = get("diverging")
    experiment.launch()
    inf = float("inf")

    result = experiment.result
    assert math.isnan(result["loss"]) and result["bounds"] == [-inf, inf] and result["scale"] == inf and result["none"] is None
    first, second = experiment.records()
    assert math.isnan(first["loss"]) and first["grad"] == inf and first["step"] == 0
    assert math.isnan(second["loss"]) and second["weights"] == [inf, 0.5]
    assert second["stats"]["low"] == -inf and math.isnan(second["stats"]["history"][1]) and second["stats"]["label"] == "NaN"
    metrics = experiment.load_data("metrics.json")
    assert math.isnan(metrics["loss"]) and metrics["ok"] is None

    # the files spell them as Python's json module does, and it reads them back
    directory = experiment.directory
    assert (directory / "data" / "result.json").read_text() == (
        '{"loss":NaN,"bounds":[-Infinity,Infinity],"scale":Infinity,"none":null}'
    )
    rows = [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines()]
    assert math.isnan(rows[1]["stats"]["history"][1]) and rows[0]["grad"] == inf
    assert math.isnan(json.loads((directory / "data" / "metrics.json").read_text())["loss"])
    _, problems = Storage.current().verify([experiment.experiment_id])
    assert problems == []

    bare = get("diverging", {"bare": True})
    bare.launch()
    assert math.isnan(bare.result)
    assert (bare.directory / "data" / "result.json").read_bytes() == b"NaN"


def test_show_prints_nan_and_infinity_as_stored(project):
    pytest.importorskip("numpy")
    write(project, "diverging.py", DIVERGING)
    experiment = get("diverging")
    experiment.launch()
    from machinable.diff import Snapshot

    shown = Snapshot.of(experiment).render()
    assert 'result  {"loss":NaN,"bounds":[-Infinity,Infinity],"scale":Infinity,"none":null}' in shown
    assert '"history":[1.0,NaN]' in shown


# --- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999999, 1.5, "42", True])
def test_invalid_seeds_are_refused_at_get_naming_the_value(project, seed):
    for make in (get, get.new):
        with pytest.raises(ConfigError, match="seed") as raised:
            make("estimate_gravity", seed=seed)
        assert repr(seed) in str(raised.value) or str(seed) in str(raised.value)
        assert "2**63" in str(raised.value)
    assert not (project / "storage").exists()


def test_the_largest_seed_and_numpy_integer_seeds_launch(project):
    numpy = pytest.importorskip("numpy")
    largest = get("estimate_gravity", {"verbose": False}, seed=2**63 - 1)
    largest.launch()
    assert largest.is_finished() and get("estimate_gravity", {"verbose": False}, seed=2**63 - 1) == largest
    assert largest.seed_everything() == 2**63 - 1
    assert get("estimate_gravity", seed=numpy.int64(7)).seed == 7
    assert type(get("estimate_gravity", seed=numpy.int64(7)).seed) is int


# --- record() errors --------------------------------------------------------------------------


def test_record_names_the_key_and_the_type_it_cannot_store(project):
    from machinable.errors import RecordError, UsageError

    assert issubclass(RecordError, UsageError) and issubclass(RecordError, ValueError)
    assert not issubclass(RecordError, ConfigError)
    write(project, "recorder.py", """
        from machinable import Experiment
        from machinable.errors import RecordError

        class Recorder(Experiment):
            def on_execute(self):
                messages = []
                for row in ({"p": object()}, {"metrics": {"val": [1.0, {2, 3}]}}, {"counts": {1: 2}}):
                    try:
                        self.record(step=1, **row)
                    except RecordError as error:
                        messages.append(str(error))
                self.record(step=2, ok=1.0)
                return messages
    """)
    experiment = get("recorder")
    experiment.launch()
    first, nested, key = experiment.result
    assert first.startswith("record(): 'p' holds a value of type object, which cannot be stored as JSON.")
    assert "save_data()" in first
    assert nested.startswith("record(): 'metrics.val[1]' holds a value of type set,")
    assert key.startswith("record(): 'counts' holds a dict key of type int (1),")
    assert list(experiment.records()) == [{"step": 2, "ok": 1.0}]  # a refused row leaves nothing behind


# --- the result's files, summaries with NaN and infinity, numpy results ------------------


@pytest.mark.parametrize("returns", [True, False])
def test_save_data_refuses_the_names_the_returned_result_is_stored_under(project, returns):
    write(project, "clobber.py", """
        from machinable import Experiment
        from machinable.errors import ConfigError

        class Clobber(Experiment):
            class Config:
                returns: bool = True

            def on_execute(self):
                for name in ("result.json", "result.pickle", "Result.JSON", "./result.pickle"):
                    try:
                        self.save_data(name, {"mine": 1})
                    except ConfigError:
                        continue
                    raise AssertionError(f"save_data({name!r}) was accepted")
                self.save_data("sub/result.json", {"nested": True})  # not the result's file
                return 7 if self.config.returns else None
    """)
    experiment = get("clobber", {"returns": returns})
    experiment.launch()
    assert experiment.is_finished(), experiment.output()
    data = experiment.directory / "data"
    if returns:
        assert experiment.result == 7
        assert (data / "result.json").read_bytes() == b"7"
        assert not (data / "result.pickle").exists()
    else:
        assert experiment.result is None
        assert not (data / "result.json").exists() and not (data / "result.pickle").exists()
    assert experiment.load_data("sub/result.json") == {"nested": True}


def test_save_data_result_names_error_names_the_file_and_what_to_do(project):
    write(project, "clobber.py", """
        from machinable import Experiment
        from machinable.errors import ConfigError

        class Clobber(Experiment):
            def on_execute(self):
                messages = []
                for name in ("result.json", "result.pickle"):
                    try:
                        self.save_data(name, [1, 2])
                    except ConfigError as error:
                        messages.append(str(error))
                return messages
    """)
    experiment = get("clobber")
    experiment.launch()
    as_json, as_pickle = experiment.result
    assert as_json == ("Invalid data file name 'result.json': data/result.json holds the experiment's returned result "
                       "(what on_execute() returns); save your file under another name.")
    assert as_pickle.startswith("Invalid data file name 'result.pickle': data/result.pickle holds the experiment's returned result")
    assert sorted(p.name for p in (experiment.directory / "data").iterdir()) == ["result.json"]  # the returned list only


DIVERGED = """
    from machinable import Experiment

    class Diverged(Experiment):
        def on_execute(self):
            for step, loss in enumerate([1.0, 0.5, float("inf"), float("nan"), 0.4]):
                self.record(step=step, loss=loss, tag="x")
"""


def test_records_summary_keeps_nan_and_infinity_visible(project):
    import math

    from machinable.experiment import Records

    write(project, "diverged.py", DIVERGED)
    experiment = get("diverged")
    experiment.launch()
    summary = experiment.records().summary()
    loss = summary["loss"]
    assert (loss["count"], loss["last"], loss["min"], loss["max"], loss["nan"]) == (5, 0.4, 0.4, float("inf"), 1)
    assert math.isnan(loss["mean"])
    assert summary["step"] == {"count": 5, "last": 4, "min": 0, "max": 4, "mean": 2.0}  # no NaN: no nan count
    assert summary["tag"] == {"count": 5, "last": "x"}

    inf, nan = float("inf"), float("nan")
    # min and max do not depend on where the NaN is
    for values in ([nan, 1.0, 0.5], [1.0, nan, 0.5], [1.0, 0.5, nan]):
        stats = Records({"v": v} for v in values).summary()["v"]
        assert (stats["min"], stats["max"], stats["nan"]) == (0.5, 1.0, 1) and math.isnan(stats["mean"])
    assert Records([{"v": 1.0}, {"v": inf}]).summary()["v"]["mean"] == inf
    both = Records([{"v": -inf}, {"v": 2}, {"v": inf}]).summary()["v"]
    assert (both["min"], both["max"]) == (-inf, inf) and math.isnan(both["mean"]) and "nan" not in both
    only_nan = Records([{"v": nan}, {"v": nan}]).summary()["v"]
    assert only_nan["nan"] == 2 and all(math.isnan(only_nan[k]) for k in ("min", "max", "mean"))
    assert Records([{"ok": True}, {"ok": False}]).summary()["ok"] == {"count": 2, "last": False}


def test_show_prints_a_summary_with_nan_and_infinity_and_json_stays_valid(project):
    from conftest import run_machinable

    write(project, "diverged.py", DIVERGED)
    experiment = get("diverged")
    experiment.launch()

    shown = run_machinable(project, "show", experiment.short_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if line.strip().startswith("loss ")]
    assert "n=5 min=0.4 max=inf mean=nan nan=1 last=0.4" in line

    as_json = run_machinable(project, "show", experiment.short_id, "--json")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr

    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")

    loss = json.loads(as_json.stdout, parse_constant=refuse)["records"]["summary"]["loss"]
    assert loss == {"count": 5, "last": 0.4, "min": 0.4, "max": None, "mean": None, "nan": 1}


NUMPY_RESULT = """
    import numpy
    from machinable import Experiment

    class NumpyResult(Experiment):
        class Config:
            kind: str = "array"

        def on_execute(self):
            array = numpy.arange(6, dtype=numpy.float32).reshape(2, 3) / 3
            if self.config.kind == "array":
                return array
            if self.config.kind == "nested":
                return {"weights": [numpy.array([1, 2], dtype=numpy.int16)], "accuracy": 0.9}
            if self.config.kind == "scalar":
                return numpy.array(2.5, dtype=numpy.float16)
            return {"accuracy": numpy.float32(0.5), "epochs": numpy.int64(3)}  # numpy scalars: JSON numbers
"""


def test_a_numpy_array_result_is_pickled_and_comes_back_with_its_dtype_and_shape(project):
    numpy = pytest.importorskip("numpy")
    write(project, "numpy_result.py", NUMPY_RESULT)

    array = get("numpy_result")
    array.launch()
    result = array.result
    assert isinstance(result, numpy.ndarray) and result.dtype == numpy.float32 and result.shape == (2, 3)
    assert numpy.array_equal(result, numpy.arange(6, dtype=numpy.float32).reshape(2, 3) / 3)
    assert array.events()[-1]["result"] == "pickle"
    assert not (array.directory / "data" / "result.json").exists()

    nested = get("numpy_result", {"kind": "nested"})
    nested.launch()
    [weights] = nested.result["weights"]
    assert weights.dtype == numpy.int16 and weights.tolist() == [1, 2] and nested.result["accuracy"] == 0.9

    scalar = get("numpy_result", {"kind": "scalar"})
    scalar.launch()
    assert scalar.result.dtype == numpy.float16 and scalar.result.shape == () and scalar.result == 2.5

    scalars = get("numpy_result", {"kind": "scalars"})
    scalars.launch()
    assert scalars.result == {"accuracy": 0.5, "epochs": 3}
    assert scalars.events()[-1]["result"] == "json"


def test_a_numpy_array_result_reproduces(project):
    pytest.importorskip("numpy")
    from conftest import commit_all, run_machinable

    write(project, "numpy_result.py", NUMPY_RESULT)
    commit_all(project)
    experiment = get("numpy_result")
    experiment.launch()

    checked = run_machinable(project, "reproduce", experiment.short_id, "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "result   match  identical bytes" in checked.stdout


def test_diff_of_two_runs_that_diverged_alike_shows_no_records_difference(project):
    from machinable.diff import diff

    write(project, "diverged.py", DIVERGED)
    a = get("diverged")
    a.launch()
    b = get.new("diverged")
    b.launch()
    assert diff(a, b).sections["outputs"] == {}  # NaN summaries and last values compare equal


DYNAMIC = """
    import importlib

    from machinable import Experiment


    class Dynamic(Experiment):
        class Config:
            model: str = "small"

        def on_execute(self):
            import json  # not a project file: nothing to say
            return importlib.import_module(f"models.{self.config.model}").DEPTH
"""


def test_a_project_module_imported_while_running_is_named_as_untracked(project):
    from conftest import commit_all, run_machinable

    write(project, "models/__init__.py", "")
    write(project, "models/small.py", "DEPTH = 1\n")
    write(project, "dynamic.py", DYNAMIC)
    commit_all(project)
    result = run_machinable(project, "dynamic", "--launch")
    assert result.returncode == 0, result.stderr
    warning = ("machinable: warning: dynamic imported project files while it ran that are not part of its code hash: "
               "models/__init__.py, models/small.py. A change to them does not give a new experiment; import them at the "
               "top of the module (import models) so that they are tracked.")
    assert warning in result.stderr.splitlines()
    experiment = get("dynamic")
    assert experiment.result == 1 and warning in experiment.output().splitlines()  # the record keeps the warning too

    # imported at the top of the module, the file is part of the code hash: no warning
    write(project, "static.py", DYNAMIC.replace("import importlib", "import importlib\n    import models.small"))
    commit_all(project)
    quiet = run_machinable(project, "static", "--launch")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    assert "models/small.py" in get("static").closure.files


RESTARTING = """
    from pathlib import Path

    from machinable import Experiment


    class Restarting(Experiment):
        def on_execute(self):
            for step in range(3):
                self.record(step=step)
                if step == 1 and not Path("fixed").exists():
                    raise RuntimeError("diverged at step 1")
            return "done"
"""


def test_records_of_each_attempt_are_kept_and_can_be_told_apart(project):
    write(project, "restarting.py", RESTARTING)
    experiment = get("restarting")
    with pytest.raises(ExecutionError, match="diverged at step 1"):
        experiment.launch()
    assert experiment.records(attempt="last") == [{"step": 0}, {"step": 1}]  # the failed attempt is the last so far
    (project / "fixed").touch()
    experiment = get("restarting")
    experiment.launch()
    assert [r["step"] for r in experiment.records()] == [0, 1, 0, 1, 2]  # every attempt's rows, in order
    assert [r["step"] for r in experiment.records(attempt="last")] == [0, 1, 2]
    assert [r["step"] for r in experiment.records(attempt=1)] == [0, 1]
    assert experiment.records(attempt=2) == experiment.records(attempt="last")
    with pytest.raises(UsageError, match=r"Invalid attempt 3 for experiment \w+: it has 2 attempts; give a number from 1 to 2"):
        experiment.records(attempt=3)


def test_the_untracked_import_warning_skips_virtualenvs_and_other_experiments(project):
    from conftest import commit_all, run_machinable

    write(project, ".venv/lib/python3.11/site-packages/fakelib/__init__.py", "VALUE = 1\n")
    write(project, "other.py", """
        from machinable import Experiment


        class Other(Experiment):
            def on_execute(self):
                return 2
    """)
    write(project, "caller.py", """
        import sys

        from machinable import Experiment, get


        class Caller(Experiment):
            def on_execute(self):
                sys.path.insert(0, ".venv/lib/python3.11/site-packages")
                import fakelib

                inner = get("other")  # an experiment of its own, with its own code hash
                inner.launch()
                return fakelib.VALUE + inner.result
    """)
    commit_all(project)
    result = run_machinable(project, "caller", "--launch")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    assert get("caller").result == 3


def test_records_of_the_last_attempt_of_an_experiment_never_started_are_none(project):
    assert get("estimate_gravity").records(attempt="last") == []


def test_a_reader_of_the_output_that_goes_away_stops_the_echo_not_the_run(project):
    import subprocess
    import sys

    from conftest import commit_all

    write(project, "chatty.py", """
        from machinable import Experiment


        class Chatty(Experiment):
            def on_execute(self):
                for i in range(20000):
                    print(f"line {i} " + "x" * 60)
                return "done"
    """)
    commit_all(project)
    # `machinable chatty --launch | head -1`
    proc = subprocess.Popen([sys.executable, "-m", "machinable.cli", "chatty", "--launch"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"line 0 ")
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    experiment = get("chatty")
    assert experiment.is_finished() and experiment.result == "done"
    assert experiment.output().count("\n") == 20000  # output.log has every line
