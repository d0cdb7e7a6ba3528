"""reproduce: re-execution at the recorded commit + diff in isolation, compared with the record."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from machinable import get
from machinable.errors import ConfigError, ExecutionError, UsageError
from machinable.reproduce import ReproductionError, environment_differences, reproduce, reproductions
from machinable.storage import verify_manifest

from conftest import git, run_machinable, write, commit_all


def worktrees(root: Path) -> list[str]:
    return [line for line in git(root, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a record except the reproductions/ folder beside it."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] != "reproductions"
    }


NOISY = """
    import os

    import numpy
    from machinable import Experiment


    class Noisy(Experiment):
        # NOISE stands for anything outside the record: a library, a GPU, the machine
        def on_execute(self):
            factor = 1.0 + float(os.environ.get("NOISE", "0"))
            self.record(step=0, loss=0.5 * factor)
            self.save_data("weights.npy", numpy.arange(4, dtype=float) * factor)
            self.save_data("metrics.json", {"accuracy": 0.75 * factor, "epochs": 3})
            self.save_data("notes.txt", "same every time")
            return 1155.5555555555557 * factor
"""


def test_a_deterministic_experiment_reproduces_and_the_original_is_untouched(project, tmp_path):
    experiment = get("estimate_gravity", {"time_dilation": 1.5})
    experiment.launch()
    before = snapshot(experiment.directory)
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    result = run_machinable(project, "reproduce", experiment.short_id, "--check", "--compare-output",
                            env={"TMPDIR": str(scratch)})

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Assuming height of 52 and time of 0.44999999999999996" in result.stdout  # shown live
    assert "result   match  513.5802469135804" in result.stdout
    assert "output   match  2 lines identical" in result.stdout
    assert "reproduced: 5 of 5 match" in result.stdout
    assert snapshot(experiment.directory) == before
    assert verify_manifest(experiment.directory) == []
    assert len(worktrees(project)) == 1 and list(scratch.iterdir()) == []  # worktree and scratch removed
    [attempt] = reproductions(experiment)
    assert attempt["ok"] is True and attempt["verdict"] == "reproduced" and attempt["experiment_id"] == experiment.experiment_id
    folder = Path(attempt["directory"])
    assert folder.parent == experiment.directory / "reproductions"
    assert [e["event"] for e in map(json.loads, (folder / "events.jsonl").read_text().splitlines())] == ["started", "finished"]
    assert "The gravity on the exoplanet is:" in (folder / "output.log").read_text()
    shown = run_machinable(project, "show", experiment.short_id)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-2] == "reproductions (machinable reproduce)"
    assert shown.stdout.splitlines()[-1].endswith("  reproduced: 5 of 5 match")
    assert json.loads(run_machinable(project, "show", experiment.short_id, "--json").stdout)["reproductions"][0]["ok"] is True


def test_code_reading_a_changing_file_fails_the_check_showing_the_differing_record(project, tmp_path):
    readings = tmp_path / "readings.txt"
    readings.write_text("1 2 3")
    write(project, "sensor.py", """
        from pathlib import Path
        from machinable import Experiment


        class Sensor(Experiment):
            class Config:
                source: str = ""

            def on_execute(self):
                for step, value in enumerate(Path(self.config.source).read_text().split()):
                    self.record(step=step, value=float(value))
    """)
    commit_all(project)
    experiment = get("sensor", {"source": str(readings)})
    experiment.launch()
    readings.write_text("1 5 3")

    result = run_machinable(project, "reproduce", experiment.short_id, "--check")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "records  MISMATCH  records[1].value: recorded 2.0, reproduced 5.0" in result.stdout
    assert "NOT reproduced: 3 of 4 match" in result.stdout
    assert "Traceback" not in result.stderr
    # without --check the same table, but the command itself succeeds
    assert run_machinable(project, "reproduce", experiment.short_id).returncode == 0
    assert [a["verdict"] for a in reproductions(experiment)] == ["mismatch", "mismatch"]
    shown = run_machinable(project, "show", experiment.short_id).stdout
    assert shown.splitlines()[-1].endswith("mismatch: 3 of 4 match; records: records[1].value: recorded 2.0, reproduced 5.0")


def test_tolerances_decide_for_numbers_in_result_records_json_and_npy(project, monkeypatch):
    write(project, "noisy.py", NOISY)
    commit_all(project)
    monkeypatch.setenv("NOISE", "1e-12")
    experiment = get("noisy")
    experiment.launch()
    monkeypatch.delenv("NOISE")

    exact = run_machinable(project, "reproduce", experiment.short_id, "--check")
    assert exact.returncode == 1, exact.stdout + exact.stderr
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in exact.stdout.splitlines()[1:-1]}
    factor = 1.0 + 1e-12
    assert rows["result"] == ["MISMATCH", f"result: recorded {1155.5555555555557 * factor!r}, reproduced 1155.5555555555557"]
    assert rows["records"] == ["MISMATCH", f"records[0].loss: recorded {0.5 * factor!r}, reproduced 0.5"]
    assert rows["data/metrics.json"] == ["MISMATCH", f"data/metrics.json.accuracy: recorded {0.75 * factor!r}, reproduced 0.75"]
    assert rows["data/weights.npy"] == ["MISMATCH", f"3 of 4 values differ; first at [1]: recorded {factor!r}, reproduced 1.0"]
    assert rows["data/notes.txt"] == ["match", "identical bytes"]

    loose = run_machinable(project, "reproduce", experiment.short_id, "--check", "--rtol", "1e-9")
    assert loose.returncode == 0, loose.stdout + loose.stderr
    assert "reproduced: 7 of 7 match (rtol=1e-09, atol=0)" in loose.stdout

    # the same facts in Python
    report = experiment.reproduce()
    assert not report.ok and {c.item for c in report.mismatches} == {"result", "records", "data/metrics.json", "data/weights.npy"}
    assert experiment.reproduce(rtol=1e-9).ok
    assert experiment.reproduce(atol=1e-6).ok


def test_a_run_from_a_dirty_tree_with_an_untracked_helper_reproduces(project):
    write(project, "gravity_helpers.py", """
        def scale(value):
            return 3 * value
    """)
    source = (project / "estimate_gravity.py").read_text()
    (project / "estimate_gravity.py").write_text(
        "from gravity_helpers import scale\n" + source.replace("return g", "return scale(g)")
    )
    experiment = get("estimate_gravity")
    experiment.launch()
    assert experiment.result == pytest.approx(3 * 1155.5555555555557)
    recorded_git = json.loads((experiment.directory / "git.json").read_text())
    assert recorded_git["dirty"] and recorded_git["untracked_files"] == ["gravity_helpers.py"]
    status_before = git(project, "status", "--porcelain")

    report = experiment.reproduce()

    assert report.ok, report.render()
    assert report.dirty and "+ recorded uncommitted changes" in report.render()
    assert [(c.item, c.detail) for c in report.comparisons[:2]] == [("run", "finished, same id"), ("code", "2 files identical")]
    assert git(project, "status", "--porcelain") == status_before  # the working tree was not touched
    assert len(worktrees(project)) == 1


READER = """
    from pathlib import Path
    from machinable import Experiment

    class Reader(Experiment):
        def on_execute(self):
            return Path("value.txt").read_text().strip()
