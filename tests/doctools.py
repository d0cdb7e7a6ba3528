"""Reading the docs pages that the tests run: code fences, ``$ `` console blocks, expected output.

Shared by tests/test_docs_*.py, test_cli.py and test_slurm.py (``from doctools import ...``;
tests/ is on sys.path as the folder of the root conftest.py).
"""

from __future__ import annotations

import re

# a fenced code block: ```language title="NAME"\n body ```\n  (the closing fence at the start of a line)
FENCE = re.compile(r"^```(\w+)(?: title=\"([^\"]*)\")?\n(.*?)^```\n", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """Every fenced block as (language, title or "", body)."""
    return [(m.group(1), m.group(2) or "", m.group(3)) for m in FENCE.finditer(text)]


def normalize(text: str) -> str:
    """Experiment ids and commits (12 hex digits) as placeholders."""
    return re.sub(r"\b[0-9a-f]{12}\b", "<id>", text)


def pattern(expected: str, *, terminated: bool = False) -> re.Pattern[str]:
    """``...`` alone on a line matches any lines; inside a line, any text.

    By default each line of ``expected`` keeps its own line ending (a last line
    without one matches without one); ``terminated=True`` splits ``expected``
    with str.splitlines() and every line, the last one too, ends in "\\n".
    """
    parts = []
    for line in expected.splitlines(keepends=not terminated):
        if line.rstrip("\n") == "...":
            parts.append(r"(?:.*\n)*?")
        else:
            parts.append(".*?".join(re.escape(piece) for piece in line.split("...")) + ("\n" if terminated else ""))
    return re.compile("".join(parts))


def matches(expected: str, actual: str, *, terminated: bool = False) -> bool:
    """Whether ``actual`` is what ``expected`` shows, with its ``...`` wildcards (see pattern())."""
    return pattern(expected, terminated=terminated).fullmatch(actual) is not None


def console_steps(body: str, *, raw: bool = False) -> list[tuple[str, str]]:
    """A ``console`` block as [(command, expected output)]: ``$ `` starts a command, the lines below are its output.

    By default a command is stripped and its output keeps the block's line endings;
    ``raw=True`` keeps the command as written and ends every output line (split with
    str.splitlines()) in "\\n".
    """
    steps: list[tuple[str, str]] = []
    for line in body.splitlines(keepends=not raw):
        if line.startswith("$ "):
            steps.append((line[2:] if raw else line[2:].strip(), ""))
        else:
            assert steps, f"output before any command in:\n{body}"
            command, expected = steps[-1]
            steps[-1] = (command, expected + (f"{line}\n" if raw else line))
    return steps
