"""machinable.execution.slurm against a real Slurm cluster.

scripts/test.sh starts a single-node cluster (tests/cluster/start_slurm.sh)
when run as root. Without Slurm these tests skip with the reason; with
MACHINABLE_REQUIRE_SLURM=1 (CI) they fail instead (see conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import doctools
from conftest import git
from doctools import blocks, console_steps

pytestmark = pytest.mark.slurm

SLEEPY = '''\
import os
import time
from pathlib import Path

from machinable import Experiment


class Sleepy(Experiment):
    """Squares x; with gate=True it first waits for the file `gate`; the file `fail-<x>` makes it fail."""

    class Config:
        x: int = 0
        gate: bool = False

    def on_execute(self):
        print(f"x={self.config.x} setup={os.environ.get('SETUP_MARK', '-')}", flush=True)
        with open("executions.txt", "a") as f:
            f.write(f"{self.experiment_id}\\n")
        while self.config.gate and not Path("gate").exists():
            time.sleep(0.05)
        if Path(f"fail-{self.config.x}").exists():
            raise RuntimeError(f"asked to fail (x={self.config.x})")
        return self.config.x ** 2
'''


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "Slurm is not available: sbatch is not on PATH (scripts/test.sh starts a local cluster when run as root)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm is not available: sinfo failed ({e})"
    if result.returncode != 0 or "up" not in result.stdout:
        return f"Slurm is not available: sinfo says {(result.stderr or result.stdout).strip()!r}"
    return None


@pytest.fixture(scope="session")
def partition() -> str:
    """The cluster's default partition (the tests fail instead of skipping under MACHINABLE_REQUIRE_SLURM=1)."""
    problem = _slurm_problem()
    if problem is not None:
        for promise in ("MACHINABLE_REQUIRE_SLURM", "MACHINABLE_SLURM_AVAILABLE"):  # CI, and scripts/test.sh
            if os.environ.get(promise) == "1":
                pytest.fail(f"{promise}=1, but {problem}")
        pytest.skip(problem)
    names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return next((n.rstrip("*") for n in names if n.endswith("*")), names[0])


