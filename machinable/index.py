"""The derived SQLite index over the experiment directories.

The directories are the source of truth; this index only makes lookups fast
(get-or-create, ``find``, ``machinable list``, id prefixes). Every row is
derived from one directory alone (``read_row``), so the index can be deleted
at any time and rebuilt from the directories, and an index that agrees with
its directories is exactly the index a rebuild would produce.

How it stays in agreement:

- Writers insert an experiment's row *before* renaming its directory into
  place, so a directory never exists unindexed, and re-derive the row from the
  directory after each ledger event (``refresh``). Concurrent refreshes cannot
  move a row backwards: a row only replaces one derived from a shorter ledger.
- Directories added or removed behind our back (copied in, deleted by hand,
  written by a crashed process) change the storage folder's mtime, which is
  compared with the one recorded at the last sync (an O(1) check before each
  lookup); a difference triggers an incremental sync.
- A ledger that grew behind our back is caught before ``find``/``list`` by
  comparing the ledger size of every unfinished row with its file (finished
  records are sealed read-only and cannot change).
- A missing, damaged or other-version index file is recreated and filled from
  the directories.
"""

from __future__ import annotations

import atexit
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

SCHEMA_VERSION = 4  # 4: the duration column (the sum of the attempts' run times)
INDEX_FILE = "index.sqlite"
EVENTS = "events.jsonl"
_ID = re.compile(r"^[0-9a-f]{32}$")
PAGE = 500  # rows fetched per query page (memory stays flat however many match)
DAMAGED = "damaged"  # state of a directory whose experiment.json cannot be read

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS experiments (
        id TEXT PRIMARY KEY,
        module TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        seed TEXT NOT NULL,
        state TEXT NOT NULL,
        created TEXT NOT NULL,
        started TEXT,
        finished TEXT,
        duration REAL,
        git_commit TEXT,
        execution TEXT,
        config TEXT NOT NULL,
        events_size INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS by_config ON experiments (config_hash, code_hash, created)",
    "CREATE INDEX IF NOT EXISTS by_module ON experiments (module, created, id)",
    "CREATE INDEX IF NOT EXISTS by_created ON experiments (created, id)",
    "CREATE INDEX IF NOT EXISTS by_state ON experiments (state, created, id)",
    "CREATE INDEX IF NOT EXISTS unsettled ON experiments (id, events_size) WHERE state != 'finished'",
    """CREATE TABLE IF NOT EXISTS config_values (
        id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (key, value, id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS config_values_by_id ON config_values (id)",
]

COLUMNS = (
    "id", "module", "config_hash", "code_hash", "seed", "state", "created",
    "started", "finished", "duration", "git_commit", "execution", "config", "events_size",
)

_UPSERT = (
    f"INSERT INTO experiments ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))}) "
    f"ON CONFLICT(id) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in COLUMNS[1:])} "
    "WHERE excluded.events_size >= experiments.events_size"
)

ReadRow = Callable[[str], "dict[str, Any] | None"]
Progress = Callable[[int, int], None]


# --- config values as lookup keys ---------------------------------------------------


def _normal(value: Any) -> Any:
    """1.0 and 1 look the same to a lookup (a float field stores 1.0 for 1)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def value_key(value: Any) -> str:
    """How a config value is stored for lookups (so 1.5 finds 1.5, 1 finds 1.0, True finds True)."""
    try:
        return orjson.dumps(_normal(value), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return orjson.dumps(repr(value)).decode()


def parse_literal(text: str) -> Any:
    """What a command-line value means: ``1.5`` -> 1.5, ``true`` -> True, ``[1,2]`` -> [1, 2]."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def value_keys(value: Any) -> list[str]:
    """The lookup keys ``value`` matches: a string also matches the literal it spells."""
    keys = [value_key(value)]
    if isinstance(value, str):
        literal = value_key(parse_literal(value))
        if literal not in keys:
            keys.append(literal)
    return keys


# --- rows, from a directory alone ------------------------------------------------------


def ledger_columns(directory: Path, data: bytes, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The columns an experiment's ledger decides: state, times, execution, size.

    ``events`` are ``data`` parsed, if the caller has them already."""
    from machinable.ledger import Ledger
    from machinable.storage import parse_rows

    ledger = Ledger(directory)
    if events is None:
        events = parse_rows(data)  # the ledger's own reader: NaN and Infinity included
    state = ledger.state(events, check_claim=False)
    last = ledger.last(events)
    started = next((e.get("time") for e in events if e.get("event") == "started"), None)
    ended = last.get("time") if last is not None and state in ("finished", "failed") and last["event"] == state else None
    execution = None
    for event in events:
        info = event.get("execution")
        if isinstance(info, dict) and isinstance(info.get("module"), str):
            execution = info["module"]
        elif isinstance(info, str):
            execution = info
    known = [seconds for seconds in attempt_durations(events) if seconds is not None]
    duration = sum(known) if known else None
    return {"state": state, "started": started, "finished": ended, "duration": duration, "execution": execution,
            "events_size": len(data)}


_ENDS = ("finished", "failed", "interrupted", "cancelled")


def attempt_durations(events: list[dict[str, Any]], now: Any = None) -> list[float | None]:
    """Seconds each attempt ran, from its ``started`` event to its end; None
    where the end is unknown. An attempt whose process died is closed by the
    next launch's ``interrupted`` note, written after the idle time in
    between: its length is unknown, so a resumed run's duration is the sum of
    what its attempts ran, never the time since the first start (likewise
    for any end noted by a process other than the one that ran the attempt).
    ``now`` (an aware datetime) ends an attempt still running."""
    from datetime import datetime

    def moment(text: Any) -> Any:
        try:
            return datetime.fromisoformat(text) if isinstance(text, str) else None
        except ValueError:
            return None

    out: list[float | None] = []
    current: dict[str, Any] | None = None
    for event in events:
        kind = event.get("event")
        if kind == "started":
            if current is not None:
                out.append(None)
            current = event
        elif kind in _ENDS and current is not None:
            start, end = moment(current.get("time")), moment(event.get("time"))
            # an end noted by another process (a later launch, a scheduler check) came when it was noticed
            by_another = (event.get("pid"), event.get("host")) != (current.get("pid"), current.get("host"))
            out.append(None if by_another or start is None or end is None else max(0.0, (end - start).total_seconds()))
            current = None
    if current is not None:
        start = moment(current.get("time"))
        out.append(max(0.0, (now - start).total_seconds()) if now is not None and start is not None else None)
    return out


def _document(path: str) -> dict[str, Any] | None:
    """A stored JSON document as ``read_json`` accepts it, or None (missing,
    damaged, or of a future format). Plain strings: this runs for every
    folder of a rebuild."""
    from machinable.storage import FORMAT

    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    fmt = data.get("format")
    return data if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt <= FORMAT else None


def read_row(root: Path, experiment_id: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The index row of one experiment, derived from its directory alone.

    None if there is no directory. A directory whose ``experiment.json`` is
    missing, damaged or of a future format still gets a row (state
    ``damaged``), so that ``list`` and ``show`` can point at it.
    """
    from machinable.config import flatten

    folder = os.fspath(directory) if directory is not None else os.path.join(os.fspath(root), experiment_id)
    try:
        with open(os.path.join(folder, EVENTS), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not os.path.isdir(folder):
            return None
        data = b""
    except OSError:
        data = b""
    from machinable.storage import parse_rows

    events = parse_rows(data)
    ledger = ledger_columns(Path(folder), data, events)
    record = _document(os.path.join(folder, "experiment.json"))
    config = record.get("config", {}) if record is not None else None
    if record is None or not isinstance(config, dict):
        created = next((e.get("time") for e in events if e.get("event") == "created"), None) or ""
        return {
            "id": experiment_id, "module": "", "config_hash": "", "code_hash": "", "seed": "",
            **ledger, "state": DAMAGED, "created": created, "git_commit": None, "config": "{}",
            "flat_config": {},
        }
    git = _document(os.path.join(folder, "git.json")) or {}
    return {
        "id": experiment_id,
        "module": str(record.get("module", "")),
        "config_hash": str(record.get("config_hash", "")),
        "code_hash": str(record.get("code_hash", "")),
        "seed": str(record.get("seed", "")),
        **ledger,
        "created": str(record.get("timestamp", "")),
        "git_commit": git.get("commit"),
        "config": orjson.dumps(config, option=orjson.OPT_SORT_KEYS).decode(),
        "flat_config": flatten(config),
    }


# --- the connection -----------------------------------------------------------------------


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row else None
    except (sqlite3.DatabaseError, ValueError):
        return None


def _is_write_failure(error: sqlite3.OperationalError) -> bool:
    """A full disk or read-only storage (not a busy database)."""
    text = str(error).lower()
    return any(w in text for w in ("full", "readonly", "read-only", "unable to open", "disk i/o"))


def is_damage(error: BaseException) -> bool:
    """A damaged index file ("not a database", "malformed"), not a busy one."""
    return type(error) is sqlite3.DatabaseError


# Open read-write connections of this process, closed at exit so that SQLite
# keeps the WAL file: deleting it would change the storage folder's mtime and
# make the next process re-sync for nothing (see ``_close_keeping_wal``).
_open: list[tuple[int, str, sqlite3.Connection]] = []
_keepers: list[sqlite3.Connection] = []
_at_exit_registered = False


def _close_keeping_wal() -> None:
    """Close this process's connections without deleting the WAL file.

    SQLite deletes ``index.sqlite-wal`` when the last connection closes, after
    a checkpoint; a read-only connection cannot checkpoint, so closing the
    read-write ones while a read-only one stays open (to be dropped at exit)
    leaves the files and with them the storage folder's mtime unchanged.
    """
    pid = os.getpid()
    for owner, path, conn in list(_open):
        if owner != pid:
            continue
        try:
            keeper = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            keeper.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            _keepers.append(keeper)
        except sqlite3.Error:
            pass
        try:
            conn.close()
        except sqlite3.Error:
            pass
    _open.clear()


def _delete_row(db: sqlite3.Connection, experiment_id: str) -> None:
    db.execute("DELETE FROM experiments WHERE id=?", (experiment_id,))
    db.execute("DELETE FROM config_values WHERE id=?", (experiment_id,))


def _retry_busy(work: Callable[[], Any], deadline: float = 60.0) -> Any:
    """Run ``work``, retrying while SQLite reports a busy database.

    SQLite skips the busy handler where waiting could deadlock (a connection
    that holds a read lock and asks for a write lock); such errors clear once
    the other connection finishes, so they are retried here with backoff.
    """
    start, pause = time.monotonic(), 0.005
    while True:
        try:
            return work()
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            if "locked" not in text and "busy" not in text or time.monotonic() - start > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _keep_wal(conn: sqlite3.Connection, path: Path) -> None:
    global _at_exit_registered
    option = getattr(sqlite3, "SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE", None)
    if option is not None and hasattr(conn, "setconfig"):  # Python >= 3.12
        conn.setconfig(option, True)
        return
    _open.append((os.getpid(), str(path), conn))
    if not _at_exit_registered:
        atexit.register(_close_keeping_wal)
        _at_exit_registered = True


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


_instances: dict[tuple[Path, Path | None], "Index"] = {}


def cache_path(root: Path) -> Path:
    """Where the index of a storage folder we cannot write to lives: the user's cache."""
    import xxhash

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "machinable" / "indexes" / f"{xxhash.xxh3_64_hexdigest(os.fsencode(os.path.abspath(root)))}.sqlite"


class Index:
    """The index of one storage folder (``Index.at(root)`` shares one per folder).

    It lives in ``root/index.sqlite``; ``path`` puts it elsewhere (the index of
    a read-only storage lives in the user's cache, see ``cache_path``).
    """

    def __init__(self, root: Path, path: Path | None = None) -> None:
        self.root = Path(root)
        self.path = Path(path) if path is not None else self.root / INDEX_FILE
        self._local = threading.local()
        self._synced_mtime: int | None = None

    @classmethod
    def at(cls, root: Path, path: Path | None = None) -> "Index":
        root = Path(os.path.abspath(root))
        key = (root, path)
        index = _instances.get(key)
        if index is None:
            index = _instances[key] = cls(root, path)
        return index

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r})"

    # --- connection ---------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            if _inode(self.path) == self._local.inode:
                return conn
            # index.sqlite was deleted (or replaced) under this connection: other
            # processes use the new file, so this one must too
            self.close()
            self._synced_mtime = None
        conn = self._connect()
        self._local.conn, self._local.pid, self._local.inode = conn, os.getpid(), _inode(self.path)
        return conn

    def _lock(self) -> Any:
        from machinable.storage import LOCKS, FileLock

        if self.path == self.root / INDEX_FILE:
            return FileLock(self.root / LOCKS / "index")
        return FileLock(self.path.with_name(self.path.name + ".lock"))

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
        self._discard()
        return self._open()

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            with self._lock():
                if not self.path.exists():
                    # A WAL left by a deleted index would be replayed into the new one.
                    _unlink(self.path.with_name(self.path.name + "-wal"))
                    _unlink(self.path.with_name(self.path.name + "-shm"))
                    conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
                    return self._configure(conn, locked=True)
        return self._configure(sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False))

    def _configure(self, conn: sqlite3.Connection, locked: bool = False) -> sqlite3.Connection:
        try:
            _retry_busy(lambda: self._ensure_wal(conn, locked))
            conn.execute("PRAGMA synchronous=NORMAL")
            if _schema_version(conn) != SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if _schema_version(conn) != SCHEMA_VERSION:  # re-check under the write lock
                        for table in ("experiments", "config_values", "meta"):
                            conn.execute(f"DROP TABLE IF EXISTS {table}")
                        for statement in _SCHEMA:
                            conn.execute(statement)
                        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                        conn.execute("INSERT OR REPLACE INTO meta VALUES ('root_mtime', '')")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise
        _keep_wal(conn, self.path)
        return conn

    def _ensure_wal(self, conn: sqlite3.Connection, locked: bool) -> None:
        """Switch a new index to WAL, one process at a time.

        Two connections converting the same file at once can deadlock inside
        SQLite, which then fails one of them with "database is locked" without
        waiting for the busy timeout; the file lock serialises the conversion.
        """
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        if locked:  # the caller holds the file lock already (flock is not re-entrant)
            conn.execute("PRAGMA journal_mode=WAL")
            return
        with self._lock():
            conn.execute("PRAGMA journal_mode=WAL")

    def _discard(self) -> None:
        """Delete a damaged index file (it is rebuilt from the directories)."""
        self.close()
        with self._lock():
            for suffix in ("", "-wal", "-shm"):
                _unlink(self.path.with_name(self.path.name + suffix))
        self._synced_mtime = None

    def recover(self) -> None:
        """Replace a damaged index with an empty one; the next lookup fills it."""
        self._discard()
        self.db  # noqa: B018 - reconnect now, so errors surface here

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            for entry in [e for e in _open if e[2] is conn]:
                _open.remove(entry)
            if getattr(self._local, "pid", None) == os.getpid():
                conn.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back itself (a full disk, for one)
            if isinstance(e, sqlite3.OperationalError) and _is_write_failure(e):
                from machinable.errors import StorageError

                cause = "No space left on device" if "full" in str(e).lower() else "Storage is not writable"
                raise StorageError(
                    f"{cause}: could not write the index {self.path} ({e}). Free space or choose a writable storage, then try again."
                ) from e
            raise
        return result

    # --- writes ---------------------------------------------------------------------

    def upsert(self, row: dict[str, Any]) -> None:
        self.upsert_many([row])

    def upsert_many(self, rows: list[dict[str, Any]]) -> None:
        self._transaction(lambda db: self._write_rows(db, rows))

    @staticmethod
    def _write_rows(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert or update rows; a row never replaces one derived from a longer ledger."""
        db.executemany(_UPSERT, [tuple(row.get(c, 0 if c == "events_size" else None) for c in COLUMNS) for row in rows])
        db.executemany(
            "INSERT OR IGNORE INTO config_values VALUES (?, ?, ?)",
            [(row["id"], k, value_key(v)) for row in rows for k, v in (row.get("flat_config") or {}).items()],
        )

    def refresh(self, experiment_id: str, read: ReadRow | None = None) -> None:
        """Re-derive one experiment's row from its directory (after a ledger event)."""
        row = (read or (lambda i: read_row(self.root, i)))(experiment_id)
        if row is None:
            self.delete(experiment_id)
        else:
            self.upsert(row)

    def delete(self, experiment_id: str) -> None:
        self._transaction(lambda db: _delete_row(db, experiment_id))

    def note_published(self, before: int | None, row: dict[str, Any] | None = None) -> None:
        """After publishing a directory: make sure its row is there, and keep the
        index 'fresh' if it was.

        A sync in another process may have dropped the row in the moment
        between the row's insertion and the directory's rename; both that
        sync's deletions and this check run in one write transaction each, so
        one of them sees the directory.
        """
        after: int | None = None
        if before is not None:
            try:
                after = self.root.stat().st_mtime_ns
            except OSError:
                after = None

        def work(db: sqlite3.Connection) -> int:
            if row is not None and db.execute("SELECT 1 FROM experiments WHERE id=?", (row["id"],)).fetchone() is None:
                self._write_rows(db, [row])
            if after is None:
                return 0
            return db.execute("UPDATE meta SET value=? WHERE key='root_mtime' AND value=?", (str(after), str(before))).rowcount

        if self._transaction(work):
            self._synced_mtime = after

    # --- freshness ------------------------------------------------------------------

    def fresh_mtime(self) -> int | None:
        """The storage mtime if the index is known to be in sync, else None."""
        try:
            current = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if self._synced_mtime == current:
            return current
        row = self.db.execute("SELECT value FROM meta WHERE key='root_mtime'").fetchone()
        if row and row[0] == str(current):
            self._synced_mtime = current
            return current
        return None

    def ensure_fresh(self, read: ReadRow | None = None, progress: Progress | None = None) -> None:
        """Sync with the directories if the storage folder changed unseen."""
        if self.fresh_mtime() is None:
            self.sync(read, progress=progress)

    def sync(self, read: ReadRow | None = None, *, full: bool = False, progress: Progress | None = None) -> tuple[int, int]:
        """Add unindexed directories and drop rows without one. (added, removed)

        ``full`` re-reads every directory (a rebuild) instead of only new ones.
        """
        read = read or (lambda i: read_row(self.root, i))
        try:
            before = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return (0, 0)
        with os.scandir(self.root) as entries:
            on_disk = {e.name for e in entries if _ID.match(e.name) and e.is_dir()}
        indexed = {r[0] for r in self.db.execute("SELECT id FROM experiments")}
        missing = sorted(on_disk if full else on_disk - indexed)
        gone = indexed - on_disk
        if progress is None and len(missing) >= 5000 and sys.stderr.isatty():
            progress = _stderr_progress(f"machinable: indexing {len(missing):,} experiment directories in {self.root}")
        added = 0
        for done, rows in _read_rows(read, missing):
            if rows:
                self.upsert_many(rows)
                added += len(rows)
            if progress is not None:
                progress(done, len(missing))

        def work(db: sqlite3.Connection) -> None:  # one transaction: see note_published
            for experiment_id in gone:
                if not (self.root / experiment_id).exists():
                    _delete_row(db, experiment_id)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('root_mtime', ?)", (str(before),))

        self._transaction(work)
        self._synced_mtime = before
        return added, len(gone)

    def rebuild(self, read: ReadRow | None = None, progress: Progress | None = None) -> int:
        """Empty the index and fill it from the directories alone. Returns the row count."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM experiments")
            db.execute("DELETE FROM config_values")
            db.execute("UPDATE meta SET value='' WHERE key='root_mtime'")

        self._transaction(work)
        self._synced_mtime = None
        added, _ = self.sync(read, full=True, progress=progress)
        try:
            self.db.execute("PRAGMA optimize")
        except sqlite3.OperationalError:
            pass
        return added

    def settle(self, read: ReadRow | None = None) -> int:
        """Re-read every unfinished row whose ledger changed size since it was indexed.

        Catches events appended without an index update (a crash in between,
        or a writer that does not know the index). Finished records are
        sealed and cannot change. Returns how many rows were re-read.
        """
        grown, shrunk = [], []
        # two range searches of the state index: "!=" would scan every row (17 ms at 100k)
        unfinished = "SELECT id, events_size FROM experiments WHERE state < 'finished' OR state > 'finished'"
        for experiment_id, size in self.db.execute(unfinished).fetchall():
            try:
                current = os.stat(self.root / experiment_id / EVENTS).st_size
            except FileNotFoundError:
                current = -1
            except OSError:
                continue
            if current > size:
                grown.append(experiment_id)
            elif current != size:  # a torn last line was cut off, or the folder is gone
                shrunk.append(experiment_id)
        if not grown and not shrunk:
            return 0
        read = read or (lambda i: read_row(self.root, i))
        rows = {i: read(i) for i in grown + shrunk}

        def work(db: sqlite3.Connection) -> None:
            for experiment_id, row in rows.items():
                if row is None or experiment_id in shrunk:  # the guard would keep the longer, older row
                    db.execute("DELETE FROM experiments WHERE id=?", (experiment_id,))
                if row is None:
                    db.execute("DELETE FROM config_values WHERE id=?", (experiment_id,))
            self._write_rows(db, [row for row in rows.values() if row is not None])

        self._transaction(work)
        return len(rows)

    # --- reads ------------------------------------------------------------------------

    def newest(self, config_hash: str, code_hash: str) -> str | None:
        row = self.db.execute(
            "SELECT id FROM experiments WHERE config_hash=? AND code_hash=? ORDER BY created DESC LIMIT 1",
            (config_hash, code_hash),
        ).fetchone()
        return row[0] if row else None

    def with_config(self, config_hash: str) -> list[dict[str, Any]]:
        return self.query("config_hash=?", (config_hash,), order="created DESC")

    def prefix(self, prefix: str, limit: int = 10) -> list[str]:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self.db.execute("SELECT id FROM experiments WHERE id >= ? AND id < ? ORDER BY id LIMIT ?", (prefix, upper, limit))
        return [r[0] for r in rows]

    def row(self, experiment_id: str) -> dict[str, Any] | None:
        found = self.db.execute(f"SELECT {','.join(COLUMNS)} FROM experiments WHERE id=?", (experiment_id,)).fetchone()
        return dict(zip(COLUMNS, found)) if found else None

    def config_is_selective(self, config: dict[str, list[str]], bound: int = 2000) -> bool:
        """Whether some config condition matches fewer than ``bound`` rows (cheap: stops at ``bound``)."""
        for key, values in config.items():
            marks = ",".join("?" * len(values))
            count = self.db.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM config_values WHERE key=? AND value IN ({marks}) LIMIT {int(bound)})",
                (key, *values),
            ).fetchone()[0]
            if count < bound:
                return True
        return False

    def has_config_key(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM config_values WHERE key=? LIMIT 1", (key,)).fetchone() is not None

    def query(self, where: str = "1", params: tuple[Any, ...] = (), *, order: str = "created DESC",
              limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return list(self.iter_query(where, params, order=order, limit=limit, offset=offset))

    def iter_query(self, where: str = "1", params: tuple[Any, ...] = (), *, order: str = "created DESC",
                   limit: int | None = None, offset: int = 0) -> Iterator[dict[str, Any]]:
        sql = f"SELECT {','.join(COLUMNS)} FROM experiments WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        rows = self.db.execute(sql, params).fetchall() if limit is not None and limit <= PAGE else None
        if rows is not None:
            yield from (dict(zip(COLUMNS, r)) for r in rows)
            return
        cursor = self.db.execute(sql, params)
        while page := cursor.fetchmany(PAGE):
            for r in page:
                yield dict(zip(COLUMNS, r))

    def count(self, where: str = "1", params: tuple[Any, ...] = ()) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM experiments WHERE {where}", params).fetchone()[0]

    def pages(self, where: str, params: Iterable[Any], *, descending: bool = True, offset: int = 0) -> Iterator[dict[str, Any]]:
        """Matching rows in (created, id) order, fetched a page at a time.

        Keyset pagination: no cursor stays open while the caller works on a
        page (so the caller may write to the index meanwhile), and memory
        stays flat however many rows match.
        """
        direction, compare = ("DESC", "<") if descending else ("ASC", ">")
        base = f"SELECT {','.join(COLUMNS)} FROM experiments WHERE ({where})"
        order = f" ORDER BY created {direction}, id {direction} LIMIT {PAGE}"
        params = tuple(params)
        rows = self.db.execute(base + order + f" OFFSET {int(offset)}", params).fetchall()
        while rows:
            yield from (dict(zip(COLUMNS, r)) for r in rows)
            if len(rows) < PAGE:
                return
            last = rows[-1]
            rows = self.db.execute(
                base + f" AND (created, id) {compare} (?, ?)" + order, (*params, last[COLUMNS.index("created")], last[0])
            ).fetchall()


def _read_rows(read: ReadRow, ids: list[str], chunk: int = 1000) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(ids read so far, rows) in chunks. Many folders are read by a few
    threads, one chunk ahead of the caller, so that reading (which waits on
    the disk) overlaps with the caller's inserts (during which SQLite releases
    the interpreter)."""
    if len(ids) <= chunk:
        for start in range(0, len(ids), 200):
            yield min(start + 200, len(ids)), [r for r in map(read, ids[start:start + 200]) if r is not None]
        return
    from concurrent.futures import ThreadPoolExecutor

    def read_part(part: list[str]) -> list[dict[str, Any]]:
        return [r for r in map(read, part) if r is not None]

    parts = [ids[start:start + chunk] for start in range(0, len(ids), chunk)]
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="machinable-index") as pool:
        pending = [pool.submit(read_part, part[i::4]) for part in parts[:2] for i in range(4)]
        done = 0
        for k, part in enumerate(parts):
            if k + 2 < len(parts):
                pending += [pool.submit(read_part, parts[k + 2][i::4]) for i in range(4)]
            mine, pending = pending[:4], pending[4:]
            rows = [row for future in mine for row in future.result()]
            done += len(part)
            yield done, rows


