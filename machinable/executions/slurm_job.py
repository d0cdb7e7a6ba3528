"""What a Slurm job runs: ``python -m machinable.executions.slurm_job PROJECT STORAGE ID [LOG]``.

It executes one stored experiment in its project folder (shared storage)
through the experiment's claim, so a second job for the same experiment never
runs it again. SIGTERM (``scancel``, the time limit) ends the run as
interrupted, so that a later ``launch()`` resumes it. Exit status: 0 when
the experiment finished, 1 when it failed, 143 when terminated.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any


class TerminatedBySlurm(SystemExit):
    """SIGTERM from Slurm: the job was cancelled or reached its time limit."""


def _terminate(signum: int, frame: Any) -> None:
    raise TerminatedBySlurm(128 + signum)


def job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4):
        print("usage: python -m machinable.executions.slurm_job PROJECT STORAGE EXPERIMENT_ID [JOB_LOG]", file=sys.stderr)
        return 2
    project_root, storage_root, experiment_id = args[:3]
    log = args[3] if len(args) == 4 else None
    signal.signal(signal.SIGTERM, _terminate)
    os.chdir(project_root)
    os.environ["MACHINABLE_STORAGE"] = storage_root  # nested get() calls use the same storage

    from machinable.experiment import _restore_for_execution
    from machinable.project import Project

    with Project(project_root):
        experiment = _restore_for_execution(project_root, storage_root, experiment_id, None)
        ledger = experiment.ledger
        events = ledger.events()
        state = ledger.state(events)
        me = job_id()
        if state == "finished":
            print(f"machinable: experiment {experiment.short_id} is finished already; job {me} has nothing to do.")
            return 0
        if state == "running":
            print(f"machinable: experiment {experiment.short_id} is running in another job; job {me} leaves it to that one.")
            return 0
        dispatched = next((e for e in reversed(events) if e.get("event") == "dispatched"), {})
        info = dict(dispatched.get("execution") or {"module": "machinable.execution.slurm"})
        info.update(job_id=me, node=socket.gethostname())
        if log:
            info["log"] = log
        experiment._execution_info = info
        print(f"machinable: Slurm job {me} on {info['node']} runs experiment {experiment.short_id} ({experiment.module})", flush=True)
        try:
            state = experiment()
        except TerminatedBySlurm:
            _record_cause(experiment)
            raise
    return 0 if state == "finished" else 1


def _record_cause(experiment: Any) -> None:
    """After SIGTERM: record whether Slurm cancelled the job or it ran out of time."""
    from machinable.executions.slurm import Slurm

    try:
        Slurm.reconcile([experiment])
    except Exception:  # the interruption itself is recorded; a later reconcile adds the cause
        pass


if __name__ == "__main__":
    sys.exit(main())
