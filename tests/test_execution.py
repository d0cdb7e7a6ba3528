"""The dispatch protocol: executions as strategy objects, and dispatch that never fails silently."""

from __future__ import annotations

import json
import os

import pytest

from machinable import Execution, get
from machinable.errors import ExecutionError
from machinable.execution import unpicklable_tasks
from conftest import BATCH, add_modules, events, run_python

HOOKED = '''
import json
import os

from machinable import Execution


def log(*event):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(json.dumps(event) + "\\n")


class Hooked(Execution):
    class Config:
        cancel: bool = False

    def on_before_dispatch(self):
        log("before_dispatch", len(self.experiments))
        if self.config.cancel:
            return False

    def on_dispatch(self):
        log("dispatch", sorted(e.config.index for e in self.experiments))
        for experiment in self.experiments:
            experiment()

    def on_after_dispatch(self):
        log("after_dispatch")

    def on_before_execute(self, experiment):
        log("before_execute", experiment.config.index)

    def on_after_execute(self, experiment, state):
        log("after_execute", experiment.config.index, state)
'''

# the upstream docs' variant: a lambda cannot be pickled, the pool runs nothing
LAMBDA = '''
from multiprocessing import Pool

from machinable import Execution


class Multiprocess(Execution):
    class Config:
        processes: int = 1

    def on_dispatch(self):
        with Pool(processes=self.config.processes) as pool:
            pool.imap_unordered(lambda experiment: experiment(), self.experiments)
'''

LAZY = '''
from machinable import Execution


class Lazy(Execution):
    def on_dispatch(self):
        map(lambda experiment: experiment(), self.experiments)
'''

NOTHING = '''
from machinable import Execution


class Nothing(Execution):
    def on_dispatch(self):
        pass
'''

RAISING = '''
from machinable import Execution


class Raising(Execution):
    def on_dispatch(self):
        raise RuntimeError("the scheduler is down")
'''


# every wait here is bounded (conftest's _bounded: a hang dumps every thread's stack and ends the run)
pytestmark = pytest.mark.usefixtures("_bounded")


# --- the seed example -------------------------------------------------------------------


SEED = """
from machinable import get

experiment = get('estimate_gravity')
multiprocessing = get("multiprocess_execution", {'processes': 2})
with multiprocessing:
    experiment.launch()
print(experiment.is_finished())
"""


def test_seed_multiprocess_execution_runs_verbatim(project):
    result = run_python(project, SEED)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "Assuming height of 52 and time of 0.3\n"
        "The gravity on the exoplanet is:  1155.5555555555557\n"
        "True\n"
    )
    again = run_python(project, SEED)  # finished: nothing runs, nothing is printed
    assert again.returncode == 0, again.stderr
    assert again.stdout == "True\n"


def test_worker_records_into_the_same_storage(project):
    experiment = get("estimate_gravity")
    with get("multiprocess_execution", {"processes": 2}):
        experiment.launch()
    assert experiment.is_finished()
    assert experiment.result == pytest.approx(1155.5555555555557)
    started = events(experiment, "started")
    assert len(started) == 1 and started[0]["pid"] != os.getpid()  # ran in a worker
    assert "The gravity on the exoplanet is" in experiment.output()


def test_launches_in_one_with_block_are_dispatched_together_at_exit(project, tmp_path, monkeypatch):
    add_modules(project, batch=BATCH, hooked_execution=HOOKED)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    experiments = [get("batch", {"index": i}) for i in range(3)]
    with get("hooked_execution"):
        for experiment in experiments:
            experiment.launch()
            assert not experiment.is_started()  # queued, not yet run
    assert all(e.is_finished() for e in experiments)
    log = [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]
    assert [e for e in log if e[0] == "dispatch"] == [["dispatch", [0, 1, 2]]]  # one dispatch of all three


# --- hooks ---------------------------------------------------------------------------------


def test_hooks_run_in_order_around_each_experiment(project, tmp_path, monkeypatch):
    add_modules(project, batch=BATCH, hooked_execution=HOOKED)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    with get("hooked_execution"):
        get("batch", {"index": 1}).launch()
        get("batch", {"index": 2}).launch()
    log = [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]
    assert log == [
        ["before_dispatch", 2],
        ["dispatch", [1, 2]],
        ["before_execute", 1],
        ["after_execute", 1, "finished"],
        ["before_execute", 2],
        ["after_execute", 2, "finished"],
        ["after_dispatch"],
    ]


