"""The embedded catalogue: one SQLite file, no server.

WAL mode lets readers work while one writer commits; writers take the file's
write lock at ``BEGIN IMMEDIATE`` and wait up to ``timeout_s`` for each other,
which is what makes :meth:`initialize` safe from several processes.
Timestamps are stored as ISO-8601 text (UTC), the config as JSON text.

A read-only catalogue opens an existing file with ``mode=rw`` (never ``rwc``:
no file is created) and ``PRAGMA query_only``; it does not switch the journal
mode. Not ``mode=ro``: a read-only connection to a WAL file leaves ``-wal`` and
``-shm`` files behind, which a read-write one removes when it closes.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from heimdall.catalog.sql import SQLCatalog
from heimdall.errors import ServiceUnavailableError

__all__ = ["SQLiteCatalog"]

# Error codes meaning the file is unusable right now (as opposed to a bug in our SQL).
_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_READONLY",
                "SQLITE_FULL", "SQLITE_PERM", "SQLITE_NOTADB", "SQLITE_CORRUPT")
_FIX = "fix: check the path and its permissions, or set HEIMDALL_CATALOG / --catalog to another catalogue"


class SQLiteCatalog(SQLCatalog):
    """A catalogue in one SQLite file (created with its parent directories unless ``read_only``).

    Args:
        path: the database file.
        timeout_s: how long a writer waits for another process's write lock.
        read_only: open an existing file for reading only; create nothing.

    Raises:
        CatalogMissingError: ``read_only`` and the file does not exist.
        ServiceUnavailableError: the file cannot be created or opened.
    """

    _ddl_types = {"id": "INTEGER PRIMARY KEY", "ts": "TEXT", "json": "TEXT"}
    _integrity_error = sqlite3.IntegrityError

    def __init__(self, path: str | Path, *, timeout_s: float = 30.0, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self.path = Path(path).expanduser().resolve()
        self._timeout_s = timeout_s
        if read_only and not self.path.is_file():
            raise self._missing_error("the file does not exist")
        try:
            if read_only:
                # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _transaction).
                self._conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=rw", uri=True,
                                             timeout=timeout_s, isolation_level=None)
                self._conn.execute("PRAGMA query_only = ON")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
                self._conn.execute("PRAGMA synchronous = NORMAL")  # durable enough under WAL, much faster
            self._conn.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as e:
            raise ServiceUnavailableError(f"cannot open the SQLite catalogue {self.describe()}: {e}; {_FIX}") from None

    def migrate(self) -> list[str]:
        """Switch a new or existing catalogue file to WAL, then create or upgrade the tables (see
        :meth:`SQLCatalog.migrate`); a file that is not ours is refused before either."""
        self._refuse_read_only("initialize")
        with self._transaction() as cur:
            tables = self._table_names(cur)
            if tables:
                self._schema_version(cur, tables)  # WAL rewrites the file's header: refuse first
        try:
            self._enable_wal(self._timeout_s)
        except sqlite3.Error as e:
            raise ServiceUnavailableError(f"SQLite catalogue {self.describe()} failed: {e}; {_FIX}") from None
        return super().migrate()

    def _enable_wal(self, timeout_s: float) -> None:
        # Switching a new file to WAL fails at once with "database is locked" while
        # another process switches it (the busy timeout does not cover it): retry.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def describe(self) -> str:
        """``sqlite:////absolute/path.db``."""
        return f"sqlite:///{self.path}"

    def _where(self) -> str:
        return f"the SQLite file {self.path}"

    def _table_names(self, cur: Any) -> set[str]:
        cur.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'")
        return {row[0] for row in cur.fetchall()}

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Cursor]:
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield cur
            cur.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self._rollback()
            if getattr(e, "sqlite_errorname", "").startswith(_UNAVAILABLE):
                raise ServiceUnavailableError(f"SQLite catalogue {self.describe()} failed: {e}; {_FIX}") from None
            raise
        except BaseException:
            self._rollback()
            raise
        finally:
            cur.close()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _insert_many(self, cur: Any, table: str, columns: Sequence[str], values: list[list[Any]]) -> None:
        marks = ", ".join("?" * len(columns))
        cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", zip(*values))

    def _close_connection(self) -> None:
        self._conn.close()

    def _ts_in(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat()

    def _ts_out(self, value: Any) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value).astimezone(UTC)
