"""``machinable.execution.slurm``: submit experiments to a Slurm cluster and return.

``launch()`` writes one job script (one job for one experiment, one job array
for many), submits it with ``sbatch`` and records the job id in each
experiment's ledger (a ``submitted`` event); it does not wait. The job runs
``python -m machinable.executions.slurm_job PROJECT STORAGE ID`` in the same
project folder on shared storage, so the experiment's claim (an flock that
works on shared file systems) keeps run-once across nodes, and its heartbeat
shows the run is alive.

``Slurm.reconcile(experiments)`` asks the scheduler (``squeue`` for live jobs,
``sacct`` for ended ones) what became of the submitted jobs and records jobs
that were cancelled, timed out, lost their node or vanished, so that the next
``launch()`` resubmits them (resuming in place). A launch of an experiment
whose job is still queued or running does not submit it again.

Plain ``sbatch`` rather than submitit: experiments travel by address (project,
storage, id), so nothing needs pickling, and the scheduler's view is read with
``squeue``/``sacct`` from any process, long after the submitting one exited.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from machinable.errors import ConfigError, ExecutionError
from machinable.execution import DispatchReport, Execution

#: Slurm job state -> the state ``reconcile`` reports.
SLURM_STATES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_FED": "pending",
    "REQUEUE_HOLD": "pending",
    "RESV_DEL_HOLD": "pending",
    "SPECIAL_EXIT": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "SUSPENDED": "running",
    "STOPPED": "running",
    "RESIZING": "running",
    "COMPLETED": "finished",
    "FAILED": "failed",
    "OUT_OF_MEMORY": "failed",
    "CANCELLED": "cancelled",
    "PREEMPTED": "cancelled",
    "REVOKED": "cancelled",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
    "NODE_FAIL": "node_fail",
    "BOOT_FAIL": "node_fail",
}
#: States in which a job still holds (or will hold) its experiment: no resubmission.
IN_FLIGHT = {"pending", "running", "unknown"}
#: sbatch options machinable sets itself.
_RESERVED = {"array", "output", "error", "chdir", "wrap", "parsable", "wait", "test-only"}
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")
_LOG_TAIL = 3000


class SchedulerError(ExecutionError):
    """``squeue``/``sacct``/``sbatch`` could not be run or refused."""


class Slurm(Execution):
    """Submit to Slurm with ``sbatch`` and return at once (``blocking = False``).

    ``setup`` lines (``module load ...``, ``conda activate ...``) are shell
    code and run as written before the experiment; every other value is
    passed to ``sbatch`` as a separate argument or quoted in the job script.
    """

    blocking: ClassVar[bool] = False

    class Config:
        partition: str = ""
        time: str = "01:00:00"
        cpus_per_task: int = 1
        mem: str = ""
        gpus: int = 0
        array_parallelism: int = 50
        sbatch: dict[str, Any] = {}
        python: str = ""
        setup: str | list[str] = ""

        def __post_init__(self) -> None:
            _check_config(self)

    def __init__(self, config: dict[str, Any] | None = None, *, module: str | None = None, project: Any = None) -> None:
        super().__init__(config, module=module, project=project)  # the built-in name, as Execution gives every built-in
        self.jobs: dict[str, str] = {}  # experiment id -> Slurm job id, of this execution's submissions

    # --- dispatch -------------------------------------------------------------------

    def dispatch(self, experiments: list[Any], *, raise_on_failure: bool = True) -> DispatchReport:
        """Submit the experiments that are not finished and not queued or running already.

        One submission at a time per storage (a lock), so that two concurrent
        launches of one experiment submit one job.
        """
        if not experiments:
            return super().dispatch(experiments, raise_on_failure=raise_on_failure)
        storages = {str(e.storage.root): e.storage for e in experiments}
        locks = [storages[root].lock("slurm-submit") for root in sorted(storages)]
        for lock in locks:
            lock.__enter__()
        try:
            for experiment in experiments:
                if not experiment.is_finished():
                    experiment.commit()  # first: get() may adopt a concurrently created twin (its id)
            queued = self._in_flight(experiments)
            fresh = [e for e in experiments if e.experiment_id not in queued]
            report = super().dispatch(fresh, raise_on_failure=False)
        finally:
            for lock in reversed(locks):
                lock.__exit__(None, None, None)
        for experiment_id, status in queued.items():
            report.submitted.append(experiment_id)
            if status["job_id"]:
                self.jobs[experiment_id] = status["job_id"]
            if status["state"] == "unknown":
                print(f"{experiment_id[:12]}: could not ask Slurm about its job {status['job_id']} ({status['reason']}); not submitted again.")
            elif status["job_id"] is None:
                print(f"{experiment_id[:12]} is running {status['reason']} (not on Slurm): not submitted.")
            else:
                print(f"{experiment_id[:12]} is {status['state']} as Slurm job {status['job_id']}: not submitted again.")
        self.last_report = report
        if raise_on_failure and not report.ok:
            raise ExecutionError(report.message(), report)
        return report

    def _in_flight(self, experiments: list[Any]) -> dict[str, dict[str, Any]]:
        """Experiments queued or running (on Slurm, or elsewhere): not to be submitted."""
        stored = [e for e in experiments if e.is_committed() and not e.is_finished()]
        queued = {i: s for i, s in self.reconcile(stored).items() if s["state"] in IN_FLIGHT}
        for experiment in stored:
            if experiment.experiment_id not in queued and experiment.state == "running":
                started = _last(experiment.events(), "started") or {}
                queued[experiment.experiment_id] = {
                    "state": "running", "reason": f"on {started.get('host')}", "log": None,
                    "job_id": (started.get("execution") or {}).get("job_id"),
                }
        return queued

    def on_dispatch(self) -> None:
        groups: dict[tuple[str, str], list[Any]] = {}
        for experiment in self.experiments:
            groups.setdefault((str(experiment.project.path), str(experiment.storage.root)), []).append(experiment)
        for (project, storage), experiments in groups.items():
            self._submit(Path(project), Path(storage), experiments)

    def is_submitted(self, experiment: Any) -> bool:
        return experiment.experiment_id in self.jobs

    def _why_not_started(self, experiment: Any, pickling_failures: list[str]) -> str:
        return "it was not submitted, because the submission failed (the error is above)"

    def _submit(self, project: Path, storage: Path, experiments: list[Any]) -> str:
        from machinable.storage import atomic_write, make_dirs

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        folder = storage / ".slurm" / f"{stamp}-{uuid.uuid4().hex[:8]}"
        make_dirs(folder)  # never writable by others (the job script lives here)
        array = len(experiments) > 1
        script = folder / "job.sh"
        log = _sbatch_path(folder) + ("/%a.log" if array else "/job.log")
        command = ["sbatch", "--parsable", f"--output={log}", f"--chdir={project}"]
        command += self.sbatch_options(len(experiments), job_name=_job_name(experiments))
        command.append(str(script))
        text = self.job_script(project, storage, [e.experiment_id for e in experiments], folder)
        # one comment line: a newline in a path would end the comment and run the rest
        comment = shlex.join(command).replace("\r", "\\r").replace("\n", "\\n")
        atomic_write(script, text.replace("\n", f"\n# submitted with: {comment}\n", 1).encode(), what="Slurm job script")
        job_id = _sbatch(command, cwd=project)
        for index, experiment in enumerate(experiments):
            task = f"{job_id}_{index}" if array else job_id
            self.jobs[experiment.experiment_id] = task
            _record_submission(experiment, task, folder / (f"{index}.log" if array else "job.log"), script)
        where = f" (partition {self.config.partition})" if self.config.partition else ""
        if array:
            print(f"Submitted Slurm job array {job_id}{where}: {len(experiments)} experiments, tasks {job_id}_0..{job_id}_{len(experiments) - 1}")
        else:
            experiment = experiments[0]
            print(f"Submitted Slurm job {job_id}{where}: {experiment.short_id} {experiment.module}")
        return job_id

    # --- the job ----------------------------------------------------------------------

    def sbatch_options(self, count: int, *, job_name: str = "machinable") -> list[str]:
        """``sbatch`` arguments for ``count`` experiments (a job array when more than one)."""
        config = self.config
        options: dict[str, Any] = {"job-name": job_name, "time": config.time, "cpus-per-task": config.cpus_per_task}
        if config.partition:
            options["partition"] = config.partition
        if config.mem:
            options["mem"] = config.mem
        if config.gpus:
            options["gpus"] = config.gpus
        options.update({_option_name(k): v for k, v in config.sbatch.items()})
        if count > 1:
            limit = f"%{config.array_parallelism}" if config.array_parallelism > 0 else ""
            options["array"] = f"0-{count - 1}{limit}"
        arguments = []
        for name, value in options.items():
            if value is True:
                arguments.append(f"--{name}")
            elif value is not False and value is not None and value != "":
                arguments.append(f"--{name}={value}")
        return arguments

    def job_script(self, project: Path, storage: Path, experiment_ids: list[str], folder: Path) -> str:
        """The batch script: setup prelude, then the experiment of this (array) task."""
        python = self.config.python or sys.executable
        setup = self.config.setup
        lines = setup.splitlines() if isinstance(setup, str) else list(setup)
        ids = "\n".join(f"  {shlex.quote(i)}" for i in experiment_ids)
        log = f'{shlex.quote(str(folder))}/"${{SLURM_ARRAY_TASK_ID:-job}}".log'
        run = shlex.join([python, "-m", "machinable.executions.slurm_job", str(project), str(storage)])
        parts = ["#!/bin/bash", f"# machinable: {len(experiment_ids)} experiment(s)"]
        if lines:
            parts += ["# setup (the execution's `setup` config, run as written)", *lines]
        parts += [
            f"ids=(\n{ids}\n)",
            f"log={log}",
            f'exec {run} "${{ids[${{SLURM_ARRAY_TASK_ID:-0}}]}}" "$log"',
            "",
        ]
        return "\n".join(parts)

    # --- reconciliation ----------------------------------------------------------

    @classmethod
    def reconcile(cls, experiments: list[Any]) -> dict[str, dict[str, Any]]:
        """What the scheduler says about each submitted experiment.

        Returns ``{id: {"state", "reason", "job_id", "log"}}`` with state one of
        pending, running, finished, failed, cancelled, timeout, node_fail (or
        unknown when Slurm could not be asked). A job that ended without its
        experiment recording the end (cancelled, timed out, node failure,
        killed, vanished) gets a ``cancelled``/``interrupted``/``failed`` event, so
        that ``launch()`` resubmits it.
        """
        entries = [entry for entry in (_Entry.of(e) for e in experiments) if entry is not None]
        out = {}
        ask = []
        for entry in entries:
            status = entry.local_status()
            if status is None:
                ask.append(entry)
            else:
                out[entry.experiment_id] = status
        try:
            jobs = query_jobs(sorted({entry.job_id for entry in ask}))
        except SchedulerError as e:
            return {**out, **{entry.experiment_id: entry.status("unknown", str(e)) for entry in ask}}
        for entry in ask:
            out[entry.experiment_id] = entry.settle(jobs.get(entry.job_id))
        return {e.experiment_id: out[e.experiment_id] for e in experiments if e.experiment_id in out}


# --- helpers -------------------------------------------------------------------------


class _Entry:
    """One experiment's latest submission and what its ledger says since."""

    def __init__(self, experiment: Any, events: list[dict[str, Any]], submission: dict[str, Any], after: list[dict[str, Any]]) -> None:
        self.experiment = experiment
        self.experiment_id = experiment.experiment_id
        self.events = events
        self.submission = submission
        self.after = after
        started = _last(after, "started")
        execution = (started or {}).get("execution") or {}
        # a job started for this experiment names itself in its started event
        self.job_id = str(execution.get("job_id") or submission["job_id"])
        self.log = execution.get("log") or submission.get("log")

    @classmethod
    def of(cls, experiment: Any) -> "_Entry | None":
        if not experiment.is_committed():
            return None
        events = experiment.ledger.events()
        for index in range(len(events) - 1, -1, -1):
            if events[index].get("event") == "submitted" and events[index].get("job_id"):
                return cls(experiment, events, events[index], events[index + 1:])
        return None

    def status(self, state: str, reason: str | None) -> dict[str, Any]:
        return {"state": state, "reason": reason, "job_id": self.job_id, "log": self.log}

    def recorded(self) -> dict[str, Any] | None:
        """The outcome an earlier reconcile recorded for this submission."""
        for row in reversed(self.after):
            if "slurm_state" in row:
                return row
        return None

    def local_status(self, *, check_claim: bool = True) -> dict[str, Any] | None:
        """The status the ledger settles alone, or None when only the scheduler knows."""
        state = self.experiment.ledger.state(self.events, check_claim=check_claim)
        if state == "finished":
            return self.status("finished", None)
        if state == "running":
            started = _last(self.after, "started") or {}
            return self.status("running", f"on {started.get('host')}" if started else None)
        recorded = self.recorded()
        if recorded is not None:
            return self.status(recorded.get("state", "failed"), recorded.get("reason"))
        if state == "failed":  # the experiment recorded its own failure
            return self.status("failed", (_last(self.after, "failed") or {}).get("error"))
        return None  # dispatched, or interrupted without a known cause

    def settle(self, job: tuple[str, str] | None) -> dict[str, Any]:
        """Report the scheduler's view; record the end of a job that ended unrecorded."""
        if job is None:
            state, slurm_state = "cancelled", "VANISHED"
            reason = f"Slurm no longer knows job {self.job_id} (purged, or the cluster was reset)"
        else:
            slurm_state, detail = job
            state = SLURM_STATES.get(slurm_state.split()[0], "unknown")
            reason = _reason(self.job_id, state, slurm_state, detail)
        if state in IN_FLIGHT:
            return self.status(state, reason)
        return self._record_end(state, slurm_state, reason)

    def _record_end(self, state: str, slurm_state: str, reason: str) -> dict[str, Any]:
        from machinable.storage import Claim, is_sealed

        experiment = self.experiment
        claim = Claim(experiment.directory)
        if is_sealed(experiment.directory) or not claim.try_acquire():
            again = _Entry.of(experiment)  # it finished, or another run holds it now
            return (again.local_status() if again else None) or self.status(state, reason)
        try:
            # The job ended before we asked, so its own events are all written:
            # read them again (under the claim) before adding one.
            fresh = _Entry.of(experiment)
            if fresh is None or fresh.submission != self.submission:
                return self.status(state, reason)  # resubmitted meanwhile
            known = fresh.local_status(check_claim=False)
            if known is not None and known["state"] != "running":
                return known
            if state == "finished":
                state, reason = "failed", f"Slurm job {self.job_id} completed, but the experiment did not finish; see {self.log}"
            fields = {"job_id": self.job_id, "slurm_state": slurm_state, "state": state, "reason": reason}
            if state == "cancelled":
                experiment.ledger.append("cancelled", **fields)
            elif state == "failed":
                experiment.ledger.append("failed", error=reason, traceback=_tail(self.log), **fields)
            else:
                experiment.ledger.append("interrupted", **fields)
        finally:
            claim.release()
        return self.status(state, reason)


