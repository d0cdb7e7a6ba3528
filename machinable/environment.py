"""The runtime environment recorded in env.json: Python, platform, packages.

Only the distributions that provide the third-party modules of an
experiment's import closure are listed: upgrading them is reported as drift
by ``status``/``diff`` but never changes an experiment's id.
"""

from __future__ import annotations

import platform
import sys
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


@lru_cache(maxsize=1024)
def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def packages_for(modules: set[str]) -> dict[str, str | None]:
    dists = _distributions()
    out: dict[str, str | None] = {}
    for module in sorted(modules):
        names = dists.get(module)
        if not names:
            out[module] = None  # importable but not from a distribution (or missing)
            continue
        for name in names:
            out[name] = _version(name)
    return out


@lru_cache(maxsize=1)
def _base() -> dict[str, Any]:
    from machinable import __version__

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "machinable": __version__,
    }


def capture(third_party: set[str]) -> dict[str, Any]:
    return {**_base(), "packages": packages_for(third_party)}