def test_on_before_dispatch_returning_false_cancels(project, tmp_path, monkeypatch):
    add_modules(project, batch=BATCH, hooked_execution=HOOKED)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    execution = get("hooked_execution", {"cancel": True})
    experiment = get("batch", {"index": 1})
    with execution:
        experiment.launch()
    assert not experiment.is_started()
    assert execution.last_report.cancelled == [experiment.experiment_id]
    assert [e["event"] for e in experiment.events()] == ["created"]


def test_execution_hooks_run_in_the_worker_process(project, tmp_path, monkeypatch):
    add_modules(project, batch=BATCH, hooked_process="""
import json
import os

from machinable.executions.process import Process


class HookedProcess(Process):
    def on_before_execute(self, experiment):
        with open(os.environ["HOOK_LOG"], "a") as f:
            f.write(json.dumps([experiment.config.index, os.getpid()]) + "\\n")
""")
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hooks.jsonl"))
    experiment = get("batch", {"index": 5})
    with get("hooked_process"):
        experiment.launch()
    [[index, pid]] = [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]
    assert index == 5
    assert pid == events(experiment, "started")[0]["pid"] != os.getpid()


# --- dispatch never fails silently ----------------------------------------------------


def test_lambda_variant_raises_naming_experiments_and_cause(project):
    add_modules(project, lambda_execution=LAMBDA)
    experiments = [get("estimate_gravity", {"time_dilation": t}) for t in (1.0, 2.0)]
    with pytest.raises(ExecutionError) as raised:
        with get("lambda_execution", {"processes": 2}):
            for experiment in experiments:
                experiment.launch()
    message = str(raised.value)
    assert "0 finished, 0 failed, 2 not started" in message
    for experiment in experiments:
        assert experiment.short_id in message
        assert not experiment.is_started()
        assert experiment.state == "interrupted"  # resumable: launching again runs it
        assert "never started" in events(experiment, "cancelled")[-1]["reason"]
    assert "lambda" in message and "pickle" in message
    assert "def run(experiment): experiment()" in message
    report = raised.value.report
    assert sorted(report.not_started) == sorted(e.experiment_id for e in experiments)
    assert report.exit_code == 1


def test_lambda_is_found_in_the_source_even_without_a_pickling_attempt(project):
    add_modules(project, lambda_execution=LAMBDA)
    cls = get("lambda_execution").__class__
    [found] = unpicklable_tasks(cls)
    line = (project / "lambda_execution.py").read_text().splitlines().index(
        "            pool.imap_unordered(lambda experiment: experiment(), self.experiments)"
    ) + 1
    assert found == f"a lambda to imap_unordered() (lambda_execution.py, line {line})"
    assert unpicklable_tasks(get("multiprocess_execution").__class__) == []


def test_lazy_builtin_map_is_reported(project):
    add_modules(project, lazy_execution=LAZY)
    experiment = get("estimate_gravity")
    with pytest.raises(ExecutionError, match=r"builtin map\(\) \(lazy_execution.py, line 7\), which is lazy"):
        with get("lazy_execution"):
            experiment.launch()
    assert not experiment.is_started()


def test_execution_that_runs_nothing_is_reported(project):
    add_modules(project, nothing_execution=NOTHING)
    experiment = get("estimate_gravity")
    with pytest.raises(ExecutionError, match="returned without calling experiment") as raised:
        with get("nothing_execution"):
            experiment.launch()
    assert f"never started: {experiment.short_id}" in str(raised.value)
    assert not experiment.is_started()


def test_on_dispatch_raising_is_reported_with_the_experiments(project):
    add_modules(project, raising_execution=RAISING)
    experiment = get("estimate_gravity")
    with pytest.raises(ExecutionError) as raised:
        with get("raising_execution"):
            experiment.launch()
    message = str(raised.value)
    assert f"never started: {experiment.short_id}" in message
    # one cause: the exception, not also "returned without calling experiment()"
    assert message.count("raised RuntimeError: the scheduler is down") == 1
    assert "likely cause: on_dispatch() of raising_execution raised RuntimeError: the scheduler is down" in message
    assert "returned without calling" not in message
    assert isinstance(raised.value.__cause__, RuntimeError)
    experiment.launch()  # a working execution (the default) then runs it
    assert experiment.is_finished()


