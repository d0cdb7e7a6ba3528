"""What one stored experiment holds, section by section (``machinable show``),
and what differs between two (``machinable diff A B``, ``experiment.diff(other)``).

Everything is read from the experiment directories and ``.objects`` alone:
no user code is imported, so a record whose module was deleted or broken
since still shows and diffs. A missing or damaged file marks its section as
damaged instead of failing the whole view.

A diff shows only what differs, section by section (config, code, git,
environment, outputs), and says in one line why the two ids differ: the
config keys, the files of the import closure, the seed.
"""

from __future__ import annotations

import ast
import difflib
import math
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from machinable.storage import dumps_value, loads_value

SECTIONS = ("config", "code", "git", "environment", "outputs")
_ENV_KEYS = ("python", "implementation", "platform", "machine", "machinable", "executable")
_UNKNOWN = object()  # a default the stored source does not spell as a literal
OUTPUT_TAIL = 20


# --- one experiment --------------------------------------------------------------------


class Snapshot:
    """Everything stored about one experiment, read lazily and damage-tolerantly.

    ``problems`` maps a section to what is wrong with its files; every
    accessor returns an empty value for a damaged part instead of raising.
    """

    def __init__(self, storage: Any, experiment_id: str) -> None:
        self.storage = storage
        self.experiment_id = experiment_id
        self.directory: Path = storage.directory(experiment_id)
        self.problems: dict[str, str] = {}

    @classmethod
    def of(cls, target: Any, storage: Any = None) -> "Snapshot":
        """A snapshot of an ``Experiment``, or of an id (any unique prefix)."""
        if isinstance(target, Snapshot):
            return target
        if isinstance(target, str):
            from machinable.storage import Storage

            storage = storage or Storage.current()
            return cls(storage, storage.resolve(target))
        experiment_id = getattr(target, "experiment_id", None)
        if experiment_id is None:
            raise TypeError(f"Expected an experiment or an id, got {target!r}")
        snapshot = cls(storage or target.storage, experiment_id)
        if not snapshot.directory.is_dir():
            from machinable.errors import ExperimentNotFound

            raise ExperimentNotFound(
                f"Experiment {experiment_id[:12]} ({getattr(target, 'module', '?')}) is not stored yet: "
                "launch() it (or commit() it) before showing or comparing it."
            )
        return snapshot

    def __repr__(self) -> str:
        return self.render()

    def __str__(self) -> str:
        return self.render()

    @property
    def short_id(self) -> str:
        return self.experiment_id[:12]

    # --- reading, damage-tolerant ---------------------------------------------------

    def _json(self, name: str, section: str) -> dict[str, Any]:
        from machinable.errors import StorageError
        from machinable.storage import read_json

        try:
            return read_json(self.directory / name)
        except FileNotFoundError:
            self.problems.setdefault(section, f"{name} is missing")
        except (StorageError, OSError) as e:
            self.problems.setdefault(section, f"{name} is damaged: {e}")
        return {}

    def _lines(self, name: str, section: str) -> tuple[list[dict[str, Any]], int, bool]:
        """Rows of a JSON-lines file, how many lines are damaged, and whether the last is torn."""
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:
            return [], 0, False
        except OSError as e:
            self.problems.setdefault(section, f"{name} cannot be read: {e}")
            return [], 0, False
        lines = data.split(b"\n")
        torn = bool(lines[-1].strip())
        rows, damaged = [], 0
        for line in lines[:-1]:
            if not line.strip():
                continue
            try:
                row = loads_value(line)  # record rows may hold NaN or Infinity
            except orjson.JSONDecodeError:
                damaged += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                damaged += 1
        if damaged:
            self.problems.setdefault(section, f"{name}: {damaged} damaged line{'s' if damaged != 1 else ''} skipped")
        return rows, damaged, torn

    @cached_property
    def record(self) -> dict[str, Any]:
        return self._json("experiment.json", "experiment")

    @property
    def damaged(self) -> bool:
        return not self.record

    @property
    def module(self) -> str:
        return str(self.record.get("module", "?"))

    @property
    def seed(self) -> Any:
        return self.record.get("seed")

    @property
    def config_hash(self) -> str | None:
        return self.record.get("config_hash")

    @property
    def code_hash(self) -> str | None:
        return self.record.get("code_hash")

    @cached_property
    def config(self) -> dict[str, Any]:
        """Flat config values (``{"model.lr": 0.1}``), defaults included."""
        from machinable.config import flatten

        config = self.record.get("config", {})
        if not isinstance(config, dict):
            self.problems.setdefault("config", "experiment.json holds no config mapping")
            return {}
        return flatten(config)

    @cached_property
    def code(self) -> dict[str, dict[str, str]]:
        """Import closure: project-relative path -> {"normalized": digest, "object": digest}."""
        files = self._json("code.json", "code").get("files", {})
        return files if isinstance(files, dict) else {}

    def source(self, path: str) -> bytes | None:
        """The stored source of one closure file (from ``.objects``), or None."""
        from machinable.storage import get_object

        entry = self.code.get(path)
        if not isinstance(entry, dict) or not isinstance(entry.get("object"), str):
            return None
        try:
            return get_object(self.storage.root, entry["object"])
        except (OSError, IndexError):
            return None

    @cached_property
    def git_files(self) -> tuple[str, str]:
        """The git state the experiment ran with: its finishing (else last) attempt's,
        which differs from git.json/git.diff (the state at creation) after a resume
        at another commit or with other uncommitted changes."""
        from machinable.ledger import Ledger

        return Ledger(self.directory).git_files(self.events)

    @cached_property
    def git(self) -> dict[str, Any]:
        return self._json(self.git_files[0], "git")

    @cached_property
    def git_diff(self) -> bytes:
        try:
            return (self.directory / self.git_files[1]).read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            self.problems.setdefault("git", f"git.diff cannot be read: {e}")
            return b""

    @cached_property
    def environment(self) -> dict[str, Any]:
        return self._json("env.json", "environment")

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        rows, _, _ = self._lines("events.jsonl", "events")
        return rows

    @cached_property
    def attempts(self) -> int:
        from machinable.ledger import Ledger

        return Ledger(self.directory).attempts(self.events)

    @cached_property
    def state(self) -> str:
        from machinable.ledger import Ledger

        if self.damaged:
            return "damaged"
        try:
            return Ledger(self.directory).state(self.events)
        except (KeyError, TypeError, OSError):
            return "damaged"

    @cached_property
    def _records(self) -> tuple[list[dict[str, Any]], int, bool]:
        return self._lines("records.jsonl", "records")

    @property
    def records(self) -> list[dict[str, Any]]:
        return self._records[0]

    @cached_property
    def records_summary(self) -> dict[str, dict[str, Any]]:
        from machinable.experiment import summarize_records

        return summarize_records(self.records)

    @cached_property
    def data_files(self) -> dict[str, dict[str, Any]]:
        """data/ files: relative name -> {"size", "digest"}."""
        from machinable.hashing import file_digest

        base = self.directory / "data"
        out: dict[str, dict[str, Any]] = {}
        if not base.is_dir():
            return out
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            try:
                out[path.relative_to(base).as_posix()] = {"size": path.stat().st_size, "digest": file_digest(path)}
            except OSError as e:
                self.problems.setdefault("outputs", f"data/{path.name} cannot be read: {e}")
        return out

    @cached_property
    def result(self) -> Any:
        """The returned value (JSON), ``{"pickle": digest}`` for a pickled one, None if none."""
        data = self.directory / "data"
        try:
            return loads_value((data / "result.json").read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, orjson.JSONDecodeError) as e:
            self.problems.setdefault("outputs", f"data/result.json is damaged: {e}")
            return None
        pickled = self.data_files.get("result.pickle")
        return {"pickle": pickled["digest"]} if pickled else None

    @cached_property
    def result_shown(self) -> Any:
        """The result as show and diff print it: a pickled one as ``{"pickle": digest, "repr": text}``."""
        result = self.result
        if isinstance(result, dict) and set(result) == {"pickle"} and "result.pickle" in self.data_files:
            return {"pickle": result["pickle"], "repr": self.unpickled_result_repr()}
        return result

    def unpickled_result_repr(self, limit: int = 200) -> str:
        """``repr()`` of the pickled result, loaded from this record's own folder
        only (unpickling runs code: never from a file a symlink leads to)."""
        import pickle
        import sys

        path = self.directory / "data" / "result.pickle"
        try:
            if path.is_symlink() or path.resolve().parent != (self.directory / "data").resolve():
                return "(not loaded: data/result.pickle is a link out of the record)"
            data = path.read_bytes()
        except OSError as e:
            return f"(cannot be read: {e})"
        project = self.record.get("project")
        added = isinstance(project, str) and Path(project).is_dir() and project not in sys.path
        if added:
            sys.path.insert(0, project)  # the result's classes live in the project's modules
        try:
            value = pickle.loads(data)  # noqa: S301 - the record's own file, as experiment.result loads it
            text = repr(value)
        except Exception as e:
            return f"(a pickle of {_size(len(data))} that cannot be loaded here: {type(e).__name__}: {e})"
        finally:
            if added and project in sys.path:
                sys.path.remove(project)
        text = text.replace("\n", " ")
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def output_tail(self, lines: int = OUTPUT_TAIL) -> list[str]:
        try:
            with open(self.directory / "output.log", "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            self.problems.setdefault("output", f"output.log cannot be read: {e}")
            return []
        return text.splitlines()[-lines:] if lines else []

    @cached_property
    def output_lines(self) -> int:
        lines = 0
        try:
            with open(self.directory / "output.log", "rb") as f:
                while block := f.read(1 << 20):
                    lines += block.count(b"\n")
        except OSError:
            pass
        return lines

    @cached_property
    def output_digest(self) -> str | None:
        from machinable.hashing import file_digest

        try:
            return file_digest(self.directory / "output.log")
        except OSError:
            return None

    @cached_property
    def defaults(self) -> dict[str, Any]:
        """Flat config defaults as the stored sources of the import closure spell them."""
        source = self.module_source(self.module)
        return config_defaults(source, self.module_source) if source is not None else {}

    def module_source(self, name: str) -> bytes | None:
        """The stored source of a project module of the closure, by dotted name."""
        module = name.replace(".", "/")
        for path in (f"{module}.py", f"{module}/__init__.py"):
            if path in self.code:
                return self.source(path)
        return None

    def is_default(self, key: str) -> bool | None:
        """Whether a (flat) config value equals its default; None when unknown."""
        default = self.defaults.get(key, _UNKNOWN)
        if default is _UNKNOWN:
            return None
        return _same(self.config.get(key), default)

    # --- views ------------------------------------------------------------------------

    def _times(self) -> dict[str, Any]:
        started = next((e.get("time") for e in self.events if e.get("event") == "started"), None)
        ended = None
        for event in self.events:
            if event.get("event") in ("finished", "failed", "interrupted"):
                ended = event.get("time")
        from machinable.index import attempt_durations

        attempts = attempt_durations(self.events)
        known = [seconds for seconds in attempts if seconds is not None]
        return {"created": self.record.get("timestamp"), "started": started, "ended": ended,
                "duration": sum(known) if ended and known else None,
                "attempt_durations": attempts}

    def _execution(self) -> str | None:
        execution = None
        for event in self.events:
            info = event.get("execution")
            if isinstance(info, dict) and info.get("module"):
                execution = info["module"]
        return execution

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.experiment_id,
            "module": self.module,
            "state": self.state,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "code_hash": self.code_hash,
            **self._times(),
            "attempts": self.attempts,
            "execution": self._execution(),
            "config": {k: {"value": v, "default": self.is_default(k)} for k, v in self.config.items()},
            "code": {path: entry.get("normalized") for path, entry in self.code.items() if isinstance(entry, dict)},
            "git": {k: self.git.get(k) for k in ("commit", "branch", "dirty", "changed_files", "untracked_files", "remote") if k in self.git}
            | {"uncommitted_diff_bytes": len(self.git_diff), "recorded_in": self.git_files[0]},
            "environment": self.environment,
            "events": self.events,
            "records": {"rows": len(self.records), "damaged_lines": self._records[1], "summary": self.records_summary},
            "data": self.data_files,
            "result": self.result_shown,
            "output_tail": self.output_tail(),
            "reproductions": _reproductions_json(self.directory),
            "problems": {**self.problems, **({"record": "; ".join(self.integrity)} if self.integrity else {})},
        }

    @cached_property
    def integrity(self) -> list[str]:
        """Damage visible without re-hashing: a ledger that cannot be read or
        contradicts the seal, a deleted MANIFEST (``file: problem`` lines)."""
        from machinable.storage import ledger_problems

        return ledger_problems(self.directory)

    def render(self) -> str:
        """The text of ``machinable show``."""
        lines: list[str] = []
        times = self._times()
        attempts = self.attempts
        lines.append(f"experiment {self.experiment_id}")
        for problem in self.integrity:
            lines.append(f"  DAMAGED: {problem} (`machinable verify {self.short_id}` checks every file)")
        if self.damaged:
            lines.append(f"  DAMAGED: {self.problems.get('experiment', 'experiment.json cannot be read')}")
            lines.append(f"  folder: {self.directory}")
        else:
            head = [
                ("module", self.module),
                ("state", self.state + (f" (attempt {attempts})" if attempts > 1 else "")),
                ("seed", str(self.seed)),
                ("created", _when(times["created"])),
            ]
            if times["started"]:
                head.append(("started", _when(times["started"])))
            if times["ended"]:
                head.append(("ended", f"{_when(times['ended'])} ({_took(times['duration'], times['attempt_durations'])})"))
            execution = self._execution()
            if execution:
                head.append(("execution", execution))
            head += [("config hash", str(self.config_hash)), ("code hash", str(self.code_hash)), ("folder", str(self.directory))]
            lines += _aligned(head)
        lines += self._render_config()
        lines += self._render_code()
        lines += self._render_git()
        lines += self._render_environment()
        lines += self._render_events()
        lines += self._render_outputs()
        lines += self._render_reproductions()
        return "\n".join(lines)

    def _section(self, title: str, key: str | None = None) -> list[str]:
        problem = self.problems.get(key or title)
        return [title + (f"  [DAMAGED: {problem}]" if problem else "")]

    def _render_config(self) -> list[str]:
        if self.damaged:
            return []
        out = self._section("config")
        if not self.config:
            return out + ["  (no config values)"]
        width = max(len(k) for k in self.config)
        for key, value in self.config.items():
            mark = {True: "  (default)", False: "", None: ""}[self.is_default(key)]
            out.append(f"  {key.ljust(width)}  {_fmt(value)}{mark}")
        return out

    def _render_code(self) -> list[str]:
        if self.damaged:
            return []
        out = self._section("code (import closure)", "code")
        for path, entry in self.code.items():
            digest = entry.get("normalized", "?") if isinstance(entry, dict) else "?"
            stored = "" if self.source(path) is not None else "  (source not stored)"
            out.append(f"  {path}  {digest}{stored}")
        return out

    def _render_git(self) -> list[str]:
        if self.damaged:
            return []
        out = self._section("git")
        git = self.git
        if not git:
            return out
        if not git.get("repository", True):
            return out + [f"  {git.get('note', 'not a git repository')}"]
        state = "clean"
        if git.get("dirty"):
            parts = []
            if git.get("changed_files"):
                parts.append(f"{len(git['changed_files'])} changed")
            if git.get("untracked_files"):
                parts.append(f"{len(git['untracked_files'])} untracked")
            state = f"dirty ({', '.join(parts) or 'uncommitted changes'}; {len(self.git_diff):,} byte diff recorded in {self.git_files[1]})"
        out.append(f"  commit {git.get('commit') or '(none)'} on {git.get('branch') or '(detached HEAD)'}, {state}")
        if self.git_files[0] != "git.json":
            created = self._json("git.json", "git")
            was = "dirty" if created.get("dirty") else "clean"
            folder = self.git_files[0].rsplit("/", 1)[0]
            out.append(f"  (attempt {folder.split('/')[-1]} ran with this state, recorded in {folder}/; "
                       f"at creation: commit {created.get('commit') or '(none)'}, {was})")
        if git.get("remote"):
            out.append(f"  remote {git['remote']}")
        for path in (git.get("changed_files") or [])[:20]:
            out.append(f"  M {path}")
        for path in (git.get("untracked_files") or [])[:20]:
            out.append(f"  ? {path}")
        return out

    def _render_environment(self) -> list[str]:
        if self.damaged:
            return []
        env = self.environment
        out = self._section("environment")
        if not env:
            return out
        out.append(f"  python {env.get('python', '?')} ({env.get('implementation', '?')}) on {env.get('platform', '?')}")
        out.append(f"  machinable {env.get('machinable', '?')}")
        packages = env.get("packages") or {}
        if packages:
            out.append("  packages: " + ", ".join(f"{name} {version or '(not installed)'}" for name, version in sorted(packages.items())))
        return out

    def _render_events(self) -> list[str]:
        out = self._section("events")
        for event in self.events:
            extra = []
            if event.get("attempt") is not None:
                extra.append(f"attempt {event['attempt']}")
            info = event.get("execution")
            if isinstance(info, dict) and info.get("module"):
                extra.append(info["module"])
            for key in ("error", "reason"):
                if event.get(key):
                    extra.append(str(event[key]))
            detail = f"  ({'; '.join(extra)})" if extra else ""
            out.append(f"  {_when(event.get('time'))}  {event.get('event', '?')}{detail}")
        failed = [e for e in self.events if e.get("event") == "failed" and e.get("traceback")]
        if failed and self.state == "failed":
            out.append("  traceback of the last failure:")
            out += ["    " + line for line in str(failed[-1]["traceback"]).rstrip().splitlines()]
        return out

    def _render_reproductions(self) -> list[str]:
        from machinable.reproduce import describe_attempt, read_reproductions

        attempts = read_reproductions(self.directory)
        if not attempts:
            return []
        return ["reproductions (machinable reproduce)"] + [
            f"  {_when(attempt.get('time'))}  {describe_attempt(attempt)}" for attempt in attempts
        ]

    def _render_outputs(self) -> list[str]:
        rows, damaged, torn = self._records
        out = self._section(f"records ({len(rows)} row{'s' if len(rows) != 1 else ''})", "records")
        if torn and self.state not in ("running",):
            out.append("  (the last line is incomplete: a write was interrupted)")
        out += _render_summary(self.records_summary)
        if self.data_files:
            out += self._section("data", "outputs")
            for name, info in self.data_files.items():
                out.append(f"  {name}  {_size(info['size'])}  {info['digest']}")
        if self.result is not None:
            out.append(f"result  {_fmt(self.result_shown, 200)}")
        tail = self.output_tail()
        out += self._section(f"output (last {len(tail)} lines of output.log)" if tail else "output (empty)", "output")
        out += ["  " + line for line in tail]
        return out


