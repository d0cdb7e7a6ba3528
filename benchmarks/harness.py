"""Timing helpers, the figure record, the table and the machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    """One measured figure next to its floor and its target.

    ``target_kind`` is ``"ratio"`` (value / floor <= target) or ``"max"``
    (value <= target, in the figure's unit). Samples are kept so the JSON
    file shows the spread, not only the median.
    """

    name: str
    unit: str
    samples: list[float]
    target: float | None = None
    target_kind: str = "ratio"
    floor_name: str | None = None
    floor_samples: list[float] = field(default_factory=list)
    note: str = ""
    available: bool = True

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def floor(self) -> float | None:
        return statistics.median(self.floor_samples) if self.floor_samples else None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.floor:
            return None
        return self.value / self.floor

    @property
    def passed(self) -> bool | None:
        if not self.available or self.target is None or self.value is None:
            return None
        if self.target_kind == "ratio":
            return self.ratio is not None and self.ratio <= self.target
        return self.value <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.target_kind == "ratio":
            return f"<= {self.target:g}x"
        return f"<= {self.target:g} {self.unit}"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(value=self.value, floor=self.floor, ratio=self.ratio, passed=self.passed, target_text=self.target_text())
        for key, samples in (("stats", self.samples), ("floor_stats", self.floor_samples)):
            out[key] = spread(samples)
        return out


def unavailable(name: str, why: str) -> Figure:
    return Figure(name=name, unit="", samples=[], note=why, available=False)


def spread(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


# --- timing ------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int, scale: float = 1e3) -> list[float]:
    """Wall time of each call of ``fn`` (milliseconds by default)."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * scale)
    return out


def interleaved(a: Callable[[], Any], b: Callable[[], Any], repeat: int, scale: float = 1e3) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` alternately, so background load hits both alike."""
    xs, ys = [], []
    for _ in range(repeat):
        xs += timed(a, 1, scale)
        ys += timed(b, 1, scale)
    return xs, ys


def env_for_workers(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("MACHINABLE_STORAGE", None)
    return env | (extra or {})


def run_worker(task: str, args: dict[str, Any], cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> Any:
    """Run ``benchmarks.worker`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", task, json.dumps(args)],
        cwd=cwd, env=env_for_workers(env), capture_output=True, text=True, timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {task!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def wall_of_command(argv: list[str], cwd: Path, repeat: int, env: dict[str, str] | None = None) -> list[float]:
    """Wall time (ms) of a whole command, start to exit."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env_for_workers(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out.append((time.perf_counter() - start) * 1e3)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return out


# --- machine -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "filesystem": filesystem_of(REPO),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_version,
        "machinable_commit": commit,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def filesystem_of(path: Path) -> str:
    """Type and block size of the file system holding ``path`` (Linux: from /proc/mounts)."""
    best, kind = "", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    try:
        block = os.statvfs(path).f_bsize
    except OSError:
        block = 0
    return f"{kind}, {block // 1024} KiB blocks" if block else kind


# --- the table ---------------------------------------------------------------------


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table(figures: list[Figure]) -> str:
    header = ("figure", "value", "floor", "ratio", "target", "pass", "min / median / max")
    rows = []
    for f in figures:
        if not f.available:
            rows.append((f.name, "n/a", "-", "-", "-", "-", f.note))
            continue
        stats = spread(f.samples)
        rows.append((
            f.name,
            _num(f.value, f.unit),
            f"{_num(f.floor, f.unit)} ({f.floor_name})" if f.floor_name else "-",
            f"{f.ratio:.2f}x" if f.ratio is not None else "-",
            f.target_text(),
            {True: "PASS", False: "FAIL", None: "-"}[f.passed],
            " / ".join(_num(stats[k]) for k in ("min", "median", "max")) if stats else "-",
        ))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note and f.available]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)
