"""What a Heimdall installation's database holds, read with plain SQL in one read-only transaction.

Only schema ``heimdall`` tables are read: ``websdr_stations``, ``known_sources``,
``recording_sessions`` and ``measurements``. The connection is opened
read-only (``SET SESSION CHARACTERISTICS ... READ ONLY``), so even a bug here
cannot write to Heimdall's database: the server refuses it. The whole read is
one repeatable-read snapshot, so rows added by a recording in progress meanwhile
are seen by the next import, not half by this one. Only the measurements of the
sessions being imported are read (the caller chooses them from the session rows
inside the same transaction), so a rerun does not fetch every row again.

Both upstream branches are read: ``develop`` links each measurement to its
session (``measurements.recording_session_id``); ``main`` has no such column,
and a measurement's session is found from its object folder instead (see
:mod:`heimdall.upstream.recordings`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from heimdall.catalog.sql import redact_url
from heimdall.errors import DataError, ServiceUnavailableError

__all__ = ["Station", "KnownSource", "Session", "Measurement", "Snapshot", "Chooser", "UpstreamSource", "PostgresSource"]

SCHEMA = "heimdall"
_TABLES = ("websdr_stations", "known_sources", "recording_sessions", "measurements")
#: The folder of a location in either object layout, as :func:`heimdall.upstream.objects.parse_location` reads it.
_FOLDER = (r"(regexp_match(iq_data_location, "
           r"'^(s3://[^/]+/)?sessions/([^/]+)/(chunk_[0-9]+_)?websdr_[0-9]+\.npy$'))[2]")


@dataclass(frozen=True)
class Station:
    """One ``websdr_stations`` row: ``id`` (uuid text) and its unique ``name``."""

    id: str
    name: str


@dataclass(frozen=True)
class KnownSource:
    """One ``known_sources`` row; position and power may be unknown (None)."""

    id: str
    name: str
    frequency_hz: float | None
    lat: float | None
    lon: float | None
    power_dbm: float | None

    @property
    def located(self) -> bool:
        """Whether the position is known (upstream's "Unknown" placeholder source is not)."""
        return all(v is not None and math.isfinite(v) for v in (self.lat, self.lon))


@dataclass(frozen=True)
class Session:
    """One ``recording_sessions`` row."""

    id: str
    known_source_id: str | None
    name: str
    start: datetime
    status: str | None
    approval_status: str | None
    celery_task_id: str | None


@dataclass(frozen=True)
class Measurement:
    """One ``measurements`` row (one receiver's capture); ``session_id`` is None on upstream ``main``."""

    id: str
    timestamp: datetime
    station_id: str | None
    session_id: str | None
    frequency_hz: float
    signal_strength_db: float | None
    snr_db: float | None
    location: str | None
    sample_rate_hz: int | None
    samples_count: int | None


@dataclass(frozen=True)
class Snapshot:
    """Everything the import reads from the database, from one transaction.

    Attributes:
        stations: by id.
        sources: known sources by id.
        sessions: every session, ordered by start time, then id.
        selected: the sessions chosen for import, in the same order.
        measurements: the measurements of ``selected`` only, ordered by timestamp, then id.
        session_links: whether ``measurements.recording_session_id`` exists (upstream ``develop``).
        unattributed: measurements whose object folder is no session's and that link to none (never importable).
    """

    stations: dict[str, Station]
    sources: dict[str, KnownSource]
    sessions: list[Session]
    measurements: list[Measurement]
    session_links: bool
    selected: list[Session]
    unattributed: int = 0


#: Chooses the sessions to import from every session row (in start order).
Chooser = Callable[[list[Session]], list[Session]]


class UpstreamSource(Protocol):
    """A read-only view of a Heimdall database."""

    def describe(self) -> str:
        """Where the data comes from, without any password."""
        ...

    def snapshot(self, choose: Chooser | None = None) -> Snapshot:
        """Read the rows the import needs, consistently: every session, and the measurements of those
        ``choose`` picks from them (None: all)."""
        ...

    def close(self) -> None:
        """Close the connection; idempotent."""
        ...


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class PostgresSource:
    """Heimdall's PostgreSQL (TimescaleDB) database, opened read-only.

    Args:
        url: ``postgresql://user@host:port/db`` (password in ``PGPASSWORD`` or the URL).
        connect_timeout_s: seconds to wait for the server.

    Raises:
        ServiceUnavailableError: the server cannot be reached (password redacted).
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        import psycopg2  # lazy: only an import from Heimdall needs the driver

        self._url = re.sub(r"^postgres(ql)?(\+psycopg2)?://", "postgresql://", url)
        self._safe_url = redact_url(self._url)
        password = None
        try:
            password = psycopg2.extensions.parse_dsn(self._url).get("password")
            self.connection = psycopg2.connect(self._url, connect_timeout=max(1, round(connect_timeout_s)),
                                               application_name="heimdall-tune-import")
        except psycopg2.Error as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            if password:
                reason = reason.replace(password, "***")
            raise ServiceUnavailableError(
                f"cannot connect to Heimdall's database {self._safe_url}: {reason}; "
                f"fix: check --from-heimdall (postgresql://user@host:port/heimdall) and PGPASSWORD") from None
        # The server refuses every write in a read-only session: the import cannot change Heimdall's data.
        self.connection.set_session(isolation_level="REPEATABLE READ", readonly=True)

    def describe(self) -> str:
        """The database URL without its password."""
        return self._safe_url

    def close(self) -> None:
        """Close the connection; idempotent."""
        if not self.connection.closed:
            self.connection.close()

    def __enter__(self) -> PostgresSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self, choose: Chooser | None = None) -> Snapshot:
        """Read stations, known sources, sessions, and the measurements of the sessions ``choose``
        picks from them (None: every session), in one read-only transaction.

        Raises:
            DataError: schema ``heimdall`` lacks one of the tables (not a Heimdall database).
        """
        try:
            with self.connection.cursor() as cur:
                columns = self._columns(cur)
                links = "recording_session_id" in columns["measurements"]
                sessions = self._sessions(cur)
                selected = sessions if choose is None else choose(sessions)
                return Snapshot(stations=self._stations(cur), sources=self._sources(cur), sessions=sessions,
                                measurements=self._measurements(cur, links, selected), session_links=links,
                                selected=selected, unattributed=self._unattributed(cur, links))
        finally:
            self.connection.rollback()  # ends the read-only transaction; there is nothing to commit

    def _columns(self, cur: Any) -> dict[str, set[str]]:
        cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
                    (SCHEMA,))
        found: dict[str, set[str]] = {}
        for table, column in cur.fetchall():
            found.setdefault(table, set()).add(column)
        missing = [t for t in _TABLES if t not in found]
        if missing:
            raise DataError(
                f"{self._safe_url} is not a Heimdall database: schema {SCHEMA!r} has no table(s) {', '.join(missing)}; "
                f"fix: point --from-heimdall at the database Heimdall's backend uses (POSTGRES_DB, usually 'heimdall')")
        return found

    def _stations(self, cur: Any) -> dict[str, Station]:
        cur.execute(f"SELECT id::text, name FROM {SCHEMA}.websdr_stations ORDER BY name")
        return {i: Station(i, n) for i, n in cur.fetchall()}

    def _sources(self, cur: Any) -> dict[str, KnownSource]:
        cur.execute(f"SELECT id::text, name, frequency_hz, latitude, longitude, power_dbm FROM {SCHEMA}.known_sources")
        return {r[0]: KnownSource(r[0], r[1], _float(r[2]), _float(r[3]), _float(r[4]), _float(r[5]))
                for r in cur.fetchall()}

    def _sessions(self, cur: Any) -> list[Session]:
        cur.execute(f"SELECT id::text, known_source_id::text, session_name, session_start, status, approval_status, "
                    f"celery_task_id FROM {SCHEMA}.recording_sessions ORDER BY session_start, id")
        return [Session(*r) for r in cur.fetchall()]

    def _measurements(self, cur: Any, links: bool, sessions: list[Session]) -> list[Measurement]:
        if not sessions:
            return []
        ids = [s.id for s in sessions]
        # A row belongs to a session by its link (develop's chunks) or, unlinked, by its object folder:
        # the session id (chunks) or its celery_task_id (single acquisitions; main has no link at all).
        folders = ids + [s.celery_task_id for s in sessions if s.celery_task_id]
        session = "recording_session_id::text" if links else "NULL::text"
        where = f"{_FOLDER} = ANY(%(folders)s)"
        if links:
            where = (f"recording_session_id = ANY(%(ids)s::uuid[]) "
                     f"OR (recording_session_id IS NULL AND {where})")
        cur.execute(f"SELECT id::text, timestamp, websdr_station_id::text, {session}, frequency_hz, "
                    f"signal_strength_db, snr_db, iq_data_location, iq_sample_rate, iq_samples_count "
                    f"FROM {SCHEMA}.measurements WHERE {where} ORDER BY timestamp, id",
                    {"ids": ids, "folders": folders})
        return [Measurement(r[0], r[1], r[2], r[3], float(r[4]), _float(r[5]), _float(r[6]), r[7], r[8], r[9])
                for r in cur.fetchall()]

    def _unattributed(self, cur: Any, links: bool) -> int:
        """Rows no session can claim, counted by the server (the report's ``no session``)."""
        unlinked = "recording_session_id IS NULL AND " if links else ""
        cur.execute(f"SELECT count(*) FROM (SELECT {_FOLDER} AS folder FROM {SCHEMA}.measurements "
                    f"WHERE {unlinked}iq_data_location IS NOT NULL) m WHERE m.folder IS NOT NULL AND NOT EXISTS "
                    f"(SELECT 1 FROM {SCHEMA}.recording_sessions s "
                    f"WHERE s.id::text = m.folder OR s.celery_task_id = m.folder)")
        return int(cur.fetchone()[0])