def config_defaults(source: bytes, load: Any = None) -> dict[str, Any]:
    """Flat defaults of a module's ``Config``, read from its source without running it.

    Finds the Config nested in the element class, or assigned there
    (``Config = Config``, ``Config = TrainConfig``: a class of the module, or
    one imported from a project module that ``load(dotted_name)`` returns the
    source of). Knows literal defaults (``x: float = 1.0``), ``field(default=...)``,
    ``field(default_factory=list)`` or a lambda returning a literal, nested
    dataclasses (``field(default_factory=Optimizer)``, keys ``optimizer.lr``)
    and enum members; others map to an unknown marker.
    """
    from machinable.config import flatten

    module = _parse(source)
    if module is None:
        return {}
    config = _find_config(module, load)
    if config is None:
        return {}
    return flatten(_class_defaults(*config, load, 0))


def _parse(source: bytes | None) -> ast.Module | None:
    if source is None:
        return None
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def _find_config(module: ast.Module, load: Any) -> tuple[ast.ClassDef, ast.Module] | None:
    for node in module.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.ClassDef) and item.name == "Config":
                return item, module
            target = item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else getattr(item, "target", None)
            if isinstance(item, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name) and target.id == "Config":
                if isinstance(item.value, ast.Name):
                    return _class_named(module, item.value.id, load)
    return None