@pytest.fixture
def cluster_project(project, partition):
    (project / "sleepy.py").write_text(SLEEPY)
    (project / ".gitignore").write_text((project / ".gitignore").read_text() + "gate\nfail-*\nexecutions.txt\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "sleepy")
    return project


def slurm(partition: str, **config):
    from machinable import get

    return get("machinable.execution.slurm", {"partition": partition, "time": "00:05:00", **config})


def submitted(experiment) -> list[str]:
    return [e["job_id"] for e in experiment.events() if e["event"] == "submitted"]


def reconcile(experiment) -> dict:
    from machinable.executions.slurm import Slurm

    return Slurm.reconcile([experiment])[experiment.experiment_id]


def until(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def executions(project: Path) -> list[str]:
    path = project / "executions.txt"
    return path.read_text().split() if path.exists() else []


def test_launch_returns_before_the_job_finishes_then_wait(cluster_project, partition, capsys):
    from machinable import get

    experiment = get("sleepy", {"x": 3, "gate": True})
    with slurm(partition):
        experiment.launch()
    (job_id,) = submitted(experiment)
    assert f"Submitted Slurm job {job_id} (partition {partition}): {experiment.short_id} sleepy" in capsys.readouterr().out
    assert not experiment.is_finished()  # the job waits for the gate: launch() returned before it ended
    assert reconcile(experiment)["state"] in ("pending", "running")

    # launching it again while it is queued or running submits nothing
    until(lambda: experiment.state == "running", "the job to start the experiment")
    with slurm(partition):
        experiment.launch()
    assert f"is running as Slurm job {job_id}: not submitted again" in capsys.readouterr().out
    assert submitted(experiment) == [job_id]

    # a second job for the same experiment (same script, submitted by hand) leaves it to the first
    script = next(e["script"] for e in experiment.events() if e["event"] == "submitted")
    duplicate = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={cluster_project}/duplicate.log", script],
                               capture_output=True, text=True, timeout=120)
    assert duplicate.returncode == 0, duplicate.stderr
    assert "is running in another job" in (cluster_project / "duplicate.log").read_text()

    (cluster_project / "gate").touch()
    experiment.wait(timeout=60)
    assert experiment.is_finished() and experiment.result == 9
    assert executions(cluster_project) == [experiment.experiment_id]
    assert "x=3" in experiment.output()  # the job's output lands in the experiment's output.log
    started = next(e for e in experiment.events() if e["event"] == "started")
    assert started["execution"]["job_id"] == job_id
    assert reconcile(experiment) == {"state": "finished", "reason": None, "job_id": job_id, "log": started["execution"]["log"]}
    with slurm(partition):
        experiment.launch()  # finished: nothing to submit
    assert submitted(experiment) == [job_id]


def test_job_array_of_ten(cluster_project, partition, capsys):
    from machinable import get

    experiments = [get("sleepy", {"x": x}) for x in range(10)]
    with slurm(partition, array_parallelism=4):
        for experiment in experiments:
            experiment.launch()
    jobs = [submitted(e)[0] for e in experiments]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{i}" for i in range(10)]
    out = capsys.readouterr().out
    assert f"Submitted Slurm job array {array} (partition {partition}): 10 experiments, tasks {array}_0..{array}_9" in out
    for experiment in experiments:
        experiment.wait(timeout=120)
    assert [e.result for e in experiments] == [x * x for x in range(10)]
    assert sorted(executions(cluster_project)) == sorted(e.experiment_id for e in experiments)

    def sacct_states():
        return subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "State"], capture_output=True, text=True).stdout.split()

    until(lambda: len(sacct_states()) == 10 and "RUNNING" not in sacct_states(), "the array's jobs to end")
    assert sacct_states() == ["COMPLETED"] * 10  # every task exited 0


def test_failing_job_is_recorded_and_resumes_in_place(cluster_project, partition):
    from machinable import get

    (cluster_project / "fail-7").touch()
    experiment = get("sleepy", {"x": 7})
    with slurm(partition):
        experiment.launch()
    experiment.wait(timeout=60)
    assert experiment.state == "failed"
    failed = experiment.events()[-1]
    assert failed["event"] == "failed" and "RuntimeError: asked to fail (x=7)" in failed["traceback"]
    assert "RuntimeError: asked to fail (x=7)" in experiment.output()
    status = reconcile(experiment)
    assert status["state"] == "failed" and status["reason"] == "RuntimeError: asked to fail (x=7)"

    (cluster_project / "fail-7").unlink()
    with slurm(partition):
        experiment.launch()  # resumes the failed one: a new job, the same experiment
    first, second = submitted(experiment)
    assert first != second
    experiment.wait(timeout=60)
    assert experiment.is_finished() and experiment.result == 49
    assert experiment.ledger.attempts() == 2
    assert "--- attempt 2" in experiment.output()


def test_scancel_of_a_running_job_shows_cancelled_and_relaunch_resubmits(cluster_project, partition):
    from machinable import get

    experiment = get("sleepy", {"x": 4, "gate": True})
    with slurm(partition):
        experiment.launch()
    (job_id,) = submitted(experiment)
    until(lambda: "x=4" in experiment.output(), "the job to run the experiment")
    subprocess.run(["scancel", job_id], check=True)
    experiment.wait(timeout=60)
    assert experiment.state == "interrupted"
    status = until(lambda: (s := reconcile(experiment))["state"] != "running" and s, "Slurm to report the job's end")
    assert status["state"] == "cancelled" and status["job_id"] == job_id and "CANCELLED" in status["reason"]
    cancelled = experiment.events()[-1]
    assert cancelled["event"] == "cancelled" and cancelled["job_id"] == job_id
    assert "TerminatedBySlurm" in experiment.output()  # the run saw SIGTERM and recorded the interruption

    (cluster_project / "gate").touch()
    with slurm(partition):
        experiment.launch()
    assert submitted(experiment)[0] == job_id and len(submitted(experiment)) == 2
    experiment.wait(timeout=60)
    assert experiment.is_finished() and experiment.result == 16
    assert experiment.ledger.attempts() == 2


