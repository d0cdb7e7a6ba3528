"""Typed ``Config`` handling: dataclass conversion, coercion, canonical form.

A module's element declares ``class Config`` (with or without
``@dataclass``). Values given to ``get()`` or on the command line are coerced
to the annotated types; unknown keys and impossible values fail early with an
error naming the key, the value and the closest valid key.

The canonical form drops values equal to their default and tags every scalar
with its type, so ``1`` and ``1.0`` and ``"1"`` never collide and adding a new
field with a default leaves existing config hashes unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import sys
import types
import typing
from typing import Any, Literal, Union

from machinable.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigMixin:
    """Gives config instances ``config['key']`` besides ``config.key``."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


class _EmptyConfig:
    pass


def config_class(element_cls: type) -> type:
    """The frozen dataclass behind ``element_cls.Config`` (made once per class)."""
    cached = element_cls.__dict__.get("_machinable_config_class")
    if cached is not None:
        return cached
    declared = getattr(element_cls, "Config", None) or _EmptyConfig
    made = _as_dataclass(declared)
    setattr(element_cls, "_machinable_config_class", made)
    return made


def _as_dataclass(declared: type) -> type:
    """A frozen dataclass with the keys, defaults and methods of ``declared``
    and of the classes it inherits from (``class Config(Base.Config)``), the
    nearest definition winning, as for a dataclass subclass."""
    namespace: dict[str, Any] = {}
    annotations: dict[str, Any] = {}
    for klass in reversed(declared.__mro__):
        if klass is object or klass is ConfigMixin:
            continue
        own, own_annotations = _declared_namespace(klass)
        namespace.update(own)
        annotations.update(own_annotations)
    for key in annotations:
        value = namespace.get(key, dataclasses.MISSING)
        if isinstance(value, (list, dict, set)):
            namespace[key] = dataclasses.field(default_factory=_copier(value))
    namespace["__annotations__"] = annotations
    namespace["__module__"] = declared.__module__
    namespace["__qualname__"] = declared.__qualname__
    namespace["__doc__"] = declared.__doc__
    cls = type(declared.__name__, (ConfigMixin,), namespace)
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)  # kw_only: a base default may precede a required key


def _own_annotations(klass: type) -> dict[str, Any]:
    """A class's own annotations, resolved in its own module: a base Config in a
    module with ``from __future__ import annotations`` has strings that only
    that module's names resolve. One that does not resolve stays a string."""
    module = sys.modules.get(klass.__module__)
    globalns = dict(getattr(module, "__dict__", {}))
    out = {}
    for key, annotation in dict(vars(klass).get("__annotations__", {})).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, globalns, dict(vars(klass)))  # noqa: S307 - as typing.get_type_hints does
            except Exception:
                pass
        out[key] = annotation
    return out


