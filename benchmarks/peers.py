"""``python -m benchmarks.peers``: the same launch figures for upstream machinable 4.x, 5.x and sacred.

On demand only (not in CI): it installs each peer from PyPI into a throwaway
virtual environment under ``benchmarks/results/peers/`` (kept for the next
run), makes a git project with the same trivial experiment written for that
peer's API, and measures in that environment:

- per launch: ``N`` new configurations launched one after another in one
  process (sacred: ``ex.run(config_updates=...)`` with a file observer);
- relaunch: ``get(...).launch()`` of an already finished configuration with
  those ``N`` stored (sacred has no get-or-create: it always runs again);
- CLI start: ``<tool> --help`` where the peer has a CLI.

This machinable is measured the same way, in this interpreter, so the table
shows each peer's ratio to it. Options: ``--launches N`` (default 200),
``--only m4,m5,sacred``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

from benchmarks import fixtures
from benchmarks.harness import REPO, machine

RESULTS = REPO / "benchmarks" / "results" / "peers"

PEERS = {
    "m4": {"label": "machinable 4.x", "requirement": "machinable>=4,<5", "dist": "machinable", "cli": ["machinable", "--help"]},
    "m5": {"label": "machinable 5.x", "requirement": "machinable>=5,<6", "dist": "machinable", "cli": ["machinable", "--help"]},
    "sacred": {"label": "sacred", "requirement": "sacred", "dist": "sacred", "cli": None},
}

MODULES = {
    "ours": fixtures.TRIVIAL,
    "m4": '''from dataclasses import dataclass

from machinable import Component


class Trivial(Component):
    @dataclass
    class Config:
        x: int = 0

    def __call__(self):
        return None
''',
    "m5": '''from pydantic import BaseModel

from machinable import Interface


class Trivial(Interface):
    class Config(BaseModel):
        x: int = 0

    def __call__(self):
        return None
''',
}

# Runs inside the peer's environment, in the project; prints one JSON line.
MACHINABLE_SCRIPT = '''
import json, sys, time
from machinable import get
n, samples = int(sys.argv[1]), int(sys.argv[2])
get("trivial", {"x": -1}).launch()  # warm: imports, storage
launch = []
for i in range(n):
    t = time.perf_counter(); get("trivial", {"x": i}).launch(); launch.append((time.perf_counter() - t) * 1e3)
relaunch = []
for i in range(0, n, max(1, n // samples)):
    t = time.perf_counter(); get("trivial", {"x": i}).launch(); relaunch.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"launch": launch, "relaunch": relaunch}))
'''

SACRED_SCRIPT = '''
import json, logging, sys, time
from sacred import Experiment
from sacred.observers import FileStorageObserver
n = int(sys.argv[1])
ex = Experiment("trivial")
ex.observers.append(FileStorageObserver("storage"))
ex.logger = logging.getLogger("trivial"); ex.logger.setLevel(logging.WARNING)
@ex.config
def cfg():
    x = 0
@ex.main
def main(x):
    return None
ex.run(config_updates={"x": -1})
launch = []
for i in range(n):
    t = time.perf_counter(); ex.run(config_updates={"x": i}); launch.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"launch": launch, "relaunch": []}))
'''


def environment(name: str, log) -> Path:  # noqa: ANN001
    """The peer's virtual environment (made and installed once)."""
    home = RESULTS / name / "venv"
    python = home / "bin" / "python"
    marker = home / ".installed"
    if not marker.exists():
        if home.exists():
            shutil.rmtree(home)
        log(f"installing {PEERS[name]['requirement']} into {home} ...")
        venv.EnvBuilder(with_pip=True).create(home)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEERS[name]["requirement"]], check=True)
        marker.write_text(PEERS[name]["requirement"])
    return python


def version_of(python: Path, dist: str) -> str:
    code = f"from importlib.metadata import version; print(version({dist!r}))"
    return subprocess.run([str(python), "-c", code], cwd=RESULTS, capture_output=True, text=True, check=True,
                          env=_peer_env()).stdout.strip()


def _peer_env() -> dict[str, str]:
    """The environment without anything that would import this checkout instead of the peer."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MACHINABLE_STORAGE", "VIRTUAL_ENV")}


def measure(name: str, python: Path, launches: int, samples: int, repeat: int) -> dict:
    work = RESULTS / name / "project"
    if name == "sacred":
        project = fixtures.git_project(work, {"run.py": SACRED_SCRIPT, ".gitignore": fixtures.GITIGNORE})
        argv = [str(python), "run.py", str(launches)]
    else:
        project = fixtures.git_project(work, {"trivial.py": MODULES[name], ".gitignore": fixtures.GITIGNORE,
                                               "run.py": MACHINABLE_SCRIPT})
        argv = [str(python), "run.py", str(launches), str(samples)]
    env = fixtures._worker_env({}) if name == "ours" else _peer_env()
    proc = subprocess.run(argv, cwd=project, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cli = PEERS.get(name, {}).get("cli") if name != "ours" else ["machinable", "--help"]
    if cli:
        exe = python.parent / cli[0] if name != "ours" else Path(shutil.which("machinable") or "machinable")
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run([str(exe), *cli[1:]], cwd=project, capture_output=True, env=env)
            times.append((time.perf_counter() - start) * 1e3)
        result["cli"] = times
    fixtures.remove_tree(project)
    return result


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--samples", type=int, default=10, help="relaunches measured")
    parser.add_argument("--repeat", type=int, default=10, help="CLI starts measured")
    parser.add_argument("--only", default=",".join(PEERS))
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = {}
    from machinable import __version__

    log("measuring this machinable ...")
    rows["ours"] = {"label": "this machinable", "version": __version__,
                    **measure("ours", Path(sys.executable), args.launches, args.samples, args.repeat)}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        python = environment(name, log)
        log(f"measuring {PEERS[name]['label']} ...")
        rows[name] = {"label": PEERS[name]["label"], "version": version_of(python, PEERS[name]["dist"]),
                      **measure(name, python, args.launches, args.samples, args.repeat)}

    ours = {k: _median(rows["ours"].get(k)) for k in ("launch", "relaunch", "cli")}
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['filesystem']}, Python {info['python']}; "
          f"{args.launches} launches each, load average {info['load_average']}")
    header = f"{'tool':<22}{'per launch (median ms)':>24}{'relaunch among ' + str(args.launches):>22}{'CLI --help':>14}"
    print(header)
    print("-" * len(header))
    for row in rows.values():
        cells = []
        for key in ("launch", "relaunch", "cli"):
            value = _median(row.get(key))
            if value is None:
                cells.append("n/a")
            elif row["label"] == "this machinable" or not ours[key]:
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.1f} ({value / ours[key]:.0f}x)")
        print(f"{row['label'] + ' ' + row['version']:<22}{cells[0]:>24}{cells[1]:>22}{cells[2]:>14}")
    output = RESULTS / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.write_text(json.dumps({"machine": info, "launches": args.launches, "rows": rows}, indent=2))
    print(f"\nwritten: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
