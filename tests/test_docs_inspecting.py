"""Every code block of docs/inspecting.md, executed in order in one project.

- ```python title="NAME.py"```: a module, written into the project (the page
  commits it with git, in a console block);
- ```python```: a script run in a fresh interpreter; the ```text``` block after
  it is its output (stdout and stderr together);
- ```console```: ``$ command`` lines run by bash in the project, each followed
  by its output (stdout and stderr together).

In expected output, ``...`` alone on a line stands for any lines, inside a
line for any text (ids, times, seeds, digests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DOC = REPO / "docs" / "inspecting.md"
FENCE = re.compile(r"^```(\w+)(?: title=\"([^\"]*)\")?\n(.*?)^```\n", re.S | re.M)


def pattern(expected: str) -> re.Pattern[str]:
    parts = []
    for line in expected.splitlines(keepends=True):
        if line.rstrip("\n") == "...":
            parts.append(r"(?:.*\n)*?")
        else:
            parts.append(".*?".join(re.escape(piece) for piece in line.split("...")))
    return re.compile("".join(parts))


def matches(expected: str, actual: str) -> bool:
    return pattern(expected).fullmatch(actual) is not None


def run(root: Path, args: list[str], shell: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "120"}
    result = subprocess.run(args if not shell else args[0], cwd=root, shell=shell, executable="/bin/bash" if shell else None,
                            text=True, timeout=120, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, f"failed: {args}\n{result.stdout}"
    return result.stdout


def console_steps(body: str) -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []
    for line in body.splitlines(keepends=True):
        if line.startswith("$ "):
            steps.append((line[2:].strip(), ""))
        else:
            command, expected = steps[-1]
            steps[-1] = (command, expected + line)
    return steps


def test_the_matcher():
    assert matches("a ... c\n", "a bbb c\n")
    assert matches("x\n...\nz\n", "x\n1\n2\nz\n")
    assert matches("x\n...\nz\n", "x\nz\n")
    assert not matches("a ... c\n", "a b d\n")


def test_every_code_block_runs_and_prints_what_the_page_shows(project):
    found = [(m.group(1), m.group(2) or "", m.group(3)) for m in FENCE.finditer(DOC.read_text())]
    pending: str | None = None
    ran = {"python": 0, "console": 0}
    for language, title, body in found:
        if language == "python" and title.endswith(".py"):
            (project / title).write_text(body)  # the page commits it itself, with git
        elif language == "python":
            assert pending is None, f"script without an output block:\n{pending}"
            pending = body
        elif language == "text":
            assert pending is not None, f"output block without a script:\n{body}"
            actual = run(project, [sys.executable, "-c", pending])
            assert matches(body, actual), f"script:\n{pending}\nexpected:\n{body}\nactual:\n{actual}"
            pending = None
            ran["python"] += 1
        elif language == "console":
            for command, expected in console_steps(body):
                actual = run(project, [command], shell=True)
                assert matches(expected, actual), f"$ {command}\nexpected:\n{expected}\nactual:\n{actual}"
                ran["console"] += 1
    assert pending is None
    assert ran["python"] >= 4 and ran["console"] >= 7