def _class_named(module: ast.Module, name: str, load: Any, depth: int = 0) -> tuple[ast.ClassDef, ast.Module] | None:
    """The class a name means in a module: defined there, or imported from a project module."""
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module
    if load is None or depth > 3:
        return None
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    other = _parse(load(node.module))
                    return _class_named(other, alias.name, load, depth + 1) if other is not None else None
    return None


def _class_defaults(cls: ast.ClassDef, module: ast.Module, load: Any, depth: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value is not None:
            defaults[statement.target.id] = _default_value(statement.value, module, load, depth)
    return defaults


def _default_value(node: ast.expr, module: ast.Module, load: Any, depth: int) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if depth > 5:
        return _UNKNOWN
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name == "field":
            if "default" in keywords:
                return _default_value(keywords["default"], module, load, depth + 1)
            if "default_factory" in keywords:
                return _factory_value(keywords["default_factory"], module, load, depth + 1)
            return _UNKNOWN
        found = _class_named(module, name, load) if isinstance(node.func, ast.Name) and not node.args else None
        if found is not None:  # a nested dataclass, maybe with some values given
            nested = _class_defaults(*found, load, depth + 1)
            for key, value in keywords.items():
                nested[key] = _default_value(value, module, load, depth + 1)
            return nested
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # an enum member
        found = _class_named(module, node.value.id, load)
        if found is not None:
            for statement in found[0].body:
                if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.attr for t in statement.targets):
                    return _default_value(statement.value, found[1], load, depth + 1)
    return _UNKNOWN