def _last(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for row in reversed(events):
        if row.get("event") == name:
            return row
    return None


def _reason(job_id: str, state: str, slurm_state: str, detail: str) -> str:
    if state == "pending":
        return detail if detail and detail != "None" else "waiting to be scheduled"
    if state == "running":
        return "the job is ending" if slurm_state.startswith("COMPLETING") else "the job is starting the experiment"
    if state == "unknown":
        return f"Slurm job {job_id} is in state {slurm_state}"
    words = {
        "finished": "completed",
        "failed": "failed",
        "cancelled": "was cancelled",
        "timeout": "reached its time limit",
        "node_fail": "lost its node",
    }
    text = f"Slurm job {job_id} {words[state]} ({slurm_state}"
    if state == "cancelled" or not detail or detail == "None":  # a cancelled job keeps its pending reason
        return text + ")"
    return text + f", {detail})"


def _tail(log: str | None) -> str:
    if not log:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _record_submission(experiment: Any, job_id: str, log: Path, script: Path, patience: float = 30.0) -> None:
    """Append the ``submitted`` event under the claim, unless the job already started.

    The claim may be held for a moment by the previous run of the experiment
    (releasing it after recording its failure) or by the new job itself,
    which then names itself in its ``started`` event.
    """
    from machinable.storage import Claim, is_sealed

    claim = Claim(experiment.directory)
    deadline = time.monotonic() + patience
    while not claim.try_acquire():
        started = _last(experiment.ledger.events(), "started") or {}
        if (started.get("execution") or {}).get("job_id") == job_id or is_sealed(experiment.directory):
            return
        if time.monotonic() > deadline:
            return  # held by a long run elsewhere: the job waits for it, and its started event names it
        time.sleep(0.05)
    try:
        if not is_sealed(experiment.directory):
            experiment.ledger.append("submitted", job_id=job_id, log=str(log), script=str(script))
    finally:
        claim.release()


def _sbatch(command: list[str], cwd: Path) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SchedulerError(
            "sbatch not found: machinable.execution.slurm needs the Slurm client tools on PATH "
            "(launch from a login node of the cluster)."
        ) from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"sbatch did not answer within 120 s: {shlex.join(command)}") from None
    if result.returncode != 0:
        raise SchedulerError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()} (command: {shlex.join(command)})")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SchedulerError(f"sbatch answered {result.stdout.strip()!r}, not a job id (command: {shlex.join(command)})")
    return job_id


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SchedulerError(f"{command[0]} not found: the Slurm client tools must be on PATH to ask about jobs.") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{command[0]} did not answer within 60 s.") from None


