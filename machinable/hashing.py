"""Canonical JSON, digests, and the code hash over a module's import closure.

Every digest is stored with its algorithm: ``"xxh3-128:<32 hex digits>"``.
The code hash covers the AST-normalised source of a module and every
project-local module it imports (transitively), so comments, whitespace and
docstrings never change an experiment's identity while a change in a helper
module always does.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import xxhash

ALGORITHM = "xxh3-128"
CACHE = ".cache"  # the storage's folder of stat caches (derived, safe to delete)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def digest_bytes(data: bytes) -> str:
    return f"{ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def digest(value: Any) -> str:
    """Digest of a JSON-able value through its canonical form."""
    return digest_bytes(canonical_json(value))


def hex_of(tagged_digest: str) -> str:
    """``"xxh3-128:abc"`` -> ``"abc"``."""
    return tagged_digest.split(":", 1)[1]


# --- code closure ------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


# AST fields that carry no meaning of their own: the load/store context (implied
# by the position) and the ``u`` prefix of string literals.
_IGNORED_FIELDS = frozenset({"ctx", "kind", "type_comment"})


def _canonical_tree(node: Any) -> Any:
    """A JSON-able form of an AST that is stable across Python versions.

    Not ``ast.dump`` or ``ast.unparse``: both change between Python releases
    (new fields such as ``type_params``, other parenthesisation), which would
    change every code hash on a Python upgrade. Fields that are empty or None
    are left out, so a field a newer Python adds with an empty default leaves
    the form unchanged; scalars are type-tagged.
    """
    if isinstance(node, ast.AST):
        out: list[Any] = [type(node).__name__]
        for name in node._fields:
            if name in _IGNORED_FIELDS:
                continue
            value = getattr(node, name, None)
            if value is None or (isinstance(value, list) and not value):
                continue
            out.append([name, _canonical_tree(value)])
        return out
    if isinstance(node, list):
        return [_canonical_tree(item) for item in node]
    return f"{type(node).__name__}:{node!r}"


def normalize_source(source: bytes, filename: str = "<module>") -> str:
    """What of a source file counts for its identity, as canonical JSON text.

    The docstring-free syntax tree: two files that differ only in comments,
    whitespace, formatting or docstrings normalise to the same text. A file
    that does not parse normalises to its raw text, so it still has an identity.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):
        return source.decode("utf-8", errors="surrogateescape")
    return canonical_json(_canonical_tree(_strip_docstrings(tree))).decode()


@dataclass(frozen=True)
class SourceFile:
    """What one file of a closure contributes: its digests and its imports."""

    normalized: str  # digest of the normalised source (identity)
    raw: str  # digest of the bytes (object store key)
    imports: tuple[tuple[str, int], ...]  # (dotted name, relative level)
    data: bytes | None = field(default=None, repr=False, compare=False)  # None: known from the stat cache
    path: str = field(default="", repr=False, compare=False)

    @property
    def source(self) -> bytes:
        """The file's bytes, as hashed (re-read and checked when only the digests were cached)."""
        if self.data is not None:
            return self.data
        data = Path(self.path).read_bytes()
        if digest_bytes(data) != self.raw:
            from machinable.errors import CodeChangedError

            raise CodeChangedError(f"{self.path} changed while it was being recorded; launch again.")
        return data


def _imports_of(tree: ast.AST) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.append((base, node.level))
            found.extend(
                (f"{base}.{alias.name}" if base else alias.name, node.level)
                for alias in node.names
                if alias.name != "*"
            )
    return found


# A file modified this recently may be modified again within the same
# timestamp tick (coarse kernel clocks, NFS), leaving its stat unchanged: such
# "racy" files are re-read rather than trusted from a cache (as git does). The
# check is made when an entry is recorded: one recorded while racy is never kept.
RACY_SECONDS = 2.0

Stamp = tuple[int, int, int, int]

_file_cache: dict[str, tuple[Stamp, SourceFile]] = {}


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def _settled(stamp: Stamp | None, now: float) -> bool:
    return stamp is None or max(stamp[0], stamp[1]) < (now - RACY_SECONDS) * 1e9


def read_source_file(path: Path) -> SourceFile:
    """Digest a file, reusing the result while its stat is unchanged."""
    return _read_source(str(path))[1]


def _read_source(key: str) -> tuple[Stamp, SourceFile]:
    import time

    stamp = _stamp(os.stat(key))
    cached = _file_cache.get(key) or _disk.files.get(key)
    if cached is not None and cached[0] == stamp:
        return cached
    source = Path(key).read_bytes()
    try:
        imports = tuple(_imports_of(ast.parse(source, filename=key)))
    except (SyntaxError, ValueError):
        imports = ()
    info = SourceFile(
        normalized=digest_bytes(normalize_source(source, key).encode("utf-8", "surrogateescape")),
        raw=digest_bytes(source),
        imports=imports,
        data=source,
        path=key,
    )
    if _settled(stamp, time.time()):
        _file_cache[key] = (stamp, info)
    return stamp, info