def _stderr_progress(title: str) -> Progress:
    state = {"shown": -1}

    def progress(done: int, total: int) -> None:
        percent = done * 100 // max(total, 1)
        if percent != state["shown"]:
            state["shown"] = percent
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r{title}: {percent}%{end}")
            sys.stderr.flush()

    return progress


# --- queries ----------------------------------------------------------------------------------

ORDERS = {"newest": True, "oldest": False}


@dataclass
class Query:
    """What ``Storage.find`` and ``machinable list`` ask the index for."""

    module: str | None = None
    state: str | None = None
    since: str | None = None  # ISO time, UTC
    config: dict[str, list[str]] = field(default_factory=dict)  # flat key -> acceptable value keys

    def where(self, by_config: bool = False) -> tuple[str, list[Any]]:
        """SQL condition and parameters. ``by_config``: make SQLite start from
        the config value lookup (when it matches few rows) rather than walk an
        index of module, state or time and test every row against it."""
        plus = "+" if by_config and self.config else ""
        where, params = ["1"], []
        if self.module:
            where.append(f"{plus}module=?")
            params.append(self.module)
        if self.state:
            # a 'running' row whose process died is 'interrupted' (checked per row)
            if self.state == "interrupted":
                where.append(f"{plus}state IN ('interrupted', 'running')")
            else:
                where.append(f"{plus}state=?")
                params.append(self.state)
        if self.since:
            where.append(f"{plus}created>=?")
            params.append(self.since)
        for key, values in self.config.items():
            marks = ",".join("?" * len(values))
            where.append(f"id IN (SELECT id FROM config_values WHERE key=? AND value IN ({marks}))")
            params.extend([key, *values])
        return " AND ".join(where), params