def test_a_queued_job_is_not_resubmitted_and_a_cancelled_one_is(cluster_project, partition, capsys):
    from machinable import get

    experiment = get("sleepy", {"x": 2})
    with slurm(partition, sbatch={"hold": True}):  # held: stays queued until released
        experiment.launch()
    (job_id,) = submitted(experiment)
    status = reconcile(experiment)
    assert status["state"] == "pending" and status["reason"] == "JobHeldUser"

    # where the Slurm tools are missing, the state is unknown and nothing is recorded
    code = ("from machinable import Storage\nfrom machinable.executions.slurm import Slurm\n"
            f"e = Storage.current().load({experiment.experiment_id!r})\nprint(Slurm.reconcile([e])[e.experiment_id])")
    events = experiment.events()
    result = subprocess.run([sys.executable, "-c", code], cwd=cluster_project, capture_output=True, text=True,
                            env={**os.environ, "PATH": str(Path(sys.executable).parent)}, timeout=60)
    assert "'state': 'unknown'" in result.stdout and "squeue not found" in result.stdout, result.stderr
    assert experiment.events() == events
    with slurm(partition):
        experiment.launch()
    assert f"is pending as Slurm job {job_id}: not submitted again" in capsys.readouterr().out
    assert submitted(experiment) == [job_id]

    subprocess.run(["scancel", job_id], check=True)
    experiment.wait(timeout=60)  # a cancelled queued job ends the wait, too
    assert experiment.state == "interrupted"
    assert reconcile(experiment)["state"] == "cancelled"
    with slurm(partition):
        experiment.launch()
    assert len(submitted(experiment)) == 2
    experiment.wait(timeout=60)
    assert experiment.is_finished() and executions(cluster_project) == [experiment.experiment_id]


LAUNCHER = """
import sys, time
from pathlib import Path
from machinable import get
experiment = get("sleepy", {"x": 11})
slurm = get("machinable.execution.slurm", {"partition": sys.argv[1]})
Path(sys.argv[2]).touch()
while not Path("start").exists():
    time.sleep(0.005)
with slurm:
    experiment.launch()
print("ID", experiment.experiment_id)
"""


