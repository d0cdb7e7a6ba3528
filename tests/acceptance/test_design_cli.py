"""DESIGN section 1, the CLI lines, verbatim: run as a user runs them, in a fresh git project."""

from __future__ import annotations

import json

from conftest import run_machinable

GRAVITY_15 = (
    "Assuming height of 52 and time of 0.44999999999999996\n"
    "The gravity on the exoplanet is:  513.5802469135804\n"
)


def test_machinable_estimate_gravity_time_dilation_launch(project):
    # machinable estimate_gravity time_dilation=1.5 --launch
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15
    assert "Traceback" not in result.stderr


def test_machinable_with_an_execution_as_context(project):
    # machinable estimate_gravity time_dilation=1.5 multiprocess_execution processes=4 --launch
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5", "multiprocess_execution", "processes=4", "--launch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == GRAVITY_15
    (directory,) = [p for p in (project / "storage").iterdir() if len(p.name) == 32]
    events = [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines()]
    assert any(e.get("execution", {}) and e["execution"]["module"] == "multiprocess_execution" for e in events)


def test_without_launch_it_is_a_dry_run(project):
    # "Without --launch the CLI prints what *would* run (module, resolved config,
    # config hash, whether a finished record already exists)"
    run_machinable(project, "estimate_gravity", "time_dilation=1.5", "--launch")
    before = sorted(p.name for p in (project / "storage").iterdir())
    result = run_machinable(project, "estimate_gravity", "time_dilation=1.5")
    assert result.returncode == 0, result.stderr
    assert "experiment   estimate_gravity" in result.stdout
    assert "time_dilation = 1.5" in result.stdout
    assert "config hash  xxh3-128:" in result.stdout
    assert "record       finished" in result.stdout
    assert "Assuming height" not in result.stdout
    assert sorted(p.name for p in (project / "storage").iterdir()) == before
