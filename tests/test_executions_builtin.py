"""The built-in executions: local (default), process (a fresh subprocess each), multiprocess (a pool)."""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import sys

import pytest

from machinable import get
from machinable.errors import ConfigError, ExecutionError
from conftest import BATCH, add_modules, events, run_machinable, run_python, wait_for

CRASH = '''
import ctypes
import os

from machinable import Experiment


class Crash(Experiment):
    class Config:
        how: str = "ok"

    def on_execute(self):
        print(f"before {self.config.how}", flush=True)
        if self.config.how == "exit":
            os._exit(1)
        if self.config.how == "segfault":
            ctypes.string_at(0)
        if self.config.how == "raise":
            raise ValueError("bad value")
        print("survived")
        return self.config.how
'''

CHATTY = '''
from machinable import Experiment


class Chatty(Experiment):
    class Config:
        lines: int = 200

    def on_execute(self):
        for i in range(self.config.lines):
            # three writes per line: a line must still reach the terminal whole
            print(f"chatter {i}", end="")
            print(" " + "x" * 80, end="")
            print()
'''

SLEEPER = '''
import os
import time

from machinable import Experiment


class Sleeper(Experiment):
    class Config:
        index: int = 0
        slow: bool = False

    def on_execute(self):
        print(f"start {self.config.index}", flush=True)
        while self.config.slow and not os.path.exists(os.environ["RELEASE"]):
            time.sleep(0.02)
        return self.config.index
'''


# every wait here is bounded (conftest's _bounded: a hang dumps every thread's stack and ends the run)
pytestmark = pytest.mark.usefixtures("_bounded")


def readline_within(stream, timeout: float = 60.0) -> str:
    """The next line of a child's pipe, or an AssertionError after ``timeout`` seconds."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no line within {timeout} s")
    return stream.readline()


# --- process: a fresh subprocess per experiment -------------------------------------------


def test_process_survives_os_exit_and_segfault(project, capfd):
    add_modules(project, crash=CRASH)
    ok, exits, segfaults = (get("crash", {"how": how}) for how in ("ok", "exit", "segfault"))
    with pytest.raises(ExecutionError) as raised:
        with get("machinable.execution.process"):
            for experiment in (exits, segfaults, ok):
                experiment.launch()
    report = raised.value.report
    assert report.summary() == "1 finished, 2 failed, 0 not started"
    assert ok.is_finished() and ok.result == "ok"
    assert exits.state == "failed"
    assert events(exits, "failed")[-1]["error"] == "its process exited with code 1 before it finished"
    assert events(exits, "failed")[-1]["exit_code"] == 1
    assert segfaults.state == "failed"
    assert events(segfaults, "failed")[-1]["error"] == "its process was killed by SIGSEGV before it finished"
    for experiment in (ok, exits, segfaults):
        assert events(experiment, "started")[0]["pid"] != os.getpid()
        assert events(experiment, "started")[0]["execution"]["module"] == "machinable.execution.process"
    assert "before exit" in exits.output() and "before segfault" in segfaults.output()
    out = capfd.readouterr().out
    assert "before exit" in out and "survived" in out  # the subprocesses write to our terminal


def test_process_failed_experiment_resumes(project, monkeypatch):
    add_modules(project, batch=BATCH)
    monkeypatch.setenv("BATCH_FAIL", "1")
    experiment = get("batch", {"index": 1})
    with pytest.raises(ExecutionError, match="RuntimeError: experiment 1 failed on purpose"):
        with get("machinable.execution.process"):
            experiment.launch()
    assert "Traceback" in events(experiment, "failed")[0]["traceback"]
    monkeypatch.delenv("BATCH_FAIL")
    with get("machinable.execution.process"):
        experiment.launch()
    assert experiment.is_finished() and len(events(experiment, "started")) == 2


def test_process_output_streams_live(project, tmp_path):
    add_modules(project, sleeper=SLEEPER)
    release = tmp_path / "release"
    driver = subprocess.Popen(
        [sys.executable, "-c", "from machinable import get\n"
         "with get('machinable.execution.process'):\n"
         "    get('sleeper', {'slow': True}, seed=1).launch()\n"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RELEASE": str(release)},
    )
    try:
        assert readline_within(driver.stdout) == "start 0\n"  # arrives while the experiment still runs
        experiment = get("sleeper", {"slow": True}, seed=1)
        assert experiment.state == "running"
    finally:
        release.touch()
        try:
            out, err = driver.communicate(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
    assert driver.returncode == 0, err
    assert experiment.is_finished()


# --- multiprocess: a pool of workers ------------------------------------------------------


def test_multiprocess_isolates_crashes(project):
    add_modules(project, crash=CRASH)
    experiments = {how: get("crash", {"how": how}) for how in ("exit", "ok", "segfault", "raise")}
    enabled = faulthandler.is_enabled()
    faulthandler.disable()  # pytest's, inherited by forked workers, would dump this process's stack
    try:
        with pytest.raises(ExecutionError) as raised:
            with get("machinable.execution.multiprocess", {"processes": 2}):
                for experiment in experiments.values():
                    experiment.launch()
    finally:
        if enabled:
            faulthandler.enable(file=sys.__stderr__)
    assert raised.value.report.summary() == "1 finished, 3 failed, 0 not started"
    assert experiments["ok"].is_finished()
    errors = {how: events(e, "failed")[-1]["error"] for how, e in experiments.items() if how != "ok"}
    assert errors == {
        "exit": "its process exited with code 1 before it finished",
        "segfault": "its process was killed by SIGSEGV before it finished",
        "raise": "ValueError: bad value",
    }


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_multiprocess_prefixes_whole_lines_when_parallel(project, start_method):
    add_modules(project, chatty=CHATTY)
    result = run_python(project, f"""
