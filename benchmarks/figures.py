"""Each figure of the benchmark: what is measured, against which floor, with which target."""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import fixtures
from benchmarks.harness import Figure, run_worker, unavailable, wall_of_command


@dataclass
class Sizes:
    launches: int = 1000  # per-launch overhead
    memory_launches: int = 10_000  # memory growth
    stored: int = 100_000  # relaunch / get / find among many
    closure_files: int = 200
    dirty_files: int = 100
    multiprocess: int = 100
    processes: int = 2
    repeat: int = 200  # in-process repetitions
    command_repeat: int = 20  # whole-command repetitions
    rounds: int = 5  # multiprocess rounds
    # one generating process: a second creating experiments at the same time makes
    # every get() re-sync the index with the folder (see the README)
    generators: int = 1

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(launches=10, memory_launches=30, stored=40, closure_files=20, dirty_files=6,
                   multiprocess=4, repeat=5, command_repeat=2, rounds=1)


@dataclass
class Context:
    sizes: Sizes
    work: Path  # scratch folder, removed after the run
    results: Path  # benchmarks/results: cached stored experiments
    log: Callable[[str], None]


def _machinable_argv() -> list[str]:
    # the script beside this interpreter: a version manager's shim on PATH (pyenv's
    # is a bash script that runs `pyenv exec`) would add its own start-up to ours
    beside = Path(sys.executable).parent / "machinable"
    exe = str(beside) if beside.is_file() else shutil.which("machinable")
    return [exe] if exe else [sys.executable, "-m", "machinable"]


# --- CLI start ------------------------------------------------------------------------------


def cli_help(ctx: Context) -> list[Figure]:
    ours, floor = [], []
    for _ in range(ctx.sizes.command_repeat):
        ours += wall_of_command([*_machinable_argv(), "--help"], ctx.work, 1)
        floor += wall_of_command([sys.executable, "-c", "import typer"], ctx.work, 1)
    return [Figure("`machinable --help` wall time", "ms", ours, 1.3, floor_name='python -c "import typer"', floor_samples=floor)]


# --- launches ---------------------------------------------------------------------------------


def launches(ctx: Context) -> list[Figure]:
    s = ctx.sizes
    project = fixtures.trivial_project(ctx.work / "launches")
    result = run_worker("launches", {"timed_n": s.launches, "total": s.memory_launches, "warmup": 20}, cwd=project)
    floor = run_worker("floor_writes", {"n": s.launches, "directory": str(ctx.work / "floor")}, cwd=project)
    times = result["times"]
    figures = [
        Figure(f"per-launch overhead ({s.launches:,} new configs, one process)", "ms", times, 4,
               floor_name="fsync'd JSON + event line", floor_samples=floor["times"],
               note=f"mean {statistics.fmean(times):.2f} ms per launch, floor mean {statistics.fmean(floor['times']):.3f} ms"),
        Figure(f"memory growth over {s.memory_launches:,} launches", "MB", [result["rss_end"] - result["rss_start"]], 20,
               target_kind="max", note=f"RSS {result['rss_start']:.0f} -> {result['rss_end']:.0f} MiB"),
    ]
    storage = project / "storage"
    runs = [p for p in storage.iterdir() if len(p.name) == 32]
    allocated, apparent = fixtures.disk_usage(storage)
    index_alloc, _ = fixtures.disk_usage_of(storage / "index.sqlite")
    objects_alloc, _ = fixtures.disk_usage(storage / ".objects")
    per_run = (allocated - objects_alloc) / len(runs) / 1024
    one_alloc, one_apparent = fixtures.disk_usage(runs[0])
    figures.append(Figure(
        "disk per trivial finished run", "KB", [per_run], 24, target_kind="max",
        note=(f"storage {allocated / 2**20:.1f} MiB allocated for {len(runs):,} runs (index {index_alloc / 2**20:.1f} MiB, "
              f"objects {objects_alloc / 1024:.0f} KiB once); one run folder: {one_alloc / 1024:.0f} KiB allocated, "
              f"{one_apparent / 1024:.1f} KiB of content, {sum(1 for _ in runs[0].rglob('*'))} entries "
              f"on {fixtures.filesystem_block(storage)} KiB blocks"),
    ))
    return figures


# --- many stored ------------------------------------------------------------------------------


