"""The small error hierarchy every user-facing failure belongs to.

Messages say what was wrong, with which value, and what to do about it. The
CLI prints ``str(error)`` without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations


class MachinableError(Exception):
    """Base of every error machinable raises on purpose."""

    exit_code = 1


class UsageError(MachinableError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key or value does not fit the module's ``Config``."""


class RecordError(UsageError, ValueError):
    """A row given to ``record()`` holds a value that JSON cannot store."""


class ModuleNotFound(UsageError):
    """No project module (or a module without exactly one element class)."""


class ExperimentNotFound(UsageError):
    """An id or id prefix matched no experiment, or several."""


class StorageError(MachinableError):
    """Storage could not be read or written (permissions, full disk, damage)."""


class StorageFormatError(StorageError):
    """A stored document is damaged or from an unknown (future) format."""


class CodeChangedError(UsageError):
    """An unfinished experiment cannot be resumed: its code changed since."""


class GitError(UsageError):
    """The git state forbids what was asked (for example a dirty tree)."""


class ExecutionError(MachinableError):
    """One or more experiments failed or never started."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class WaitTimeout(MachinableError, TimeoutError):
    """``experiment.wait(timeout=...)`` gave up before the experiment ended."""


class ReproductionError(MachinableError):
    """A recorded experiment cannot be re-executed at its recorded code
    (commit gone, recorded outside git, its diff does not apply)."""