"""


@pytest.mark.parametrize("committed", [True, False], ids=["value committed", "value uncommitted"])
def test_a_resumed_experiment_reproduces_at_the_state_its_finishing_attempt_ran_with(project, committed):
    write(project, "reader.py", READER)
    commit_all(project, "reader")
    failed = run_machinable(project, "reader", "--launch", "--require-clean")
    assert failed.returncode == 1 and "FileNotFoundError" in failed.stderr
    (project / "value.txt").write_text("42\n")
    if committed:
        commit_all(project, "value")
    resumed = run_machinable(project, "reader", "--launch", *(["--require-clean"] if committed else []))
    assert resumed.returncode == 0, resumed.stderr
    if not committed:
        assert "Note: uncommitted changes in 1 file (value.txt) are recorded with this attempt" in resumed.stderr
    experiment = get("reader")
    assert experiment.is_finished() and experiment.result == "42"

    result = run_machinable(project, "reproduce", experiment.short_id, "--check")

    assert result.returncode == 0, result.stdout + result.stderr
    head = git(project, "rev-parse", "HEAD").strip()
    assert f"reader at commit {head[:12]}" in result.stdout
    assert ("+ recorded uncommitted changes" in result.stdout) is not committed
    assert "result   match  '42'" in result.stdout and "reproduced: 4 of 4 match" in result.stdout
    assert len(worktrees(project)) == 1


def test_unseeded_randomness_does_not_reproduce_and_seed_everything_fixes_it(project):
    write(project, "draw.py", """
        import random

        import numpy
        from machinable import Experiment


        class Draw(Experiment):
            class Config:
                seeded: bool = True

            def on_execute(self):
                if self.config.seeded:
                    self.seed_everything()
                return [random.random(), float(numpy.random.rand())]
    """)
    commit_all(project)
    seeded, unseeded = get("draw"), get("draw", {"seeded": False})
    seeded.launch()
    unseeded.launch()

    assert seeded.reproduce().ok
    report = unseeded.reproduce()
    assert not report.ok and [c.item for c in report.mismatches] == ["result"]
    assert "result[0]: recorded" in report.mismatches[0].detail


def test_seed_everything_seeds_random_and_numpy_from_the_experiment_seed(project):
    experiment = get.new("estimate_gravity", seed=1234)
    assert experiment.seed_everything() == 1234
    first = (random.random(), numpy.random.rand())
    experiment.seed_everything()
    assert (random.random(), numpy.random.rand()) == first
    get.new("estimate_gravity", seed=4321).seed_everything()
    assert (random.random(), numpy.random.rand()) != first


def test_all_with_a_sample_through_an_execution(project):
    for dilation in (1.0, 2.0, 3.0):
        get("estimate_gravity", {"time_dilation": dilation}).launch()

    result = run_machinable(project, "reproduce", "--all", "--check", "--execution", "multiprocess_execution", "processes=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 experiments: 3 reproduced, 0 mismatch, 0 could not run." in result.stdout

    # the spelling: a built-in execution by its short name
    sampled = run_machinable(project, "reproduce", "--all", "estimate_gravity", "--sample", "2", "--json",
                             "--execution", "multiprocess", "processes=2")
    assert sampled.returncode == 0, sampled.stderr
    reports = json.loads(sampled.stdout)
    assert len(reports) == 2 and all(r["ok"] and r["verdict"] == "reproduced" for r in reports)

    usage = run_machinable(project, "reproduce", "--all", "processes=2")
    assert usage.returncode == 2 and "give --execution NAME first" in usage.stderr


def test_a_commit_that_is_gone_is_named_clearly(project):
    write(project, "estimate_gravity.py", (project / "estimate_gravity.py").read_text() + "\n\nSCALE = 2\n")
    commit_all(project, "to be rebased away")
    experiment = get("estimate_gravity")
    experiment.launch()
    commit = json.loads((experiment.directory / "git.json").read_text())["commit"]
    git(project, "reset", "-q", "--hard", "HEAD~1")
    git(project, "reflog", "expire", "--expire=now", "--all")
    git(project, "gc", "-q", "--prune=now")

    result = run_machinable(project, "reproduce", experiment.short_id, "--check")

    assert result.returncode == 1
    assert f"recorded at commit {commit[:12]}, which is not in the repository" in result.stderr
    assert "rebased or amended away, or not fetched" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ReproductionError, match="not in the repository"):
        experiment.reproduce()
    assert [a["verdict"] for a in reproductions(experiment)] == ["error", "error"]
    assert f"could not run: Experiment {experiment.short_id} (estimate_gravity) was recorded at commit" in run_machinable(
        project, "show", experiment.short_id).stdout
    assert len(worktrees(project)) == 1


def test_failed_reproduction_still_removes_the_worktree_and_keep_keeps_it(project, tmp_path):
    readings = tmp_path / "readings.txt"
    readings.write_text("7")
    write(project, "reader.py", """
        from pathlib import Path
        from machinable import Experiment


        class Reader(Experiment):
            class Config:
                source: str = ""

            def on_execute(self):
                return float(Path(self.config.source).read_text())
    """)
    commit_all(project)
    experiment = get("reader", {"source": str(readings)})
    experiment.launch()
    readings.unlink()

    report = experiment.reproduce()
    assert not report.ok and report.state == "failed"
    assert report.comparisons[0].item == "run" and "FileNotFoundError" in report.comparisons[0].detail
    assert len(worktrees(project)) == 1

    readings.write_text("7")
    kept = run_machinable(project, "reproduce", experiment.short_id, "--keep")
    assert kept.returncode == 0, kept.stderr
    [folder] = [line.split("kept: ")[1].split(" ")[0] for line in kept.stdout.splitlines() if "kept: " in line]
    assert (Path(folder) / "worktree" / "reader.py").is_file() and (Path(folder) / "storage" / experiment.experiment_id).is_dir()
    assert len(worktrees(project)) == 2
    git(project, "worktree", "remove", "--force", str(Path(folder) / "worktree"))
    shutil.rmtree(folder)


def test_only_finished_experiments_can_be_reproduced(project):
    write(project, "broken.py", """
        from machinable import Experiment


        class Broken(Experiment):
            def on_execute(self):
                raise ValueError("boom")
    """)
    commit_all(project)
    experiment = get("broken")
    with pytest.raises(ExecutionError):
        experiment.launch()
    with pytest.raises(UsageError, match="is failed: only finished experiments can be reproduced"):
        experiment.reproduce()
    result = run_machinable(project, "reproduce", experiment.short_id)
    assert result.returncode == 2 and "only finished experiments" in result.stderr
    one = run_machinable(project, "reproduce")
    assert one.returncode == 2 and "Give one experiment id" in one.stderr


def test_environment_differences_are_listed():
    recorded = {"python": "3.11.7", "machinable": "0.1.0", "packages": {"numpy": "1.26.4", "scipy": "1.11.0"}}
    now = {"python": "3.12.1", "machinable": "0.1.0", "packages": {"numpy": "2.0.0", "torch": "2.3.0"}}
    assert environment_differences(recorded, now) == [
        "python 3.11.7 -> 3.12.1",
        "numpy 1.26.4 -> 2.0.0",
        "scipy 1.11.0 -> absent",
        "torch absent -> 2.3.0",
    ]


def test_a_project_in_a_subfolder_of_the_repository(tmp_path, monkeypatch):
    import shutil

    from machinable.project import Project

    from conftest import TEMPLATE

    repo = tmp_path / "repo"
    shutil.copytree(TEMPLATE, repo / "physics")
    write(repo, "README.md", "experiments live in physics/\n")
    git(repo, "init", "-q", "-b", "main")
    commit_all(repo, "initial")
    monkeypatch.chdir(repo / "physics")
    with Project(repo / "physics"):
        experiment = get("estimate_gravity", {"time_dilation": 3.0})
        experiment.launch()
        report = experiment.reproduce(compare_output=True)
    assert report.ok, report.render()
    assert len(worktrees(repo)) == 1


def test_a_project_outside_git_cannot_be_reproduced_and_says_why(plain_project):
    experiment = get("estimate_gravity")
    experiment.launch()
    with pytest.raises(ReproductionError, match="recorded outside a git repository"):
        experiment.reproduce()


CLUSTER = """
    from machinable import Execution


    class Cluster(Execution):
        blocking = False

        def on_dispatch(self):
            pass
