"""Every code block of docs/getting-started.md, executed in order, as a new user would.

- ```bash```: each line runs in a shell (``cd`` moves on; ``pip install -e .``
  is already done by whoever runs the tests);
- ```python title="NAME.py"```: a module; written into the project, or, if
  ``machinable init`` wrote it, checked to be exactly what the page shows;
- ```python```: a script, run in a fresh interpreter in the project;
- the ```text``` block after a script is its expected output ("stdout": stdout alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from doctools import blocks

DOC = REPO / "docs" / "getting-started.md"


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MACHINABLE_STORAGE"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def test_every_code_block_runs_and_prints_what_the_page_shows(tmp_path):
    found = blocks(DOC.read_text())
    assert len(found) >= 20
    cwd = tmp_path
    pending: str | None = None
    ran = 0
    for language, title, body in found:
        if language == "bash":
            for line in body.splitlines():
                if line.startswith("pip install"):
                    assert line == "pip install -e ."
                elif line.startswith("cd "):
                    cwd = cwd / line[3:]
                else:
                    proc = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, env=environment(), timeout=120)
                    assert proc.returncode == 0, f"{line}\n{proc.stdout}{proc.stderr}"
        elif language == "python" and title.endswith(".py"):
            path = cwd / title
            if path.exists():
                assert path.read_text() == body, f"{title} differs from what machinable init wrote"
            else:
                path.write_text(body)
        elif language == "python":
            assert pending is None, f"script without an expected output block:\n{pending}"
            pending = body
        elif language == "text":
            assert pending is not None, f"output block without a script: {body}"
            assert title == "stdout"
            proc = subprocess.run([sys.executable, "-c", pending], cwd=cwd, capture_output=True, text=True, env=environment(), timeout=120)
            assert proc.returncode == 0, f"script failed:\n{pending}\n{proc.stdout}{proc.stderr}"
            assert proc.stdout == body, f"script:\n{pending}"
            pending = None
            ran += 1
    assert pending is None
    assert ran >= 10
    assert cwd.name == "gravity-demo" and (cwd / ".git").is_dir()
