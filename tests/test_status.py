"""status: fresh or stale against the working tree, finished records, reconciled dispatches."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from machinable import get
from machinable.errors import ExecutionError
from machinable.reproduce import status

from conftest import git, run_in_terminal, run_machinable, write, commit_all


TRAIN = """
    from helpers import scale
    from machinable import Experiment


    class Train(Experiment):
        class Config:
            lr: float = 0.1

        def on_execute(self):
            return scale(self.config.lr)
"""

HELPERS = '''
    """Helpers shared by experiments."""


    def scale(value):
        return 2 * value
'''


def test_stale_after_a_helper_edit_fresh_after_a_comment_only_edit(project):
    write(project, "helpers.py", HELPERS)
    write(project, "train.py", TRAIN)
    commit_all(project)
    get("train", {"lr": 0.1}).launch()
    get("train", {"lr": 0.2}).launch()
    get("estimate_gravity").launch()

    fresh = run_machinable(project, "status", "--check")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert fresh.stdout.splitlines()[0].split() == ["ID", "MODULE", "CONFIG", "STATE", "STATUS"]
    assert "3 configs: 3 fresh, 0 stale, 0 unfinished." in fresh.stdout
    assert "lr=0.2" in fresh.stdout and "lr=0.1" in fresh.stdout  # the config values that differ

    (project / "helpers.py").write_text(
        '"""Helpers, now documented differently."""\n\n# a comment\ndef scale(value):\n    """Twice."""\n    return 2 * value  # still\n'
    )
    comment_only = run_machinable(project, "status", "--check")
    assert comment_only.returncode == 0, comment_only.stdout
    assert "3 configs: 3 fresh" in comment_only.stdout

    (project / "helpers.py").write_text("def scale(value):\n    return 3 * value\n")
    edited = run_machinable(project, "status", "--check")
    assert edited.returncode == 1
    stale_rows = [line for line in edited.stdout.splitlines() if " train " in line]
    assert len(stale_rows) == 2 and all(line.endswith("finished  stale: helpers.py changed") for line in stale_rows)
    assert "estimate_gravity  -" in edited.stdout and "3 configs: 1 fresh, 2 stale, 0 unfinished." in edited.stdout
    # without --check it only reports
    assert run_machinable(project, "status").returncode == 0
    # a module filter
    only = run_machinable(project, "status", "estimate_gravity", "--check")
    assert only.returncode == 0 and "1 config: 1 fresh" in only.stdout

    # relaunching with the new code makes the config fresh again; the old record stays, and --all shows it stale
    get("train", {"lr": 0.1}).launch()
    report = status(["train"])
    assert {(r.config["lr"], r.verdict) for r in report.rows} == {(0.1, "fresh"), (0.2, "stale")}
    assert [r.experiments for r in report.rows if r.config["lr"] == 0.1] == [2]
    every = status(["train"], every=True)
    assert sorted(r.verdict for r in every.rows) == ["fresh", "stale", "stale"]


def test_added_and_removed_files_of_the_closure_are_named(project):
    write(project, "helpers.py", HELPERS)
    write(project, "train.py", TRAIN)
    commit_all(project)
    get("train").launch()

    write(project, "extra.py", "FACTOR = 1\n")
    (project / "train.py").write_text((project / "train.py").read_text().replace("from helpers import scale", "from extra import FACTOR\nfrom helpers import scale"))
    [row] = [r for r in status().rows if r.module == "train"]
    assert row.verdict == "stale" and row.changed == ["extra.py added", "train.py changed"]

    (project / "train.py").unlink()
    [row] = [r for r in status().rows if r.module == "train"]
    assert row.changed == ["train.py removed"]


def test_a_config_without_a_finished_run_fails_the_check(project):
    write(project, "flaky.py", """
        from machinable import Experiment


        class Flaky(Experiment):
            def on_execute(self):
                raise RuntimeError("diverged at step 3")
    """)
    commit_all(project)
    with pytest.raises(ExecutionError):
        get("flaky").launch()

    result = run_machinable(project, "status", "--check")

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "MODULE", "CONFIG", "STATE", "STATUS", "REASON"]
    [row] = [line for line in lines if " flaky " in line]
    assert re.split(r"\s{2,}", row)[3:] == ["failed", "no finished run", "RuntimeError: diverged at step 3"]
    # the reason has its own (last) column: the STATE column is as wide as its words
    assert lines[0].index("STATUS") - lines[0].index("STATE") == len("failed  ")


LONG_REASON = """
    from machinable import Experiment


    class Diverges(Experiment):
        def on_execute(self):
            raise FloatingPointError("the loss diverged at step 3: " + "the learning rate is far too large, " * 4)