"""


def test_a_bad_execution_is_refused_before_anything_runs(project):
    write(project, "cluster.py", CLUSTER)
    commit_all(project)
    experiment = get("estimate_gravity")
    experiment.launch()
    refused = {
        ("--execution", "machinable.execution.process", "grace=x"):
            "Invalid value 'x' for config key 'grace' of machinable.execution.process: expected a float.",
        ("--execution", "process", "processs=2"):
            "Unknown config key 'processs' (value '2') for machinable.execution.process. Valid keys: grace.",
        ("--execution", "multiproces"): "Did you mean 'multiprocess'?",
        ("--execution", "multiprocess_executon", "processes=2"): "Did you mean 'multiprocess_execution'?",
        ("--execution", "estimate_gravity"): "'estimate_gravity' holds EstimateGravity, which is not an execution",
        ("--execution", "cluster"): "Execution 'cluster' does not wait for its experiments",
    }
    for args, message in refused.items():
        for target in ([experiment.short_id, "--check"], ["--all", "--check"]):
            result = run_machinable(project, "reproduce", *target, *args)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert result.stderr.startswith("Error: ") and message in result.stderr, (args, result.stderr)
            assert result.stdout == "" and "Traceback" not in result.stderr

    assert reproductions(experiment) == [] and len(worktrees(project)) == 1  # no attempt, no worktree
    with pytest.raises(ConfigError, match="'grace'"):
        reproduce(experiment, execution="process", execution_config={"grace": "x"})
    assert reproduce(experiment, execution="process", execution_config={"grace": "1.5"}, echo=False).ok


SLOW = """
    import os
    import time

    from machinable import Experiment


    class Slow(Experiment):
        class Config:
            n: int = 0

        def on_execute(self):
            print(f"started pid={os.getpid()}", flush=True)
            time.sleep(float(os.environ.get("SLOW", "0")))
            return self.config.n
