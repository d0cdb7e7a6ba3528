"""Measurements that run in a fresh interpreter, inside a benchmark project.

``python -m benchmarks.worker TASK '<json args>'`` (cwd: the project). The
last line printed is the JSON result. Each task times the machinable work and
its floor in the same process, alternating where it can, so that background
load affects both alike.
"""

from __future__ import annotations

import gc
import json
import statistics
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.harness import interleaved, timed


def _rss_mb() -> float:
    """Resident memory now (not the peak), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _launch(x: int) -> None:
    from machinable import get

    get("trivial", {"x": x}).launch()


# --- generation of the stored experiments ---------------------------------------------


def generate(start: int, stop: int) -> dict[str, Any]:
    for x in range(start, stop):
        _launch(x)
        if (x - start) % 5000 == 4999:
            print(f"  {x - start + 1:,}/{stop - start:,}", file=sys.stderr, flush=True)
    return {"launched": stop - start}


def check_stored(count: int) -> dict[str, Any]:
    from machinable import get

    for x in {0, count // 2, count - 1}:
        if not get("trivial", {"x": x}).is_finished():
            raise SystemExit(f"stored experiment x={x} is not finished")
    return {"ok": True}


# --- per launch, memory, disk -----------------------------------------------------------


def launches(timed_n: int, total: int, warmup: int) -> dict[str, Any]:
    """``total`` launches of new configs; the first ``timed_n`` are timed one by one."""
    for i in range(warmup):
        _launch(-1 - i)
    gc.collect()
    rss_start = _rss_mb()
    times = []
    for x in range(total):
        start = time.perf_counter()
        _launch(x)
        if x < timed_n:
            times.append((time.perf_counter() - start) * 1e3)
    gc.collect()
    return {"times": times, "rss_start": rss_start, "rss_end": _rss_mb(), "launched": total + warmup}


def floor_writes(n: int, directory: str) -> dict[str, Any]:
    """The floor of a launch: one JSON written atomically (fsync + rename) and one event line appended."""
    import orjson

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    events = root / "events.jsonl"

    def one(i: int) -> None:
        path = root / f"{i}.json"
        tmp = root / f".{i}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, orjson.dumps({"format": 1, "id": uuid.uuid4().hex, "config": {"x": i}}))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, orjson.dumps({"event": "finished", "run": i, "time": time.time()}) + b"\n")
        finally:
            os.close(fd)

    counter = iter(range(10**9))
    return {"times": timed(lambda: one(next(counter)), n)}


# --- relaunch among many stored -----------------------------------------------------------


def _records(root: Path) -> int:
    return sum(1 for entry in os.scandir(root) if len(entry.name) == 32 and entry.is_dir())


def relaunch(xs: list[int]) -> dict[str, Any]:
    from machinable import Storage, get

    storage = Storage.current()
    before = _records(storage.root)
    experiment = get("trivial", {"x": xs[0]})
    experiment.launch()  # warm: imports, index freshness, stat caches
    assert experiment.is_finished(), "the stored experiment is not finished"
    code_hash = experiment.code_hash
    db = sqlite3.connect(storage.root / "index.sqlite")
    hashes = {x: get("trivial", {"x": x}).config_hash for x in xs}

    def lookup(x: int) -> None:
        db.execute(
            "SELECT id FROM experiments WHERE config_hash=? AND code_hash=? ORDER BY created DESC LIMIT 1",
            (hashes[x], code_hash),
        ).fetchone()

    it_a, it_b, it_c = iter(xs * 3), iter(xs * 3), iter(xs * 3)
    relaunched, floor = interleaved(lambda: get("trivial", {"x": next(it_a)}).launch(), lambda: lookup(next(it_b)), len(xs))
    got = timed(lambda: get("trivial", {"x": next(it_c)}), len(xs))
    it_d = iter(xs * 3)
    found_counts: list[int] = []
    find = timed(lambda: found_counts.append(len(list(storage.find("trivial", x=next(it_d))))), len(xs))
    after = _records(storage.root)
    assert before == after, f"relaunching finished experiments created records ({before} -> {after})"
    # >= 1: a storage kept across identity-scheme changes also holds older-code twins of a config
    assert all(c >= 1 for c in found_counts), f"find by x returned {set(found_counts)} experiments, expected >= 1"
    return {"relaunch": relaunched, "floor": floor, "get": got, "find": find, "stored": after,
            "found_per_find": statistics.median(found_counts)}


def rebuild_index() -> dict[str, Any]:
    from machinable import Storage

    storage = Storage.current()
    start = time.perf_counter()
    added = storage.rebuild_index()
    return {"seconds": time.perf_counter() - start, "added": added}


# --- code hashing ---------------------------------------------------------------------------


def _code_hasher() -> tuple[Any, list[Path]]:
    """Hash the closure the way a launch does (``Experiment.code_hash``), without importing user code."""
    from machinable.experiment import Experiment

    experiment = Experiment(None, module="closure_experiment")

    def code_hash() -> str:
        experiment._closure = None
        experiment._code_hash = None
        return experiment.code_hash

    return code_hash, experiment


def closure_warm(repeat: int) -> dict[str, Any]:
    """Relaunch in the same process: the closure was hashed before (and launched once, so a storage exists)."""
    from machinable import get

    get("closure_experiment").launch()
    code_hash, experiment = _code_hasher()
    code_hash()
    files = [experiment.project.path / rel for rel in experiment.closure.files]
    hashed, floor = interleaved(code_hash, lambda: [os.stat(f) for f in files], repeat)
    return {"hashed": hashed, "floor": floor, "files": len(files), "paths": [str(f) for f in files]}


def closure_cold(files: list[str] | None = None) -> dict[str, Any]:
    """Relaunch in a new process: only what machinable keeps on disk can help.

    With ``files``, this process measures the floor instead (the first
    ``stat`` of each file in a fresh process), so that neither side finds
    the other's work in its process.
    """
    if files is not None:
        start = time.perf_counter()
        for f in files:
            os.stat(f)
        return {"floor": (time.perf_counter() - start) * 1e3}
    code_hash, experiment = _code_hasher()
    start = time.perf_counter()
    code_hash()
    return {"hashed": (time.perf_counter() - start) * 1e3, "files": len(experiment.closure.files)}


# --- git ------------------------------------------------------------------------------------


def git_capture(repeat: int, edit: str | None = None) -> dict[str, Any]:
    """``capture`` of an unchanged tree (repeat launches), and after an edit of ``edit``."""
    from machinable import git
    from machinable.storage import Storage

    root = Path.cwd()
    storage = Storage.current().root
    git.capture(root, exclude=[storage])

    def read_head() -> str:
        """The floor: HEAD and the ref it names, read from .git (what any capture must at least know)."""
        head = (root / ".git" / "HEAD").read_text().strip()
        return (root / ".git" / head[4:].strip()).read_text() if head.startswith("ref:") else head

    repeated, head = interleaved(lambda: git.capture(root, exclude=[storage]), read_head, repeat)
    out: dict[str, Any] = {"repeated": repeated, "read_head": head}
    status_argv = ["git", "status", "--porcelain"]
    out["status"] = timed(lambda: subprocess.run(status_argv, cwd=root, stdout=subprocess.DEVNULL, check=True), repeat)
    if edit:
        counter = iter(range(10**9))

        def edited() -> None:
            (root / edit).write_text(f"edit {next(counter)}\n")

        after_edit = []
        for _ in range(repeat):
            edited()
            after_edit += timed(lambda: git.capture(root, exclude=[storage]), 1)
        info, diff = git.capture(root, exclude=[storage])
        out["after_edit"] = after_edit
        out["dirty_files"] = len(info.get("changed_files", [])) + len(info.get("untracked_files", []))
        out["diff_bytes"] = len(diff)
    return out


# --- multiprocess -----------------------------------------------------------------------------


def _noop(_: Any) -> None:
    return None


def multiprocess(n: int, processes: int, rounds: int, module: str, maxtasksperchild: int | None) -> dict[str, Any]:
    from multiprocessing import Pool

    from machinable import get

    counter = iter(range(10**9))
    _launch(-1)

    def ours() -> None:
        base = next(counter) * n
        with get(module, {"processes": processes}):
            for i in range(n):
                get("trivial", {"x": base + i}).launch()

    def floor() -> None:
        with Pool(processes=processes, maxtasksperchild=maxtasksperchild) as pool:
            pool.map(_noop, range(n))

    executed, floors = interleaved(ours, floor, rounds)
    from machinable import Storage

    finished = sum(1 for e in Storage.current().find("trivial", state="finished"))
    return {"executed": executed, "floor": floors, "finished": finished}


def peak_rss_of(argv: list[str]) -> dict[str, Any]:
    """Peak resident memory (MiB) and wall time of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {stderr[-2000:]}")
    return {"peak_mb": usage.ru_maxrss / 1024, "seconds": wall}


TASKS = {f.__name__: f for f in (generate, check_stored, launches, floor_writes, relaunch, rebuild_index,
                                 closure_warm, closure_cold, git_capture, multiprocess, peak_rss_of)}


def main() -> None:
    task, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result = TASKS[task](**args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
