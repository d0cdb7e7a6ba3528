"""docs/guarantees.md: its examples run as shown, and every test it links exists.

- ```console```: ``$ command`` lines run by bash in a fresh project, in
  order, each followed by its output (stdout and stderr together); ``...``
  alone on a line stands for any lines, inside a line for any text.
- Every link to a test (```[`test_name`](../tests/test_x.py)```) names a test
  function defined in that file, and every promise section links at least one.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from doctools import blocks, console_steps, matches

DOC = REPO / "docs" / "guarantees.md"
LINK = re.compile(r"\[`?([^\]`]+)`?\]\(\.\./(tests/[^)]+\.py)\)")


def test_every_console_block_runs_and_prints_what_the_page_shows(project):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
    ran = 0
    for language, _, body in blocks(DOC.read_text()):
        assert language == "console", f"a {language} block: this page only shows commands"
        for command, expected in console_steps(body):
            result = subprocess.run(command, shell=True, executable="/bin/bash", cwd=project, env=env, text=True,
                                    timeout=120, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert result.returncode == 0, f"$ {command}\n{result.stdout}"
            assert matches(expected, result.stdout), f"$ {command}\nexpected:\n{expected}\nactual:\n{result.stdout}"
            ran += 1
    assert ran >= 7


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_linked_test_exists_and_every_promise_links_one():
    text = DOC.read_text()
    links = LINK.findall(text)
    assert len(links) >= 20
    for name, file in links:
        path = REPO / file
        assert path.is_file(), f"{file} does not exist"
        if name.endswith(".py"):
            assert name == path.name, f"link text {name!r} should name the file {path.name}"
        else:
            assert name in _tests_in(path), f"{file} has no test {name}"
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if title != "What is not promised":
            assert LINK.search(section), f"section {title!r} links no test"