"""


def test_on_a_terminal_the_table_fits_its_width(project):
    write(project, "diverges.py", LONG_REASON)
    commit_all(project)
    with pytest.raises(ExecutionError):
        get("diverges").launch()
    get("estimate_gravity").launch()

    code, text = run_in_terminal(project, "status", columns=100, term="dumb")
    assert code == 0
    lines = text.splitlines()

    assert lines[0].split() == ["ID", "MODULE", "CONFIG", "STATE", "STATUS", "REASON"]
    assert all(len(line) <= 100 for line in lines), lines
    [row] = [line for line in lines if " diverges " in line]
    state, verdict, reason = re.split(r"\s{2,}", row)[3:]
    assert (state, verdict) == ("failed", "no finished run")
    assert reason.startswith("FloatingPointError: the loss d") and reason.endswith("...") and len(row) > 95
    # piped (a CI log), the reason is longer: there is no width to fit
    piped = run_machinable(project, "status").stdout
    assert max(len(line) for line in piped.splitlines()) > 100


QUEUE = """
    from machinable import Execution


    class Queue(Execution):
        \"\"\"A scheduler that accepts jobs and runs them later (here: never).\"\"\"

        blocking = False

        def on_dispatch(self):
            pass

        def is_submitted(self, experiment):
            return True

        @classmethod
        def reconcile(cls, experiments):
            return {e.experiment_id: {"state": "pending", "reason": "Priority"} for e in experiments}