from machinable import get
experiments = [get("chatty", seed=seed) for seed in range(3)]
with get("machinable.execution.multiprocess", {{"processes": 3, "start_method": "{start_method}"}}):
    for experiment in experiments:
        experiment.launch()
print("ids", *(e.short_id for e in experiments))
""")
    assert result.returncode == 0, result.stderr
    *lines, last = result.stdout.splitlines()
    ids = last.split()[1:]
    seen: dict[str, list[int]] = {i: [] for i in ids}
    for line in lines:
        match = re.fullmatch(r"\[([0-9a-f]{12})\] chatter (\d+) x{80}", line)
        assert match, f"a line was broken up or not prefixed: {line!r}"
        seen[match.group(1)].append(int(match.group(2)))
    assert all(numbers == list(range(200)) for numbers in seen.values())
    assert "machinable: machinable.execution.multiprocess: 3 finished, 0 failed, 0 not started." in result.stderr
    # output.log holds the experiment's own output, without prefixes
    experiment = get("chatty", seed=0)
    assert experiment.output().splitlines()[0] == "chatter 0 " + "x" * 80


def test_multiprocess_single_experiment_is_not_prefixed(project):
    result = run_python(project, """
from machinable import get
with get("machinable.execution.multiprocess", {"processes": 4}):
    get("estimate_gravity").launch()
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Assuming height of 52 and time of 0.3\nThe gravity on the exoplanet is:  1155.5555555555557\n"


def test_multiprocess_config_is_checked_at_get(project):
    with pytest.raises(ConfigError, match="processes=-1"):
        get("machinable.execution.multiprocess", {"processes": -1})
    with pytest.raises(ConfigError, match="start_method='threads'"):
        get("machinable.execution.multiprocess", {"start_method": "threads"})


