"""The project template that ``machinable init`` writes.

The template ships inside the package (``machinable/_template``), so ``init``
works from a regular install as well as from a clone; the repository's
``.machinable-template/`` is the same set of files (a test keeps them equal).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from machinable.errors import UsageError

TEMPLATE = Path(__file__).resolve().parent / "_template"
#: who commits the template where git has no identity yet (a fresh machine)
INIT_AUTHOR = ("machinable init", "machinable-init@localhost")
_SKIP = {"__pycache__", ".pytest_cache"}


def template_files(root: Path = TEMPLATE) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file of the template."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not _SKIP.intersection(rel.parts) and path.suffix != ".pyc":
            files[rel.as_posix()] = path
    return files


@dataclass
class InitResult:
    directory: Path
    written: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    git: str = "skipped"  # committed | staged | inside-repository | no-git | skipped
    messages: list[str] = field(default_factory=list)


def write_template(directory: str | os.PathLike[str], *, git: bool = True) -> InitResult:
    """Write the template into ``directory`` (created if missing); never overwrite.

    With ``git`` and git installed, a directory that is not inside a git
    repository becomes one whose first commit is the template, so that the
    first launch records a clean commit. Inside an existing repository nothing
    is committed: the new files are the user's to commit.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise UsageError(f"Cannot create a project in {str(target)!r}: it is a file, not a folder.")
    files = template_files()
    conflicts = [rel for rel, src in files.items() if (target / rel).exists() and (target / rel).read_bytes() != src.read_bytes()]
    if conflicts:
        raise UsageError(
            f"Cannot create a project in {str(target)!r}: {', '.join(conflicts)} already exist{'s' if len(conflicts) == 1 else ''} "
            f"with other content. Nothing was written; move {'it' if len(conflicts) == 1 else 'them'} away or choose another folder."
        )
    result = InitResult(directory=target)
    try:
        for rel, src in files.items():
            dest = target / rel
            if dest.exists():
                result.present.append(rel)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
            result.written.append(rel)
    except OSError as e:
        raise UsageError(f"Cannot create a project in {str(target)!r}: {e.strerror or e} ({e.filename}).") from None
    where = _shown(target)
    if result.written:
        result.messages.append(f"Created a machinable project in {where}: {', '.join(result.written)}")
    else:
        result.messages.append(f"{where} already holds the template: nothing to write")
    if git:
        _git_init(result)
    else:
        result.git = "skipped"
    step = "" if target.resolve() == Path.cwd().resolve() else f"cd {where} && "
    result.messages.append(f"Next: {step}machinable estimate_gravity --launch")
    return result


def _shown(path: Path) -> str:
    """How to name ``path`` in a command the user copies: relative to the
    current folder, else ``~/...`` under the home folder, else absolute."""
    resolved = path.resolve()
    try:
        rel = resolved.relative_to(Path.cwd().resolve())
        return "." if not rel.parts else rel.as_posix()
    except ValueError:
        pass
    try:
        rel = resolved.relative_to(Path.home().resolve())
        return "~" if not rel.parts else "~/" + rel.as_posix()
    except (ValueError, RuntimeError):  # RuntimeError: no home folder known
        return str(resolved)


def _git_init(result: InitResult) -> None:
    from machinable.git import find_git_dir

    target = result.directory
    if shutil.which("git") is None:
        result.git = "no-git"
        result.messages.append("git: not installed, so this is not a repository (records say so; install git to record commits)")
        return
    found = find_git_dir(target.resolve())
    if found is not None:
        result.git = "inside-repository"
        if result.written:
            result.messages.append(
                f"git: inside the repository at {found[0]}; commit the new files (git add {_shown(target)} && git commit) "
                "so that launches record a clean tree"
            )
        return

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=target, capture_output=True, text=True)

    proc = run("init", "-q")
    if proc.returncode != 0:
        result.git = "no-git"
        result.messages.append(f"git: 'git init' failed ({_first_line(proc.stderr)}); the project is not a repository")
        return
    run("add", "--", *result.written, *result.present)
    proc = run("commit", "-q", "-m", "machinable init")
    if proc.returncode == 0:
        result.git = "committed"
        result.messages.append("git: new repository, with the template as its first commit")
        return
    no_identity = "user.email" in proc.stderr or "identity" in proc.stderr
    if no_identity:
        # A fresh machine: commit the template as machinable (only this commit),
        # so that the first launch still records a clean tree.
        proc = run("-c", f"user.name={INIT_AUTHOR[0]}", "-c", f"user.email={INIT_AUTHOR[1]}", "commit", "-q", "-m", "machinable init")
        if proc.returncode == 0:
            result.git = "committed"
            result.messages.append(
                f"git: new repository, with the template as its first commit (author {INIT_AUTHOR[0]} <{INIT_AUTHOR[1]}>: "
                "git has no user.name/user.email yet; set them before your own commits)"
            )
            return
    result.git = "staged"
    reason = "git has no user.name/user.email" if no_identity else _first_line(proc.stderr)
    result.messages.append(
        f"git: new repository, template staged but not committed ({reason}); run 'git commit -m init' there "
        "so that launches record a clean tree"
    )


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"