"""


def test_dispatched_experiments_are_reconciled_with_their_execution(project):
    write(project, "fake_cluster.py", QUEUE)
    commit_all(project)
    with get("fake_cluster"):
        get("estimate_gravity", {"time_dilation": 2.0}).launch()
    get("estimate_gravity").launch()

    result = run_machinable(project, "status", "--check", "--json")

    assert result.returncode == 1, result.stderr
    rows = {row["config"]["time_dilation"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows[2.0]["state"] == "pending" and rows[2.0]["reason"] == "Priority" and rows[2.0]["execution"] == "fake_cluster"
    assert rows[2.0]["verdict"] == "unfinished" and rows[1.0]["verdict"] == "fresh"
    text = run_machinable(project, "status").stdout
    assert "pending   no finished run  Priority" in text

    # a reconcile that fails is shown on its rows; the others are unaffected
    (project / "fake_cluster.py").write_text((project / "fake_cluster.py").read_text().replace(
        "return {e.experiment_id", "raise OSError('squeue: connection refused')\n        return {e.experiment_id"))
    rows = {row.config["time_dilation"]: row for row in status().rows}
    assert rows[2.0].state == "dispatched" and rows[2.0].reason == "cannot reconcile with fake_cluster: OSError: squeue: connection refused"
    assert rows[1.0].verdict == "fresh"


HINT = "(run machinable from the project root, or pass --storage PATH if the records are elsewhere)"


def test_with_check_no_records_fail_unless_allowed(project):
    # a CI job whose storage was never committed must not go green
    storage = project / "storage"
    result = run_machinable(project, "status", "--check")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"Error: Nothing to check: no storage at {storage} {HINT}.")
    assert "commit the records to check (git add --force storage" in result.stderr and "--allow-empty" in result.stderr
    allowed = run_machinable(project, "status", "--check", "--allow-empty")
    assert allowed.returncode == 0 and allowed.stdout == f"No storage at {storage} {HINT}.\n"
    assert run_machinable(project, "status").returncode == 0  # without --check it only reports

    for command in (["reproduce", "--all", "--check"], ["reproduce", "--all", "--sample", "3", "--check"]):
        result = run_machinable(project, *command)
        assert result.returncode == 1 and f"Nothing to check: no storage at {storage}" in result.stderr, command
        assert run_machinable(project, *command, "--allow-empty").returncode == 0
    assert run_machinable(project, "reproduce", "--all").stdout == (
        f"No storage at {storage} {HINT}: nothing to reproduce.\n")
    verify = run_machinable(project, "verify")
    assert verify.returncode == 0 and verify.stdout.startswith(f"Nothing to verify: no storage at {storage}")
    assert not storage.exists()  # looking created nothing

    # a storage with no finished experiment of the module asked for
    get("estimate_gravity").launch()
    result = run_machinable(project, "status", "multiprocess_execution", "--check")
    assert result.returncode == 1
    assert f"Nothing to check: no experiments of multiprocess_execution recorded in {storage}." in result.stderr
    result = run_machinable(project, "reproduce", "--all", "multiprocess_execution", "--check")
    assert result.returncode == 1 and f"no finished experiments of multiprocess_execution in {storage}" in result.stderr


def test_an_unknown_module_is_a_usage_error_naming_a_close_one(project):
    get("estimate_gravity").launch()
    (project / "estimate_gravity.py").rename(project / "gravity.py")  # recorded, but no longer in the project

    for command in (["status", "--check", "estimate_gravty"], ["reproduce", "--all", "estimate_gravty", "--check"]):
        result = run_machinable(project, *command)
        assert result.returncode == 2, command
        assert result.stderr == (
            f"Error: Unknown module 'estimate_gravty': no estimate_gravty.py in the project {project}, and no "
            f"experiments of it in {project / 'storage'}. Did you mean 'estimate_gravity'?\n"
        )
    # known from its records alone
    assert "stale: estimate_gravity.py removed" in run_machinable(project, "status", "estimate_gravity").stdout


def test_in_a_subfolder_status_says_there_is_no_storage_there(project):
    get("estimate_gravity").launch()
    sub = project / "notebooks"
    sub.mkdir()

    result = run_machinable(sub, "status")
    assert result.returncode == 0
    assert result.stdout == f"No storage at {sub / 'storage'} {HINT}.\n"
    assert run_machinable(sub, "status", "--check").returncode == 1
    named = run_machinable(sub, "status", "estimate_gravity")
    assert named.returncode == 2 and f"and no storage at {sub / 'storage'} {HINT}." in named.stderr
    assert not (sub / "storage").exists()


def test_watch_refreshes_until_interrupted(project):
    import os
    import signal
    import subprocess
    import sys

    get("estimate_gravity").launch()
    proc = subprocess.Popen([sys.executable, "-m", "machinable.cli", "status", "--watch", "--interval", "0.2"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        summaries = 0
        for line in proc.stdout:
            summaries += line.startswith("1 config: 1 fresh")
            if summaries == 2:  # refreshed at least once
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert summaries == 2


CLUSTER = """
    from machinable import Execution


    class Cluster(Execution):
        \"\"\"Submits and returns; reconcile() reports what the scheduler knows.\"\"\"

        blocking = False

        def on_dispatch(self):
            pass

        def is_submitted(self, experiment):
            return True

        @classmethod
        def reconcile(cls, experiments):
            return {e.experiment_id: {"state": "cancelled", "reason": "job 7 was cancelled by its owner"}
                    for e in experiments if e.ledger.state() == "interrupted"}
"""


def test_interrupted_runs_of_a_non_blocking_execution_show_the_schedulers_word(project):
    from machinable.ledger import Ledger

    write(project, "cluster.py", CLUSTER)
    commit_all(project)
    with get("cluster"):
        get("estimate_gravity", {"time_dilation": 2.0}).launch()
    submitted = get("estimate_gravity", {"time_dilation": 2.0})
    # the job was cancelled while it ran: the run recorded its own interruption (SIGTERM), not why
    Ledger(submitted.directory).append("interrupted", reason="SIGTERM")
    # interrupted in a blocking execution: its ledger has the last word, the execution is not asked
    write(project, "stopped.py", STOPPED)
    commit_all(project)
    with pytest.raises(KeyboardInterrupt):
        with get("stopped"):
            get("estimate_gravity", {"time_dilation": 3.0}).launch()

    rows = {row.config["time_dilation"]: row for row in status().rows}

    assert (rows[2.0].state, rows[2.0].reason) == ("cancelled", "job 7 was cancelled by its owner")
    assert (rows[3.0].state, rows[3.0].reason) == ("interrupted", "Ctrl-C stopped the dispatch before it started")
    assert "cancelled    no finished run  job 7 was cancelled by its owner" in run_machinable(project, "status").stdout


STOPPED = """
    from machinable import Execution


    class Stopped(Execution):
        def on_dispatch(self):
            raise KeyboardInterrupt  # Ctrl-C

        @classmethod
        def reconcile(cls, experiments):
            return {e.experiment_id: {"state": "asked"} for e in experiments}