def test_two_concurrent_launches_execute_once(cluster_project, partition):
    from machinable import Storage

    launchers = [
        subprocess.Popen([sys.executable, "-c", LAUNCHER, partition, f"ready-{i}"], cwd=cluster_project,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    until(lambda: all((cluster_project / f"ready-{i}").exists() for i in range(2)), "both launchers to be ready")
    (cluster_project / "start").touch()  # both launch at once
    outputs = [p.communicate(timeout=120) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    ids = {line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("ID ")}
    assert len(ids) == 1
    experiment = Storage.current().load(ids.pop())
    experiment.wait(timeout=60)
    assert experiment.is_finished()
    assert len(submitted(experiment)) == 1
    assert sum("Submitted Slurm job" in out for out, _ in outputs) == 1
    assert executions(cluster_project) == [experiment.experiment_id]


def test_job_environment_python_and_setup_are_quoted(cluster_project, partition, tmp_path):
    from machinable import get

    # a Python path that a shell would split and expand if it were not quoted
    odd = tmp_path / "py $(touch pwned) 'x'"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    experiment = get("sleepy", {"x": 5})
    with slurm(partition, python=str(odd / "python"), setup=["export SETUP_MARK='from setup'"], sbatch={"job_name": "odd name; true"}):
        experiment.launch()
    experiment.wait(timeout=60)
    assert experiment.is_finished(), experiment.events()[-1]
    assert "x=5 setup=from setup" in experiment.output()
    assert not list(cluster_project.rglob("pwned")) and not (Path.cwd() / "pwned").exists()
    (job_id,) = submitted(experiment)

    def job_name():  # sacct fills in the name a moment after the job ends
        return subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobName"], capture_output=True, text=True).stdout.strip()

    assert until(lambda: job_name() == "odd name; true", "sacct to show the job's name")


def test_a_refused_submission_is_reported_and_launching_again_submits(cluster_project, partition):
    from machinable import get
    from machinable.errors import ExecutionError

    experiment = get("sleepy", {"x": 6})
    with pytest.raises(ExecutionError) as raised:
        with slurm("no-such-partition"):
            experiment.launch()
    message = str(raised.value)
    assert "sbatch refused the job" in message and "invalid partition" in message.lower()
    assert f"never started: {experiment.short_id}" in message
    assert "on_dispatch() of machinable.execution.slurm raised" in message  # the sbatch error is the one cause
    assert submitted(experiment) == []
    with slurm(partition):
        experiment.launch()
    experiment.wait(timeout=60)
    assert experiment.is_finished() and experiment.result == 36


def test_config_is_checked_at_get_time(project):
    from machinable import get
    from machinable.errors import ConfigError

    with pytest.raises(ConfigError, match="'output' is set by machinable.execution.slurm"):
        get("machinable.execution.slurm", {"sbatch": {"output": "x.log"}})
    with pytest.raises(ConfigError, match="must be one line"):
        get("machinable.execution.slurm", {"partition": "debug\nrm -rf /"})
    with pytest.raises(ConfigError, match="Invalid sbatch option"):
        get("machinable.execution.slurm", {"sbatch": {"a b": 1}})


# --- docs/slurm.md, executed against the cluster ------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "slurm.md"
MARK = "@@@ command "


def normalize(text: str) -> str:
    """Ids (doctools.normalize) and job numbers as placeholders; table columns aligned by any run of spaces."""
    text = doctools.normalize(text)
    text = re.sub(r"\b\d+_(\d+)\b", r"<job>_\1", text)
    text = re.sub(r"\b(job(?: array)?) \d+\b", r"\1 <job>", text)
    return re.sub(r" {2,}", " ", text)


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MACHINABLE_STORAGE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `machinable` of this Python
    return env


def run_console(cwd: Path, body: str) -> None:
    steps = console_steps(body, raw=True)
    script = "".join(f"echo '{MARK}{i}'\n{command}\n" for i, (command, _) in enumerate(steps))
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=shell_env(), capture_output=True, text=True, timeout=300)
    outputs = re.split(rf"^{MARK}\d+\n", result.stdout, flags=re.M)[1:]
    assert len(outputs) == len(steps), result.stdout + result.stderr
    for (command, expected), actual in zip(steps, outputs):
        assert normalize(actual) == normalize(expected), f"$ {command}\n--- got:\n{actual}--- stderr:\n{result.stderr}"


def test_the_docs_page_runs_on_the_cluster_as_shown(project, partition):
    assert partition == "debug", "docs/slurm.md uses the partition 'debug' (the test cluster's)"
    found = blocks(DOC.read_text())
    scripts = consoles = 0
    pending: str | None = None
    for language, title, body in found:
        if language == "python":
            pending = body
        elif language == "text" and pending is not None:
            result = subprocess.run([sys.executable, "-c", pending], cwd=project, env=shell_env(), capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            assert normalize(result.stdout) == normalize(body), f"{pending}\n--- got:\n{result.stdout}--- stderr:\n{result.stderr}"
            pending, scripts = None, scripts + 1
        elif language == "console":
            run_console(project, body)
            consoles += 1
    assert (scripts, consoles) == (3, 3)