# --- experiments travel to pool workers by address (fork and spawn) ------------------------


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_user_pool_execution_pickles_experiments_by_address(project, start_method):
    add_modules(project, batch=BATCH)
    result = run_python(project, f"""
import multiprocessing, os
multiprocessing.set_start_method("{start_method}")
from machinable import get
experiments = [get("batch", {{"index": i}}) for i in range(3)]
with get("multiprocess_execution", {{"processes": 2}}):
    for experiment in experiments:
        experiment.launch()
for experiment in experiments:
    started = [e for e in experiment.events() if e["event"] == "started"]
    print(experiment.state, experiment.result, started[0]["pid"] != os.getpid())
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == ["finished 0 True", "finished 1 True", "finished 2 True"]


# --- Ctrl-C during a pool run ---------------------------------------------------------------

EXECUTIONS = {
    "builtin-pool": ("machinable.execution.multiprocess", {"processes": 2}),
    "user-pool": ("multiprocess_execution", {"processes": 2}),
    "process": ("machinable.execution.process", {}),
}


@pytest.mark.parametrize("name,target", [
    ("builtin-pool", "parent"), ("builtin-pool", "group"), ("user-pool", "parent"), ("process", "parent"),
])
def test_ctrl_c_stops_workers_and_keeps_what_finished(project, tmp_path, name, target):
    add_modules(project, sleeper=SLEEPER)
    module, config = EXECUTIONS[name]
    release = tmp_path / "release"
    script = (
        "from machinable import get\n"
        "experiments = [get('sleeper', {'index': i, 'slow': i >= 2}, seed=i) for i in range(4)]\n"
        f"with get({module!r}, {config!r}):\n"
        "    for experiment in experiments:\n"
        "        experiment.launch()\n"
    )
    env = {**os.environ, "RELEASE": str(release)}
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=project, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    experiments = [get("sleeper", {"index": i, "slow": i >= 2}, seed=i) for i in range(4)]
    try:
        # "start 2" in its output: its on_execute() runs (Ctrl-C a moment earlier, while the run is set up,
        # is recorded by the launching process, without the experiment's own line)
        wait_for(lambda: all(e.is_committed() and e.is_finished() for e in experiments[:2])
                 and experiments[2].is_committed() and "start 2" in experiments[2].output(), "a slow experiment to run")
        if target == "group":  # Ctrl-C in a terminal: every process of the foreground group
            os.killpg(driver.pid, signal.SIGINT)
        else:
            os.kill(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    finally:
        kill_group(driver.pid)  # also a worker that outlived the driver
    assert driver.returncode != 0
    assert "interrupted: 2 finished, 0 failed, 0 not started, 2 interrupted; launching again resumes them.\n" in err, err
    for experiment in experiments[:2]:  # nothing finished is lost
        assert experiment.is_finished() and experiment.result == experiment.config.index
    for experiment in experiments[2:]:
        assert experiment.state == "interrupted"
    assert events(experiments[2], "interrupted") or events(experiments[2], "cancelled")
    # one short line per interrupted experiment, no traceback of machinable's internals
    assert f"machinable: interrupted: {experiments[2].short_id} (Ctrl-C); launching again resumes it\n" in err or name == "user-pool", err
    assert err.count("Traceback") == 1 and err.endswith("\nKeyboardInterrupt\n"), err  # the driver's own: it stopped
    assert "machinable/executions/" not in err and "in handler" not in err, err
    if name != "user-pool":  # the pool's workers are terminated, they record nothing themselves
        assert "KeyboardInterrupt" in events(experiments[2], "interrupted")[0]["traceback"]

    release.touch()  # launching again resumes only the interrupted ones
    again = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert all(e.is_finished() for e in experiments)
    assert [len(events(e, "started")) for e in experiments[:2]] == [1, 1]
    assert "start 0" not in again.stdout and "start 2" in again.stdout and "start 3" in again.stdout


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


AT_FORK_CTRL_C = """
import os, signal
from machinable import get

forks = 0

def ctrl_c_at_the_third_fork():
    global forks
    forks += 1
    if forks == 3:
        os.kill(os.getpid(), signal.SIGINT)  # handled inside this callback, where an exception is lost

os.register_at_fork(after_in_parent=ctrl_c_at_the_third_fork)
experiments = [get('sleeper', {'index': i, 'slow': i >= 1}, seed=i) for i in range(3)]
with get('machinable.execution.multiprocess', {'processes': 3}):
    for experiment in experiments:
        experiment.launch()
"""


def test_ctrl_c_while_a_worker_is_forked_still_stops_the_launch(project, tmp_path):
    # A KeyboardInterrupt raised inside an at-fork callback is printed as "Exception ignored" and
    # lost: the launch then waited for its (never ending) workers forever.
    add_modules(project, sleeper=SLEEPER)
    driver = subprocess.Popen([sys.executable, "-c", AT_FORK_CTRL_C], cwd=project, start_new_session=True,
                              env={**os.environ, "RELEASE": str(tmp_path / "never")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = driver.communicate(timeout=60)
    finally:
        kill_group(driver.pid)
    assert driver.returncode == -signal.SIGINT, err
    assert "Exception ignored" not in err
    states = [get("sleeper", {"index": i, "slow": i >= 1}, seed=i).state for i in range(3)]
    assert states[1:] == ["interrupted", "interrupted"], err
    assert re.search(r"interrupted: \d finished, 0 failed, 0 not started, \d interrupted; launching again resumes them", err), err


# --- start methods that run the main script again ------------------------------------------

UNGUARDED = """
from machinable import get

experiments = [get("estimate_gravity", {"time_dilation": t, "verbose": False}) for t in (1.0, 2.0)]
with get("multiprocess", {"processes": 2, "start_method": "spawn"}):
    for experiment in experiments:
        experiment.launch()
"""


def test_spawn_without_main_guard_is_refused_with_one_cause(project):
    (project / "run.py").write_text(UNGUARDED)
    result = subprocess.run([sys.executable, "run.py"], cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "machinable.errors.ConfigError: start_method='spawn' starts each worker by running the main script's top "
        "level again, and the script launches experiments there (run.py, line 5), outside "
        "`if __name__ == \"__main__\":`. Put the launch under that guard, or use start_method='fork'. Nothing was started."
    )
    assert result.stderr.count("Traceback") == 1 and "never started" not in result.stderr
    for t in (1.0, 2.0):  # no worker ran, nothing was dispatched
        assert events(get("estimate_gravity", {"time_dilation": t, "verbose": False}), "dispatched") == []

    guarded = UNGUARDED.replace("experiments = ", "if __name__ == '__main__':\n    experiments = ").replace("\nwith ", "\n    with ").replace("\n    for", "\n        for").replace("\n        experiment.launch", "\n            experiment.launch")
    (project / "run.py").write_text(guarded)
    result = subprocess.run([sys.executable, "run.py"], cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 finished, 0 failed, 0 not started" in result.stderr


def test_a_spawned_worker_importing_the_main_script_dispatches_nothing(project):
    # the backstop for executions of one's own: a worker still importing the main script must not launch
    import multiprocessing

    experiment = get("estimate_gravity", {"time_dilation": 4.0})
    process = multiprocessing.current_process()
    process._inheriting = True  # what spawn sets while the worker imports the main script
    try:
        with pytest.raises(SystemExit, match='put the launch under `if __name__ == "__main__":`'):
            with get("multiprocess_execution"):
                experiment.launch()
    finally:
        del process._inheriting
    assert not experiment.is_started() and events(experiment, "dispatched") == []


# --- short names of the built-in executions --------------------------------------------------


def test_short_names_resolve_to_the_builtin_executions(project):
    from machinable.executions.local import Local
    from machinable.executions.multiprocess import Multiprocess
    from machinable.executions.process import Process
    from machinable.project import Project

    for short, cls in (("local", Local), ("process", Process), ("multiprocess", Multiprocess)):
        execution = get(short)
        assert type(execution) is cls and execution.module == f"machinable.execution.{short}"
        assert Project.get().module_file(short).name == f"{short}.py"
        assert Project.get().element_class(short) is cls
    assert Project.get().import_module("slurm").__name__ == "machinable.executions.slurm"
    experiment = get("estimate_gravity", {"time_dilation": 5.0})
    with get("multiprocess", {"processes": 2}):
        experiment.launch()
    assert events(experiment, "started")[0]["execution"]["module"] == "machinable.execution.multiprocess"


def test_short_name_on_the_command_line(project):
    result = run_machinable(project, "estimate_gravity", "time_dilation=2", "multiprocess", "processes=2", "--launch")
    assert result.returncode == 0, result.stderr
    experiment = get("estimate_gravity", {"time_dilation": 2.0})
    assert experiment.is_finished()
    execution = events(experiment, "started")[0]["execution"]
    assert (execution["module"], execution["config"]["processes"]) == ("machinable.execution.multiprocess", 2)


OWN_MULTIPROCESS = """
from machinable import Execution


class Mine(Execution):
    def on_dispatch(self):
        for experiment in self.experiments:
            print("my own multiprocess")
            experiment()
"""


def test_a_project_module_with_a_short_name_takes_precedence(project):
    add_modules(project, multiprocess=OWN_MULTIPROCESS)
    execution = get("multiprocess")
    assert type(execution).__name__ == "Mine" and execution.module == "multiprocess"
    assert type(get("machinable.execution.multiprocess")).__name__ == "Multiprocess"  # the full name: the built-in
    result = run_machinable(project, "estimate_gravity", "time_dilation=3", "multiprocess", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("my own multiprocess\n")
