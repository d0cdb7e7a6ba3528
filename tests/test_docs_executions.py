"""Every code block of docs/executions.md, executed in order in one project.

- ```python title="NAME.py"```: a module, written into the project and committed;
- ```python```: a script, run in a fresh interpreter in the project;
- the ```text``` block after a script is its expected output: title "output" is
  stdout and stderr together, "stdout" is stdout alone, "(in any order)" compares
  sorted lines. Experiment ids (12 hex digits) are compared as placeholders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, git
from doctools import blocks, normalize

DOC = REPO / "docs" / "executions.md"


def run_script(root: Path, code: str, merged: bool) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, text=True, timeout=120,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
    )
    assert result.returncode == 0, f"script failed:\n{code}\n{result.stdout}{result.stderr or ''}"
    return result.stdout


def test_every_code_block_runs_and_prints_what_the_page_shows(project):
    found = blocks(DOC.read_text())
    assert len(found) >= 10
    pending: str | None = None
    ran = 0
    for language, title, body in found:
        if language == "python" and title.endswith(".py"):
            path = project / title
            if not path.exists() or path.read_text() != body:
                path.write_text(body)
                git(project, "add", title)
                git(project, "commit", "-q", "-m", title)
        elif language == "python":
            assert pending is None, f"script without an expected output block:\n{pending}"
            pending = body
        elif language == "text":
            assert pending is not None, f"output block without a script: {body}"
            merged = title.startswith("output")
            actual = run_script(project, pending, merged)
            if "any order" in title:
                assert sorted(normalize(actual).splitlines()) == sorted(normalize(body).splitlines())
            else:
                assert normalize(actual) == normalize(body)
            pending = None
            ran += 1
    assert pending is None
    assert ran >= 6


def test_the_page_shows_the_template_execution_verbatim():
    template = (REPO / ".machinable-template" / "multiprocess_execution.py").read_text()
    [module] = [body for language, title, body in blocks(DOC.read_text()) if title == "multiprocess_execution.py"]
    assert module == template
