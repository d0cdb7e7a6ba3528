"""The shared base of experiments and executions: module, typed config, context."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from machinable.config import check_storable, config_class, make_config, to_json

T = TypeVar("T", bound="Element")

_context: list["Element"] = []


class Element:
    """A class found in a project module, configured by its inner ``Config``."""

    _machinable_abstract: ClassVar[bool] = True
    kind: ClassVar[str] = "element"

    class Config:
        pass

    def __init__(self, config: dict[str, Any] | None = None, *, module: str | None = None, project: Any = None) -> None:
        from machinable.project import Project

        self.project = project or Project.get()
        self.module = module or type(self).__module__
        if self.module == "__main__" and type(self).kind == "experiment":  # an execution may live anywhere
            self.module = _main_module_name(type(self), self.project)
        cls = config_class(type(self))
        self._config = make_config(cls, config, where=self.module)
        check_storable(cls, self._config, where=self.module)

    @property
    def config(self) -> Any:
        return self._config

    def config_json(self) -> dict[str, Any]:
        return to_json(self._config)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_machinable_abstract" not in cls.__dict__:
            cls._machinable_abstract = False

    # --- context ------------------------------------------------------------

    def __enter__(self: T) -> T:
        _context.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _context:
            _context.remove(self)

    @staticmethod
    def current(kind: type[T]) -> T | None:
        for element in reversed(_context):
            if isinstance(element, kind):
                return element
        return None


def _main_module_name(cls: type, project: Any) -> str:
    """The project module a class defined in ``__main__`` lives in: the script's file
    (``python train.py``), if it is a project module. A notebook or ``python -c``
    has no file to hash or to import the class from again, which is an error here
    rather than a confusing one at launch."""
    import os
    import sys

    from machinable.errors import UsageError

    file = getattr(sys.modules.get("__main__"), "__file__", None)
    if file and file.endswith(".py"):
        path = os.path.realpath(file)
        root = os.path.realpath(project.path)
        if path.startswith(root + os.sep):
            parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(part.isidentifier() for part in parts):
                return ".".join(parts)
    where = f"the script {file}, which is outside the project {project.path}" if file else "__main__ (a notebook, the REPL or python -c)"
    raise UsageError(
        f"{cls.__name__} is defined in {where}: machinable hashes and re-imports an experiment's code from its module "
        f"file. Move the class into a module of the project (for example {cls.__name__.lower()}.py) and use "
        f"get({cls.__name__.lower()!r})."
    )