# --- failure isolation ---------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["machinable.execution.local", "machinable.execution.multiprocess"])
def test_batch_of_eight_with_two_failures(project, monkeypatch, capfd, execution):
    add_modules(project, batch=BATCH)
    monkeypatch.setenv("BATCH_FAIL", "2,5")
    experiments = [get("batch", {"index": i}) for i in range(8)]
    with pytest.raises(ExecutionError) as raised:
        with get(execution, {"processes": 2} if "multi" in execution else {}):
            for experiment in experiments:
                experiment.launch()
    report = raised.value.report
    assert raised.value.exit_code == 1 and report.exit_code == 1
    assert report.summary() == "6 finished, 2 failed, 0 not started"
    failed = {experiments[2].experiment_id, experiments[5].experiment_id}
    assert set(report.failed) == failed
    assert str(raised.value).startswith(f"{execution}: 6 finished, 2 failed, 0 not started.")
    for i, experiment in enumerate(experiments):
        if i in (2, 5):
            assert experiment.state == "failed"
            [event] = events(experiment, "failed")
            assert event["error"] == f"RuntimeError: experiment {i} failed on purpose"
            assert "Traceback (most recent call last)" in event["traceback"]
            assert f"experiment {i} failed on purpose" in event["traceback"]
        else:
            assert experiment.is_finished() and experiment.result == i

    monkeypatch.delenv("BATCH_FAIL")
    capfd.readouterr()
    with get(execution, {"processes": 2} if "multi" in execution else {}) as again:
        for experiment in experiments:
            experiment.launch()
    assert again.last_report.summary() == "2 finished, 0 failed, 0 not started, 6 already finished"
    assert sorted(again.last_report.finished) == sorted(failed)
    assert all(e.is_finished() for e in experiments)
    for i, experiment in enumerate(experiments):
        assert len(events(experiment, "started")) == (2 if i in (2, 5) else 1)
    out = capfd.readouterr().out
    assert "batch 2 done" in out and "batch 5 done" in out and "batch 0 done" not in out


def test_summary_line_after_a_batch(project, capfd):
    add_modules(project, batch=BATCH)
    with get("machinable.execution.local"):
        get("batch", {"index": 1}).launch()
        get("batch", {"index": 2}).launch()
    assert "machinable: machinable.execution.local: 2 finished, 0 failed, 0 not started." in capfd.readouterr().err


# --- the execution is recorded, the id does not depend on it ----------------------------


def test_execution_is_recorded_without_changing_the_id(project):
    add_modules(project, batch=BATCH)
    experiment = get("batch", {"index": 3}, seed=7)
    same = get("batch", {"index": 3}, seed=7)
    assert experiment.experiment_id == same.experiment_id
    execution = get("machinable.execution.multiprocess", {"processes": 3})
    with execution:
        experiment.launch()
    assert experiment.experiment_id == same.experiment_id
    [started] = events(experiment, "started")
    assert started["execution"] == {
        "module": "machinable.execution.multiprocess",
        "config": {"processes": 3, "start_method": "", "grace": 10.0},
        "config_hash": execution.describe()["config_hash"],
    }
    assert events(experiment, "dispatched")[0]["execution"] == started["execution"]
    other = get("machinable.execution.multiprocess", {"processes": 2})
    assert other.describe()["config_hash"] != execution.describe()["config_hash"]
    rows = {row["id"]: row for row in experiment.storage.fresh_index().query("1", order="id")}
    assert rows[experiment.experiment_id]["execution"] == "machinable.execution.multiprocess"
    experiment.storage.rebuild_index()  # the column comes from the ledger: a rebuild keeps it
    rows = {row["id"]: row for row in experiment.storage.fresh_index().query("1", order="id")}
    assert rows[experiment.experiment_id]["execution"] == "machinable.execution.multiprocess"


def test_default_execution_is_local_and_recorded(project):
    experiment = get("estimate_gravity")
    experiment.launch()
    [started] = events(experiment, "started")
    assert started["execution"]["module"] == "machinable.execution.local"
    assert started["pid"] == os.getpid()


def test_execution_without_with_dispatches_immediately(project):
    execution = get("machinable.execution.local")
    experiment = get("estimate_gravity")
    execution.add(experiment)
    assert experiment.is_finished()
    assert isinstance(execution, Execution)
