"""Git metadata: a fast path that reads ``.git`` directly, GitPython for the rest.

GitPython is imported here only, and only when a diff, the untracked files or
a worktree are needed, so ``machinable --help`` and read-only commands never
pay for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Head:
    git_dir: Path  # the worktree's own git dir
    common_dir: Path  # where refs and objects live
    worktree: Path
    commit: str | None
    branch: str | None


def find_git_dir(start: Path) -> tuple[Path, Path] | None:
    """(worktree root, git dir) for ``start`` or one of its parents."""
    for directory in (start, *start.parents):
        dot_git = directory / ".git"
        if dot_git.is_dir():
            return directory, dot_git
        if dot_git.is_file():  # a linked worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            if text.startswith("gitdir:"):
                git_dir = Path(text.split(":", 1)[1].strip())
                if not git_dir.is_absolute():
                    git_dir = (directory / git_dir).resolve()
                return directory, git_dir
    return None


def _read_ref(common_dir: Path, git_dir: Path, ref: str) -> str | None:
    for base in (git_dir, common_dir):
        path = base / ref
        if path.is_file():
            value = path.read_text().strip()
            if value.startswith("ref:"):
                return _read_ref(common_dir, git_dir, value[4:].strip())
            return value or None
    packed = common_dir / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            if line and line[0] not in "#^":
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    return None


def read_head(start: Path) -> Head | None:
    """HEAD commit and branch without starting a process (sub-millisecond)."""
    found = find_git_dir(start.resolve())
    if found is None:
        return None
    worktree, git_dir = found
    common_dir = git_dir
    common_file = git_dir / "commondir"
    if common_file.is_file():
        common_dir = (git_dir / common_file.read_text().strip()).resolve()
    head = (git_dir / "HEAD").read_text().strip()
    if head.startswith("ref:"):
        ref = head[4:].strip()
        branch = ref[len("refs/heads/"):] if ref.startswith("refs/heads/") else ref
        commit = _read_ref(common_dir, git_dir, ref)
    else:
        branch, commit = None, head
    return Head(git_dir=git_dir, common_dir=common_dir, worktree=worktree, commit=commit, branch=branch)


def _repo(worktree: Path) -> Any:
    import git  # GitPython, lazily

    return git.Repo(worktree)


def _status(worktree: Path, excludes: list[str]) -> str:
    """``git status`` as a plain subprocess: a clean tree needs no GitPython (whose
    import costs more than the status itself in a fresh process, a worker's say)."""
    import subprocess

    args = ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored=matching", "--", ".", *excludes]
    try:
        proc = subprocess.run(args, cwd=worktree, capture_output=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        from machinable.errors import GitError

        raise GitError(f"Could not run git to record the state of {worktree}: {e}. Install git, or work outside a repository.") from e
    if proc.returncode != 0:
        from machinable.errors import GitError

        raise GitError(f"`git status` failed in {worktree}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8", "surrogateescape")  # as GitPython decodes


def _remote_url(common_dir: Path) -> str | None:
    config = common_dir / "config"
    if not config.is_file():
        return None
    section = None
    for line in config.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == '[remote "origin"]' and line.startswith("url"):
            return line.split("=", 1)[1].strip()
    return None


def capture(start: Path, exclude: list[Path] | None = None) -> tuple[dict[str, Any], bytes]:
    """git.json content and the binary-safe diff of all uncommitted changes.

    The diff includes untracked (not ignored) files' content: it is taken
    against HEAD from a temporary copy of the index to which every change has
    been added, so the real index is never touched.

    Launching many experiments from an unchanged tree asks git once: the
    result is kept with the stat of everything git looked at (see
    ``_Snapshot``) and reused while none of it changed.
    """
    key = (str(start), tuple(str(p) for p in exclude or ()))
    snapshot = _snapshots.get(key)
    if snapshot is not None and snapshot.still_valid():
        return snapshot.result()
    head = read_head(start)
    if head is None:
        return {"repository": False, "note": "not inside a git repository"}, b""
    excludes = []
    excluded_dirs = []
    for path in exclude or []:
        try:
            rel = Path(path).resolve().relative_to(head.worktree.resolve())
        except ValueError:
            continue
        if rel.parts:
            excludes.append(f":(exclude){rel.as_posix()}")
            excluded_dirs.append(rel.as_posix())
    started = time.time()
    # --ignored=matching lists ignored folders without descending into them: the
    # snapshot needs them to know what not to watch
    status = _status(head.worktree, excludes)
    changed, untracked = _parse_status(status)
    diff = b""
    if changed or untracked:
        diff = _full_diff(_repo(head.worktree), head, excludes)
    info = {
        "repository": True,
        "worktree": str(head.worktree),
        "commit": head.commit,
        "branch": head.branch,
        "remote": _remote_url(head.common_dir),
        "dirty": bool(changed or untracked),
        "changed_files": changed,
        "untracked_files": untracked,
    }
    snapshot = _Snapshot.take(head, info, diff, skip={*excluded_dirs, *_ignored(status)}, since=started)
    if snapshot is not None:
        _snapshots[key] = snapshot
    else:
        _snapshots.pop(key, None)
    return info, diff


# --- reusing a capture while nothing changed -----------------------------------------

# A file changed this recently may change again within the same timestamp tick
# (coarse kernel clocks, NFS) without changing its stat; a snapshot that saw
# such a file is not kept (git treats "racily clean" index entries alike).
RACY_SECONDS = 2.0
# Watching more than this many paths would cost more than asking git.
MAX_WATCHED = 5000

Stamp = tuple[int, int, int, int, int] | None


def _stamp(path: str) -> Stamp:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)


def _git_files(head: Head) -> list[str]:
    """Files whose change can change the capture without touching the tree:
    HEAD and the branch ref (a commit or checkout rewrites them), the index,
    git's config and ignore files."""
    home = Path.home()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [
        head.git_dir / "HEAD", head.git_dir / "index", head.common_dir / "packed-refs",
        head.common_dir / "config", head.common_dir / "info" / "exclude",
        home / ".gitconfig", xdg / "git" / "config", xdg / "git" / "ignore",
    ]
    if head.branch is not None:
        ref = f"refs/heads/{head.branch}"
        files += [head.git_dir / ref, head.common_dir / ref]
    return [str(p) for p in files]


@dataclass
class _Snapshot:
    """A capture and the stat of every path that could change it.

    Watched: every file git sees (tracked, untracked, and ignored ones in
    watched folders), every folder it walks (an added or removed entry changes
    the folder's mtime), HEAD, the branch ref, the index, git's config and
    the ignore files. Ignored folders, the storage and ``.git`` are not
    watched: git does not look into them either. Any difference in any stamp
    means git is asked again.
    """

    stamps: dict[str, Stamp]
    info: dict[str, Any]
    diff: bytes

    @classmethod
    def take(cls, head: Head, info: dict[str, Any], diff: bytes, skip: set[str], since: float) -> "_Snapshot | None":
        root = str(head.worktree)
        paths = _git_files(head)
        for directory, dirs, files in os.walk(root):
            rel = os.path.relpath(directory, root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirs[:] = [d for d in dirs if d != ".git" and (prefix + d) not in skip and (prefix + d + "/") not in skip]
            paths.append(directory)
            paths.extend(os.path.join(directory, f) for f in files if f != ".git" and (prefix + f) not in skip)
            if len(paths) > MAX_WATCHED:
                return None
        stamps = {p: _stamp(p) for p in paths}
        # stamps taken after git ran: anything git saw that changed since is racy by this measure too
        racy = int((since - RACY_SECONDS) * 1e9)
        if any(s is not None and max(s[0], s[1]) >= racy for s in stamps.values()):
            return None
        return cls(stamps, info, diff)

    def still_valid(self) -> bool:
        return all(_stamp(p) == s for p, s in self.stamps.items())

    def result(self) -> tuple[dict[str, Any], bytes]:
        info = dict(self.info)
        for key in ("changed_files", "untracked_files"):
            if key in info:
                info[key] = list(info[key])
        return info, self.diff


_snapshots: dict[tuple[str, tuple[str, ...]], _Snapshot] = {}


def _ignored(status: str) -> list[str]:
    """Ignored paths of ``git status --ignored`` output (folders end with "/")."""
    return [entry[3:].rstrip("/") for entry in status.split("\0") if entry.startswith("!! ")]


def _parse_status(status: str) -> tuple[list[str], list[str]]:
    changed: list[str] = []
    untracked: list[str] = []
    entries = status.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code == "!!":  # ignored (listed with --ignored)
            continue
        if code == "??":
            untracked.append(path)
        else:
            changed.append(path)
            if "R" in code or "C" in code:
                i += 1  # the rename source follows
    return changed, untracked


def _full_diff(repo: Any, head: Head, excludes: list[str]) -> bytes:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="machinable-index-") as tmp:
        index = Path(tmp) / "index"
        real_index = head.git_dir / "index"
        if real_index.exists():
            shutil.copyfile(real_index, index)
        env = {"GIT_INDEX_FILE": str(index)}
        # an exclude naming an ignored path makes `git add` fail ("paths are ignored"); ignored paths
        # are left out anyway
        excludes = [e for e in excludes if not _is_ignored(repo, e.split(")", 1)[1])]
        repo.git.add("-A", "--", ".", *excludes, env=env)
        against = head.commit or _empty_tree(repo)
        return repo.git.diff(
            "--cached", "--binary", "--no-color", "--no-ext-diff", against, env=env, stdout_as_string=False, strip_newline_in_stdout=False
        )


def _is_ignored(repo: Any, path: str) -> bool:
    import git  # GitPython, lazily

    try:
        repo.git.check_ignore("-q", "--no-index", path)
    except git.GitCommandError:
        return False
    return True


def _empty_tree(repo: Any) -> str:
    return repo.git.hash_object("-t", "tree", os.devnull)


def dirty_files(start: Path, exclude: list[Path] | None = None) -> list[str] | None:
    """Changed and untracked files, or None outside a repository."""
    info, _ = capture(start, exclude)
    if not info.get("repository"):
        return None
    return [*info["changed_files"], *info["untracked_files"]]


def create_worktree(repo_dir: Path, commit: str, target: Path) -> None:
    repo = _repo(repo_dir)
    repo.git.worktree("add", "--detach", str(target), commit)


def remove_worktree(repo_dir: Path, target: Path) -> None:
    repo = _repo(repo_dir)
    try:
        repo.git.worktree("remove", "--force", str(target))
    except Exception:
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        repo.git.worktree("prune")


def apply_diff(worktree: Path, diff: bytes) -> None:
    if not diff.strip():
        return
    import subprocess

    proc = subprocess.run(
        ["git", "apply", "--binary", "--whitespace=nowarn", "-"], cwd=worktree, input=diff, capture_output=True
    )
    if proc.returncode != 0:
        from machinable.errors import GitError

        raise GitError(f"Could not apply the recorded uncommitted diff in {worktree}: {proc.stderr.decode(errors='replace').strip()}")


def commit_exists(repo_dir: Path, commit: str) -> bool:
    repo = _repo(repo_dir)
    try:
        repo.git.cat_file("-e", f"{commit}^{{commit}}")
        return True
    except Exception:
        return False


def log_between(start: Path, since: str, until: str, limit: int = 20) -> list[str] | None:
    """One line per commit reachable from ``until`` but not from ``since`` (newest
    first, at most ``limit``), or None if the repository at ``start`` lacks either."""
    head = read_head(Path(start).resolve())
    if head is None:
        return None
    try:
        repo = _repo(head.worktree)
        text = repo.git.log("--oneline", "--no-decorate", f"--max-count={int(limit)}", f"{since}..{until}", "--")
    except Exception:  # unknown commits, no repository, no git: nothing to show
        return None
    return text.splitlines()
