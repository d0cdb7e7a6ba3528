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
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from doctools import blocks, console_steps, matches

DOC = REPO / "docs" / "inspecting.md"


def run(root: Path, args: list[str], shell: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "120"}
    result = subprocess.run(args if not shell else args[0], cwd=root, shell=shell, executable="/bin/bash" if shell else None,
                            text=True, timeout=120, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, f"failed: {args}\n{result.stdout}"
    return result.stdout


def test_the_matcher():
    assert matches("a ... c\n", "a bbb c\n")
    assert matches("x\n...\nz\n", "x\n1\n2\nz\n")
    assert matches("x\n...\nz\n", "x\nz\n")
    assert not matches("a ... c\n", "a b d\n")


def test_every_code_block_runs_and_prints_what_the_page_shows(project):
    found = blocks(DOC.read_text())
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
