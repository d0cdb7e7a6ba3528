"""The derived SQLite index over the experiment directories.

The directories are the source of truth; this index only makes lookups fast.
Writers insert an experiment's row *before* renaming its directory into
place, so a directory never exists unindexed; readers check that a row's
directory exists. Anything else (a deleted index, a new schema, directories
copied in by hand) is caught by comparing the storage folder's mtime with the
one recorded at the last sync, and repaired by an incremental sync or a full
rebuild from the directories alone.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

SCHEMA_VERSION = 2
INDEX_FILE = "index.sqlite"
_ID = re.compile(r"^[0-9a-f]{32}$")

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
        git_commit TEXT,
        execution TEXT,
        config TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS by_config ON experiments (config_hash, code_hash, created)",
    "CREATE INDEX IF NOT EXISTS by_module ON experiments (module, created)",
    "CREATE INDEX IF NOT EXISTS by_created ON experiments (created)",
    "CREATE INDEX IF NOT EXISTS by_state ON experiments (state, created)",
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
    "started", "finished", "git_commit", "execution", "config",
)

ReadRow = Callable[[str], "dict[str, Any] | None"]


def value_key(value: Any) -> str:
    """How a config value is stored for lookups (so 1.5 finds 1.5, True finds True)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row else None
    except (sqlite3.DatabaseError, ValueError):
        return None


class Index:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / INDEX_FILE
        self._local = threading.local()
        self._synced_mtime: int | None = None

    # --- connection ---------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if fresh or _schema_version(conn) != SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if _schema_version(conn) != SCHEMA_VERSION:  # re-check under the lock
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
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes ---------------------------------------------------------------------

    def upsert(self, row: dict[str, Any]) -> None:
        self.upsert_many([row])

    def upsert_many(self, rows: list[dict[str, Any]]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._write_rows(db, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_rows(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            db.execute(
                f"INSERT OR REPLACE INTO experiments ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
                tuple(row.get(c) for c in COLUMNS),
            )
            db.execute("DELETE FROM config_values WHERE id=?", (row["id"],))
            db.executemany(
                "INSERT OR IGNORE INTO config_values VALUES (?, ?, ?)",
                [(row["id"], k, value_key(v)) for k, v in (row.get("flat_config") or {}).items()],
            )

    def set_state(self, experiment_id: str, state: str, **times: str | None) -> None:
        sets = ["state=?"] + [f"{k}=?" for k in times]
        self.db.execute(f"UPDATE experiments SET {', '.join(sets)} WHERE id=?", (state, *times.values(), experiment_id))

    def delete(self, experiment_id: str) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM experiments WHERE id=?", (experiment_id,))
        db.execute("DELETE FROM config_values WHERE id=?", (experiment_id,))
        db.execute("COMMIT")

    def note_published(self, before: int | None, row: dict[str, Any] | None = None) -> None:
        """After publishing a directory: make sure its row is there, and keep the
        index 'fresh' if it was.

        A sync in another process may have dropped the row in the moment
        between the row's insertion and the directory's rename; both that
        sync's deletions and this check run in one write transaction each, so
        one of them sees the directory.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if row is not None and db.execute("SELECT 1 FROM experiments WHERE id=?", (row["id"],)).fetchone() is None:
                self._write_rows(db, [row])
            updated = 0
            after = None
            if before is not None:
                try:
                    after = self.root.stat().st_mtime_ns
                except OSError:
                    after = None
            if after is not None:
                updated = db.execute(
                    "UPDATE meta SET value=? WHERE key='root_mtime' AND value=?", (str(after), str(before))
                ).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if updated:
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

    def ensure_fresh(self, read_row: ReadRow) -> None:
        """Sync with the directories if the storage folder changed unseen."""
        if self.fresh_mtime() is None:
            self.sync(read_row)

    def sync(self, read_row: ReadRow, *, full: bool = False, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Add unindexed directories and drop rows without one. (added, removed)"""
        try:
            before = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return (0, 0)
        on_disk = {name for name in os.listdir(self.root) if _ID.match(name)}
        indexed = {r[0] for r in self.db.execute("SELECT id FROM experiments")}
        missing = sorted(on_disk if full else on_disk - indexed)
        gone = indexed - on_disk
        added = 0
        batch: list[dict[str, Any]] = []
        for i, experiment_id in enumerate(missing):
            row = read_row(experiment_id)
            if row is not None:
                batch.append(row)
            if len(batch) >= 500:
                self.upsert_many(batch)
                added += len(batch)
                batch = []
            if progress is not None:
                progress(i + 1, len(missing))
        if batch:
            self.upsert_many(batch)
            added += len(batch)
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # one transaction: see note_published
        try:
            for experiment_id in gone:
                if not (self.root / experiment_id).exists():
                    db.execute("DELETE FROM experiments WHERE id=?", (experiment_id,))
                    db.execute("DELETE FROM config_values WHERE id=?", (experiment_id,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('root_mtime', ?)", (str(before),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._synced_mtime = before
        return added, len(gone)

    def rebuild(self, read_row: ReadRow, progress: Callable[[int, int], None] | None = None) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM experiments")
        db.execute("DELETE FROM config_values")
        db.execute("UPDATE meta SET value='' WHERE key='root_mtime'")
        db.execute("COMMIT")
        self._synced_mtime = None
        added, _ = self.sync(read_row, full=True, progress=progress)
        return added

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

    def query(self, where: str = "1", params: tuple[Any, ...] = (), *, order: str = "created DESC",
              limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return list(self.iter_query(where, params, order=order, limit=limit, offset=offset))

    def iter_query(self, where: str = "1", params: tuple[Any, ...] = (), *, order: str = "created DESC",
                   limit: int | None = None, offset: int = 0) -> Iterator[dict[str, Any]]:
        sql = f"SELECT {','.join(COLUMNS)} FROM experiments WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        cursor = self.db.execute(sql, params)
        while rows := cursor.fetchmany(500):
            for r in rows:
                yield dict(zip(COLUMNS, r))

    def count(self, where: str = "1", params: tuple[Any, ...] = ()) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM experiments WHERE {where}", params).fetchone()[0]