@dataclass
class Closure:
    """A module's project-local import closure."""

    files: dict[str, SourceFile]  # project-relative posix path -> file
    third_party: set[str]  # top-level names of non-stdlib, non-project imports

    @property
    def code_hash(self) -> str:
        cached = self.__dict__.get("_code_hash")
        if cached is None:
            cached = self.__dict__["_code_hash"] = digest({path: f.normalized for path, f in self.files.items()})
        return cached

    def as_json(self) -> dict[str, Any]:
        return {
            "files": {path: {"normalized": f.normalized, "object": f.raw} for path, f in sorted(self.files.items())},
            "code_hash": self.code_hash,
        }


def _module_file(root: Path, dotted: str, probed: set[str] | None = None) -> Path | None:
    """The project file of a dotted module name, or None.

    ``probed`` collects the folders whose entries decided the answer: a
    ``.py`` file or package created or removed there changes their mtime.
    """
    if not dotted:
        return None
    base = root.joinpath(*dotted.split("."))
    module = base.with_name(base.name + ".py")
    if module.is_file():
        return module  # found first, whatever else appears; its own stat is watched
    if probed is not None:
        folder = base.parent
        while not folder.is_dir() and folder != root:
            folder = folder.parent
        probed.add(str(folder))
        if base.is_dir():
            probed.add(str(base))
    package = base / "__init__.py"
    return package if package.is_file() else None


def _module_name_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


_STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def closure_of(root: Path, entry: Path, exclude: tuple[Path, ...] = (), cache_dir: Path | None = None) -> Closure:
    """Collect ``entry`` and every project-local module it imports.

    Relaunching is cheap: a computed closure is kept with the stat of each of
    its files and of each folder an import was looked up in, and returned
    again while none of them changed (a changed file is re-read and
    re-digested). With ``cache_dir`` (the storage's ``.cache``) this also
    holds across processes.
    """
    import time

    key = (str(root), str(entry), tuple(str(p) for p in exclude))
    disk = _disk.load(cache_dir) if cache_dir is not None else _disk
    memo = _closures.get(key) or disk.closures.get(key)
    if memo is not None and memo.still_valid():
        _closures[key] = memo
        return memo.closure
    stamps: dict[str, Stamp | None] = {}
    probed: set[str] = set()
    closure = _collect(root, entry, exclude, stamps, probed)
    now = time.time()
    for folder in probed:
        stamps[folder] = _stat_or_none(folder)
    if all(_settled(s, now) for s in stamps.values()):
        memo = _ClosureMemo(stamps, closure)
        _closures[key] = memo
        if cache_dir is not None:
            _disk.save(cache_dir, key, memo)
    return closure


def _stat_or_none(path: str) -> Stamp | None:
    try:
        return _stamp(os.stat(path))
    except OSError:
        return None


def _collect(root: Path, entry: Path, exclude: tuple[Path, ...], stamps: dict[str, Stamp | None], probed: set[str]) -> Closure:
    root = root.resolve()
    files: dict[str, SourceFile] = {}
    third_party: set[str] = set()
    pending = [entry.resolve()]
    while pending:
        path = pending.pop()
        rel = path.relative_to(root).as_posix()
        if rel in files:
            continue
        stamps[str(path)], info = _read_source(str(path))
        files[rel] = info
        package = _module_name_of(root, path)
        is_package = path.name == "__init__.py"
        for name, level in info.imports:
            if level:
                parts = package.split(".") if package else []
                if not is_package:
                    parts = parts[:-1]
                if level > 1:
                    parts = parts[: len(parts) - (level - 1)]
                name = ".".join([*parts, name] if name else parts)
            top = name.split(".")[0]
            if not top:
                continue
            found_local = False
            # ``import a.b.c`` also imports the packages ``a`` and ``a.b``.
            pieces = name.split(".")
            for i in range(1, len(pieces) + 1):
                target = _module_file(root, ".".join(pieces[:i]), probed)
                if target is not None and not any(_is_under(target, ex) for ex in exclude):
                    found_local = True
                    if target.relative_to(root).as_posix() not in files:
                        pending.append(target)
            if not found_local and not level and top not in _STDLIB:
                third_party.add(top)
    return Closure(files=dict(sorted(files.items())), third_party=third_party)


