"""The README's commands and tour, run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_design_examples import printed, run_session

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
INSTALL = "pip install -e . && "  # done already by whoever runs the tests (scripts/test.sh)


def blocks(language: str) -> list[str]:
    """The bodies of the README's fenced code blocks of one language ("" for plain fences)."""
    found, current, lang = [], None, ""
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang == language:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": path, "MACHINABLE_STORAGE": ""},
    )


def test_the_first_command_prints_the_seed_lines(tmp_path):
    first = blocks("bash")[0].strip()
    assert first.startswith(INSTALL), first
    expected = blocks("")[0]
    assert expected == "Assuming height of 52 and time of 0.3\nThe gravity on the exoplanet is:  1155.5555555555557\n"
    proc = bash(first[len(INSTALL):], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.endswith(expected), proc.stdout
    (demo,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    finished = list((demo / "storage").glob("*/MANIFEST"))
    assert len(finished) == 1

    # run again: the experiment is finished, nothing runs and nothing of it is printed
    again = bash(f"cd {demo.name} && " + first[len(INSTALL):].split(" && cd ", 1)[1].split(" && ", 1)[1], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Assuming height" not in again.stdout
    assert list((demo / "storage").glob("*/MANIFEST")) == finished


def test_the_second_command_is_what_ci_runs():
    assert blocks("bash")[1].strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_tour(project):
    (tour,) = [b for b in blocks("python") if b.startswith(">>> from machinable import get")][:1]
    assert run_session(project, tour) == printed(tour)
