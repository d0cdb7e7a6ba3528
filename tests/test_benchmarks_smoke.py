"""The benchmark runs end to end with tiny sizes and prints every figure.

A smoke test only: it asserts no time (timings belong to the benchmark,
``python -m benchmarks``, not to the test suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FIGURES = [
    "`machinable --help` wall time",
    "per-launch overhead",
    "memory growth over",
    "disk per trivial finished run",
    "get()+launch() of a finished config",
    "get() of a finished config",
    "find by one config value",
    "`machinable list --limit 50`",
    "memory of `machinable list --json`",
    "index rebuild",
    "closure, relaunch in-process",
    "closure, relaunch in a new process",
    "git capture, clean tree",
    "dirty files (repeat launch)",
    "dirty files, after an edit",
    "trivial experiments, 2 processes",
]


def test_quick_benchmark_prints_every_figure_and_writes_json(tmp_path):
    output = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results", str(tmp_path / "results"), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MACHINABLE_STORAGE"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("figure"))
    for column in ("value", "floor", "ratio", "target", "pass", "min / median / max"):
        assert column in header
    for name in FIGURES:
        assert name in proc.stdout, f"{name!r} missing from:\n{proc.stdout}"
    assert "failed:" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.startswith("machine: ")

    written = json.loads(output.read_text())
    assert written["quick"] is True
    assert {"cpu", "cores", "filesystem", "python", "git"} <= set(written["machine"])
    names = [f["name"] for f in written["figures"]]
    for name in FIGURES:
        assert any(name in n for n in names), name
    measured = [f for f in written["figures"] if f["available"]]
    assert measured and all(f["stats"]["n"] >= 1 for f in measured)