@dataclass
class _ClosureMemo:
    stamps: dict[str, Stamp | None]  # the closure's files and the folders imports were looked up in
    closure: Closure

    def still_valid(self) -> bool:
        for path, expected in self.stamps.items():  # the hot loop of every relaunch: kept plain
            try:
                st = os.stat(path)
            except OSError:
                if expected is not None:
                    return False
                continue
            if expected is None or expected != (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino):
                return False
        return True


_closures: dict[tuple[str, str, tuple[str, ...]], _ClosureMemo] = {}


class _DiskCache:
    """The stat caches of ``closure_of`` in ``<storage>/.cache/closures.json``, for new processes.

    Only a cache: an entry is used while the stat of everything it depends
    on is unchanged, a file whose stat changed is re-read and re-digested, and
    the whole file is ignored when it is damaged or was written by another
    hashing scheme (another machinable or Python version). It is written
    without fsync: losing it costs one re-hash.
    """

    NAME = "closures.json"
    KEEP = 64  # closures kept; files are kept while a kept closure uses them

    def __init__(self) -> None:
        self.files: dict[str, tuple[Stamp, SourceFile]] = {}
        self.closures: dict[tuple[str, str, tuple[str, ...]], _ClosureMemo] = {}
        self._loaded: tuple[str, Stamp | None] | None = None
        self._raw: dict[str, Any] = {}

    def load(self, cache_dir: Path) -> "_DiskCache":
        path = str(cache_dir / self.NAME)
        stamp = _stat_or_none(path)
        if self._loaded == (path, stamp):
            return self
        self.files, self.closures, self._raw = {}, {}, {}
        self._loaded = (path, stamp)
        if stamp is None:
            return self
        try:
            raw = orjson.loads(Path(path).read_bytes())
            if raw.get("scheme") != _scheme():
                return self
            for name, (st, normalized, object_digest, imports) in raw["files"].items():
                info = SourceFile(normalized, object_digest, tuple(map(tuple, imports)), None, name)
                self.files[name] = (tuple(st), info)
            for entry in raw["closures"]:
                key = (entry["root"], entry["entry"], tuple(entry["exclude"]))
                files = {rel: self.files[name][1] for rel, name in entry["files"].items()}
                closure = Closure(files=files, third_party=set(entry["third_party"]))
                stamps = {p: (tuple(s) if s is not None else None) for p, s in entry["stamps"].items()}
                self.closures[key] = _ClosureMemo(stamps, closure)
            self._raw = raw
        except (OSError, ValueError, KeyError, TypeError):
            self.files, self.closures, self._raw = {}, {}, {}
        return self

    def save(self, cache_dir: Path, key: tuple[str, str, tuple[str, ...]], memo: _ClosureMemo) -> None:
        if not cache_dir.parent.is_dir():
            return  # no storage yet: hashing alone does not create one
        self.load(cache_dir)
        closures = [c for c in self._raw.get("closures", []) if (c["root"], c["entry"], tuple(c["exclude"])) != key]
        root = Path(key[0]).resolve()
        names = {rel: str(root / rel) for rel in memo.closure.files}
        closures.append({
            "root": key[0], "entry": key[1], "exclude": list(key[2]), "files": names,
            "third_party": sorted(memo.closure.third_party), "stamps": memo.stamps,
        })
        closures = closures[-self.KEEP:]
        used = {name for c in closures for name in c["files"].values()}
        files = {n: v for n, v in self._raw.get("files", {}).items() if n in used}
        for rel, name in names.items():
            info = memo.closure.files[rel]
            st = memo.stamps.get(name)
            if st is not None:
                files[name] = [st, info.normalized, info.raw, info.imports]
        data = orjson.dumps({"format": 1, "scheme": _scheme(), "files": files, "closures": closures})
        from machinable.errors import StorageError
        from machinable.storage import DIR_MODE, atomic_write

        try:
            cache_dir.mkdir(mode=DIR_MODE, exist_ok=True)
            atomic_write(cache_dir / self.NAME, data, sync=False)  # a full disk leaves no half cache behind
        except (OSError, StorageError):
            return  # a read-only or full storage: the cache only saves time
        self._loaded = None  # re-read (and re-check) on next use


_disk = _DiskCache()
_SCHEME: str | None = None


def _scheme() -> str:
    """Identifies how digests are computed: this module's code and the Python version (its ast)."""
    global _SCHEME
    if _SCHEME is None:
        _SCHEME = f"{sys.version_info[0]}.{sys.version_info[1]}:{digest_bytes(Path(__file__).read_bytes())}"
    return _SCHEME


def _is_under(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
    except ValueError:
        return False
    return True


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"{ALGORITHM}:{h.hexdigest()}"