def live_state(root: Path, row: dict[str, Any]) -> str:
    """A row's state, with 'running' checked against the claim (a dead run is
    'interrupted') and a record damaged since it was indexed marked 'damaged'."""
    from machinable.storage import claim_is_held, looks_damaged

    if row["state"] != DAMAGED and looks_damaged(root / row["id"], row):
        return DAMAGED
    if row["state"] == "running":
        if not claim_is_held(root / row["id"]):
            return "interrupted"
    return row["state"]


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)$")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: Any) -> str:
    """A point in time as the index stores times (UTC ISO text).

    Accepts a ``datetime``/``date``, ISO text (``2024-05-01``,
    ``2024-05-01T12:00``, with or without offset; local time without), a
    duration back from now (``30m``, ``12h``, ``7d``, ``2w``), ``today`` or
    ``yesterday``.
    """
    from datetime import date, datetime, time, timedelta, timezone

    from machinable.errors import UsageError

    now = datetime.now(timezone.utc)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.astimezone()
    elif isinstance(value, date):
        moment = datetime.combine(value, time()).astimezone()
    elif isinstance(value, str):
        text = value.strip().lower()
        relative = _RELATIVE.match(text)
        if relative:
            moment = now - timedelta(seconds=float(relative.group(1)) * _UNITS[relative.group(2)])
        elif text in ("today", "yesterday"):
            midnight = datetime.combine(datetime.now().date(), time()).astimezone()
            moment = midnight - timedelta(days=1 if text == "yesterday" else 0)
        else:
            try:
                moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise UsageError(
                    f"Invalid time {value!r} for --since: give a date (2024-05-01), a date and time "
                    "(2024-05-01T14:30), a duration back from now (30m, 12h, 7d, 2w), today or yesterday."
                ) from None
            if moment.tzinfo is None:
                moment = moment.astimezone()
    else:
        raise UsageError(f"Invalid time {value!r} for since=: give a datetime, a date or text such as '7d'.")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