def _factory_value(node: ast.expr, module: ast.Module, load: Any, depth: int) -> Any:
    if isinstance(node, ast.Name):
        empty = {"list": [], "dict": {}, "tuple": (), "set": set(), "frozenset": frozenset()}
        if node.id in empty:
            return empty[node.id]
        found = _class_named(module, node.id, load)
        return _class_defaults(*found, load, depth + 1) if found is not None else _UNKNOWN
    if isinstance(node, ast.Lambda):
        return _default_value(node.body, module, load, depth + 1)
    return _UNKNOWN


def _same(value: Any, default: Any) -> bool:
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list, set, frozenset)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    a, b = plain(value), plain(default)
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool) and a == b
    )


# --- two experiments -----------------------------------------------------------------------


class ExperimentDiff:
    """What differs between two stored experiments, section by section.

    ``sections`` holds only differences (an equal section is an empty dict);
    ``causes`` and ``verdict`` say why the ids differ.
    """

    def __init__(self, a: Snapshot, b: Snapshot) -> None:
        self.a, self.b = a, b
        self.sections: dict[str, dict[str, Any]] = {
            "config": self._config(),
            "code": self._code(),
            "git": self._git(),
            "environment": self._environment(),
            "outputs": self._outputs(),
        }
        self.causes = self._causes()

    def __bool__(self) -> bool:
        return self.a.experiment_id != self.b.experiment_id or any(self.sections.values())

    def __repr__(self) -> str:
        return self.render()

    def __str__(self) -> str:
        return self.render()

    # --- sections ------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        a, b = self.a.config, self.b.config
        out: dict[str, Any] = {}
        if self.a.module != self.b.module:
            out["module"] = [self.a.module, self.b.module]
        changed = {k: [a[k], b[k]] for k in a if k in b and not _identical(a[k], b[k])}
        if changed:
            out["changed"] = changed
        if only := {k: a[k] for k in a if k not in b}:
            out["only_in_a"] = only
        if only := {k: b[k] for k in b if k not in a}:
            out["only_in_b"] = only
        return out

    def _code(self) -> dict[str, Any]:
        a, b = self.a.code, self.b.code
        out: dict[str, Any] = {}
        changed = [p for p in a if p in b and _digest(a[p], "normalized") != _digest(b[p], "normalized")]
        cosmetic = [p for p in a if p in b and p not in changed and _digest(a[p], "object") != _digest(b[p], "object")]
        removed = [p for p in a if p not in b]
        added = [p for p in b if p not in a]
        for key, paths in (("changed", changed), ("added", added), ("removed", removed), ("formatting_only", cosmetic)):
            if paths:
                out[key] = paths
        diffs = {}
        for path in changed + added + removed + cosmetic:
            diffs[path] = self._source_diff(path)
        if diffs:
            out["diffs"] = diffs
        return out

    def _source_diff(self, path: str) -> str:
        sources = []
        for snap in (self.a, self.b):
            if path not in snap.code:
                sources.append(b"")
                continue
            source = snap.source(path)
            if source is None:
                return f"(the source of {path} in {snap.short_id} is not stored in .objects)"
            sources.append(source)
        return _unified(sources[0], sources[1], f"a/{path}", f"b/{path}")

    def _git(self) -> dict[str, Any]:
        a, b = self.a.git, self.b.git
        out: dict[str, Any] = {}
        for key in ("repository", "commit", "branch", "dirty", "remote"):
            if a.get(key) != b.get(key):
                out[key] = [a.get(key), b.get(key)]
        if "commit" in out and a.get("commit") and b.get("commit"):
            from machinable.git import log_between

            worktree = Path(b.get("worktree") or a.get("worktree") or ".")
            between = {
                f"{a['commit'][:7]}..{b['commit'][:7]}": log_between(worktree, a["commit"], b["commit"]),
                f"{b['commit'][:7]}..{a['commit'][:7]}": log_between(worktree, b["commit"], a["commit"]),
            }
            known = {k: v for k, v in between.items() if v}
            if known:
                out["commits"] = known
        if self.a.git_diff != self.b.git_diff:
            out["uncommitted"] = {
                "files_a": _patch_files(self.a.git_diff),
                "files_b": _patch_files(self.b.git_diff),
                "diff": _unified(self.a.git_diff, self.b.git_diff, f"a/{self.a.git_files[1]} ({self.a.short_id})", f"b/{self.b.git_files[1]} ({self.b.short_id})"),
            }
        return out

    def _environment(self) -> dict[str, Any]:
        a, b = self.a.environment, self.b.environment
        out: dict[str, Any] = {key: [a.get(key), b.get(key)] for key in _ENV_KEYS if a.get(key) != b.get(key)}
        pa, pb = a.get("packages") or {}, b.get("packages") or {}
        # env.json lists the packages the closure imports: one absent on one side was not imported there
        packages = {name: [pa.get(name, NOT_IMPORTED), pb.get(name, NOT_IMPORTED)]
                    for name in sorted(set(pa) | set(pb)) if pa.get(name, NOT_IMPORTED) != pb.get(name, NOT_IMPORTED)}
        if packages:
            out["packages"] = packages
        return out

    def _outputs(self) -> dict[str, Any]:
        a, b = self.a, self.b
        out: dict[str, Any] = {}
        if a.state != b.state:
            out["state"] = [a.state, b.state]
        if not _identical(a.result, b.result):
            out["result"] = [a.result_shown, b.result_shown]
        records: dict[str, Any] = {}
        if len(a.records) != len(b.records):
            records["rows"] = [len(a.records), len(b.records)]
        sa, sb = a.records_summary, b.records_summary
        keys = {k: [sa.get(k), sb.get(k)] for k in [*sa, *[k for k in sb if k not in sa]] if not _identical(sa.get(k), sb.get(k))}
        if keys:
            records["keys"] = keys
        if records:
            out["records"] = records
        da, db = a.data_files, b.data_files
        data: dict[str, Any] = {}
        if changed := {n: [da[n]["digest"], db[n]["digest"]] for n in da if n in db and da[n]["digest"] != db[n]["digest"]}:
            data["changed"] = changed
        if only := {n: da[n]["digest"] for n in da if n not in db}:
            data["only_in_a"] = only
        if only := {n: db[n]["digest"] for n in db if n not in da}:
            data["only_in_b"] = only
        if data:
            out["data"] = data
        if a.output_digest != b.output_digest:
            out["output"] = [a.output_lines, b.output_lines]
        return out

    # --- why the ids differ ------------------------------------------------------------

    def _causes(self) -> list[str]:
        a, b = self.a, self.b
        if a.experiment_id == b.experiment_id:
            return []
        for snap in (a, b):
            if snap.damaged:
                return [f"unknown: the record of {snap.short_id} is damaged ({snap.problems.get('experiment', 'experiment.json')})"]
        if a.module != b.module:
            return [f"module ({a.module} -> {b.module})"]
        causes = []
        if a.config_hash != b.config_hash:
            config = self.sections["config"]
            keys = [*config.get("changed", {}), *config.get("only_in_a", {}), *config.get("only_in_b", {})]
            if keys:
                shown = ", ".join(f"{k} ({_fmt(a.config.get(k, '(unset)'), 40)} -> {_fmt(b.config.get(k, '(unset)'), 40)})" for k in keys[:5])
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                causes.append(f"config key{'s' if len(keys) > 1 else ''} {shown}{more}")
            else:
                causes.append("config (the values are equal, but which of them count as defaults differs: the Config's defaults changed)")
        if a.code_hash != b.code_hash:
            code = self.sections["code"]
            files = [f"{p} (changed)" for p in code.get("changed", [])]
            files += [f"{p} (added)" for p in code.get("added", [])]
            files += [f"{p} (removed)" for p in code.get("removed", [])]
            if files:
                causes.append(f"file{'s' if len(files) > 1 else ''} {', '.join(files)}")
            else:
                causes.append("code hash (the same files hash differently: another hashing scheme)")
        if a.seed != b.seed:
            causes.append(f"seed ({a.seed} -> {b.seed})")
        return causes

    @property
    def verdict(self) -> str:
        a, b = self.a, self.b
        if a.experiment_id == b.experiment_id:
            return "Same experiment (same id)."
        if self.causes == [f"seed ({a.seed} -> {b.seed})"]:
            return f"Replicates: same config and code, only the seed differs ({a.seed} -> {b.seed})."
        if not self.causes:
            return "The ids differ although config, code and seed agree (another id scheme)."
        return "The ids differ because of " + "; ".join(self.causes) + "."

    # --- output ------------------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        return {
            "a": {"id": self.a.experiment_id, "module": self.a.module},
            "b": {"id": self.b.experiment_id, "module": self.b.module},
            "same": self.a.experiment_id == self.b.experiment_id,
            "verdict": self.verdict,
            "causes": self.causes,
            "sections": self.sections,
            "problems": {"a": dict(self.a.problems), "b": dict(self.b.problems)},
        }

    def render(self) -> str:
        a, b = self.a, self.b
        lines = [f"diff a={a.short_id} ({a.module}) b={b.short_id} ({b.module})", f"why: {self.verdict}"]
        for snap, name in ((a, "a"), (b, "b")):
            for section, problem in snap.problems.items():
                lines.append(f"note: {name}'s {section} is damaged: {problem}")
        render = {"config": _render_config_diff, "code": _render_code_diff, "git": _render_git_diff,
                  "environment": _render_env_diff, "outputs": _render_outputs_diff}
        for section in SECTIONS:
            if self.sections[section]:
                lines.append(section)
                lines += render[section](self.sections[section])
        equal = [s for s in SECTIONS if not self.sections[s]]
        if equal:
            lines.append(f"(no differences in {', '.join(equal)})")
        return "\n".join(lines)