"""


@pytest.mark.parametrize("execution", [[], ["--execution", "process"]], ids=["own-process", "through-an-execution"])
def test_ctrl_c_stops_at_once_and_records_the_attempt_as_interrupted(project, tmp_path, execution):
    write(project, "slow.py", SLOW)
    commit_all(project)
    experiments = [get("slow", {"n": n}) for n in (1, 2)]
    for experiment in experiments:
        experiment.launch()
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    # like a terminal's Ctrl-C: SIGINT to the command's process group, once the first reproduction runs
    proc = subprocess.Popen([sys.executable, "-m", "machinable.cli", "reproduce", "--all", "--check", *execution],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "SLOW": "600", "TMPDIR": str(scratch)})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "started pid=" in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 130, stderr
    output = "".join(lines) + rest
    started = re.findall(r"^\[\w+\] started pid=(\d+)$", output, re.M)  # (a traceback may quote the line's source)
    assert len(started) == 1 and "reproduced" not in output and "match" not in output
    assert f"reproduce interrupted; {'2 attempts' if execution else '1 attempt'} recorded as interrupted." in stderr
    assert "launching again resumes it" not in output + stderr  # nothing of the user's to resume: the original is finished
    attempts = [reproductions(e) for e in experiments]
    interrupted = [a for a in attempts if a]
    assert len(interrupted) == (2 if execution else 1)  # one process for the batch, or the first only
    for [attempt] in interrupted:
        assert attempt["verdict"] == "interrupted" and attempt["ok"] is False and attempt["error"] is None
        events = [json.loads(line)["event"] for line in (Path(attempt["directory"]) / "events.jsonl").read_text().splitlines()]
        assert events == ["started", "interrupted"]
    assert len(worktrees(project)) == 1 and list(scratch.iterdir()) == []  # worktree and scratch storage removed
    if not execution:  # the reproduction process itself ran the experiment: it is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int(started[0]), 0)
    shown = run_machinable(project, "show", experiments[0].short_id if attempts[0] else experiments[1].short_id)
    assert shown.stdout.splitlines()[-1].endswith("interrupted (Ctrl-C) before its verdict")
    for experiment in experiments:
        assert experiment.is_finished() and verify_manifest(experiment.directory) == []


def test_a_damaged_original_fails_the_check_even_when_its_outputs_reproduce(project):
    experiment = get("estimate_gravity", {"time_dilation": 1.5})
    experiment.launch()
    experiment.directory.chmod(0o755)
    (experiment.directory / "MANIFEST").unlink()  # nothing left to vouch for the record's files

    result = run_machinable(project, "reproduce", experiment.short_id, "--check")

    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert rows["result"] == ["match", "513.5802469135804"]  # the outputs themselves agree
    verdict, detail = rows["original"]
    assert verdict == "MISMATCH" and "MANIFEST: missing" in detail and f"machinable verify {experiment.short_id}" in detail
    assert "NOT reproduced: 4 of 5 match" in result.stdout


NOISY_ARRAYS = """
    import os

    import numpy
    from machinable import Experiment


    class NoisyArrays(Experiment):
        def on_execute(self):
            factor = 1.0 + float(os.environ.get("NOISE", "0"))
            self.save_data("sub/result.json", {"accuracy": 0.75 * factor})  # a data file, not the result
            return {"weights": numpy.arange(4, dtype=float) * factor, "epochs": (3, 4)}
