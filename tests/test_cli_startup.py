"""`machinable --help` starts fast: no GitPython, sqlite3, rich tables or user code at startup.

Checked on the modules a real subprocess imported (``python -X importtime``);
the wall-time ratio to ``python -c "import typer"`` is a benchmark figure, not
a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from machinable.cli import SEED_COMMAND, app_commands

FORBIDDEN = ("git", "sqlite3", "_sqlite3", "rich.table", "estimate_gravity", "multiprocess_execution", "numpy", "pydantic")  # pydantic: typer 0.29 imports it for every command


def imported_modules(cwd: Path, *args: str) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "machinable", *args], cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    assert "machinable.cli" in names, "importtime output not understood"
    return names


def offending(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


@pytest.mark.parametrize("args", [["--help"], ["--version"], [SEED_COMMAND, "--help"], ["estimate_gravity", "--help"]],
                         ids=["--help", "--version", "MODULE --help", "estimate_gravity --help"])
def test_startup_imports_nothing_heavy(project, args):
    assert offending(imported_modules(project, *args)) == []


def test_no_subcommand_help_imports_anything_heavy(project):
    """Guards every subcommand, including those added later: imports belong inside the command."""
    for command in app_commands():
        if command == SEED_COMMAND:
            continue
        assert offending(imported_modules(project, command, "--help")) == [], f"machinable {command} --help"