def _declared_namespace(declared: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """What one class of a Config's hierarchy declares itself: attributes and annotations."""
    namespace = {
        key: value
        for key, value in vars(declared).items()
        if key not in ("__dict__", "__weakref__", "__dataclass_fields__", "__dataclass_params__",
                       "__annotations__", "__module__", "__qualname__", "__doc__")
    }
    annotations = _own_annotations(declared)
    if dataclasses.is_dataclass(declared):
        import inspect

        # drop what @dataclass generated (__init__, __eq__, ...; compiled from "<string>"), so the
        # frozen dataclass made from it generates its own; methods the user wrote are kept
        namespace = {
            key: value
            for key, value in namespace.items()
            if key != "__match_args__"
            and not (key == "__hash__" and value is None)
            and getattr(getattr(inspect.unwrap(value) if callable(value) else value, "__code__", None),
                        "co_filename", None) != "<string>"  # (a generated __repr__ is wrapped)
        }
        # keep defaults and factories the user declared with field() (in this class: inherited
        # fields come from the base class's own turn)
        for f in dataclasses.fields(declared):
            if f.name not in annotations:
                continue
            if f.default is not dataclasses.MISSING:
                namespace[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                namespace[f.name] = dataclasses.field(default_factory=f.default_factory)
    return namespace, annotations


def _copier(value: Any) -> Any:
    import copy

    return lambda: copy.deepcopy(value)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to raw
        return dict(getattr(cls, "__annotations__", {}))


def fields_of(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (type, default or MISSING)."""
    hints = _hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out[f.name] = (hints.get(f.name, f.type), default)
    return out


def _unflatten(values: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (for nested dataclass configs)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"Config keys must be strings, got {key!r}.")
        if "." in key:
            head, rest = key.split(".", 1)
            if not head or not rest:
                raise ConfigError(f"Invalid config key {key!r}.")
            nested = out.setdefault(head, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"Config key {head!r} is given both as a value and with nested keys.")
            nested[rest] = value
        else:
            if key in out and isinstance(out[key], dict) and isinstance(value, dict):
                out[key].update(value)
            else:
                out[key] = value
    return out


def make_config(cls: type, values: dict[str, Any] | None, *, where: str = "", path: str = "") -> Any:
    """Build a config instance from user values, coercing and validating.

    ``where`` names the module in error messages; ``path`` is the key prefix of a nested config.
    """
    values = _unflatten(dict(values or {}))
    fields = fields_of(cls)
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise unknown_key_error(unknown[0], values[unknown[0]], list(fields), where=where, path=path, cls=cls)
    kwargs: dict[str, Any] = {}
    for name, (annotation, default) in fields.items():
        label = f"{path}{name}"
        if name in values:
            kwargs[name] = coerce(values[name], annotation, label, where)
        elif default is dataclasses.MISSING:
            raise ConfigError(f"Missing config value {label!r}{' for ' + where if where else ''}: it has no default; pass {label}=...")
        elif dataclasses.is_dataclass(annotation) and isinstance(default, dict):
            kwargs[name] = coerce(default, annotation, label, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # user __post_init__ validation
        raise ConfigError(f"Invalid config{' for ' + where if where else ''}: {e}") from e


def unknown_key_error(key: str, value: Any, keys: list[str], *, where: str = "", path: str = "",
                      cls: type | None = None) -> ConfigError:
    """The error for a key that is not in the Config: with the closest valid key and all of them
    (or, for an attribute of ``cls`` written without a type annotation, how to make it a key)."""
    default = _unannotated(cls, key) if cls is not None else dataclasses.MISSING
    if default is not dataclasses.MISSING:
        kind = type(default).__name__ if default is not None else "Any"
        spelled = repr(default) if len(repr(default)) <= 40 else "..."
        return ConfigError(
            f"Config key {path + key!r}{' of ' + where if where else ''} cannot be set: {key!r} in "
            f"{cls.__qualname__} has no type annotation, so it is a plain class attribute, not a config key. "  # type: ignore[union-attr]
            f"Write `{key}: {kind} = {spelled}` to make it one."
        )
    close = close_keys(key, keys)
    hint = f" Did you mean {path + close[0]!r}?" if close else ""
    valid = ", ".join(keys) or "(none: this Config is empty)"
    return ConfigError(
        f"Unknown config key {path + key!r} (value {value!r}){' for ' + where if where else ''}.{hint} "
        f"Valid keys: {valid}."
    )


def _unannotated(cls: type, key: str) -> Any:
    """The value of a public attribute of a Config written without an annotation
    (``untyped = 5``), or MISSING: dataclasses ignore such attributes."""
    if key.startswith("_"):
        return dataclasses.MISSING
    for klass in cls.__mro__:
        if klass in (ConfigMixin, object) or key not in vars(klass):
            continue
        value = vars(klass)[key]
        if isinstance(value, (types.FunctionType, staticmethod, classmethod, property, type)):
            return dataclasses.MISSING  # behaviour, not a value
        return value
    return dataclasses.MISSING


def close_keys(key: str, keys: list[str]) -> list[str]:
    """The valid key a mistyped ``key`` most likely meant: case-insensitive first (``LR`` -> ``lr``)."""
    same = [k for k in keys if k.lower() == key.lower()]
    if same:
        return same[:1]
    lowered = {k.lower(): k for k in keys}
    return [lowered[k] for k in difflib.get_close_matches(key.lower(), list(lowered), n=1)]


def _integral_float(text: str) -> int | None:
    """``"3.0"``/``"3e2"`` -> 3/300; None unless the text is a float holding an exact integer."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    if math.isfinite(number) and number.is_integer() and abs(number) <= 2**53:
        return int(number)
    return None


def _bad(label: str, value: Any, expected: str, where: str = "") -> ConfigError:
    of = f" of {where}" if where else ""
    return ConfigError(f"Invalid value {value!r} for config key {label!r}{of}: expected {expected}.")


def coerce(value: Any, annotation: Any, label: str = "value", where: str = "") -> Any:
    """Coerce ``value`` to ``annotation`` or raise a ConfigError naming ``label``."""
    if annotation is Any or annotation is dataclasses.MISSING or annotation is None and value is None:
        return value
    if isinstance(annotation, str):  # unresolved forward reference
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, label, where)
            except ConfigError as e:
                errors.append(e)
        raise _bad(label, value, " or ".join(_name(a) for a in args), where)
    if origin is Literal:
        for option in args:
            if value == option or (isinstance(value, str) and str(option) == value):
                return option
        raise _bad(label, value, "one of " + ", ".join(repr(a) for a in args), where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(label, value, "a bool (true/false, yes/no, on/off, 1/0)", where)
    if annotation is int:
        if isinstance(value, bool):
            raise _bad(label, value, "an int", where)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
            number = _integral_float(value)
            if number is not None:  # "3.0" like the float 3.0 (exact integers only)
                return number
        raise _bad(label, value, "an int", where)
    if annotation is float:
        if isinstance(value, bool):
            raise _bad(label, value, "a float", where)
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:
                raise _bad(label, value, "a float within range", where) from None
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad(label, value, "a float", where)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _bad(label, value, "a string", where)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        for member in annotation:
            if value == member.value or value == member.name:
                return member
        raise _bad(label, value, "one of " + ", ".join(m.name for m in annotation), where)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, str):
            value = _parse_json_text(value, label, where)
        if not isinstance(value, dict):
            raise _bad(label, value, f"a mapping for {_name(annotation)}", where)
        nested = annotation if issubclass(annotation, ConfigMixin) else _as_dataclass(annotation)
        return make_config(nested, value, where=where, path=label + ".")
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset):
        if isinstance(value, str):
            value = _parse_json_text(value, label, where)
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise _bad(label, value, _name(annotation), where)
        container = origin or annotation
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _bad(label, value, f"{len(args)} items", where)
            return tuple(coerce(v, a, f"{label}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{label}[{i}]", where) for i, v in enumerate(value)]
        return container(items) if container is not list else items
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = _parse_json_text(value, label, where)
        if not isinstance(value, dict):
            raise _bad(label, value, "a mapping", where)
        key_t, val_t = args if args else (Any, Any)
        return {coerce(k, key_t, label, where): coerce(v, val_t, f"{label}.{k}", where) for k, v in value.items()}
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _bad(label, value, _name(annotation), where)
    return value


def _parse_json_text(text: str, label: str, where: str = "") -> Any:
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _bad(label, text, "JSON text (for example [1, 2] or {\"a\": 1})", where) from None


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# --- canonical form ----------------------------------------------------------


def tag(value: Any) -> Any:
    """Type-tagged canonical value: every scalar carries its type."""
    if value is None:
        return "n:"
    if isinstance(value, bool):
        return "b:" + ("1" if value else "0")
    if isinstance(value, enum.Enum):
        return f"e:{type(value).__name__}.{value.name}"
    if isinstance(value, int):
        return f"i:{value}"
    if isinstance(value, float):
        return f"f:{value!r}"
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, bytes):
        return "x:" + value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"d:": canonical(value)}
    if isinstance(value, dict):
        return {"m:": {str(tag(k)): tag(v) for k, v in value.items()}}
    if isinstance(value, (set, frozenset)):
        return {"set:": sorted((tag(v) for v in value), key=repr)}
    if isinstance(value, (list, tuple)):
        return [tag(v) for v in value]
    raise ConfigError(
        f"Config value {value!r} of type {type(value).__name__} has no canonical form; "
        "use JSON-like values (numbers, strings, bools, None, lists, dicts, enums, dataclasses)."
    )


