"""The projects the benchmarks run in: real git repositories in folders we make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}

TRIVIAL = '''from machinable import Experiment


class Trivial(Experiment):
    """Does nothing: everything a launch of it costs is machinable's overhead."""

    class Config:
        x: int = 0

    def on_execute(self):
        return None
'''

GITIGNORE = "storage/\n__pycache__/\n*.pyc\n"

# The template's execution (the built-in machinable.execution.multiprocess
# replaces it once it exists; see figures.multiprocess).
MULTIPROCESS = (Path(__file__).resolve().parents[1] / ".machinable-template" / "multiprocess_execution.py")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def git_project(path: Path, files: dict[str, str]) -> Path:
    """A fresh folder with ``files``, committed in a new git repository."""
    if path.exists():
        remove_tree(path)
    path.mkdir(parents=True)
    for rel, text in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "benchmark project")
    settle(path)
    return path


# Seconds to wait after making a project (run.py sets 0 for --quick).
SETTLE_SECONDS = 2.1


def settle(path: Path, age: float = 600) -> None:
    """Date the project's files back ``age`` seconds, as code edited a while ago is.

    Files modified within the last seconds are "racy" (a second edit in the
    same timestamp tick would not change their stat), so machinable rightly
    re-reads them instead of trusting a stat cache; real code is rarely that
    fresh, and the benchmark should not measure that special case. Git's own
    files are left alone (git refreshes its index for the new dates), and then
    we wait until those are no longer racy either.
    """
    past = time.time() - age
    for directory, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in [*files, *dirs]:
            os.utime(os.path.join(directory, name), (past, past))
    os.utime(path, (past, past))
    if (path / ".git").exists():
        git(path, "update-index", "-q", "--refresh")
    time.sleep(SETTLE_SECONDS)


def trivial_project(path: Path) -> Path:
    files = {"trivial.py": TRIVIAL, ".gitignore": GITIGNORE}
    if MULTIPROCESS.exists():
        files["multiprocess_execution.py"] = MULTIPROCESS.read_text()
    return git_project(path, files)


def closure_files(n: int) -> dict[str, str]:
    """An experiment whose project-local import closure is exactly ``n`` files.

    ``closure_experiment.py`` imports ``lib``; ``lib`` is a package of
    sub-packages of modules that import their neighbours, the standard library
    and a third-party package, like a real research code base.
    """
    assert n >= 4
    modules: list[str] = []
    files: dict[str, str] = {}
    remaining = n - 2  # the entry and lib/__init__.py
    package = 0
    while remaining > 0:
        size = min(20, remaining)
        if remaining - size == 1:  # a package needs a module besides __init__.py
            size -= 1
        pkg = f"lib/p{package:02d}"
        files[f"{pkg}/__init__.py"] = '"""A sub-package."""\n'
        for i in range(size - 1):
            name = f"{pkg}/m{i:02d}.py"
            files[name] = _module_source(pkg.replace("/", "."), i)
            modules.append(f"{pkg.replace('/', '.')}.m{i:02d}")
        remaining -= size
        package += 1
    files["lib/__init__.py"] = "".join(f"from lib.p{p:02d} import m00 as p{p:02d}\n" for p in range(package))
    # every module must be reachable: the entry imports each one
    files["closure_experiment.py"] = (
        "from machinable import Experiment\n\n"
        + "".join(f"import {m}\n" for m in modules)
        + "\n\nclass ClosureExperiment(Experiment):\n    class Config:\n        x: int = 0\n\n    def on_execute(self):\n        return None\n"
    )
    files[".gitignore"] = GITIGNORE
    assert sum(1 for f in files if f.endswith(".py")) == n, (n, len(files))
    return files


def _module_source(package: str, i: int) -> str:
    neighbour = f"from {package} import m{i - 1:02d}\n" if i else ""
    return (
        f'"""Module {i} of {package}."""\n\nimport json\nimport os\n\nimport orjson\n\n{neighbour}\n'
        + "".join(
            f"\ndef f{k}(values, scale={k}):\n    # a comment\n    out = []\n    for v in values:\n"
            f"        out.append(v * scale + len(os.sep))\n    return json.dumps(out), orjson.dumps(out)\n"
            for k in range(8)
        )
    )


def make_dirty(project: Path, n: int) -> None:
    """``n`` uncommitted changes: half edited tracked files, half new untracked files."""
    for i in range(n):
        if i % 2 == 0:
            (project / "dirty").mkdir(exist_ok=True)
            (project / "dirty" / f"new_{i:03d}.txt").write_text(f"untracked {i}\n" * 20)
        else:
            path = project / f"tracked_{i:03d}.txt"
            path.write_text(f"edited {i}\n" * 20)


def tracked_files(n: int) -> dict[str, str]:
    return {f"tracked_{i:03d}.txt": f"line {i}\n" * 20 for i in range(1, n, 2)}


# --- the cached 100k storage -------------------------------------------------------


def stored_project(results: Path, count: int, workers: int, log=print) -> Path:
    """A project whose storage holds ``count`` finished trivial experiments (x = 0..count-1).

    Generated once through the public API (``get("trivial", {"x": i}).launch()``
    in ``workers`` processes, with ``MACHINABLE_FSYNC=0`` because nothing here
    needs to survive a power cut) and kept in ``results/``: it is slow. An
    interrupted generation is completed; one whose experiments the current
    machinable no longer finds (identity scheme changed) is made again.
    """
    from benchmarks.harness import run_worker

    base = results / f"stored-{count}"
    project = base / "project"
    storage = project / "storage"
    if (project / "trivial.py").exists() and (project / "trivial.py").read_text() == TRIVIAL and storage.is_dir():
        stored = sum(1 for e in os.scandir(storage) if len(e.name) == 32)
        if stored >= count:
            try:
                run_worker("check_stored", {"count": count}, cwd=project)
                return project
            except RuntimeError:
                log("the stored experiments are from another identity scheme: generating them again")
                remove_tree(base)
    else:
        remove_tree(base)
    if not project.exists():
        trivial_project(project)
    log(f"generating {count:,} finished experiments in {storage} (once; kept for later runs) ...")
    start = time.time()
    bounds = [count * k // workers for k in range(workers + 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", "generate", json.dumps({"start": bounds[k], "stop": bounds[k + 1]})],
            cwd=project, env=_worker_env({"MACHINABLE_FSYNC": "0"}), stdout=subprocess.DEVNULL,
        )
        for k in range(workers)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"generating the stored experiments failed (exit codes {codes})")
    run_worker("check_stored", {"count": count}, cwd=project)
    log(f"generated in {time.time() - start:.0f} s")
    return project


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    from benchmarks.harness import env_for_workers

    return env_for_workers(extra)


def remove_tree(path: Path) -> None:
    """Remove a tree that may hold read-only (sealed) records."""
    if not path.exists():
        return
    for directory, dirs, _files in os.walk(path):  # sealed folders are read-only: open them first
        for name in dirs:
            try:
                os.chmod(os.path.join(directory, name), 0o755)
            except OSError:
                pass

    def writable(func, p, _exc):  # noqa: ANN001
        os.chmod(os.path.dirname(p), 0o755)
        if os.path.exists(p) and not os.path.islink(p):
            os.chmod(p, 0o755)
        func(p)

    shutil.rmtree(path, onerror=writable)


def disk_usage(root: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of every file and folder under ``root``."""
    allocated = apparent = 0
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(directory, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def disk_usage_of(path: Path) -> tuple[int, int]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    return st.st_blocks * 512, st.st_size


def filesystem_block(path: Path) -> int:
    return os.statvfs(path).f_bsize // 1024
