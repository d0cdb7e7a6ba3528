"""The project root and how module names resolve to files and element classes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from machinable.errors import ModuleNotFound

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Built-in elements, addressable by name like project modules.
BUILTINS = {
    "machinable.execution.local": "machinable.executions.local",
    "machinable.execution.process": "machinable.executions.process",
    "machinable.execution.multiprocess": "machinable.executions.multiprocess",
    "machinable.execution.slurm": "machinable.executions.slurm",
    "machinable.storage": "machinable.storage",
}

# Short names of the built-in executions. A project module of the same name
# (a user's own multiprocess.py) takes precedence.
SHORT_NAMES = {name.rsplit(".", 1)[1]: name for name in BUILTINS if name.startswith("machinable.execution.")}

_stack: list["Project"] = []


class Project:
    """A folder whose Python modules are experiments and executions.

    ``Project(path)`` may be used as a context manager; otherwise the project
    is the current working directory.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path if path is not None else os.getcwd()).resolve()
        if not self.path.is_dir():
            raise ModuleNotFound(f"Project directory {str(self.path)!r} does not exist.")

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    def __enter__(self) -> "Project":
        _stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack.remove(self)

    @classmethod
    def get(cls) -> "Project":
        return _stack[-1] if _stack else cls()

    # --- modules ----------------------------------------------------------

    def normalize_name(self, name: str) -> str:
        """``./pkg/mod.py`` -> ``pkg.mod``; refuses paths that leave the project.

        A built-in execution's short name (``multiprocess``) becomes its full
        name (``machinable.execution.multiprocess``) unless the project has a
        module of that name.
        """
        if not isinstance(name, str) or not name:
            raise ModuleNotFound(f"Invalid module name {name!r}: give a dotted module name such as 'estimate_gravity'.")
        if name.startswith("./") and name.endswith(".py"):
            name = name[2:-3].replace("/", ".")
        if not _NAME.fullmatch(name):  # fullmatch: "$" alone would accept a trailing newline
            raise ModuleNotFound(
                f"Invalid module name {name!r}: use a dotted Python module name inside the project "
                "(letters, digits, '_' and '.'), such as 'estimate_gravity' or 'evolution.simulate_offspring'."
            )
        if name in SHORT_NAMES and not self._has_module(name):
            return SHORT_NAMES[name]
        return name

    def _has_module(self, name: str) -> bool:
        base = self.path.joinpath(*name.split("."))
        return base.with_name(base.name + ".py").is_file() or (base / "__init__.py").is_file()

    def module_file(self, name: str) -> Path:
        name = self.normalize_name(name)
        if name in BUILTINS:
            spec = importlib.util.find_spec(BUILTINS[name])
            assert spec is not None and spec.origin is not None
            return Path(spec.origin)
        base = self.path.joinpath(*name.split("."))
        for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        raise ModuleNotFound(self._not_found_message(name))

    def _not_found_message(self, name: str) -> str:
        import difflib

        available = self.available_modules()
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"Module {name!r} not found in project {str(self.path)!r} (looked for {name.replace('.', '/')}.py).{hint}"

    def available_modules(self) -> list[str]:
        names = []
        for path in self.path.glob("*.py"):
            names.append(path.stem)
        for path in self.path.glob("*/*.py"):
            if path.parent.name not in ("storage", "tests") and not path.parent.name.startswith("."):
                names.append(f"{path.parent.name}.{path.stem}")
        return sorted(names)

    def import_module(self, name: str) -> ModuleType:
        """Import a project module by name, from this project's files."""
        name = self.normalize_name(name)
        if name in BUILTINS:
            return importlib.import_module(BUILTINS[name])
        path = self.module_file(name)
        root = str(self.path)
        if not sys.path or sys.path[0] != root:
            if root in sys.path:
                sys.path.remove(root)
            sys.path.insert(0, root)
        sources = self._closure_sources(path)
        existing = sys.modules.get(name)
        if existing is not None:
            same_file = getattr(existing, "__file__", None) and Path(existing.__file__).resolve() == path.resolve()
            if same_file and getattr(existing, "__machinable_sources__", None) == sources:
                return existing
            # another project's module of the same name, or it or a helper it imports was edited since:
            # drop every project module of the old and the new closure, so helpers are re-imported too
            stale = set(sources) | set(getattr(existing, "__machinable_sources__", None) or {})
            for key, module in list(sys.modules.items()):
                file = getattr(module, "__file__", None)
                if key == name or key.startswith(name + ".") or (file and str(Path(file).resolve()) in stale):
                    del sys.modules[key]
            _evict_foreign_parents(name, self.path)
        self._evict_foreign_closure(sources)
        _drop_stale_bytecode(sources)
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ModuleNotFound(f"Module {name!r} could not be imported: {e}") from e
        except SyntaxError as e:
            raise ModuleNotFound(
                f"Module {name!r} could not be imported: {e.msg} ({e.filename}, line {e.lineno}). Fix the syntax error."
            ) from e
        module.__machinable_sources__ = sources  # type: ignore[attr-defined]
        return module

    def _evict_foreign_closure(self, sources: dict[str, str]) -> None:
        """Drop loaded modules that carry the name of a module of this closure but
        are another file (another project's ``helpers``, say), so that the
        closure imports its own."""
        expected: dict[str, str] = {}
        for source in sources:
            parts = list(Path(source).relative_to(self.path).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            for i in range(1, len(parts)):
                expected.setdefault(".".join(parts[:i]), "")  # a parent package: any file of this project
            expected[".".join(parts)] = source
        for key, wanted in expected.items():
            module = sys.modules.get(key)
            if module is None:
                continue
            file = getattr(module, "__file__", None)
            resolved = Path(file).resolve() if file else None
            if wanted and resolved != Path(wanted).resolve() or not wanted and (resolved is None or not resolved.is_relative_to(self.path)):
                for other in [k for k in sys.modules if k == key or k.startswith(key + ".")]:
                    del sys.modules[other]

    def _closure_sources(self, path: Path) -> dict[str, str]:
        """Absolute path -> byte digest of the module and its project-local imports."""
        from machinable.hashing import CACHE, closure_of
        from machinable.storage import Storage

        # the arguments Experiment.closure passes, so that both share one cached closure
        storage = Storage.current(self)
        closure = closure_of(self.path, path, exclude=(storage.root,), cache_dir=storage.root / CACHE)
        return {str(self.path / rel): info.raw for rel, info in closure.files.items()}

    def element_class(self, name: str, base: type | None = None) -> type:
        """The one Experiment/Execution class defined in module ``name``."""
        from machinable.element import Element

        module = self.import_module(name)
        base = base or Element
        found = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, Element)
            and value.__module__ == module.__name__
            and not value.__dict__.get("_machinable_abstract", False)
        ]
        if not found:
            raise ModuleNotFound(
                f"Module {name!r} ({getattr(module, '__file__', '?')}) defines no Experiment or Execution class. "
                "Define exactly one subclass of machinable.Experiment or machinable.Execution in it."
            )
        if len(found) > 1:
            names = ", ".join(sorted(c.__name__ for c in found))
            raise ModuleNotFound(
                f"Module {name!r} defines {len(found)} element classes ({names}); a module holds exactly one. "
                "Move the others into their own modules."
            )
        cls = found[0]
        if not issubclass(cls, base):
            raise ModuleNotFound(f"Module {name!r} holds {cls.__name__}, which is not a {base.__name__}.")
        return cls


def _drop_stale_bytecode(sources: dict[str, str]) -> None:
    """Remove ``__pycache__`` files that may predate an edit of their source.

    A .pyc is validated by the source's mtime in whole seconds and its size,
    so an edit within the second the .pyc was written, keeping the size,
    would run the old code. A .pyc not written strictly after its source is
    recompiled instead.
    """
    for source in sources:
        try:
            cached = Path(importlib.util.cache_from_source(source))
            if cached.stat().st_mtime_ns <= Path(source).stat().st_mtime_ns:
                cached.unlink()
        except (OSError, NotImplementedError, ValueError):
            pass


def _evict_foreign_parents(name: str, root: Path) -> None:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        module = sys.modules.get(parent)
        file = getattr(module, "__file__", None) if module else None
        if file and not Path(file).resolve().is_relative_to(root):
            del sys.modules[parent]


def load_element_class(project_root: str, module: str) -> Any:
    return Project(project_root).element_class(module)
