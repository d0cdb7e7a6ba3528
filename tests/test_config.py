"""Typed Config: with and without @dataclass, coercion, clear errors, both access styles."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from machinable import get
from machinable.config import canonical, coerce, config_class, make_config, to_json
from machinable.errors import ConfigError, UsageError

PLAIN = """
from machinable import Experiment

class Typed(Experiment):
    class Config:
        rate: float = 1.0
        steps: int = 3
        flag: bool = True
        name: str = "a"
        layers: list[int] = [1, 2]
        optional: float | None = None

    def on_execute(self):
        return [self.config.rate, self.config["steps"], self.config.flag, self.config.layers]
"""

DATACLASS = """
from dataclasses import dataclass, field
from machinable import Experiment

class Typed(Experiment):
    @dataclass
    class Config:
        rate: float = 1.0
        steps: int = 3
        flag: bool = True
        name: str = "a"
        layers: list[int] = field(default_factory=lambda: [1, 2])
        optional: float | None = None

    def on_execute(self):
        return [self.config.rate, self.config["steps"], self.config.flag, self.config.layers]
"""


@pytest.fixture(params=["plain", "dataclass"])
def typed(request, plain_project: Path) -> str:
    (plain_project / "typed.py").write_text(textwrap.dedent(PLAIN if request.param == "plain" else DATACLASS))
    return "typed"


def test_defaults_and_both_access_styles(typed):
    experiment = get(typed)
    config = experiment.config
    assert (config.rate, config.steps, config.flag, config.name, config.layers, config.optional) == (1.0, 3, True, "a", [1, 2], None)
    for key in ("rate", "steps", "flag", "name", "layers", "optional"):
        assert config[key] == getattr(config, key)
    assert "rate" in config and "nope" not in config
    with pytest.raises(KeyError):
        config["nope"]
    with pytest.raises(AttributeError):
        config.rate = 2.0  # configs are frozen: an experiment's config never changes
    experiment.launch()
    assert experiment.result == [1.0, 3, True, [1, 2]]


def test_mutable_defaults_are_not_shared(typed):
    first = get(typed)
    second = get.new(typed)
    assert first.config.layers == second.config.layers
    assert first.config.layers is not second.config.layers


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"rate": 2}, {"rate": 2.0}),
        ({"rate": "1.5"}, {"rate": 1.5}),
        ({"rate": " 2.5 "}, {"rate": 2.5}),
        ({"steps": "7"}, {"steps": 7}),
        ({"steps": 4.0}, {"steps": 4}),
        ({"flag": "true"}, {"flag": True}),
        ({"flag": "false"}, {"flag": False}),
        ({"flag": "1"}, {"flag": True}),
        ({"flag": "0"}, {"flag": False}),
        ({"flag": 1}, {"flag": True}),
        ({"flag": 0}, {"flag": False}),
        ({"flag": "True"}, {"flag": True}),
        ({"layers": "[3, 4]"}, {"layers": [3, 4]}),
        ({"layers": ["5", 6.0]}, {"layers": [5, 6]}),
        ({"optional": "none"}, {"optional": None}),
        ({"optional": "0.5"}, {"optional": 0.5}),
    ],
)
def test_values_are_coerced_to_the_annotated_types(typed, values, expected):
    config = get(typed, values).config
    for key, value in expected.items():
        assert config[key] == value and type(config[key]) is type(value)


def test_coerced_values_give_the_same_experiment(typed):
    assert get(typed, {"rate": 2}).config_hash == get(typed, {"rate": 2.0}).config_hash == get(typed, {"rate": "2"}).config_hash
    assert get(typed, {"flag": "0"}).config_hash == get(typed, {"flag": False}).config_hash


@pytest.mark.parametrize(
    "values, fragments",
    [
        ({"rat": 2}, ["'rat'", "2", "Did you mean 'rate'?"]),
        ({"stepz": "9"}, ["'stepz'", "'9'", "Did you mean 'steps'?"]),
        ({"zzzz": 1}, ["'zzzz'", "Valid keys: rate, steps, flag, name, layers, optional"]),
    ],
)
def test_unknown_keys_name_the_key_the_value_and_the_closest_key(typed, values, fragments):
    with pytest.raises(ConfigError) as raised:
        get(typed, values)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message
    assert "typed" in message


def test_the_template_typo_from_the_issue(plain_project):
    with pytest.raises(ConfigError, match=r"Unknown config key 'time_diliation' \(value 2\) for estimate_gravity\. Did you mean 'time_dilation'\?"):
        get("estimate_gravity", {"time_diliation": 2})


@pytest.mark.parametrize(
    "values, fragments",
    [
        ({"rate": "fast"}, ["Invalid value 'fast' for config key 'rate' of typed: expected a float."]),
        ({"rate": True}, ["True", "'rate'"]),
        ({"steps": 2.5}, ["2.5", "'steps'", "an int"]),
        ({"steps": "three"}, ["'three'", "'steps'"]),
        ({"flag": "maybe"}, ["'maybe'", "'flag'", "true/false, yes/no, on/off, 1/0"]),
        ({"flag": 2}, ["2", "'flag'"]),
        ({"name": 5}, ["5", "'name'", "a string"]),
        ({"layers": '[1, "x"]'}, ["'x'", "'layers[1]' of typed"]),
        ({"layers": "not json"}, ["'not json'", "'layers'"]),
    ],
)
def test_impossible_values_fail_at_get_naming_key_and_value(typed, values, fragments):
    with pytest.raises(ConfigError) as raised:
        get(typed, values)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_config_errors_are_usage_errors():
    assert issubclass(ConfigError, UsageError)


def test_missing_required_value_is_named(plain_project):
    (plain_project / "required.py").write_text(textwrap.dedent("""
        from machinable import Experiment

        class Required(Experiment):
            class Config:
                size: int
    """))
    with pytest.raises(ConfigError, match=r"Missing config value 'size'.*size=\.\.\."):
        get("required")
    assert get("required", {"size": "3"}).config.size == 3


def test_post_init_validation_is_a_config_error(plain_project):
    (plain_project / "validated.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from machinable import Experiment

        class Validated(Experiment):
            @dataclass
            class Config:
                p: float = 0.5

                def __post_init__(self):
                    if not 0 <= self.p <= 1:
                        raise ValueError(f"p must be within [0, 1], got {self.p}")
    """))
    with pytest.raises(ConfigError, match=r"p must be within \[0, 1\], got 2\.0"):
        get("validated", {"p": 2})
    assert get("validated", {"p": "0.25"}).config.p == 0.25