def diff(a: Any, b: Any, storage: Any = None) -> ExperimentDiff:
    """What differs between two experiments (objects, snapshots or id prefixes)."""
    return ExperimentDiff(Snapshot.of(a, storage), Snapshot.of(b, storage))


# --- rendering helpers ---------------------------------------------------------------------------


def _render_config_diff(section: dict[str, Any]) -> list[str]:
    out = []
    if "module" in section:
        out.append(f"  module: {section['module'][0]} -> {section['module'][1]}")
    for key, (va, vb) in section.get("changed", {}).items():
        out.append(f"  {key}: {_fmt(va)} -> {_fmt(vb)}")
    for key, value in section.get("only_in_a", {}).items():
        out.append(f"  {key}: {_fmt(value)} -> (not set)")
    for key, value in section.get("only_in_b", {}).items():
        out.append(f"  {key}: (not set) -> {_fmt(value)}")
    return out


def _render_code_diff(section: dict[str, Any]) -> list[str]:
    out = []
    labels = (("changed", "changed"), ("added", "added in b"), ("removed", "removed in b"),
              ("formatting_only", "comments/whitespace/docstrings only (does not change the id)"))
    for key, label in labels:
        for path in section.get(key, []):
            out.append(f"  {path}: {label}")
            out += ["    " + line for line in section.get("diffs", {}).get(path, "").splitlines()]
    return out