def stored(ctx: Context) -> list[Figure]:
    s = ctx.sizes
    project = fixtures.stored_project(ctx.results, s.stored, s.generators, log=ctx.log)
    step = max(1, s.stored // s.repeat)
    xs = list(range(step // 2, s.stored, step))[: s.repeat]
    r = run_worker("relaunch", {"xs": xs}, cwd=project)
    n = f"{r['stored']:,}"
    figures = [
        Figure(f"get()+launch() of a finished config, {n} stored", "ms", r["relaunch"], 1, target_kind="max",
               floor_name="indexed SQLite lookup", floor_samples=r["floor"]),
        Figure(f"get() of a finished config, {n} stored", "ms", r["get"], 1, target_kind="max",
               floor_name="indexed SQLite lookup", floor_samples=r["floor"]),
        Figure(f"find by one config value, {n} stored", "ms", r["find"], 5, target_kind="max",
               floor_name="indexed SQLite lookup", floor_samples=r["floor"]),
    ]
    figures += _cli_over_stored(ctx, project)
    rebuild = run_worker("rebuild_index", {}, cwd=project)
    figures.append(Figure(f"index rebuild, {n} stored", "s", [rebuild["seconds"]], 60, target_kind="max",
                          note=f"{rebuild['added']:,} rows from the directories alone"))
    return figures


def _cli_missing(project: Path, *args: str) -> str | None:
    """Why ``machinable ARGS`` cannot be measured (it fails), or None."""
    import subprocess

    proc = subprocess.run([*_machinable_argv(), *args], cwd=project, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return f"`machinable {' '.join(args)}` fails: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"


def _cli_over_stored(ctx: Context, project: Path) -> list[Figure]:
    n = f"{sum(1 for p in (project / 'storage').iterdir() if len(p.name) == 32):,}"
    missing = _cli_missing(project, "list", "--limit", "1") or _cli_missing(project, "list", "--json", "--limit", "1")
    if missing:
        return [unavailable(f"`machinable list --limit 50`, {n} stored", missing),
                unavailable(f"memory of `machinable list --json`, {n} stored", missing)]
    ours, floor = [], []
    for _ in range(ctx.sizes.command_repeat):
        ours += wall_of_command([*_machinable_argv(), "list", "--limit", "50"], project, 1)
        floor += wall_of_command([*_machinable_argv(), "--help"], project, 1)
    figures = [Figure(f"`machinable list --limit 50`, {n} stored", "ms", ours, 2, floor_name="machinable --help", floor_samples=floor)]
    full = run_worker("peak_rss_of", {"argv": [*_machinable_argv(), "list", "--json"]}, cwd=project)
    small = run_worker("peak_rss_of", {"argv": [*_machinable_argv(), "list", "--json", "--limit", "50"]}, cwd=project)
    figures.append(Figure(
        f"memory of `machinable list --json`, {n} stored", "MB", [full["peak_mb"] - small["peak_mb"]], 20, target_kind="max",
        note=f"peak RSS {full['peak_mb']:.0f} MiB for all vs {small['peak_mb']:.0f} MiB for 50 rows "
             f"(flat = streaming); {full['seconds']:.1f} s",
    ))
    return figures


# --- code hashing -----------------------------------------------------------------------------


def code_hashing(ctx: Context) -> list[Figure]:
    s = ctx.sizes
    project = fixtures.git_project(ctx.work / "closure", fixtures.closure_files(s.closure_files))
    warm = run_worker("closure_warm", {"repeat": s.repeat}, cwd=project)
    cold, cold_floor = [], []
    for _ in range(s.command_repeat):
        cold.append(run_worker("closure_cold", {}, cwd=project)["hashed"])
        cold_floor.append(run_worker("closure_cold", {"files": warm["paths"]}, cwd=project)["floor"])
    n = warm["files"]
    return [
        Figure(f"code hash of an unchanged {n}-file closure, relaunch in-process", "ms", warm["hashed"], 2,
               floor_name=f"stat of the {n} files", floor_samples=warm["floor"]),
        Figure(f"code hash of an unchanged {n}-file closure, relaunch in a new process", "ms", cold, 2,
               floor_name=f"stat of the {n} files", floor_samples=cold_floor,
               note="each side in its own fresh process; the closure comes from <storage>/.cache"),
    ]


# --- git --------------------------------------------------------------------------------------


def git_capture(ctx: Context) -> list[Figure]:
    s = ctx.sizes
    clean = fixtures.trivial_project(ctx.work / "git-clean")
    r = run_worker("git_capture", {"repeat": s.repeat}, cwd=clean)
    dirty = fixtures.git_project(ctx.work / "git-dirty", {"trivial.py": fixtures.TRIVIAL, ".gitignore": fixtures.GITIGNORE,
                                                            **fixtures.tracked_files(s.dirty_files)})
    fixtures.make_dirty(dirty, s.dirty_files)
    fixtures.settle(dirty)
    d = run_worker("git_capture", {"repeat": max(5, s.repeat // 10), "edit": "tracked_001.txt"}, cwd=dirty)
    n = d["dirty_files"]
    return [
        Figure("git capture, clean tree (repeat launch)", "ms", r["repeated"], 2,
               floor_name="read HEAD from .git", floor_samples=r["read_head"]),
        Figure(f"git capture, {n} dirty files (repeat launch)", "ms", d["repeated"], 2,
               floor_name="git status --porcelain", floor_samples=d["status"]),
        Figure(f"git capture, {n} dirty files, after an edit", "ms", d["after_edit"], None,
               floor_name="git status --porcelain", floor_samples=d["status"],
               note=f"status + full binary diff incl. untracked content ({d['diff_bytes'] / 1024:.0f} KiB); no target"),
    ]


# --- multiprocess -----------------------------------------------------------------------------


def multiprocess(ctx: Context) -> list[Figure]:
    s = ctx.sizes
    project = fixtures.trivial_project(ctx.work / "multiprocess")
    if importlib.util.find_spec("machinable.executions.multiprocess") is not None:
        # one fresh worker process per experiment, like the floor's pool with maxtasksperchild=1
        module, which, maxtasks = "machinable.execution.multiprocess", "built-in machinable.execution.multiprocess", 1
    else:
        module, which, maxtasks = "multiprocess_execution", "the template's multiprocess_execution", 1
    r = run_worker("multiprocess", {"n": s.multiprocess, "processes": s.processes, "rounds": s.rounds,
                                    "module": module, "maxtasksperchild": maxtasks}, cwd=project)
    expected = s.multiprocess * s.rounds + 1
    return [Figure(
        f"{s.multiprocess} trivial experiments, {s.processes} processes", "ms", r["executed"], 3,
        floor_name=f"Pool({s.processes}).map of {s.multiprocess} no-ops", floor_samples=r["floor"],
        note=f"{which}; floor pool with maxtasksperchild={maxtasks}; {r['finished']}/{expected} finished",
    )]


ALL = {
    "cli": cli_help,
    "launch": launches,
    "stored": stored,
    "hashing": code_hashing,
    "git": git_capture,
    "multiprocess": multiprocess,
}