def query_jobs(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job_id: (slurm state, reason)}`` for the jobs Slurm knows (``123`` or ``123_4``).

    ``squeue`` first: it knows live jobs at once (``sacct`` lags on job start).
    Then ``sacct`` for jobs that left the queue, and for COMPLETING ones:
    ``squeue`` shows a cancelled job as COMPLETING while its processes wind
    down, ``sacct`` already as CANCELLED.
    """
    if not job_ids:
        return {}
    live: dict[str, tuple[str, str]] = {}
    bases = sorted({j.split("_")[0] for j in job_ids}, key=int)
    result = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(bases), "-o", "%i|%T|%r"])
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise SchedulerError(f"squeue failed: {result.stderr.strip()}")
    for line in result.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            live[parts[0]] = (parts[1], parts[2])
    ended: dict[str, tuple[str, str]] = {}
    ask = [j for j in job_ids if j not in live or live[j][0] == "COMPLETING"]
    if ask and shutil.which("sacct"):
        result = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ask), "-o", "JobID,State,Reason"])
        if result.returncode == 0:  # else accounting is off: ended jobs are simply gone
            for line in result.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 3 and parts[0] in ask:
                    ended[parts[0]] = (parts[1], parts[2])  # the last row wins: job ids can be reused
    found = {}
    for job_id in job_ids:
        end = ended.get(job_id)
        if end is not None and (job_id not in live or SLURM_STATES.get(end[0].split()[0]) not in IN_FLIGHT):
            found[job_id] = end
        elif job_id in live:
            found[job_id] = live[job_id]
    return found


def _sbatch_path(folder: Path) -> str:
    return str(folder).replace("%", "%%")  # sbatch expands %j, %a, ... in file names


def _job_name(experiments: list[Any]) -> str:
    modules = {e.module for e in experiments}
    return modules.pop() if len(modules) == 1 else "machinable"


def _option_name(key: str) -> str:
    return key.strip().lstrip("-").replace("_", "-")


def _check_config(config: Any) -> None:
    if config.cpus_per_task < 1:
        raise ConfigError(f"Invalid cpus_per_task {config.cpus_per_task!r} for machinable.execution.slurm: give 1 or more.")
    if config.gpus < 0 or config.array_parallelism < 0:
        raise ConfigError("Invalid gpus or array_parallelism for machinable.execution.slurm: give 0 or more (0 parallelism: no limit).")
    for key, value in {"partition": config.partition, "time": config.time, "mem": config.mem, "python": config.python}.items():
        if any(c in value for c in "\n\r\0"):
            raise ConfigError(f"Invalid {key} {value!r} for machinable.execution.slurm: it must be one line.")
    for key, value in config.sbatch.items():
        name = _option_name(str(key))
        if not _OPTION.match(name):
            raise ConfigError(f"Invalid sbatch option {key!r}: give the long option name, such as 'account' or 'qos'.")
        if name in _RESERVED:
            raise ConfigError(f"sbatch option {key!r} is set by machinable.execution.slurm itself; remove it from `sbatch`.")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise ConfigError(f"Invalid value {value!r} for sbatch option {key!r}: give a string or number (True for a flag).")
        if isinstance(value, str) and any(c in value for c in "\n\r\0"):
            raise ConfigError(f"Invalid value {value!r} for sbatch option {key!r}: it must be one line.")