STATES = ("created", "dispatched", "running", "finished", "failed", "interrupted", DAMAGED)


class Found:
    """Stored experiments matching a query, newest first (``Storage.find``).

    No experiment is read until you iterate (``find`` itself only checks the
    config keys against the index), and then a page at a time: iterating
    yields ``Experiment`` objects (restored from storage, no user code
    imported), ``rows()`` yields the index rows (dicts). There is no cap:
    without ``limit`` every match is yielded.
    """

    def __init__(self, storage: Any, query: Query, *, order: str = "newest", limit: int | None = None, offset: int = 0) -> None:
        self.storage = storage
        self.query = query
        self.order = order
        self.limit = limit
        self.offset = offset

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("module", self.query.module), ("state", self.query.state), ("since", self.query.since)) if v]
        parts += [f"{k}=..." for k in self.query.config]
        if self.limit is not None:
            parts.append(f"limit={self.limit}")
        return f"<Found {' '.join(parts) or 'all'} ({self.order} first) in {self.storage.root}>"

    def _index(self) -> Index | None:
        if not self.storage.root.is_dir():
            return None
        index = self.storage.fresh_index()
        index.settle(self.storage.read_row)
        return index

    @property
    def _live(self) -> bool:
        """Whether the state filter needs the claim of each candidate checked."""
        return self.query.state in ("running", "interrupted")

    def rows(self) -> Iterator[dict[str, Any]]:
        """Index rows (dicts, ``state`` checked live), in order, lazily."""
        index = self._index()
        if index is None or self.limit == 0:
            return
        where, params = self.query.where(by_config=index.config_is_selective(self.query.config))
        skip = self.offset if self._live else 0
        seen = 0
        root = str(self.storage.root)
        for row in index.pages(where, params, descending=ORDERS[self.order], offset=0 if self._live else self.offset):
            if not os.path.isdir(os.path.join(root, row["id"])):  # removed since the index was synced
                continue
            row["state"] = live_state(self.storage.root, row)
            if self.query.state and row["state"] != self.query.state:
                continue
            if skip:
                skip -= 1
                continue
            yield row
            seen += 1
            if self.limit is not None and seen >= self.limit:
                return

    def __iter__(self) -> Iterator[Any]:
        from machinable.experiment import Experiment

        from machinable.errors import StorageError

        for row in self.rows():
            try:
                experiment = Experiment.restore(self.storage, row["id"])
            except (StorageError, KeyError, TypeError, ValueError):
                continue  # an unreadable record: `machinable list`/`verify` show it
            yield experiment

    def ids(self) -> Iterator[str]:
        return (row["id"] for row in self.rows())

    def first(self) -> Any:
        """The first match, or None."""
        return next(iter(self), None)

    def count(self) -> int:
        """How many experiments match (ignoring ``limit`` and ``offset``)."""
        if self._live:
            return sum(1 for _ in Found(self.storage, self.query, order=self.order).rows())
        index = self._index()
        if index is None:
            return 0
        return index.count(*self.query.where(by_config=index.config_is_selective(self.query.config)))