def test_nested_dataclass_config_with_dotted_keys(plain_project):
    (plain_project / "nested.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass, field
        from machinable import Experiment

        @dataclass
        class Optimizer:
            lr: float = 0.1
            momentum: float = 0.0

        class Nested(Experiment):
            class Config:
                optimizer: Optimizer = field(default_factory=Optimizer)
                epochs: int = 1
    """))
    experiment = get("nested", {"optimizer.lr": "0.5", "epochs": 2})
    assert experiment.config.optimizer.lr == 0.5 and experiment.config["optimizer"].momentum == 0.0
    assert get("nested", {"optimizer": {"lr": 0.5}, "epochs": 2}).config_hash == experiment.config_hash
    with pytest.raises(ConfigError, match="'optimizer.lrr'.*Did you mean 'optimizer.lr'"):
        get("nested", {"optimizer.lrr": 1})


def test_an_element_without_config_takes_no_values(plain_project):
    (plain_project / "bare.py").write_text(textwrap.dedent("""
        from machinable import Experiment

        class Bare(Experiment):
            def on_execute(self):
                return "ran"
    """))
    assert get("bare").config.keys() == []
    with pytest.raises(ConfigError, match=r"Unknown config key 'x'.*none: this Config is empty"):
        get("bare", {"x": 1})


# --- the functions behind it ---------------------------------------------------------------


class _WithConfig:
    class Config:
        a: int = 1
        b: float = 0.5


def test_config_class_is_made_once_and_canonical_drops_defaults():
    cls = config_class(_WithConfig)
    assert config_class(_WithConfig) is cls
    assert canonical(make_config(cls, {})) == {}
    assert canonical(make_config(cls, {"a": 2})) == {"a": "i:2"}
    assert canonical(make_config(cls, {"a": 1, "b": 0.25})) == {"b": "f:0.25"}
    assert to_json(make_config(cls, {"a": "3"})) == {"a": 3, "b": 0.5}


def test_coerce_refuses_overflowing_floats_and_non_finite_ints():
    with pytest.raises(ConfigError):
        coerce(10**400, float, "x")
    with pytest.raises(ConfigError):
        coerce(float("inf"), int, "x")
    assert coerce("nan", float, "x") != coerce("nan", float, "x")  # NaN parses, and stays NaN


UNTYPED = """
from dataclasses import dataclass, field
from machinable import Experiment

@dataclass
class Inner:
    depth: int = 1
    width = 4

class Untyped(Experiment):
    {decorator}
    class Config:
        typed: int = 1
        untyped = 5
        nothing = None
        inner: Inner = field(default_factory=Inner)

        def helper(self):
            return 1
"""


@pytest.mark.parametrize("decorator", ["", "@dataclass"])
def test_an_unannotated_attribute_is_named_with_the_annotation_to_write(plain_project, decorator):
    (plain_project / "untyped.py").write_text(UNTYPED.replace("{decorator}", decorator))
    with pytest.raises(ConfigError) as raised:
        get("untyped", {"untyped": 6})
    assert str(raised.value) == (
        "Config key 'untyped' of untyped cannot be set: 'untyped' in Untyped.Config has no type annotation, "
        "so it is a plain class attribute, not a config key. Write `untyped: int = 5` to make it one."
    )
    with pytest.raises(ConfigError, match=r"Write `nothing: Any = None`"):
        get("untyped", {"nothing": 1})
    with pytest.raises(ConfigError, match=r"'inner.width' of untyped cannot be set: 'width' in Inner has no type annotation.*`width: int = 4`"):
        get("untyped", {"inner.width": 8})
    with pytest.raises(ConfigError, match=r"Unknown config key 'helper'"):  # a method is not a forgotten annotation
        get("untyped", {"helper": 1})
    assert get("untyped").config.untyped == 5  # unset, it stays a class attribute


def test_the_command_line_names_an_unannotated_attribute_as_a_usage_error(plain_project):
    from conftest import run_machinable

    (plain_project / "untyped.py").write_text(UNTYPED.replace("{decorator}", ""))
    result = run_machinable(plain_project, "untyped", "untyped=3")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Error: Config key 'untyped' of untyped cannot be set: 'untyped' in Untyped.Config has no type annotation, "
        "so it is a plain class attribute, not a config key. Write `untyped: int = 5` to make it one."
    )


BASE_EXPERIMENT = """
    from dataclasses import dataclass, field
    from machinable import Experiment


    class Base(Experiment):
        {decorator}
        class Config:
            a: int = 1
            tags: list[str] = {tags}

            def __post_init__(self):
                if self.a < 0:
                    raise ValueError(f"a must not be negative, got {{self.a}}")

        def on_execute(self):
            return self.compute()

        def compute(self):
            return self.config.a
"""

DERIVED_EXPERIMENT = """
    from __future__ import annotations

    from dataclasses import dataclass
    from base_experiment import Base


    class Derived(Base):
        {decorator}
        class Config(Base.Config):
            b: int = 2
            a: int = 10  # a new default for an inherited key

        def compute(self):
            return self.config.a + self.config.b + len(self.config.tags)
"""


@pytest.mark.parametrize("decorator", ["", "@dataclass"])
def test_a_config_inherits_the_keys_defaults_and_checks_of_its_base(plain_project, decorator):
    tags = '["x"]' if not decorator else 'field(default_factory=lambda: ["x"])'
    (plain_project / "base_experiment.py").write_text(textwrap.dedent(BASE_EXPERIMENT.format(decorator=decorator, tags=tags)))
    (plain_project / "derived.py").write_text(textwrap.dedent(DERIVED_EXPERIMENT.format(decorator=decorator)))

    derived = get("derived")
    assert derived.config.keys() == ["a", "tags", "b"]  # base keys first, as for a dataclass subclass
    assert (derived.config.a, derived.config["b"], derived.config.tags) == (10, 2, ["x"])
    assert get("derived", {"a": "5", "b": 1}).config.a == 5  # inherited keys are coerced like own ones
    with pytest.raises(ConfigError, match=r"a must not be negative, got -1"):  # the base's check still runs
        get("derived", {"a": -1})
    with pytest.raises(ConfigError, match=r"Unknown config key 'c'"):
        get("derived", {"c": 1})
    assert get("derived", {"a": 10}).config_hash == derived.config_hash  # a default given explicitly
    derived.launch()
    assert derived.result == 13
    assert get("base_experiment").config.keys() == ["a", "tags"]  # the base is unchanged


def test_a_base_config_with_postponed_annotations_in_another_module_keeps_its_types(plain_project):
    (plain_project / "typed_base.py").write_text(textwrap.dedent("""
        from __future__ import annotations

        from dataclasses import dataclass
        from typing import Literal

        from machinable import Experiment


        @dataclass
        class Shared:
            lr: float = 0.1
            mode: Literal["a", "b"] = "a"


        class TypedBase(Experiment):
            Config = Shared

            def on_execute(self):
                return self.config.lr
    """))
    (plain_project / "typed_derived.py").write_text(textwrap.dedent("""
        from typed_base import Shared, TypedBase


        class TypedDerived(TypedBase):
            class Config(Shared):
                epochs: int = 3
                data: str  # a required key after the base's defaults
    """))
    derived = get("typed_derived", {"lr": "2", "data": "x"})
    assert (derived.config.lr, derived.config.epochs, derived.config.data) == (2.0, 3, "x")  # coerced: "2" -> 2.0
    with pytest.raises(ConfigError, match=r"mode"):  # the Literal of the base module still checks
        get("typed_derived", {"mode": "zzz", "data": "x"})
    with pytest.raises(ConfigError, match=r"Missing config value 'data'"):
        get("typed_derived")
    assert "epochs=3" in repr(derived.config) and "lr=2.0" in repr(derived.config)  # the base's repr does not hide keys
