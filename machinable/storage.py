"""Storage: the experiment directories (the source of truth) and how they are
written: atomic files, an append-only event ledger, run-once claims, MANIFESTs.

Layout, one directory per experiment under the storage root::

    <id>/experiment.json code.json git.json git.diff env.json
        events.jsonl output.log records.jsonl data/ MANIFEST .claim
        attempts/<n>/git.json git.diff   (a resumed attempt that ran with another git state)
    .objects/<2 hex>/<30 hex>    content-addressed source objects
    index.sqlite                 derived index (see ``machinable.index``)
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from machinable.errors import StorageError, StorageFormatError

FORMAT = 1
MANIFEST = "MANIFEST"
CLAIM = ".claim"
TMP = ".tmp"
OBJECTS = ".objects"
LOCKS = ".locks"
OBJECTS_LOCK = "objects"  # shared while a commit adds objects, exclusive while gc sweeps them
# Created files and folders never grant write access to others, whatever the
# umask (which still narrows them further, e.g. 0o077 -> private records).
FILE_MODE = 0o664
DIR_MODE = 0o775


def now_iso() -> str:
    """UTC time with a fixed width, so that stored times also sort as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _storage_error(e: OSError, what: str, path: Path | str) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(f"No space left on device while writing {what} ({path}). Free space and launch again: the experiment resumes.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"Storage is not writable: cannot write {what} ({path}): {e.strerror}. Choose a writable storage with MACHINABLE_STORAGE or --storage.")
    return StorageError(f"Could not write {what} ({path}): {e}")


def fsync_enabled() -> bool:
    return os.environ.get("MACHINABLE_FSYNC", "1") not in ("0", "false", "no")


def atomic_write(path: Path, data: bytes, *, what: str | None = None, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via temp file, fsync and rename (``sync=False``:
    no fsync, for derived files such as caches, which are only ever whole or absent)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync and fsync_enabled():
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _storage_error(e, what or path.name, path) from e


def write_json(path: Path, document: dict[str, Any]) -> None:
    atomic_write(path, json_bytes(document))


def json_bytes(document: dict[str, Any]) -> bytes:
    """How every stored JSON document is written: with its format, sorted, indented."""
    return orjson.dumps({"format": FORMAT, **document}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


# --- user values: results, record rows, JSON data files ---------------------------------
#
# JSON has no NaN or infinity, and orjson writes them as null: a diverging loss
# would come back as None. Documents that hold such a float are written with the
# tokens Python's json module writes and reads (NaN, Infinity, -Infinity);
# every other document stays strict JSON, written by orjson.

_NONFINITE_TOKENS = (b"NaN", b"Infinity")
_marker: str | None = None


def dumps_value(value: Any, *, indent: bool = False) -> bytes:
    """JSON bytes of a user value (numpy values included), non-finite floats kept
    as ``NaN``/``Infinity``/``-Infinity``. Raises TypeError for what JSON cannot hold."""
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    data = orjson.dumps(value, default=_numpy_default, option=option)
    if b"null" not in data:  # orjson wrote every NaN and infinity as null: none here
        return data
    global _marker
    if _marker is None:  # random per process, so no user string can pass for it
        _marker = "\x00machinable-nonfinite-" + uuid.uuid4().hex + ":"
    marked, found = _mark_nonfinite(value, _marker)
    if not found:
        return data
    data = orjson.dumps(marked, default=_numpy_default, option=option)
    quoted = orjson.dumps(_marker)[:-1]  # the marker as orjson spells it, opening quote included
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        data = data.replace(quoted + token + b'"', token)
    return data


def _numpy_default(value: Any) -> Any:
    """What orjson's numpy support leaves out (float16 scalars, say), as Python values."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Type is not JSON serializable: {type(value).__module__}.{type(value).__qualname__}")


def _mark_nonfinite(value: Any, marker: str) -> tuple[Any, bool]:
    """A copy of ``value`` with each NaN/infinity replaced by ``marker + token``
    (the marker is swapped for the bare token in the JSON text)."""
    if isinstance(value, float):
        if value != value:
            return marker + "NaN", True
        if value in (float("inf"), float("-inf")):
            return marker + ("Infinity" if value > 0 else "-Infinity"), True
        return value, False
    if isinstance(value, dict):
        out, found = {}, False
        for key, item in value.items():
            out[key], hit = _mark_nonfinite(item, marker)
            found = found or hit
        return (out, True) if found else (value, False)
    if isinstance(value, (list, tuple)):
        items = [_mark_nonfinite(item, marker) for item in value]
        return ([item for item, _ in items], True) if any(hit for _, hit in items) else (value, False)
    if type(value).__module__ == "numpy" and getattr(getattr(value, "dtype", None), "kind", "-") in ("f", "O"):
        marked, found = _mark_nonfinite(value.tolist(), marker)  # numpy floats (scalars, arrays) as Python floats
        return (marked, True) if found else (value, False)
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        marked, found = _mark_nonfinite(fields, marker)
        return (marked, True) if found else (value, False)
    return value, False


def loads_value(data: bytes) -> Any:
    """A value written by ``dumps_value`` (strict JSON, or JSON with NaN/Infinity tokens)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if not any(token in data for token in _NONFINITE_TOKENS):
            raise
        import json

        try:
            return json.loads(data)
        except ValueError:
            pass
        raise


def write_unpublished(path: Path, data: bytes, *, what: str | None = None) -> None:
    """Write a file inside a folder that is not published yet (see ``make_temp_dir``).

    No temp file and no fsync of its own: the folder's rename publishes all
    its files at once, after one ``sync_paths`` of them all.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise _storage_error(e, what or path.name, path) from e


_sync_pool: tuple[int, Any] | None = None


def sync_paths(paths: list[Path]) -> None:
    """Make files (and folders' entries) durable: fsync each, all at once.

    The fsyncs run concurrently, so the file system can commit them together
    (one journal commit and one device flush instead of one per file); each
    file still gets its own fsync, so this holds on any POSIX file system.
    """
    if not fsync_enabled() or not paths:
        return
    if len(paths) == 1:
        _fsync_path(paths[0])
        return
    global _sync_pool
    if _sync_pool is None or _sync_pool[0] != os.getpid():  # a forked child has no pool threads
        from concurrent.futures import ThreadPoolExecutor

        _sync_pool = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="machinable-fsync"))
    futures = [_sync_pool[1].submit(_fsync_path, p) for p in paths[1:]]
    _fsync_path(paths[0])  # meanwhile, here: one thread handoff less
    for future in futures:
        future.result()


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _storage_error(e, path.name, path) from e


def silence(stream: Any) -> None:
    """Point a stream's file descriptor at /dev/null: its reader went away (a
    closed pipe), and what the stream still buffers must not fail a later flush."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor behind it
        pass


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except orjson.JSONDecodeError as e:
        raise StorageFormatError(f"{path} is damaged (not valid JSON: {e}). Run `machinable verify` for details.") from None
    if not isinstance(data, dict):
        raise StorageFormatError(f"{path} is damaged (expected a JSON object).")
    fmt = data.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise StorageFormatError(
            f"{path} has storage format {fmt!r}, but this machinable reads format <= {FORMAT}. Upgrade machinable to read it."
        )
    return data


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with DIR_MODE for every folder it creates (``Path.mkdir``
    gives missing parents the default 0o777 & ~umask)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise


def append_line(path: Path, row: dict[str, Any], *, what: str = "event", sync: bool = True) -> None:
    """Append one JSON line, so readers see whole lines only.

    Under an exclusive ``flock`` of the file: a torn last line (a crash or a
    full disk mid-append) is cut off first, so it cannot swallow this line,
    and the line is written whole or the error is raised.
    """
    import fcntl

    line = dumps_value(row) + b"\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _cut_torn_tail(fd)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            if sync and fsync_enabled():
                os.fsync(fd)
        finally:
            os.close(fd)  # drops the lock
    except OSError as e:
        raise _storage_error(e, what, path) from e


def _cut_torn_tail(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - 65536)
    while True:
        block = os.pread(fd, size - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        if start == 0:
            os.ftruncate(fd, 0)
            return
        start = max(0, start - 65536)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn (unterminated) last line is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_rows(data)


def parse_rows(data: bytes) -> list[dict[str, Any]]:
    """Rows of JSON-lines bytes; a torn (unterminated) last line is ignored."""
    rows = []
    for line in data.split(b"\n")[:-1] if data else []:
        if not line.strip():
            continue
        try:
            row = loads_value(line)  # record rows may hold NaN or Infinity
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def repair_torn_tail(path: Path) -> bool:
    """Cut an unterminated last line (left by a crash mid-append)."""
    try:
        with open(path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
            return True
    except FileNotFoundError:
        return False


# --- objects -----------------------------------------------------------------


def object_path(root: Path, tagged_digest: str) -> Path:
    hexd = tagged_digest.split(":", 1)[1]
    return root / OBJECTS / hexd[:2] / hexd[2:]


def put_object(root: Path, tagged_digest: str, data: bytes) -> None:
    path = object_path(root, tagged_digest)
    if path.exists():
        return
    try:
        make_dirs(path.parent)
    except OSError as e:
        raise _storage_error(e, "source object", path) from e
    atomic_write(path, data, what="source object")


def get_object(root: Path, tagged_digest: str) -> bytes | None:
    try:
        return object_path(root, tagged_digest).read_bytes()
    except FileNotFoundError:
        return None


# --- claims ------------------------------------------------------------------


def heartbeat_timeout() -> float:
    try:
        return float(os.environ.get("MACHINABLE_HEARTBEAT_TIMEOUT", "60"))
    except ValueError:
        return 60.0


class Claim:
    """The right to execute one experiment, held as a ``flock`` on ``.claim``.

    The kernel (or the NFS lock manager) drops the lock when its holder dies,
    so a killed run never blocks its resumption. ``flock`` (not ``lockf``)
    because its locks belong to the open file, so a status probe in the
    holding process cannot release the claim by closing another descriptor;
    Linux maps it onto NFS byte-range locks on shared file systems. While held, a heartbeat
    thread refreshes the claim file's mtime; a lock whose heartbeat is older
    than ``MACHINABLE_HEARTBEAT_TIMEOUT`` (a frozen or partitioned holder) may
    be taken over, and its holder notices on its next beat.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CLAIM
        self.fd: int | None = None
        self.lost = False

    def try_acquire(self) -> bool:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise _storage_error(e, "claim", self.path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if self._heartbeat_is_stale():
                return self._take_over()
            return False
        if os.fstat(fd).st_ino != _inode(self.path):  # replaced meanwhile
            os.close(fd)
            return False
        self._own(fd)
        return True

    def _heartbeat_is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > heartbeat_timeout()

    def _take_over(self) -> bool:
        import fcntl

        guard_path = self.directory / ".claim.takeover"
        guard = os.open(guard_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if not self._heartbeat_is_stale():
                return False
            fresh = self.directory / f".claim.{uuid.uuid4().hex[:8]}"
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(fresh, self.path)
            self._own(fd)
            return True
        finally:
            os.close(guard)

    def _own(self, fd: int) -> None:
        self.fd = fd
        info = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": now_iso()})
        os.pwrite(fd, info, 0)
        if os.fstat(fd).st_size > len(info):  # an earlier owner's longer note (truncating always costs a journal write)
            os.ftruncate(fd, len(info))
        os.utime(self.path)

    def start_heartbeat(self, interval: float | None = None) -> None:
        _heartbeat.add(self, interval or max(0.5, min(10.0, heartbeat_timeout() / 4)))

    def _beat(self) -> bool:
        """Refresh the claim's mtime; False once it is released or was taken over."""
        if self.fd is None:
            return False
        try:
            if os.fstat(self.fd).st_ino != _inode(self.path):
                self.lost = True
                return False
            os.utime(self.path)
        except OSError:
            pass
        return True

    def holds(self) -> bool:
        """Still ours: not released and not taken over after a stale heartbeat."""
        if self.fd is None or self.lost:
            return False
        try:
            return os.fstat(self.fd).st_ino == _inode(self.path)
        except OSError:
            return False

    def stop_heartbeat(self) -> None:
        _heartbeat.remove(self)

    def release(self) -> None:
        _heartbeat.remove(self)
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


class _Heartbeat:
    """One thread per process refreshes every claim the process holds.

    (A thread per claim cost a thread start and join per launch.) Beats run
    under the lock that ``remove`` takes, so once ``remove`` returns no beat
    touches that claim again (nothing lands after a seal). A forked child
    starts with an empty registry and its own thread.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Condition()
        self._due: dict[Claim, tuple[float, float]] = {}  # claim -> (next beat, interval)
        self._pid: int | None = None

    def add(self, claim: Claim, interval: float) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, args=(self._pid,), name="machinable-heartbeat", daemon=True).start()
            self._due[claim] = (time.monotonic() + interval, interval)
            self._lock.notify()

    def remove(self, claim: Claim) -> None:
        with self._lock:
            self._due.pop(claim, None)

    def _run(self, pid: int) -> None:
        with self._lock:
            while self._pid == pid:
                now = time.monotonic()
                for claim, (due, interval) in list(self._due.items()):
                    if due <= now:
                        if claim._beat():
                            self._due[claim] = (now + interval, interval)
                        else:
                            del self._due[claim]
                wake = min((due for due, _ in self._due.values()), default=now + 60.0)
                self._lock.wait(max(0.0, wake - time.monotonic()))


_heartbeat = _Heartbeat()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_heartbeat._reset)


class FileLock:
    """A blocking ``flock`` on a lock file, as a context manager (``.locks/<name>``);
    ``shared`` locks exclude only the exclusive ones."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self.fd: int | None = None

    def __enter__(self) -> "FileLock":
        import fcntl

        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise _storage_error(e, "lock file", self.path) from e
        fcntl.flock(fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return -1


def claim_is_held(directory: Path) -> bool:
    """True while some live process holds the experiment's claim."""
    import fcntl

    path = directory / CLAIM
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # a shared lock conflicts with the holder's exclusive lock
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return time.time() - path.stat().st_mtime <= heartbeat_timeout()
        except FileNotFoundError:
            return False
    finally:
        os.close(fd)
    return False


# --- MANIFEST and sealing ----------------------------------------------------

SEALING = ".sealing"  # exists from just before the finished event until the seal is complete (MANIFEST, read-only)
_UNSEALED = {CLAIM, ".claim.takeover", MANIFEST, SEALING}
REPRODUCTIONS = "reproductions"  # added beside a sealed record; not part of it
ATTEMPTS = "attempts"  # attempts/<n>/git.json, git.diff: the git state of an attempt that ran with another than git.json's


def manifest_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in _UNSEALED and not path.name.startswith(".claim."):
            rel = path.relative_to(directory)
            if rel.parts[0] == REPRODUCTIONS:
                continue  # added after sealing, by design
            yield path


def write_manifest(directory: Path) -> None:
    """Write MANIFEST once every file it lists is durable, so a sealed record is
    whole after a power cut too (events, output and data are appended
    without fsync while the run lasts; they are synced here, together)."""
    from machinable.hashing import ALGORITHM, file_digest

    listed = list(manifest_files(directory))
    files = {p.relative_to(directory).as_posix(): file_digest(p) for p in listed}
    path = directory / MANIFEST
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_unpublished(tmp, json_bytes({"algorithm": ALGORITHM, "files": files, "sealed": now_iso()}), what=MANIFEST)
        sync_paths([*listed, tmp])
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def make_read_only(directory: Path, *, folder: bool = True) -> None:
    """Drop write bits on a record: every file and folder, the record folder itself
    included (unless not ``folder``), except ``reproductions/`` (where later
    reproductions are recorded) and the claim files (so a status probe can still open them)."""
    for path in [*sorted(directory.rglob("*"), reverse=True), *([directory] if folder else [])]:
        rel = path.relative_to(directory).parts
        if path.name in (CLAIM, ".claim.takeover") or (rel and rel[0] == REPRODUCTIONS):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def is_sealed(directory: Path) -> bool:
    return (directory / MANIFEST).exists()


def seal(directory: Path) -> None:
    """Finish a record: MANIFEST of per-file digests, then read-only.

    Idempotent, so a crash between the steps is repaired by sealing again:
    the ``.sealing`` mark goes last (before the folder's own write bit), so a
    crash anywhere before leaves it for the next launch to complete the seal.
    The writable ``reproductions/`` folder is made first, because nothing can
    be created in the record folder once it is read-only.
    """
    try:
        (directory / REPRODUCTIONS).mkdir(mode=DIR_MODE, exist_ok=True)
    except OSError as e:
        raise _storage_error(e, "reproductions folder", directory) from e
    if not is_sealed(directory):
        remove_temp_files(directory)  # an interrupted seal's half-written MANIFEST
        write_manifest(directory)
    make_read_only(directory, folder=False)
    try:
        (directory / SEALING).unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _storage_error(e, "seal marker", directory) from e
    mode = directory.lstat().st_mode
    os.chmod(directory, stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def begin_seal(directory: Path) -> None:
    """Mark that this run is about to finish: if a crash stops it between its
    ``finished`` event and its MANIFEST, the mark tells the next launch to
    complete the seal (a finished record without MANIFEST and without the
    mark has lost its MANIFEST, which ``verify`` reports instead)."""
    try:
        os.close(os.open(directory / SEALING, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    except OSError as e:
        raise _storage_error(e, "seal marker", directory) from e


def seal_interrupted(directory: Path) -> bool:
    """True if a crash stopped a finishing run before its seal was complete
    (before or after its MANIFEST was written, or after the mark was removed
    but before the folder's own write bit was cleared)."""
    if (directory / SEALING).exists():
        return True
    try:
        return is_sealed(directory) and bool(directory.lstat().st_mode & stat.S_IWUSR)
    except FileNotFoundError:
        return False


def complete_seal(directory: Path) -> bool:
    """Finish sealing a record whose run was killed while sealing. True if it did.

    Under the claim, so that two launches never seal at once.
    """
    if not seal_interrupted(directory):
        return False
    claim = Claim(directory)
    if not claim.try_acquire():
        return False  # another process is completing it
    try:
        if not seal_interrupted(directory):
            return False
        seal(directory)
        return True
    finally:
        claim.release()


def remove_temp_files(directory: Path) -> None:
    """Delete the temp files of atomic writes a crash left behind (under the claim)."""
    for path in directory.rglob(".*.tmp"):
        try:
            path.unlink()
        except OSError:
            pass


def verify_manifest(directory: Path) -> list[str]:
    """Problems of a sealed directory, one line each (empty when intact)."""
    from machinable.hashing import file_digest

    problems: list[str] = []
    try:
        manifest = read_json(directory / MANIFEST)
    except FileNotFoundError:
        return [f"{directory.name}/MANIFEST: missing (record finished but not sealed)"]
    except StorageError as e:
        return [f"{directory.name}/MANIFEST: {e}"]
    listed = manifest.get("files", {})
    for rel, expected in sorted(listed.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{directory.name}/{rel}: missing")
        elif file_digest(path) != expected:
            problems.append(f"{directory.name}/{rel}: content changed (digest differs from MANIFEST)")
    for path in manifest_files(directory):
        rel = path.relative_to(directory).as_posix()
        if rel not in listed:
            problems.append(f"{directory.name}/{rel}: not in MANIFEST (added after sealing)")
    return problems


# --- verification ---------------------------------------------------------------


class Problem:
    """One thing wrong with a stored experiment: the file (relative to the
    storage root) and what is wrong with it."""

    def __init__(self, experiment_id: str, file: str, message: str) -> None:
        self.experiment_id, self.file, self.message = experiment_id, file, message

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"

    def as_json(self) -> dict[str, str]:
        return {"experiment": self.experiment_id, "file": self.file, "problem": self.message}


def document_problem(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"damaged: not valid JSON ({len(data)} bytes; truncated or overwritten)"
    if not isinstance(document, dict):
        return "damaged: not a JSON object"
    fmt = document.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        return f"storage format {fmt!r} is unknown to this machinable (reads <= {FORMAT})"
    return None


def _lines_problems(path: Path, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a JSON-lines file and its damaged lines (a torn, unterminated
    last line is a crash's trace, not damage: readers skip it, the next append
    cuts it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], ["missing"]
    rows, bad = [], []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            row = loads_value(line)
        except orjson.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if not bad:
        return rows, []
    if len(bad) == 1:
        return rows, [f"line {bad[0]} is not a valid {what} (damaged)"]
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return rows, [f"{len(bad)} lines are not valid {what}s (damaged): lines {shown}"]


def ledger_problems(directory: Path) -> list[str]:
    """Damage visible without re-hashing: an unreadable ledger, or a ledger
    that contradicts the seal. ``file: message`` lines relative to ``directory``.

    A run may be sealing while this reads, so each file is looked at in the
    order the run writes them (``.sealing``, the finished event, MANIFEST,
    then ``.sealing`` removed): MANIFEST before the ledger (a MANIFEST seen
    means the finished event is there to read), and the ledger before
    ``.sealing`` before MANIFEST again (a finished event seen means either the
    mark or the MANIFEST is there to see).
    """
    sealed = is_sealed(directory)
    events, problems = _lines_problems(directory / "events.jsonl", "event")
    found = [f"events.jsonl: {p}" for p in problems]
    finished = any(row.get("event") == "finished" for row in events)
    if sealed and not finished:
        found.append("events.jsonl: has no 'finished' event, yet the record is sealed (MANIFEST): the ledger is damaged")
    elif finished and not sealed and not (directory / SEALING).exists() and not is_sealed(directory):
        found.append("MANIFEST: missing: the record is finished but its MANIFEST was deleted, so its files cannot be checked")
    return found


def looks_damaged(directory: Path, row: dict[str, Any]) -> bool:
    """Whether ``list`` should mark an index row's record as damaged: a few
    ``stat`` calls per row, and a read only when they show a change since the
    row was indexed (the full check is ``verify``)."""
    try:
        events_size = os.stat(directory / "events.jsonl").st_size
    except OSError:
        return True
    if events_size != row.get("events_size", events_size) and ledger_problems(directory):
        return True
    try:
        sealed = os.stat(directory / MANIFEST).st_mtime_ns
    except FileNotFoundError:
        # .sealing before MANIFEST again: a run sealing right now writes MANIFEST before removing the mark
        return row.get("state") == "finished" and not (directory / SEALING).exists() and not is_sealed(directory)
    except OSError:
        return True
    try:
        changed = os.stat(directory / "experiment.json").st_mtime_ns > sealed
    except OSError:
        return True
    return changed and (document_problem(directory / "experiment.json") is not None or bool(ledger_problems(directory)))


def record_problems(root: Path, experiment_id: str, *, rehash: bool = True) -> list[Problem]:
    """Everything wrong with one stored experiment (empty when intact).

    Without ``rehash`` only the cheap checks run (documents parse, the ledger
    agrees with the seal); with it, a sealed record's files are re-hashed
    against its MANIFEST and its source objects against their digests.
    """
    directory = root / experiment_id
    problems: list[Problem] = []

    def add(file: str, message: str) -> None:
        problems.append(Problem(experiment_id, file, message))

    for name in ("experiment.json", "code.json", "git.json", "env.json"):
        message = document_problem(directory / name)
        if message is not None and (name == "experiment.json" or rehash):
            add(f"{experiment_id}/{name}", message)
    for line in ledger_problems(directory):
        name, message = line.split(": ", 1)
        add(f"{experiment_id}/{name}", message)
    if not rehash:
        return problems
    if seal_interrupted(directory) and not is_sealed(directory):
        add(f"{experiment_id}/MANIFEST", "missing: a crash interrupted sealing; launching the experiment again completes it")
    if is_sealed(directory):
        for line in verify_manifest(directory):
            name, message = line.split(": ", 1)
            if not any(p.file == name for p in problems):
                add(name, message)
    else:
        _, bad = _lines_problems(directory / "records.jsonl", "record")
        for message in bad:
            if message != "missing":
                add(f"{experiment_id}/records.jsonl", message)
    problems.extend(_object_problems(root, experiment_id))
    return problems


def _object_problems(root: Path, experiment_id: str) -> list[Problem]:
    """Source objects of the experiment's code.json that are missing or altered."""
    from machinable.hashing import file_digest

    try:
        files = read_json(root / experiment_id / "code.json").get("files", {})
    except (OSError, StorageError):
        return []  # reported as a damaged code.json
    problems = []
    for source, info in sorted(files.items()):
        digest = info.get("object") if isinstance(info, dict) else None
        if not isinstance(digest, str) or ":" not in digest:
            continue
        path = object_path(root, digest)
        rel = path.relative_to(root).as_posix()
        if not path.is_file():
            problems.append(Problem(experiment_id, rel, f"missing (the stored source of {source} for {experiment_id})"))
        elif file_digest(path) != digest:
            problems.append(Problem(experiment_id, rel, f"content changed (the stored source of {source} for {experiment_id})"))
    return problems


def make_temp_dir(root: Path) -> Path:
    tmp_root = root / TMP
    try:
        make_dirs(tmp_root)
        path = tmp_root / uuid.uuid4().hex
        path.mkdir(mode=DIR_MODE)
    except OSError as e:
        raise _storage_error(e, "experiment directory", root) from e
    return path


def publish_dir(tmp: Path, target: Path) -> bool:
    """Rename a fully written temp directory into place; False if it exists."""
    try:
        os.rename(tmp, target)
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise _storage_error(e, "experiment directory", target) from e


# --- the Storage element -------------------------------------------------------

from machinable.element import Element  # noqa: E402

_instances: dict[Path, "Storage"] = {}


class Storage(Element):
    """Where experiments are stored; use ``get('machinable.storage', {...})`` as a context.

    The default is ``$MACHINABLE_STORAGE`` or ``<project>/storage``.
    """

    class Config:
        directory: str = ""

    def __init__(self, config: dict[str, Any] | str | os.PathLike[str] | None = None, *, module: str | None = None,
                 project: Any = None) -> None:
        if isinstance(config, (str, os.PathLike)):  # Storage('/data/runs')
            config = {"directory": os.fspath(config)}
        super().__init__(config, module=module or "machinable.storage", project=project)
        directory = self.config.directory
        if not directory:  # Storage() inside `with get('machinable.storage', {...}):` is that storage
            active = Element.current(Storage)
            directory = str(active.root) if active is not None else ""
        directory = directory or os.environ.get("MACHINABLE_STORAGE") or "storage"
        path = Path(directory).expanduser()
        if not path.is_absolute():
            path = self.project.path / path
        self.root = Path(os.path.abspath(path))
        self._index: Any = None

    def __repr__(self) -> str:
        return f"Storage({str(self.root)!r})"

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> "Storage":
        """The (cached) storage at an explicit folder."""
        path = Path(os.path.abspath(Path(root).expanduser()))
        existing = _instances.get(path)
        if existing is None:
            existing = cls({"directory": str(path)})
            _instances[path] = existing
        return existing

    @classmethod
    def current(cls, project: Any = None) -> "Storage":  # type: ignore[override]
        """The storage in use: the innermost storage context, else ``$MACHINABLE_STORAGE``,
        else ``storage/`` in ``project`` (default: the current project)."""
        active = Element.current(Storage)
        if active is not None:
            return active
        from machinable.project import Project

        directory = os.environ.get("MACHINABLE_STORAGE") or str((project or Project.get()).path / "storage")
        return cls.at(directory)

    # --- layout -----------------------------------------------------------------

    def directory(self, experiment_id: str) -> Path:
        return self.root / experiment_id

    def lock(self, name: str, *, shared: bool = False) -> FileLock:
        """A blocking inter-process lock named ``name`` (a file under ``.locks/``)."""
        return FileLock(self.root / LOCKS / name, shared=shared)

    def ensure_writable(self) -> None:
        try:
            make_dirs(self.root)
        except OSError as e:
            raise _storage_error(e, "storage folder", self.root) from e
        if not os.access(self.root, os.W_OK):
            raise StorageError(
                f"Storage is not writable: {self.root}. Choose a writable storage with MACHINABLE_STORAGE or --storage."
            )

    @property
    def index(self) -> Any:
        """The SQLite index of this storage (``index.sqlite``; for a storage we
        may only read, such as an archive on a read-only share, one in the
        user's cache, so that list/show/diff work there too)."""
        if self._index is None:
            from machinable.index import Index, cache_path

            try:
                self.ensure_writable()
                self._index = Index.at(self.root)
            except StorageError:
                if not self.root.is_dir() or os.access(self.root, os.W_OK):
                    raise
                self._index = Index.at(self.root, cache_path(self.root))
        return self._index

    def fresh_index(self) -> Any:
        """The index, synced with the directories if they changed behind its back
        (a damaged index file is replaced and refilled)."""
        import sqlite3

        from machinable.index import is_damage

        index = self.index
        try:
            index.ensure_fresh(self.read_row)
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            index.recover()
            index.ensure_fresh(self.read_row)
        return index

    def read_row(self, experiment_id: str, directory: Path | None = None) -> dict[str, Any] | None:
        """The index row of one experiment, read from its directory alone
        (``directory``: a not yet published copy of it)."""
        from machinable.index import read_row

        return read_row(self.root, experiment_id, directory)

    def rebuild_index(self, progress: Any = None) -> int:
        """Recreate the index from the directories alone; returns how many it holds.
        ``progress(done, total)`` is called as directories are read."""
        return self.index.rebuild(self.read_row, progress=progress)

    def refresh_state(self, experiment_id: str) -> None:
        """Re-derive an experiment's index row from its directory (after a ledger event).

        A crash between the event and this update leaves the index one state
        behind (never ahead): the next ``find``/``list`` (``settle()``), the
        next launch of the experiment, or a rebuild brings it up to date.
        """
        import sqlite3

        try:
            self.index.refresh(experiment_id, self.read_row)
        except (sqlite3.Error, OSError, StorageError):  # the index is derived: the ledger already holds the truth
            pass

    def settle(self) -> int:
        """Bring every unfinished experiment's index row up to date with its
        ledger (after crashes between a ledger event and its index update).
        Returns how many rows were re-read."""
        return self.fresh_index().settle(self.read_row)

    # --- lookups ------------------------------------------------------------------

    def resolve(self, prefix: str) -> str:
        """Full id for an id or any unique prefix of one.

        Raises ``ExperimentNotFound`` for an unknown prefix, and for an
        ambiguous one with the candidates (id, module, creation time).
        """
        from machinable.errors import ExperimentNotFound

        prefix = prefix.strip().lower()
        if not prefix or len(prefix) > 32 or not all(c in "0123456789abcdef" for c in prefix):
            raise ExperimentNotFound(f"Invalid experiment id {prefix!r}: ids are up to 32 hexadecimal digits (give any unique prefix).")
        if len(prefix) == 32 and self.directory(prefix).is_dir():
            return prefix
        if not self.root.is_dir():
            raise ExperimentNotFound(f"No experiment with id {prefix!r}: storage {self.root} holds no experiments.")
        index = self.fresh_index()
        candidates = [c for c in index.prefix(prefix, limit=11) if self.directory(c).is_dir()]
        if not candidates:
            raise ExperimentNotFound(f"No experiment with id {prefix!r} in {self.root}. `machinable list` shows the stored ones.")
        if len(candidates) > 1:
            lines = []
            for candidate in candidates[:10]:
                row = index.row(candidate) or {}
                lines.append(f"  {candidate[:12]}  {row.get('module') or '?'}  {(row.get('created') or '')[:19].replace('T', ' ')}")
            more = "\n  ... and more" if len(candidates) > 10 else ""
            raise ExperimentNotFound(
                f"Experiment id prefix {prefix!r} is ambiguous; it matches:\n" + "\n".join(lines) + more + "\nGive more characters."
            )
        return candidates[0]

    def load(self, experiment_id: str) -> Any:
        """The stored experiment with this id (or unique prefix), for inspection."""
        from machinable.experiment import Experiment

        return Experiment.restore(self, self.resolve(experiment_id))

    def experiment_ids(self) -> list[str]:
        """Ids of every experiment directory, from the folder itself (no index)."""
        import re

        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        pattern = re.compile(r"^[0-9a-f]{32}$")
        return sorted(name for name in names if pattern.match(name) and (self.root / name).is_dir())

    def _resolve_without_writing(self, prefix: str) -> str:
        """``resolve``, falling back to a folder scan where the index cannot be
        opened (read-only storage)."""
        from machinable.errors import ExperimentNotFound

        try:
            return self.resolve(prefix)
        except ExperimentNotFound:
            raise
        except StorageError:
            matches = [i for i in self.experiment_ids() if i.startswith(prefix.strip().lower())]
            if len(matches) == 1:
                return matches[0]
            if not matches:
                raise ExperimentNotFound(f"No experiment with id {prefix!r} in {self.root}.") from None
            raise ExperimentNotFound(
                f"Experiment id prefix {prefix!r} is ambiguous; it matches: {', '.join(m[:12] for m in matches[:10])}. Give more characters."
            ) from None

    def verify(self, ids: list[str] | None = None, *, progress: Any = None) -> tuple[list[str], list[Problem]]:
        """Re-check experiments (all, or ids/unique prefixes): documents parse,
        ledgers agree with seals, sealed files match their MANIFEST, source
        objects match their digests. Returns (checked ids, problems); reads
        only, so it also works on read-only storage.
        """
        checked = [self._resolve_without_writing(i) for i in ids] if ids else self.experiment_ids()
        problems: list[Problem] = []
        for n, experiment_id in enumerate(checked, 1):
            problems.extend(record_problems(self.root, experiment_id))
            if progress is not None:
                progress(n, len(checked))
        return checked, problems

    def gc(self, older_than: str | float = "7d", *, ids: list[str] | None = None, include_finished: bool = False,
           dry_run: bool = False) -> Any:
        """Remove unfinished experiments inactive for ``older_than`` (``'7d'``,
        ``'12h'``, seconds), leftovers of interrupted writes and unreferenced
        source objects; finished records only by explicit ``ids`` with
        ``include_finished``. ``dry_run`` only reports. See ``machinable.gc``."""
        from machinable.gc import collect

        return collect(self, older_than=older_than, ids=ids, include_finished=include_finished, dry_run=dry_run)

    def find(self, module: str | None = None, *, state: str | None = None, since: Any = None,
             limit: int | None = None, offset: int = 0, order: str = "newest",
             config: dict[str, Any] | None = None, check_keys: bool = True, **values: Any) -> Any:
        """Stored experiments matching a module, state, creation time and config values.

        ``Storage().find('estimate_gravity', time_dilation=1.5, state='finished')``
        returns a lazy ``Found``: iterate it for experiments (newest first, or
        ``order='oldest'``), ``.rows()`` for index rows, ``.count()``,
        ``.first()``. There is no silent cap: without ``limit`` every match
        is yielded, a page at a time. Config values match by flat key
        (``**{'model.lr': 0.1}``) and loosely by type (``1`` finds ``1.0``);
        pass ``config={...}`` for keys named like the parameters here. A key that
        no stored experiment (of ``module``) has is refused as a likely typo,
        naming the closest stored key (``check_keys=False`` allows it).
        ``since``: a datetime, date, ISO text or a duration back (``'7d'``).
        """
        from machinable.config import flatten
        from machinable.errors import UsageError
        from machinable.index import ORDERS, STATES, Found, Query, parse_since, value_keys

        if state is not None and state not in STATES:
            raise UsageError(f"Invalid state {state!r}: use one of {', '.join(STATES)}.")
        if order not in ORDERS:
            raise UsageError(f"Invalid order {order!r}: use one of {', '.join(ORDERS)}.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise UsageError(f"Invalid limit {limit!r}: give a number >= 0, or None for every match.")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise UsageError(f"Invalid offset {offset!r}: give a number >= 0.")
        wanted = flatten({**(config or {}), **values})
        if wanted and check_keys and self.root.is_dir():
            self._check_stored_keys(module or None, list(wanted))
        query = Query(
            module=module or None,
            state=state,
            since=parse_since(since) if since is not None else None,
            config={key: value_keys(value) for key, value in wanted.items()},
        )
        return Found(self, query, order=order, limit=limit, offset=offset)

    def _check_stored_keys(self, module: str | None, keys: list[str]) -> None:
        """A config key that no stored experiment (of ``module``) has is a typo, not an empty result.

        Checked against what is stored rather than the module's current Config, so
        that keys of older code versions still find the experiments that have them.
        """
        from machinable.config import close_keys
        from machinable.errors import UsageError

        db = self.fresh_index().db
        of = "experiments e JOIN config_values c ON c.id = e.id"
        where, params = ("e.module = ?", (module,)) if module else ("1", ())
        if db.execute(f"SELECT 1 FROM experiments e WHERE {where} LIMIT 1", params).fetchone() is None:
            return  # nothing stored to check against: no match is the true answer
        for key in keys:
            if db.execute(f"SELECT 1 FROM {of} WHERE c.key = ? AND {where} LIMIT 1", (key, *params)).fetchone():
                continue
            known = [row[0] for row in db.execute(f"SELECT DISTINCT c.key FROM {of} WHERE {where} ORDER BY c.key", params)]
            close = close_keys(key, known)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            among = f"experiment of {module}" if module else "experiment"
            raise UsageError(
                f"No stored {among} has the config key {key!r}.{hint} "
                f"Stored keys: {', '.join(known) or '(none)'}."
            )
