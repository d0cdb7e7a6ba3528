"""machinable: content-addressed, git-integrated reproducibility for research code.

The public API is deliberately small; everything is imported lazily so that
``import machinable`` (and ``machinable --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Execution", "Experiment", "Project", "Storage", "__version__", "get"]

_LAZY = {
    "get": "machinable.experiment",
    "Experiment": "machinable.experiment",
    "Execution": "machinable.execution",
    "Project": "machinable.project",
    "Storage": "machinable.storage",
}

if TYPE_CHECKING:  # pragma: no cover
    from machinable.execution import Execution
    from machinable.experiment import Experiment, get
    from machinable.project import Project
    from machinable.storage import Storage


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'machinable' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
