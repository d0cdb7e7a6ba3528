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
    source: bytes = field(repr=False, compare=False)


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


_file_cache: dict[str, tuple[tuple[int, int, int], SourceFile]] = {}

# A file modified this recently may be modified again within the same
# timestamp tick (coarse kernel clocks, NFS), leaving its stat unchanged: such
# "racy" files are re-read rather than trusted from the cache (as git does).
RACY_SECONDS = 2.0


def read_source_file(path: Path) -> SourceFile:
    """Digest a file, reusing the result while its stat is unchanged."""
    import time

    key = str(path)
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _file_cache.get(key)
    if cached is not None and cached[0] == stamp and time.time() - st.st_mtime > RACY_SECONDS:
        return cached[1]
    source = path.read_bytes()
    try:
        imports = tuple(_imports_of(ast.parse(source, filename=key)))
    except (SyntaxError, ValueError):
        imports = ()
    info = SourceFile(
        normalized=digest_bytes(normalize_source(source, key).encode("utf-8", "surrogateescape")),
        raw=digest_bytes(source),
        imports=imports,
        source=source,
    )
    _file_cache[key] = (stamp, info)
    return info


@dataclass
class Closure:
    """A module's project-local import closure."""

    files: dict[str, SourceFile]  # project-relative posix path -> file
    third_party: set[str]  # top-level names of non-stdlib, non-project imports

    @property
    def code_hash(self) -> str:
        return digest({path: f.normalized for path, f in self.files.items()})

    def as_json(self) -> dict[str, Any]:
        return {
            "files": {path: {"normalized": f.normalized, "object": f.raw} for path, f in sorted(self.files.items())},
            "code_hash": self.code_hash,
        }


def _module_file(root: Path, dotted: str) -> Path | None:
    if not dotted:
        return None
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


_STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def closure_of(root: Path, entry: Path, exclude: tuple[Path, ...] = ()) -> Closure:
    """Collect ``entry`` and every project-local module it imports."""
    root = root.resolve()
    files: dict[str, SourceFile] = {}
    third_party: set[str] = set()
    pending = [entry.resolve()]
    while pending:
        path = pending.pop()
        rel = path.relative_to(root).as_posix()
        if rel in files:
            continue
        info = read_source_file(path)
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
                target = _module_file(root, ".".join(pieces[:i]))
                if target is not None and not any(_is_under(target, ex) for ex in exclude):
                    found_local = True
                    if target.relative_to(root).as_posix() not in files:
                        pending.append(target)
            if not found_local and not level and top not in _STDLIB:
                third_party.add(top)
    return Closure(files=dict(sorted(files.items())), third_party=third_party)


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
