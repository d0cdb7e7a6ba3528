"""Every code block of docs/reproducibility.md, executed in order in one project,
then the template's CI workflow (minus the GitHub parts) in a fresh clone.

- ```console```: ``$ `` lines are shell commands (one bash per block, so ``cd``
  and ``$?`` carry over within it); the lines below a command are its stdout;
- ```python title="NAME.py"```: a module, written into the project (the page's
  own commands commit it);
- ```python``` and the ```text``` block after it: a script run in a fresh
  interpreter and its stdout;
- ```yaml title=...```: the workflow, which must be the template's file.

Ids and commits (12 hex digits) are compared as placeholders.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from doctools import blocks, console_steps, normalize

DOC = REPO / "docs" / "reproducibility.md"
WORKFLOW = ".github/workflows/reproduce.yml"
MARK = "@@@ command "


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_STORAGE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `machinable` of this Python
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"], env[f"GIT_{role}_EMAIL"] = "docs", "docs@example.org"
    return env


def run_console(cwd: Path, body: str) -> None:
    steps = console_steps(body, raw=True)  # [(command, expected stdout)], commands as written
    # the marker must not reset $?, so that `echo $?` shows the previous command's status
    script = "".join(f"_status=$?; echo '{MARK}{i}'; (exit $_status)\n{command}\n" for i, (command, _) in enumerate(steps))
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=shell_env(), capture_output=True, text=True, timeout=600)
    outputs = re.split(rf"^{MARK}\d+\n", result.stdout, flags=re.M)[1:]
    assert len(outputs) == len(steps), result.stdout + result.stderr
    for (command, expected), actual in zip(steps, outputs):
        assert normalize(actual) == normalize(expected), f"$ {command}\n--- got:\n{actual}--- stderr:\n{result.stderr}"


def test_every_code_block_runs_and_prints_what_the_page_shows(project):
    found = blocks(DOC.read_text())
    pending: str | None = None
    consoles = 0
    for language, title, body in found:
        if language == "console":
            run_console(project, body)
            consoles += 1
        elif language == "python" and title:
            (project / title).write_text(body)
        elif language == "python":
            pending = body
        elif language == "text":
            assert pending is not None, f"output block without a script: {body}"
            result = subprocess.run([sys.executable, "-c", pending], cwd=project, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            assert normalize(result.stdout) == normalize(body)
            pending = None
        elif language == "yaml":
            assert title == WORKFLOW
            assert body == (REPO / ".machinable-template" / WORKFLOW).read_text()
    assert pending is None and consoles == 5

    # The page ends in a fresh clone with the records committed, as CI sees the
    # repository: run the workflow's own check steps there.
    clone = project.parent / "ci"
    steps = re.findall(r"^\s+run: (machinable .*)$", (REPO / ".machinable-template" / WORKFLOW).read_text(), re.M)
    assert steps == ["machinable status --check", "machinable reproduce --all --sample 3 --check"]
    for step in steps:
        result = subprocess.run(["bash", "-c", step], cwd=clone, env={**shell_env(), "MACHINABLE_STORAGE": "storage"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{step}\n{result.stdout}{result.stderr}"

    # ... both fail where the records were not committed, rather than pass on nothing
    for step in steps:
        result = subprocess.run(["bash", "-c", step], cwd=clone, env={**shell_env(), "MACHINABLE_STORAGE": "not-committed"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 1 and f"Nothing to check: no storage at {clone / 'not-committed'}" in result.stderr, step

    # ... and the same checks fail once the code changes under the records
    (clone / "estimate_gravity.py").write_text((clone / "estimate_gravity.py").read_text().replace("52", "53"))
    result = subprocess.run(["bash", "-c", steps[0]], cwd=clone, env=shell_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "stale: estimate_gravity.py changed" in result.stdout