def canonical(config: Any) -> dict[str, Any]:
    """Non-default fields, type-tagged, ready for canonical JSON."""
    out: dict[str, Any] = {}
    for name, (_, default) in fields_of(type(config)).items():
        value = getattr(config, name)
        tagged = tag(value)
        if default is not dataclasses.MISSING:
            try:
                if tag(default) == tagged:
                    continue
            except ConfigError:
                pass
        out[name] = tagged
    return out


def to_json(value: Any) -> Any:
    """A JSON-safe copy of a config (every field, defaults included).

    Non-finite floats become ``"nan"``/``"inf"``/``"-inf"`` and integers
    beyond 64 bits become strings; both coerce back through ``make_config``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (str, int, float)) else value.name
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(v) for v in value]
    return repr(value)


def check_storable(cls: type, config: Any, *, where: str = "") -> None:
    """Refuse a config that would not come back the same from its stored JSON.

    Records store ``to_json(config)``, and resumes in other processes, pool
    workers, cluster jobs and reproductions rebuild the config from it. In a
    field without a precise type, JSON cannot carry NaN, infinity, integers
    beyond 64 bits, bytes, sets or non-string keys (they would come back as
    strings or lists), nor strings with lone surrogates: such a config is
    refused before anything is stored, naming the key.
    """
    if _plain_json(config):
        return  # stored exactly as it is: nothing can change on the way back
    import orjson

    of = f" of {where}" if where else ""
    for f in dataclasses.fields(config):
        try:
            orjson.dumps(to_json(getattr(config, f.name)))
        except TypeError as e:
            raise ConfigError(f"Config value of key {f.name!r}{of} cannot be stored as JSON: {e}.") from None
    try:
        again = make_config(cls, to_json(config), where=where)
        if canonical(again) == canonical(config):
            return
    except ConfigError:
        again = None
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        back = getattr(again, f.name, None) if again is not None else None
        try:
            same = again is not None and tag(back) == tag(value)
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(
                f"Config value {value!r} of key {f.name!r}{of} would not come back the same from storage "
                f"(stored as {to_json(value)!r}): JSON has no NaN or infinity, no integers beyond 64 bits, no bytes "
                "or sets, and only string keys. Annotate the key with its type (for example float or int), "
                "or use a JSON value."
            )


def _plain_json(value: Any) -> bool:
    """True for values JSON stores and returns unchanged (a fast path)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return value.isascii() or _utf8(value)
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(k) and _plain_json(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_plain_json(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def defaults_of(cls: type) -> dict[str, Any]:
    return {name: default for name, (_, default) in fields_of(cls).items() if default is not dataclasses.MISSING}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