def _render_git_diff(section: dict[str, Any]) -> list[str]:
    out = []
    for key in ("repository", "commit", "branch", "dirty", "remote"):
        if key in section:
            out.append(f"  {key}: {section[key][0]} -> {section[key][1]}")
    for span, commits in section.get("commits", {}).items():
        out.append(f"  commits in {span}:")
        out += [f"    {c}" for c in commits]
    if "uncommitted" in section:
        unc = section["uncommitted"]
        out.append(f"  uncommitted changes: a: {', '.join(unc['files_a']) or 'none'}; b: {', '.join(unc['files_b']) or 'none'}")
        out += ["    " + line for line in unc["diff"].splitlines()]
    return out


NOT_IMPORTED = "(not imported)"


def _render_env_diff(section: dict[str, Any]) -> list[str]:
    out = [f"  {key}: {values[0]} -> {values[1]}" for key, values in section.items() if key != "packages"]
    for name, (va, vb) in section.get("packages", {}).items():
        out.append(f"  {name}: {va or '(not installed)'} -> {vb or '(not installed)'}")
    return out


def _render_outputs_diff(section: dict[str, Any]) -> list[str]:
    out = []
    if "state" in section:
        out.append(f"  state: {section['state'][0]} -> {section['state'][1]}")
    if "result" in section:
        out.append(f"  result: {_fmt(section['result'][0], 200)} -> {_fmt(section['result'][1], 200)}")
    records = section.get("records", {})
    if "rows" in records:
        out.append(f"  records: {records['rows'][0]} -> {records['rows'][1]} rows")
    for key, (sa, sb) in records.get("keys", {}).items():
        out.append(f"  records {key}: {_stats(sa)} -> {_stats(sb)}")
    data = section.get("data", {})
    for name, (da, db) in data.get("changed", {}).items():
        out.append(f"  data/{name}: {da} -> {db}")
    for name, digest in data.get("only_in_a", {}).items():
        out.append(f"  data/{name}: only in a ({digest})")
    for name, digest in data.get("only_in_b", {}).items():
        out.append(f"  data/{name}: only in b ({digest})")
    if "output" in section:
        out.append(f"  output.log differs ({section['output'][0]} -> {section['output'][1]} lines)")
    return out


