"""Identity: canonical JSON, digests, config hash, code hash over the import closure.

The pinned values below are the hashing scheme: if one of them changes, every
stored experiment would get a new id. Change them only together with a
"Storage format" entry in CHANGELOG.md.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machinable import get
from machinable.config import config_class, make_config, tag
from conftest import write
from machinable.experiment import config_hash_of, experiment_id_of
from machinable.hashing import (
    ALGORITHM,
    canonical_json,
    closure_of,
    digest,
    digest_bytes,
    file_digest,
    hex_of,
    normalize_source,
    read_source_file,
)

PINNED_MODULE = '''\
from machinable import Experiment


class Pinned(Experiment):
    class Config:
        rate: float = 1.0
        steps: int = 3
        name: str = "a"

    def on_execute(self):
        return self.config.rate * self.config.steps
'''

PINNED_CONFIG_HASH = "xxh3-128:e378dee8c487c9bb3cd45dbb276dd9a9"
PINNED_CODE_HASH = "xxh3-128:7a4e2f53a2eb25e2c15bf3b72509ea58"
PINNED_ID = "ba2ba2e0a335f6f1a5f576a20031639c"


# --- pinned values -------------------------------------------------------------------------


def test_pinned_digests():
    assert ALGORITHM == "xxh3-128"
    assert canonical_json({"b": [1, 2.5, "x", None, True], "a": {}}) == b'{"a":{},"b":[1,2.5,"x",null,true]}'
    assert digest({"b": [1, 2.5, "x", None, True], "a": {}}) == "xxh3-128:09d0dfc3f29877fbb8a37111b32956a5"
    assert digest_bytes(b"") == "xxh3-128:99aa06d3014798d86001c324468d497f"
    assert hex_of(PINNED_CONFIG_HASH) == PINNED_CONFIG_HASH[len("xxh3-128:"):]


@pytest.mark.parametrize("with_git", [False, True])
def test_pinned_config_hash_code_hash_and_id(tmp_path, monkeypatch, with_git):
    """A fixed module, config and seed have a fixed identity, in any folder, with or without git."""
    root = tmp_path / "somewhere"
    write(root, "pinned.py", PINNED_MODULE)
    if with_git:
        from conftest import git

        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "x")
    monkeypatch.chdir(root)
    from machinable import Project

    with Project(root):
        experiment = get("pinned", {"rate": 2, "name": "b"}, seed=42)
        assert experiment.config_hash == PINNED_CONFIG_HASH
        assert experiment.code_hash == PINNED_CODE_HASH
        assert experiment.experiment_id == PINNED_ID
        # the defaults spelled out and coercible spellings are the same identity
        same = get("pinned", {"name": "b", "steps": "3", "rate": "2.0"}, seed=42)
        assert same.experiment_id == PINNED_ID
        experiment.commit()
    import orjson

    record = orjson.loads((root / "storage" / PINNED_ID / "experiment.json").read_bytes())
    assert record["config_hash"] == PINNED_CONFIG_HASH and record["code_hash"] == PINNED_CODE_HASH
    assert record["algorithm"] == "xxh3-128" and record["seed"] == 42 and record["format"] == 1


def test_the_id_is_the_digest_of_config_hash_code_hash_and_seed():
    assert experiment_id_of(PINNED_CONFIG_HASH, PINNED_CODE_HASH, 42) == PINNED_ID
    assert experiment_id_of(PINNED_CONFIG_HASH, PINNED_CODE_HASH, 43) != PINNED_ID
    assert PINNED_ID == hex_of(digest({"config_hash": PINNED_CONFIG_HASH, "code_hash": PINNED_CODE_HASH, "seed": "42"}))


def test_the_code_hash_is_the_digest_of_the_normalised_closure(tmp_path):
    write(tmp_path, "pinned.py", PINNED_MODULE)
    closure = closure_of(tmp_path, tmp_path / "pinned.py")
    normalized = digest_bytes(normalize_source(PINNED_MODULE.encode()).encode())
    assert closure.code_hash == digest({"pinned.py": normalized}) == PINNED_CODE_HASH
    assert closure.third_party == {"machinable"}


# --- canonical config: properties ----------------------------------------------------------


def _element(fields: dict[str, tuple[type, object]]) -> type:
    """An element-like class whose Config has the given (type, default) fields."""
    annotations = {name: t for name, (t, _) in fields.items()}
    namespace = {"__annotations__": annotations, **{name: d for name, (_, d) in fields.items()}}
    return type("E", (), {"Config": type("Config", (), namespace)})


BASE = {"rate": (float, 1.0), "steps": (int, 3), "name": (str, "a"), "flag": (bool, True)}
BASE_CLASS = config_class(_element(BASE))

values = st.fixed_dictionaries(
    {},
    optional={
        "rate": st.floats(allow_nan=False, allow_infinity=False, width=64),
        "steps": st.integers(min_value=-(2**62), max_value=2**62),
        "name": st.text(max_size=20),
        "flag": st.booleans(),
    },
)


def config_hash(cls: type, given_values: dict) -> str:
    return config_hash_of("module", make_config(cls, given_values))


@settings(max_examples=200, deadline=None)
@given(values, st.randoms(use_true_random=False))
def test_key_order_does_not_matter(given_values, random):
    keys = list(given_values)
    random.shuffle(keys)
    shuffled = {k: given_values[k] for k in keys}
    assert config_hash(BASE_CLASS, shuffled) == config_hash(BASE_CLASS, given_values)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_ints_given_for_floats_hash_like_the_float(n):
    assert config_hash(BASE_CLASS, {"rate": n}) == config_hash(BASE_CLASS, {"rate": float(n)})
    assert config_hash(BASE_CLASS, {"rate": str(n)}) == config_hash(BASE_CLASS, {"rate": float(n)})


@settings(max_examples=200, deadline=None)
@given(values)
def test_values_equal_to_their_default_are_dropped(given_values):
    with_defaults = {**{name: default for name, (_, default) in BASE.items()}, **given_values}
    assert config_hash(BASE_CLASS, with_defaults) == config_hash(BASE_CLASS, given_values)
    left_out = {k: v for k, v in given_values.items() if v != BASE[k][1] or type(v) is not type(BASE[k][1])}
    assert config_hash(BASE_CLASS, left_out) == config_hash(BASE_CLASS, given_values)


@settings(max_examples=200, deadline=None)
@given(values, st.sampled_from([(int, 0), (str, ""), (float, 0.5), (bool, False), (list, [])]))
def test_adding_a_field_with_a_default_keeps_old_hashes(given_values, new_field):
    extended = config_class(_element({**BASE, "added": new_field}))
    assert config_hash(extended, given_values) == config_hash(BASE_CLASS, given_values)


@settings(max_examples=200, deadline=None)
@given(values, values)
def test_different_configs_have_different_hashes(a, b):
    made_a, made_b = make_config(BASE_CLASS, a), make_config(BASE_CLASS, b)
    if dataclasses.astuple(made_a) != dataclasses.astuple(made_b):
        assert config_hash_of("module", made_a) != config_hash_of("module", made_b)
    else:
        assert config_hash_of("module", made_a) == config_hash_of("module", made_b)


def test_the_module_is_part_of_the_config_hash():
    config = make_config(BASE_CLASS, {})
    assert config_hash_of("a", config) != config_hash_of("b", config)


def test_values_are_type_tagged():
    tagged = [tag(1), tag(1.0), tag("1"), tag(True), tag(None), tag([1]), tag({"1": 1})]
    assert len({repr(t) for t in tagged}) == len(tagged)


@settings(max_examples=100, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
))
def test_tagging_is_deterministic_and_json_able(value):
    assert canonical_json(tag(value)) == canonical_json(tag(value))


# --- code hash ------------------------------------------------------------------------------


def test_comments_whitespace_and_docstrings_do_not_count():
    base = b"def f(x):\n    return x + 1\n"
    same = [
        b"# comment\ndef f(x):\n    return x + 1  # more\n",
        b'"""Module doc."""\ndef f(x):\n    """Function doc."""\n    return x + 1\n',
        b"def f( x ):\n\n\n    return (x+1)\n",
        b"def f(x):\r\n    return x + 1\r\n",
    ]
    for variant in same:
        assert normalize_source(variant) == normalize_source(base), variant
    different = [b"def f(x):\n    return x + 2\n", b"def g(x):\n    return x + 1\n", b"def f(y):\n    return y + 1\n",
                 b"def f(x):\n    return 'x' + 1\n", b"def f(x):\n    x + 1\n"]
    for variant in different:
        assert normalize_source(variant) != normalize_source(base), variant


def test_a_function_with_only_a_docstring_equals_one_with_pass():
    assert normalize_source(b'def f():\n    """Doc."""\n') == normalize_source(b"def f():\n    pass\n")
    assert normalize_source(b'x = "not a docstring"\n') != normalize_source(b"x = 'other'\n")


def test_unparsable_files_still_have_an_identity():
    assert normalize_source(b"def (:\n") == "def (:\n"
    assert normalize_source(b"def (:\n") != normalize_source(b"def )(:\n")


def test_closure_follows_project_imports_only(tmp_path):
    write(tmp_path, "main.py", """
        import os
        import numpy
        import pkg.sub
        from helpers import tool
        from pkg import other as renamed
        from . import nothing_here
    """)
    write(tmp_path, "helpers.py", "from pkg.deep.leaf import X\n")
    write(tmp_path, "pkg/__init__.py", "")
    write(tmp_path, "pkg/sub.py", "from .other import Y\nimport requests\n")
    write(tmp_path, "pkg/other.py", "Y = 1\n")
    write(tmp_path, "pkg/deep/__init__.py", "")
    write(tmp_path, "pkg/deep/leaf.py", "from ..other import Y\nX = Y\n")
    write(tmp_path, "unrelated.py", "Z = 1\n")
    closure = closure_of(tmp_path, tmp_path / "main.py")
    assert set(closure.files) == {
        "main.py", "helpers.py", "pkg/__init__.py", "pkg/sub.py", "pkg/other.py", "pkg/deep/__init__.py", "pkg/deep/leaf.py",
    }
    assert closure.third_party == {"numpy", "requests"}
    assert closure.as_json()["code_hash"] == closure.code_hash


def test_closure_excludes_the_storage_folder(tmp_path):
    write(tmp_path, "main.py", "import storage\n")
    write(tmp_path, "storage/__init__.py", "")
    assert set(closure_of(tmp_path, tmp_path / "main.py", exclude=(tmp_path / "storage",)).files) == {"main.py"}


def test_the_stat_cache_never_hides_an_edit(tmp_path):
    """An edit right after a read, keeping size and (coarse) mtime, is still seen."""
    path = tmp_path / "m.py"
    path.write_text("X = 1\n")
    first = read_source_file(path)
    stat = path.stat()
    path.write_text("X = 2\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same stat as before the edit
    assert read_source_file(path).normalized != first.normalized


def test_file_digest_matches_digest_bytes(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_digest(path) == digest_bytes(data)