"""


def test_a_pickled_array_result_is_compared_by_value_within_the_tolerances(project, monkeypatch):
    write(project, "noisy_arrays.py", NOISY_ARRAYS)
    commit_all(project)
    monkeypatch.setenv("NOISE", "1e-12")
    experiment = get("noisy_arrays")
    experiment.launch()
    monkeypatch.delenv("NOISE")
    assert isinstance(experiment.result["weights"], numpy.ndarray)

    exact = run_machinable(project, "reproduce", experiment.short_id, "--check")
    assert exact.returncode == 1, exact.stdout + exact.stderr
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in exact.stdout.splitlines()[1:-1]}
    factor = 1.0 + 1e-12
    assert rows["result"] == ["MISMATCH", f"result.weights: 3 of 4 values differ; first at [1]: recorded {factor!r}, reproduced 1.0"]
    assert rows["data/sub/result.json"] == ["MISMATCH", f"data/sub/result.json.accuracy: recorded {0.75 * factor!r}, reproduced 0.75"]

    loose = run_machinable(project, "reproduce", experiment.short_id, "--check", "--rtol", "1e-9")
    assert loose.returncode == 0, loose.stdout + loose.stderr
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in loose.stdout.splitlines()[1:-1]}
    assert rows["result"] == ["match", "array values match"] and rows["data/sub/result.json"] == ["match", "values match"]


def test_a_record_that_stored_an_array_result_as_json_still_reproduces(project):
    write(project, "noisy_arrays.py", NOISY_ARRAYS)
    commit_all(project)
    experiment = get("noisy_arrays")
    experiment.launch()
    # as machinable stored it before array results were pickled: a JSON list in data/result.json
    data = experiment.directory / "data"
    for path in (experiment.directory, data):
        path.chmod(0o755)
    (data / "result.pickle").chmod(0o644)
    (data / "result.pickle").unlink()
    (data / "result.json").write_text('{"weights": [0.0, 1.0, 2.0, 3.0], "epochs": [3, 4]}')

    result = run_machinable(project, "reproduce", experiment.short_id)  # without --check: no MANIFEST verdict on this edit
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in result.stdout.splitlines()[1:-1]}
    assert rows["result"] == ["match", "values match"], result.stdout + result.stderr