def _render_summary(summary: dict[str, dict[str, Any]]) -> list[str]:
    if not summary:
        return []
    width = max(len(k) for k in summary)
    return [f"  {key.ljust(width)}  {_stats(stats)}" for key, stats in summary.items()]


def _stats(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "(absent)"
    if "mean" in stats:
        nan = f" nan={stats['nan']}" if stats.get("nan") else ""  # how many of the n values are NaN
        return (f"n={stats['count']} min={_num(stats['min'])} max={_num(stats['max'])} "
                f"mean={_num(stats['mean'])}{nan} last={_fmt(stats['last'], 30)}")
    return f"n={stats['count']} last={_fmt(stats['last'], 40)}"


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


#: how stored configs spell the floats JSON has no literal for (``config.to_json``)
NON_FINITE = ("nan", "inf", "-inf")


def format_value(value: Any, width: int = 80) -> str:
    """A config value as list, show, diff and status print it: JSON, but strings
    quoted and floats exact; NaN and infinities (stored as "nan", "inf", "-inf")
    bare, as Python prints them."""
    return _fmt(value, width)


def _fmt(value: Any, width: int = 80) -> str:
    """A value as the user wrote it: JSON, but strings quoted and floats exact."""
    if isinstance(value, str) and value in NON_FINITE:
        text = value
    elif isinstance(value, dict) and set(value) == {"pickle", "repr"}:  # Snapshot.result_shown
        text = f"{value['repr']}  (pickled)"
    elif isinstance(value, (str, float)):
        text = repr(value)
    else:
        try:
            text = dumps_value(value).decode()  # NaN as NaN, not null
        except TypeError:
            try:
                text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
            except TypeError:
                text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _identical(a: Any, b: Any) -> bool:
    """Equal and of the same type, with NaN equal to NaN (two runs that diverged alike do not differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


def _digest(entry: Any, key: str) -> Any:
    return entry.get(key) if isinstance(entry, dict) else entry


def _unified(a: bytes, b: bytes, from_name: str, to_name: str) -> str:
    left = a.decode("utf-8", errors="replace").splitlines(keepends=True)
    right = b.decode("utf-8", errors="replace").splitlines(keepends=True)
    lines = difflib.unified_diff(left, right, fromfile=from_name, tofile=to_name)
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def _patch_files(patch: bytes) -> list[str]:
    files = []
    for line in patch.decode("utf-8", errors="replace").splitlines():
        if line.startswith("diff --git "):
            parts = line.split(" b/", 1)
            files.append(parts[1] if len(parts) == 2 else line[len("diff --git "):])
    return files


def _aligned(pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"  {k.ljust(width)}  {v}" for k, v in pairs]


def _reproductions_json(directory: Path) -> list[dict[str, Any]]:
    from machinable.reproduce import describe_attempt, read_reproductions

    keys = ("time", "verdict", "ok", "rtol", "atol", "error", "directory")
    return [{**{k: v for k, v in attempt.items() if k in keys}, "summary": describe_attempt(attempt)}
            for attempt in read_reproductions(directory)]


def _when(iso: Any) -> str:
    if not iso:
        return "-"
    try:
        moment = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _took(total: float | None, attempts: list[float | None]) -> str:
    """``took 4.2s``; for a resumed run the sum of its attempts (idle time between them does not count)."""
    if len(attempts) <= 1:
        return f"took {_duration(total)}"
    unknown = sum(1 for seconds in attempts if seconds is None)
    parts = " + ".join("?" if seconds is None else _duration(seconds) for seconds in attempts)
    if unknown:
        return f"took at least {_duration(total or 0.0)} running, over {len(attempts)} attempts: {parts} (? = ended unnoticed)"
    return f"took {_duration(total)} running, over {len(attempts)} attempts: {parts}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"
