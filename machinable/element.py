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
