"""Bad input never corrupts storage nor runs what the user did not ask for.

Config keys and values of every JSON type (and a few that JSON lacks: NaN,
infinity, huge integers, bytes, sets, lone surrogates), module names that
try to leave the project or reach a shell, malformed command-line pairs and
ambiguous id prefixes. Each is either accepted and stored so that it comes
back the same, or refused with one clear line (exit 2 on the command line),
and a refusal leaves the storage folder exactly as it was.
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import git, run_machinable

ANYTHING = '''
from typing import Any

from machinable import Experiment


class Anything(Experiment):
    class Config:
        x: Any = None
        f: float = 0.0
        i: int = 0
        s: str = ""
        d: dict = {}
        l: list = []

    def on_execute(self):
        return {"x": repr(self.config.x)}
'''


@pytest.fixture
def anything_project(project):
    (project / "anything.py").write_text(ANYTHING)
    git(project, "add", "anything.py")
    git(project, "commit", "-q", "-m", "anything")
    return project


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the storage folder with its content (derived files
    aside: the index and caches may be refreshed by any lookup)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("index.sqlite") and not {".locks", ".cache"} & set(p.parts)
    }


text = st.text(st.characters(blacklist_categories=()), max_size=12)  # surrogates included
scalars = (
    st.none() | st.booleans() | text
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=4)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(text | st.integers(), inner, max_size=3)
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(["x", "f", "i", "s", "d", "l"]) | text | st.integers() | st.just("x.y") | st.just(".")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=keys, value=values)
def test_any_config_value_is_stored_faithfully_or_refused(anything_project, key, value):
    from machinable import get
    from machinable.errors import ConfigError
    from machinable.experiment import Experiment, config_hash_of

    storage = anything_project / "storage"
    before = _snapshot(storage)
    try:
        experiment = get.new("anything", {key: value})
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and message.strip(), message
        assert _snapshot(storage) == before, "a refused config left something in storage"
        return
    experiment.commit()
    stored = orjson.loads((experiment.directory / "experiment.json").read_bytes())
    assert stored["config_hash"] == experiment.config_hash
    # what a resume in another process, a pool worker or a reproduction rebuilds:
    rebuilt = Experiment.restore(experiment.storage, experiment.experiment_id, element_class=type(experiment))
    assert config_hash_of(rebuilt.module, rebuilt.config) == experiment.config_hash


def test_values_json_cannot_carry_in_untyped_fields_are_refused_by_name(anything_project):
    from machinable import get
    from machinable.errors import ConfigError

    for value in (float("nan"), float("inf"), 2**70, b"raw", {1, 2}, {1: "a"}, "\ud800"):
        with pytest.raises(ConfigError, match="key 'x' of anything"):
            get("anything", {"x": value})
    assert not (anything_project / "storage").exists()

    # typed fields carry them: float NaN/inf and big ints come back as they were
    experiment = get("anything", {"f": float("nan"), "i": 2**100})
    experiment.launch()
    from machinable.experiment import Experiment

    rebuilt = Experiment.restore(experiment.storage, experiment.experiment_id, element_class=type(experiment))
    assert math.isnan(rebuilt.config.f) and rebuilt.config.i == 2**100
    again = get("anything", {"f": float("nan"), "i": 2**100})
    assert again.experiment_id == experiment.experiment_id


def test_unicode_and_nested_values_round_trip(anything_project):
    from machinable import get

    config = {"s": "größe ✓ 日本 \U0001f600", "d": {"ключ": [1, {"z": None, "w": 2.5}]}, "x": {"a": [True, "é"]}}
    experiment = get("anything", config)
    experiment.launch()
    assert experiment.is_finished()
    again = get("anything", config)
    assert again.experiment_id == experiment.experiment_id
    assert again.config.s == config["s"] and again.config.d == config["d"]


@pytest.mark.parametrize("name", [
    "../estimate_gravity", "./../estimate_gravity.py", "..estimate_gravity", "/etc/passwd", "/tmp/x.py",
    "estimate_gravity;touch pwned", "$(touch pwned)", "`touch pwned`", "a|b", "estimate_gravity && touch pwned",
    "", " ", "estimate_gravity\n",
])
def test_module_names_outside_the_project_or_with_shell_syntax_are_refused(project, name):
    from machinable import get
    from machinable.errors import ModuleNotFound

    with pytest.raises(ModuleNotFound) as info:
        get(name)
    assert "\n" not in str(info.value)
    result = run_machinable(project, name, "--launch") if name.strip() else run_machinable(project, "--", name)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (project / "pwned").exists()
    assert not (project / "storage").exists()


@pytest.mark.parametrize("pair", ["time_dilation==1", "=1", "time_dilation=", "=", "time_dilation=1=2=", "no_such_key=1",
                                  "time_dilation=fast", "verbose=maybe", "time_dilation=$(touch pwned)"])
def test_malformed_command_line_pairs_are_usage_errors(project, pair):
    result = run_machinable(project, "estimate_gravity", pair, "--launch")
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "The gravity" not in result.stdout
    assert not (project / "pwned").exists()
    assert not (project / "storage").exists()


def test_ambiguous_id_prefixes_list_the_candidates(project):
    from machinable import get
    from machinable.errors import ExperimentNotFound
    from machinable.storage import Storage

    ids = []
    for seed in range(17):  # 17 ids: two share a first hex digit
        experiment = get("estimate_gravity", {"verbose": False}, seed=seed)
        experiment.commit()
        ids.append(experiment.experiment_id)
    first = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    matching = sorted(i for i in ids if i.startswith(first))

    with pytest.raises(ExperimentNotFound) as info:
        Storage.current().load(first)
    message = str(info.value)
    assert "ambiguous" in message
    for candidate in matching[:10]:
        assert candidate[:12] in message

    before = _snapshot(project / "storage")
    for command in ("verify", "gc"):
        result = run_machinable(project, command, first)
        assert result.returncode == 2, result
        assert "ambiguous" in result.stderr and matching[0][:12] in result.stderr
        assert "Traceback" not in result.stderr
    for bad in ("xyz", "0" * 33, "-1"):
        result = run_machinable(project, "verify", "--", bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert _snapshot(project / "storage") == before
    assert Storage.current().load(matching[0][:20]).experiment_id == matching[0]


def test_record_values_that_are_not_json_are_refused(project):
    (project / "recorder.py").write_text(
        "from machinable import Experiment\n\n"
        "class Recorder(Experiment):\n"
        "    def on_execute(self):\n"
        "        self.record(step=1, loss=0.5)\n"
        "        self.record(step=2, weird=object())\n"
    )
    git(project, "add", "recorder.py")
    git(project, "commit", "-q", "-m", "recorder")
    from machinable import get
    from machinable.errors import ExecutionError

    experiment = get("recorder")
    with pytest.raises(ExecutionError):
        experiment.launch()
    assert experiment.is_failed()
    assert experiment.records() == [{"step": 1, "loss": 0.5}]
    lines = (experiment.directory / "records.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(orjson.loads(line) for line in lines[:-1])
