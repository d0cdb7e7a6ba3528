"""The Python examples of DESIGN.md section 1, verbatim, in fresh interpreters, output byte for byte.

The examples are copied here (so this test runs wherever the repository is) and
checked against DESIGN.md when it is reachable (a copy of shared/ beside the
repository), so the two cannot drift apart. The CLI lines of section 1 are
tested with the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_python

REPO = Path(__file__).resolve().parents[2]

# section 1, first block: an interactive session (">>>" lines are typed, the others are printed)
SESSION = """\
>>> from machinable import get
>>> experiment = get('estimate_gravity')
>>> experiment.launch()
Assuming height of 52 and time of 0.3
The gravity on the exoplanet is:  1155.5555555555557
>>> experiment.is_finished()
True
>>> gravity = get('estimate_gravity')        # same config -> same experiment
>>> gravity.experiment_id, gravity.timestamp, gravity.seed
"""

# section 1, the custom execution module `multiprocess_execution.py`
MULTIPROCESS_MODULE = """\
from multiprocessing import Pool
from machinable import Execution

def run(experiment):
    experiment()

class Multiprocess(Execution):
    class Config:
        processes: int = 1

    def on_dispatch(self):
        with Pool(processes=self.config.processes, maxtasksperchild=1) as pool:
            pool.map(run, self.experiments)   # experiment() runs in a worker
"""

# section 1, using it as a context
MULTIPROCESS_USE = """\
multiprocessing = get("multiprocess_execution", {'processes': 2})
with multiprocessing:
    experiment.launch()
"""


def design_md() -> str | None:
    for candidate in (REPO.parent / "shared" / "DESIGN.md", REPO / "shared" / "DESIGN.md", REPO / "DESIGN.md"):
        if candidate.is_file():
            return candidate.read_text()
    return None


def run_session(cwd: Path, session: str) -> str:
    """Type the '>>>' lines of a session into a real interactive interpreter; its stdout."""
    typed = "".join(line[4:] + "\n" for line in session.splitlines() if line.startswith(">>> "))
    proc = subprocess.run(
        [sys.executable, "-i", "-q"], cwd=cwd, input=typed, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONSTARTUP": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def printed(session: str) -> str:
    return "".join(line + "\n" for line in session.splitlines() if not line.startswith(">>> "))


def test_the_examples_are_those_of_design_md():
    text = design_md()
    if text is None:
        pytest.skip("DESIGN.md (shared/) is not beside this checkout")
    section = text.split("## 1.", 1)[1].split("\n## 2.", 1)[0]
    assert SESSION in section
    assert MULTIPROCESS_MODULE in section
    assert MULTIPROCESS_USE in section


def test_the_session(project):
    out = run_session(project, SESSION)
    expected = printed(SESSION)  # everything but the last statement, whose values differ per run
    assert out.startswith(expected), out
    last = out[len(expected):]
    match = re.fullmatch(
        r"\('([0-9a-f]{32})', datetime\.datetime\((\d+, ){5,7}tzinfo=datetime\.timezone\.utc\), (\d+)\)\n", last
    )
    assert match, last
    experiment_id = match.group(1)
    assert (project / "storage" / experiment_id / "MANIFEST").is_file()

    # a second session: the experiment is found, finished, and launch() prints nothing at all
    again = run_session(project, ">>> from machinable import get\n>>> e = get('estimate_gravity')\n>>> e.launch()\n>>> e.experiment_id\n")
    assert again == f"'{experiment_id}'\n"


def test_the_custom_multiprocess_execution(project):
    (project / "multiprocess_execution.py").write_text(MULTIPROCESS_MODULE)
    script = (
        "from machinable import get\n"
        "experiment = get('estimate_gravity', {'time_dilation': 1.5})\n"
        + MULTIPROCESS_USE
        + "print(experiment.is_finished())\n"
    )
    proc = run_python(project, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "Assuming height of 52 and time of 0.44999999999999996\n"
        "The gravity on the exoplanet is:  513.5802469135804\n"
        "True\n"
    )


def test_the_upstream_lambda_mistake_is_a_clear_error(project):
    """DESIGN: upstream passes a lambda to imap_unordered, which silently runs nothing; here it must surface."""
    (project / "lambda_execution.py").write_text(textwrap.dedent("""\
        from multiprocessing import Pool
        from machinable import Execution

        class Multiprocess(Execution):
            class Config:
                processes: int = 1

            def on_dispatch(self):
                pool = Pool(processes=self.config.processes)
                for _ in pool.imap_unordered(lambda e: e(), self.experiments):
                    pass
                pool.close()
                pool.join()
    """))
    script = (
        "from machinable import get\n"
        "experiment = get('estimate_gravity', {'time_dilation': 1.5})\n"
        "with get('lambda_execution', {'processes': 2}):\n"
        "    experiment.launch()\n"
    )
    proc = run_python(project, script)
    assert proc.returncode != 0
    assert "lambda" in proc.stderr and "never started" in proc.stderr
