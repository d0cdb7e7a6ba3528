"""status: fresh or stale against the working tree, finished records, reconciled dispatches."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from machinable import get
from machinable.reproduce import status

from conftest import git, run_machinable


def write(root: Path, rel: str, source: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def commit_all(root: Path, message: str = "more") -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


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
    try:
        get("flaky").launch()
    except Exception:
        pass

    result = run_machinable(project, "status", "--check")

    assert result.returncode == 1
    [row] = [line for line in result.stdout.splitlines() if " flaky " in line]
    assert "failed (RuntimeError: diverged at step 3)" in row and row.endswith("no finished run")


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
    assert "pending (Priority)  no finished run" in text

    # a reconcile that fails is shown on its rows; the others are unaffected
    (project / "fake_cluster.py").write_text((project / "fake_cluster.py").read_text().replace(
        "return {e.experiment_id", "raise OSError('squeue: connection refused')\n        return {e.experiment_id"))
    rows = {row.config["time_dilation"]: row for row in status().rows}
    assert rows[2.0].state == "dispatched" and rows[2.0].reason == "cannot reconcile with fake_cluster: OSError: squeue: connection refused"
    assert rows[1.0].verdict == "fresh"


def test_empty_storage_has_nothing_to_check(project):
    result = run_machinable(project, "status", "--check")
    assert result.returncode == 0
    assert result.stdout.startswith("No experiments recorded in ") and "nothing to check" in result.stdout


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
