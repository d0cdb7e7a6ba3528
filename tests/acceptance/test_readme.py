"""The README's commands and tour, run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import GIT_IDENTITY
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


def bash(command: str, cwd: Path, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` as a user whose home folder is ``home`` (no ~/.gitconfig there)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "MACHINABLE_"))}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**base, "PATH": path, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", **(env or {})},
    )


def a_clone(tmp_path: Path) -> Path:
    """Where the README's reader stands: a git clone of this repository (a stand-in with one commit)."""
    clone = tmp_path / "machinable"
    clone.mkdir()
    (clone / "README.md").write_text(README)
    for args in (["init", "-q"], ["add", "README.md"], ["commit", "-q", "-m", "clone"]):
        subprocess.run(["git", *args], cwd=clone, check=True, capture_output=True, env={**os.environ, **GIT_IDENTITY})
    return clone


def first_command() -> str:
    first = blocks("bash")[0].strip()
    assert first.startswith(INSTALL), first
    return first[len(INSTALL):]


def test_the_first_command_prints_exactly_what_the_readme_shows(tmp_path):
    clone, home = a_clone(tmp_path), tmp_path / "home"
    home.mkdir()
    expected = blocks("")[0]
    assert expected.endswith("Assuming height of 52 and time of 0.3\nThe gravity on the exoplanet is:  1155.5555555555557\n")
    proc = bash(first_command(), clone, home, GIT_IDENTITY)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected, "")
    # the project is its own repository outside the clone, and its first record is clean
    demo = home / "gravity-demo"
    assert (demo / ".git").is_dir()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout == ""
    (manifest,) = list((demo / "storage").glob("*/MANIFEST"))
    recorded = json.loads((manifest.parent / "git.json").read_text())
    assert recorded["dirty"] is False and not recorded.get("remote")

    # run again: the experiment is finished, nothing runs and nothing of it is printed
    launch = first_command().split(" && cd ", 1)[1].split(" && ", 1)[1]
    again = bash(f"cd ~/gravity-demo && {launch}", clone, home, GIT_IDENTITY)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "already finished" in again.stderr
    assert list((demo / "storage").glob("*/MANIFEST")) == [manifest]


def test_the_first_command_on_a_fresh_machine_without_a_git_identity(tmp_path):
    """root on a fresh machine: no ~/.gitconfig, so init commits the template as machinable."""
    clone, home = a_clone(tmp_path), tmp_path / "home"
    home.mkdir()
    expected = blocks("")[0].splitlines(keepends=True)
    proc = bash(first_command(), clone, home, {"EMAIL": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines(keepends=True)
    assert lines[1].startswith("git: new repository, with the template as its first commit (author machinable init")
    assert lines[:1] + lines[2:] == expected[:1] + expected[2:]
    assert proc.stderr == ""


def test_the_second_command_is_what_ci_runs():
    assert blocks("bash")[1].strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_tour(project):
    (tour,) = [b for b in blocks("python") if b.startswith(">>> from machinable import get")][:1]
    assert run_session(project, tour) == printed(tour)