"""


def test_a_damaged_record_is_its_own_row_and_fails_the_check(project):
    write(project, "helpers.py", HELPERS)
    write(project, "train.py", TRAIN)
    commit_all(project)
    kept = get("train", {"lr": 0.1})
    kept.launch()
    lost = get("train", {"lr": 0.2})
    lost.launch()
    assert run_machinable(project, "status", "train", "--check").returncode == 0

    # the MANIFEST of a finished record deleted: a CI check must not call that config fresh
    lost.directory.chmod(0o755)
    (lost.directory / "MANIFEST").unlink()
    damaged = run_machinable(project, "status", "train", "--check")
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    row = next(line for line in damaged.stdout.splitlines() if line.startswith(lost.experiment_id[:12]))
    assert "finished" in row and "damaged: MANIFEST: missing" in row
    assert "2 configs: 1 fresh, 0 stale, 0 unfinished, 1 damaged." in damaged.stdout
    assert f"`machinable verify {lost.experiment_id[:12]}`" in damaged.stdout
    report = json.loads(run_machinable(project, "status", "--json").stdout)
    assert report["ok"] is False
    assert {r["id"]: r["verdict"] for r in report["rows"]} == {kept.experiment_id: "fresh", lost.experiment_id: "damaged"}
    assert all(isinstance(r["seed"], int) for r in report["rows"])


def test_a_record_whose_module_cannot_be_read_fails_a_module_check(project):
    write(project, "helpers.py", HELPERS)
    write(project, "train.py", TRAIN)
    commit_all(project)
    experiment = get("train", {"lr": 0.1})
    experiment.launch()
    directory = experiment.directory
    directory.chmod(0o755)
    (directory / "experiment.json").chmod(0o644)
    (directory / "experiment.json").write_text('{"module": "tra')  # truncated
    assert run_machinable(project, "index", "--rebuild").returncode == 0  # as in a fresh CI clone

    result = run_machinable(project, "status", "train", "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(experiment.experiment_id[:12]))
    assert row.split()[1] == "?" and "damaged: experiment.json: not valid JSON" in row
    assert "Nothing to check" not in result.stdout + result.stderr


def _with_stdout_closed(cwd: Path, *args: str) -> tuple[int, str]:
    """Run the CLI with a reader that has gone before it writes (`machinable status | true`)."""
    import os
    import subprocess
    import sys

    read, write_end = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "machinable.cli", *args], cwd=cwd, stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("status", "--check"), ("list",), ("verify",)])
def test_a_closed_stdout_is_no_failure(project, args):
    get("estimate_gravity").launch()
    code, err = _with_stdout_closed(project, *args)
    assert (code, err) == (0, "")


def test_a_closed_stdout_keeps_the_checks_verdict(project):
    get("estimate_gravity").launch()
    (project / "estimate_gravity.py").write_text((project / "estimate_gravity.py").read_text() + "\nEXTRA = 1\n")
    code, err = _with_stdout_closed(project, "status", "--check")
    assert (code, err) == (1, "")


def test_a_failed_launch_with_its_output_to_a_closed_pipe_still_exits_1(project):
    import os
    import subprocess
    import sys

    write(project, "failing.py", """
        from machinable import Experiment


        class Failing(Experiment):
            def on_execute(self):
                raise RuntimeError("asked to fail")
    """)
    (project / "untracked.txt").write_text("a dirty tree, so that the launch has a note to write first\\n")
    read, write_end = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "machinable.cli", "failing", "--launch"], cwd=project,
                          stdout=write_end, stderr=write_end, timeout=120)  # `2>&1 | head` after head is gone
    os.close(write_end)
    assert proc.returncode == 1
