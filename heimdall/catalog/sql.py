"""The catalogue logic both SQL backends share: schema, queries and row mapping.

The tables borrow the names of Heimdall's upstream PostgreSQL schema ``heimdall``
(but live apart from it: see :mod:`heimdall.catalog.postgres`):

* ``websdr_stations``: the receivers of :data:`heimdall.receivers.STATIONS`
  (``id`` is the short station id; ``array_index`` its column in every (N, R) array).
* ``known_sources``: named reference transmitters, as upstream. Nothing fills it
  yet: every synthetic recording has its own transmitter, so its truth lives in
  the ``source_*`` columns of its session row; ``known_source_id`` can point at a
  beacon when real captures of known transmitters are imported.
* ``recording_sessions``: one row per recording, with its ``split_group`` (recordings
  of one group always share a split; NULL reads as its ``recording_id``), the transmitter truth
  (``source_latitude``, ``source_longitude``, ``source_power_dbm``,
  ``frequency_hz``, ``inside_hull``; NULL = unknown) and where its IQ lies
  (``shard_index``, ``row_index``).
* ``measurements``: one row per (recording, station): ``signal_strength_db``
  (received power, dBm), ``snr_db``, ``heard``, ``iq_data_location``
  (``"{shard key}#{row}"``), ``iq_sample_rate``, ``iq_samples_count``.
* ``datasets`` and ``shards`` (object key, SHA-256, row and byte counts), and
  ``schema_version``: one row per version applied; :meth:`SQLCatalog.migrate`
  upgrades an older catalogue step by step (:data:`SCHEMA_VERSION`), read-only
  commands refuse it with that fix.

Deleting a dataset cascades datasets -> shards -> recording_sessions -> measurements.
NaN labels are stored as SQL NULL and read back as NaN.

The ``schema_version`` table marks a catalogue as ours. :meth:`SQLCatalog.initialize`
creates the tables only where there are none yet (a new file, an absent or empty
schema) and refuses a database that holds other tables but no ``schema_version``,
so a catalogue URL pointing at somebody else's database adds nothing to it. A
catalogue opened ``read_only`` never creates anything: :meth:`SQLCatalog.check`
only looks.

SQL text here uses ``?`` for parameters and ``{p}`` for the table prefix; a
backend rewrites both (:meth:`SQLCatalog._q`).
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from heimdall.catalog.base import (
    DATASET_KINDS,
    CatalogMissingError,
    DatasetInfo,
    ShardInfo,
    check_recordings,
)
from heimdall.errors import AlreadyExistsError, ConfigError, DataError, HeimdallError, NotFoundError, collect_problems
from heimdall.receivers import STATIONS

__all__ = ["SCHEMA_VERSION", "SQLCatalog", "TABLES", "redact_url"]

#: 1: the first layout; 2: ``recording_sessions.split_group`` (and, in PostgreSQL, schema ``heimdall_tune``).
SCHEMA_VERSION = 2
#: Every table of a catalogue: the only ones a migration moves or alters.
TABLES = frozenset(("schema_version", "websdr_stations", "known_sources", "datasets", "shards",
                    "recording_sessions", "measurements"))

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS {p}schema_version (version INTEGER PRIMARY KEY, applied_at {ts} NOT NULL)"
_TABLES = (
    """CREATE TABLE IF NOT EXISTS {p}websdr_stations (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        latitude DOUBLE PRECISION NOT NULL,
        longitude DOUBLE PRECISION NOT NULL,
        altitude_asl DOUBLE PRECISION NOT NULL,
        array_index INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {p}known_sources (
        id {id},
        name TEXT NOT NULL UNIQUE,
        frequency_hz DOUBLE PRECISION,
        latitude DOUBLE PRECISION,
        longitude DOUBLE PRECISION,
        power_dbm DOUBLE PRECISION,
        description TEXT)""",
    """CREATE TABLE IF NOT EXISTS {p}datasets (
        id {id},
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL CHECK (status IN ('pending', 'complete')),
        kind TEXT NOT NULL CHECK (kind IN ('synthetic', 'imported')),
        config {json} NOT NULL,
        seed BIGINT,
        planned_recordings BIGINT NOT NULL CHECK (planned_recordings >= 1),
        shard_size INTEGER NOT NULL CHECK (shard_size >= 1),
        store TEXT NOT NULL,
        created_at {ts} NOT NULL,
        completed_at {ts})""",
    """CREATE TABLE IF NOT EXISTS {p}shards (
        dataset_id BIGINT NOT NULL REFERENCES {p}datasets (id) ON DELETE CASCADE,
        shard_index INTEGER NOT NULL CHECK (shard_index >= 0),
        object_key TEXT NOT NULL,
        sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
        n_rows INTEGER NOT NULL CHECK (n_rows >= 1),
        n_bytes BIGINT NOT NULL CHECK (n_bytes >= 0),
        created_at {ts} NOT NULL,
        PRIMARY KEY (dataset_id, shard_index))""",
    """CREATE TABLE IF NOT EXISTS {p}recording_sessions (
        id {id},
        dataset_id BIGINT NOT NULL,
        shard_index INTEGER NOT NULL,
        row_index INTEGER NOT NULL CHECK (row_index >= 0),
        recording_id BIGINT NOT NULL CHECK (recording_id >= 0),
        split_group BIGINT,
        known_source_id BIGINT REFERENCES {p}known_sources (id),
        source_latitude DOUBLE PRECISION,
        source_longitude DOUBLE PRECISION,
        source_power_dbm DOUBLE PRECISION,
        frequency_hz DOUBLE PRECISION,
        inside_hull BOOLEAN NOT NULL,
        FOREIGN KEY (dataset_id, shard_index)
            REFERENCES {p}shards (dataset_id, shard_index) ON DELETE CASCADE,
        UNIQUE (dataset_id, recording_id),
        UNIQUE (dataset_id, shard_index, row_index))""",
    """CREATE TABLE IF NOT EXISTS {p}measurements (
        recording_session_id BIGINT NOT NULL REFERENCES {p}recording_sessions (id) ON DELETE CASCADE,
        websdr_station_id TEXT NOT NULL REFERENCES {p}websdr_stations (id),
        frequency_hz DOUBLE PRECISION,
        signal_strength_db DOUBLE PRECISION,
        snr_db DOUBLE PRECISION,
        heard BOOLEAN NOT NULL,
        iq_data_location TEXT NOT NULL,
        iq_sample_rate DOUBLE PRECISION NOT NULL CHECK (iq_sample_rate > 0),
        iq_samples_count BIGINT NOT NULL CHECK (iq_samples_count >= 1),
        PRIMARY KEY (recording_session_id, websdr_station_id))""",
)

# Schema upgrades: version -> (what it does, statements) bringing a catalogue to version + 1.
# Version 1 had no split_group: each of its recordings was split on its own, so the
# backfill keeps every existing split where it was.
_UPGRADES: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("added recording_sessions.split_group (set to recording_id: splits unchanged)", (
        "ALTER TABLE {p}recording_sessions ADD COLUMN split_group BIGINT",
        "UPDATE {p}recording_sessions SET split_group = recording_id",
    )),
}

_DATASET_SELECT = """SELECT d.name, d.status, d.kind, d.config, d.seed, d.planned_recordings,
        d.shard_size, d.store, d.created_at, d.completed_at,
        (SELECT COUNT(*) FROM {p}recording_sessions r WHERE r.dataset_id = d.id),
        (SELECT COUNT(*) FROM {p}shards s WHERE s.dataset_id = d.id)
    FROM {p}datasets d"""

_SESSION_COLUMNS = (
    "dataset_id", "shard_index", "row_index", "recording_id", "split_group", "source_latitude",
    "source_longitude", "source_power_dbm", "frequency_hz", "inside_hull",
)
_MEASUREMENT_COLUMNS = (
    "recording_session_id", "websdr_station_id", "frequency_hz", "signal_strength_db",
    "snr_db", "heard", "iq_data_location", "iq_sample_rate", "iq_samples_count",
)
_NAME_RULE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def redact_url(url: str) -> str:
    """``url`` without any password (in the user part or a ``password=`` parameter)."""
    parts = urlsplit(url)
    if parts.password is None and "password=" not in parts.query.lower():
        return url  # nothing to hide; urlunsplit would also turn sqlite:////abs into sqlite://abs
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _nullable(values: np.ndarray) -> list[Any]:
    """Python scalars for the driver, NaN as None (SQL NULL)."""
    if values.dtype.kind == "f":
        return np.where(np.isnan(values), None, values.astype(object)).tolist()
    return values.tolist()


def _floats(values: Sequence[Any], dtype: str = "float64") -> np.ndarray:
    return np.array(values, dtype=np.float64).astype(dtype)  # None -> NaN


class SQLCatalog(ABC):
    """A :class:`~heimdall.catalog.base.Catalog` over a DB-API connection.

    Subclasses open the connection and supply the dialect: the table prefix,
    the parameter marker, the DDL types, transactions and bulk inserts.
    """

    _prefix = ""
    _param = "?"
    _ddl_types: dict[str, str] = {}
    _share_lock = ""  # row-lock clauses; SQLite locks the whole file instead
    _update_lock = ""
    _integrity_error: type[Exception] = Exception

    def __init__(self, *, read_only: bool = False) -> None:
        self.read_only = read_only
        self._initialized = False
        self._closed = False

    # -- dialect hooks -------------------------------------------------------
    @abstractmethod
    def describe(self) -> str:
        """The catalogue's URL without any password."""

    @abstractmethod
    def _transaction(self, write: bool = False) -> Any:
        """Context manager yielding a cursor inside one transaction; commits on
        success, rolls back on error, turns lost connections into
        :class:`~heimdall.errors.ServiceUnavailableError`."""

    @abstractmethod
    def _insert_many(self, cur: Any, table: str, columns: Sequence[str], values: list[list[Any]]) -> None:
        """Insert many rows with the backend's fastest bulk path; ``values`` holds one
        list of Python scalars per column (None for NULL)."""

    @abstractmethod
    def _close_connection(self) -> None:
        """Close the driver's connection."""

    def _prepare_schema(self, cur: Any) -> list[str]:
        """Statements run first in :meth:`migrate` (schema, locks, moving an old layout);
        returns what they changed, for the migration report. None by default."""
        return []

    def _legacy(self, cur: Any) -> str | None:
        """Where an old catalogue lies that :meth:`migrate` would move here, if any; looks only."""
        return None

    @abstractmethod
    def _table_names(self, cur: Any) -> set[str]:
        """Names of the tables and views where the catalogue's tables live (the file, the schema)."""

    @abstractmethod
    def _where(self) -> str:
        """Where :meth:`_table_names` looks, for messages (e.g. ``the SQLite file /x.db``)."""

    def _ts_in(self, value: datetime) -> Any:
        return value

    def _ts_out(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC)

    def _json_out(self, value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else json.loads(value)

    def _q(self, sql: str) -> str:
        return sql.format(p=self._prefix, **self._ddl_types).replace("?", self._param)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Close the connection; idempotent."""
        if not self._closed:
            self._closed = True
            self._close_connection()

    def __enter__(self) -> SQLCatalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"

    def check(self) -> None:
        """Check, without changing anything, that this is a catalogue this code can read.

        Raises:
            CatalogMissingError: there is no catalogue yet (no file, no tables); the message says how
                to create one (a :class:`~heimdall.errors.NotFoundError`).
            DataError: the database holds other tables but is not a Heimdall Tune catalogue, it
                has a newer schema version than this code, or an older one (the fix names
                ``python -m tuning.data migrate``).
            ServiceUnavailableError: the database cannot be reached.
        """
        with self._transaction() as cur:
            tables = self._table_names(cur)
            if not tables:
                legacy = self._legacy(cur)
                if legacy:
                    raise self._old_error(legacy)
                raise self._missing_error(f"{self._where()} holds no tables")
            version = self._schema_version(cur, tables)
            if version is not None and version < SCHEMA_VERSION:
                raise self._old_error(f"schema version {version}")
        self._initialized = True

    def initialize(self) -> None:
        """Create the tables, upgrade an older catalogue and upsert the receivers; idempotent,
        multi-process safe (see :meth:`migrate`).

        Raises:
            DataError: the database holds other tables but is not a Heimdall Tune catalogue
                (nothing is added to it), or it has a newer schema version than this code.
            ServiceUnavailableError: the database cannot be reached.
            HeimdallError: the catalogue was opened read-only.
        """
        self.migrate()

    def migrate(self) -> list[str]:
        """Bring the catalogue to :data:`SCHEMA_VERSION` in one transaction: move an old layout
        into place, run the schema upgrades, create what is missing, upsert the receivers.

        Returns:
            What was changed, one line per step; empty when the catalogue was current
            (creating a new catalogue is reported too).

        Raises:
            Same as :meth:`initialize`.
        """
        self._refuse_read_only("initialize")
        with self._transaction(write=True) as cur:
            done = self._prepare_schema(cur)
            tables = self._table_names(cur)
            version = self._schema_version(cur, tables) if tables else None
            if version is not None:
                done += self._upgrade(cur, version)
            cur.execute(self._q(_VERSION_TABLE))
            for ddl in _TABLES:
                cur.execute(self._q(ddl))
            if version is None:
                cur.execute(self._q("INSERT INTO {p}schema_version (version, applied_at) VALUES (?, ?)"),
                            (SCHEMA_VERSION, self._ts_in(_now())))
                done.append(f"created a catalogue of schema version {SCHEMA_VERSION} in {self._where()}")
            self._upsert_stations(cur)
        self._initialized = True
        return done

    def _upgrade(self, cur: Any, version: int) -> list[str]:
        done = []
        for v in range(version, SCHEMA_VERSION):
            what, statements = _UPGRADES[v]
            for sql in statements:
                cur.execute(self._q(sql))
            cur.execute(self._q("INSERT INTO {p}schema_version (version, applied_at) VALUES (?, ?)"),
                        (v + 1, self._ts_in(_now())))
            done.append(f"schema version {v} -> {v + 1}: {what}")
        return done

    def _upsert_stations(self, cur: Any) -> None:
        sql = self._q(
            "INSERT INTO {p}websdr_stations (id, name, latitude, longitude, altitude_asl, array_index) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
            "latitude = excluded.latitude, longitude = excluded.longitude, "
            "altitude_asl = excluded.altitude_asl, array_index = excluded.array_index"
        )
        cur.executemany(sql, [(s.id, s.name, s.lat, s.lon, s.alt_m, i) for i, s in enumerate(STATIONS)])

    def _schema_version(self, cur: Any, tables: set[str]) -> int | None:
        """The catalogue's schema version, after refusing a database that is not ours or too new."""
        if "schema_version" not in tables:
            shown = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
            raise DataError(
                f"{self._where()} ({self.describe()}) is not a Heimdall Tune catalogue: it holds other tables "
                f"({shown}) and no schema_version table of ours, so nothing was read from or added to it; "
                f"fix: point --catalog / HEIMDALL_CATALOG at a new file or an existing Heimdall Tune catalogue "
                f"(default: sqlite:///.heimdall/catalog.db)"
            )
        cur.execute(self._q("SELECT MAX(version) FROM {p}schema_version"))
        version = cur.fetchone()[0]
        if version is not None and version > SCHEMA_VERSION:
            raise DataError(
                f"catalogue {self.describe()} has schema version {version}, this code knows up to "
                f"{SCHEMA_VERSION}; fix: upgrade heimdall-tune, or point HEIMDALL_CATALOG at another catalogue"
            )
        return version

    def _old_error(self, what: str) -> DataError:
        return DataError(
            f"catalogue {self.describe()} holds {what}; this code reads schema version {SCHEMA_VERSION} "
            f"only, and a read-only command changes nothing; fix: upgrade it once with "
            f"`python -m tuning.data migrate --catalog {self.describe()}` (generate and import upgrade it too)"
        )

    def _missing_error(self, why: str) -> CatalogMissingError:
        return CatalogMissingError(
            f"no Heimdall Tune catalogue at {self.describe()} yet ({why}); nothing was created by this "
            f"read-only command; fix: create one with `python -m tuning.data generate --dataset NAME` "
            f"(or `import`), or point --catalog / HEIMDALL_CATALOG at an existing catalogue"
        )

    def _refuse_read_only(self, action: str) -> None:
        if self.read_only:
            raise HeimdallError(
                f"catalogue {self.describe()} was opened read-only, so it cannot {action}; "
                f"fix: open it with open_catalog(url) (read_only=False) to write"
            )

    @contextmanager
    def _ready(self, write: bool = False) -> Iterator[Any]:
        """A transaction on a ready catalogue: initialized once per instance, or for a read-only
        catalogue only checked (it never creates anything)."""
        if write:
            self._refuse_read_only("write")
        if not self._initialized:
            self.check() if self.read_only else self.initialize()
        with self._transaction(write=write) as cur:
            yield cur

    # -- datasets ------------------------------------------------------------
    def create_dataset(
        self,
        name: str,
        *,
        kind: str,
        config: dict[str, Any],
        seed: int | None,
        planned_recordings: int,
        shard_size: int,
        store: str,
    ) -> DatasetInfo:
        """Register a new, pending dataset (see :class:`~heimdall.catalog.base.Catalog`)."""
        config_json = _check_dataset_request(name, kind, config, seed, planned_recordings, shard_size, store)
        seed = None if seed is None else int(seed)
        row = (name, "pending", kind, config_json, seed, int(planned_recordings), int(shard_size), store,
               self._ts_in(_now()))
        try:
            with self._ready(write=True) as cur:
                cur.execute(self._q(
                    "INSERT INTO {p}datasets (name, status, kind, config, seed, planned_recordings, "
                    "shard_size, store, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"), row)
        except self._integrity_error:
            raise self._exists_error(name) from None  # the only constraint left unchecked: a unique name
        return self.get_dataset(name)

    def get_dataset(self, name: str) -> DatasetInfo:
        """One dataset (see :class:`~heimdall.catalog.base.Catalog`)."""
        with self._ready() as cur:
            cur.execute(self._q(_DATASET_SELECT + " WHERE d.name = ?"), (name,))
            row = cur.fetchone()
            if row is None:
                raise self._not_found(cur, name)
        return self._dataset_info(row)

    def list_datasets(self) -> list[DatasetInfo]:
        """Every dataset, ordered by name."""
        with self._ready() as cur:
            cur.execute(self._q(_DATASET_SELECT + " ORDER BY d.name"))
            rows = cur.fetchall()
        return [self._dataset_info(r) for r in rows]

    def mark_complete(self, name: str) -> None:
        """Mark a dataset complete (see :class:`~heimdall.catalog.base.Catalog`)."""
        with self._ready(write=True) as cur:
            dataset_id, status, _ = self._lock_dataset(cur, name, self._update_lock)
            if status == "complete":
                return
            cur.execute(self._q("SELECT planned_recordings, (SELECT COUNT(*) FROM {p}recording_sessions "
                                "WHERE dataset_id = ?) FROM {p}datasets WHERE id = ?"), (dataset_id, dataset_id))
            planned, have = cur.fetchone()
            if planned != have:
                raise DataError(
                    f"dataset {name!r} cannot be marked complete: it holds {have} of {planned} planned "
                    f"recordings; fix: add the missing shards (rerun the generate/import to resume it)"
                )
            cur.execute(self._q("UPDATE {p}datasets SET status = 'complete', completed_at = ? WHERE id = ?"),
                        (self._ts_in(_now()), dataset_id))

    def reopen_dataset(
        self, name: str, *, planned_recordings: int | None = None, config: dict[str, Any] | None = None
    ) -> DatasetInfo:
        """Make a complete imported dataset pending again (see :class:`~heimdall.catalog.base.Catalog`)."""
        config_json = None if config is None else _config_json(name, config)
        with self._ready(write=True) as cur:
            cur.execute(self._q("SELECT d.id, d.kind, (SELECT COUNT(*) FROM {p}recording_sessions r "
                                "WHERE r.dataset_id = d.id) FROM {p}datasets d WHERE d.name = ?" + self._update_lock),
                        (name,))
            row = cur.fetchone()
            if row is None:
                raise self._not_found(cur, name)
            dataset_id, kind, have = int(row[0]), row[1], int(row[2])
            _check_reopen(name, kind, have, planned_recordings)
            sets, values = ["status = 'pending'", "completed_at = NULL"], []
            if planned_recordings is not None:
                sets.append("planned_recordings = ?")
                values.append(int(planned_recordings))
            if config_json is not None:
                sets.append("config = ?")
                values.append(config_json)
            cur.execute(self._q(f"UPDATE {{p}}datasets SET {', '.join(sets)} WHERE id = ?"), (*values, dataset_id))
        return self.get_dataset(name)

    def delete_dataset(self, name: str) -> None:
        """Delete a dataset and everything below it (see :class:`~heimdall.catalog.base.Catalog`)."""
        with self._ready(write=True) as cur:
            cur.execute(self._q("DELETE FROM {p}datasets WHERE name = ?"), (name,))
            if cur.rowcount == 0:
                raise self._not_found(cur, name)

    # -- shards and recordings -----------------------------------------------
    def add_shard(self, shard: ShardInfo, recordings: dict[str, np.ndarray]) -> None:
        """Register a shard with its recordings atomically (see :class:`~heimdall.catalog.base.Catalog`)."""
        _check_shard_info(shard)
        arrays = check_recordings(shard, recordings)
        try:
            with self._ready(write=True) as cur:
                dataset_id = self._insert_shard_row(cur, shard)
                self._insert_sessions(cur, dataset_id, arrays)
                session_ids = self._session_ids(cur, dataset_id, shard)
                self._insert_measurements(cur, session_ids, shard.key, arrays)
        except self._integrity_error as e:
            reason = str(e).strip().splitlines()[0]
            raise DataError(
                f"shard {shard.index} of dataset {shard.dataset!r} breaks a catalogue constraint ({reason}); "
                f"nothing was registered; fix: recording ids must be unique across the dataset's shards"
            ) from None

    def _insert_shard_row(self, cur: Any, shard: ShardInfo) -> int:
        dataset_id, status, shard_size = self._lock_dataset(cur, shard.dataset, self._share_lock)
        if status != "pending":
            raise DataError(
                f"dataset {shard.dataset!r} is complete and read-only, shard {shard.index} was not added; "
                f"fix: write to a new dataset, or `python -m tuning.data delete {shard.dataset}` and regenerate it"
            )
        if shard.n_rows > shard_size:
            raise DataError(f"shard {shard.index} of dataset {shard.dataset!r} has {shard.n_rows} rows, "
                            f"more than the dataset's shard_size {shard_size}")
        cur.execute(self._q("SELECT 1 FROM {p}shards WHERE dataset_id = ? AND shard_index = ?"),
                    (dataset_id, shard.index))
        if cur.fetchone() is not None:
            raise AlreadyExistsError(
                f"shard {shard.index} of dataset {shard.dataset!r} is already registered; "
                f"fix: check `shards()` first and skip registered shards (resume), or delete the dataset"
            )
        row = (dataset_id, shard.index, shard.key, shard.sha256, shard.n_rows, shard.n_bytes, self._ts_in(_now()))
        cur.execute(self._q("INSERT INTO {p}shards (dataset_id, shard_index, object_key, sha256, n_rows, n_bytes, "
                            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"), row)
        return dataset_id

    def _insert_sessions(self, cur: Any, dataset_id: int, a: dict[str, np.ndarray]) -> None:
        n = a["recording_id"].shape[0]
        columns = [
            [dataset_id] * n, a["shard_index"].tolist(), a["row"].tolist(), a["recording_id"].tolist(),
            a["split_group"].tolist(), _nullable(a["tx_lat"]), _nullable(a["tx_lon"]), _nullable(a["tx_power_dbm"]),
            _nullable(a["frequency_hz"]), a["inside_hull"].tolist(),
        ]
        self._insert_many(cur, "recording_sessions", _SESSION_COLUMNS, columns)

    def _session_ids(self, cur: Any, dataset_id: int, shard: ShardInfo) -> np.ndarray:
        """Database ids of the shard's sessions, indexed by row."""
        cur.execute(self._q("SELECT row_index, id FROM {p}recording_sessions WHERE dataset_id = ? AND shard_index = ?"),
                    (dataset_id, shard.index))
        rows = np.array(cur.fetchall(), dtype=np.int64).reshape(-1, 2)
        ids = np.empty(shard.n_rows, dtype=np.int64)
        ids[rows[:, 0]] = rows[:, 1]
        return ids

    def _insert_measurements(self, cur: Any, session_ids: np.ndarray, key: str, a: dict[str, np.ndarray]) -> None:
        """One row per (recording, station); recordings in row order, as ``session_ids``."""
        by_row = np.argsort(a["row"])
        n, r = a["heard"].shape

        def per_station(column: str) -> np.ndarray:
            return np.repeat(a[column][by_row], r)

        columns = [
            np.repeat(session_ids, r).tolist(),
            [s.id for s in STATIONS] * n,
            _nullable(per_station("frequency_hz")),
            _nullable(a["rx_power_dbm"][by_row].reshape(-1)),
            _nullable(a["snr_db"][by_row].reshape(-1)),
            a["heard"][by_row].reshape(-1).tolist(),
            [f"{key}#{row}" for row in range(n) for _ in range(r)],
            per_station("iq_sample_rate").tolist(),
            per_station("iq_samples_count").tolist(),
        ]
        self._insert_many(cur, "measurements", _MEASUREMENT_COLUMNS, columns)

    def shards(self, name: str) -> list[ShardInfo]:
        """The dataset's shards ordered by index (see :class:`~heimdall.catalog.base.Catalog`)."""
        with self._ready() as cur:
            dataset_id = self._dataset_id(cur, name)
            cur.execute(self._q("SELECT shard_index, object_key, sha256, n_rows, n_bytes FROM {p}shards "
                                "WHERE dataset_id = ? ORDER BY shard_index"), (dataset_id,))
            rows = cur.fetchall()
        return [ShardInfo(name, int(i), k, h, int(nr), int(nb)) for i, k, h, nr, nb in rows]

    def recordings(self, name: str) -> dict[str, np.ndarray]:
        """Every label array of the dataset, ordered by ``recording_id``."""
        with self._ready() as cur:
            dataset_id = self._dataset_id(cur, name)
            cur.execute(self._q(
                "SELECT id, recording_id, shard_index, row_index, COALESCE(split_group, recording_id), "
                "source_latitude, source_longitude, "
                "source_power_dbm, frequency_hz, inside_hull FROM {p}recording_sessions "
                "WHERE dataset_id = ? ORDER BY recording_id"), (dataset_id,))
            sessions = cur.fetchall()
            cur.execute(self._q(
                "SELECT m.recording_session_id, st.array_index, m.signal_strength_db, m.snr_db, m.heard, "
                "m.iq_sample_rate, m.iq_samples_count FROM {p}measurements m "
                "JOIN {p}recording_sessions r ON r.id = m.recording_session_id "
                "JOIN {p}websdr_stations st ON st.id = m.websdr_station_id WHERE r.dataset_id = ?"), (dataset_id,))
            measurements = cur.fetchall()
        return _assemble(name, sessions, measurements)

    # -- helpers -------------------------------------------------------------
    def _dataset_info(self, row: Sequence[Any]) -> DatasetInfo:
        name, status, kind, config, seed, planned, size, store, created, completed, n_rec, n_shards = row
        return DatasetInfo(
            name=name, status=status, kind=kind, config=self._json_out(config),
            seed=None if seed is None else int(seed), planned_recordings=int(planned), shard_size=int(size),
            store=store, created_at=self._ts_out(created), completed_at=self._ts_out(completed),
            n_recordings=int(n_rec), n_shards=int(n_shards),
        )

    def _dataset_id(self, cur: Any, name: str) -> int:
        cur.execute(self._q("SELECT id FROM {p}datasets WHERE name = ?"), (name,))
        row = cur.fetchone()
        if row is None:
            raise self._not_found(cur, name)
        return int(row[0])

    def _lock_dataset(self, cur: Any, name: str, lock: str) -> tuple[int, str, int]:
        cur.execute(self._q("SELECT id, status, shard_size FROM {p}datasets WHERE name = ?" + lock), (name,))
        row = cur.fetchone()
        if row is None:
            raise self._not_found(cur, name)
        return int(row[0]), row[1], int(row[2])

    def _names(self, cur: Any) -> list[str]:
        cur.execute(self._q("SELECT name FROM {p}datasets ORDER BY name"))
        return [r[0] for r in cur.fetchall()]

    def _not_found(self, cur: Any, name: str) -> NotFoundError:
        names = self._names(cur)
        existing = ", ".join(names) if names else "none yet"
        return NotFoundError(
            f"no dataset named {name!r} in catalogue {self.describe()}; existing datasets: {existing}; "
            f"fix: check the name (`python -m tuning.data list`) and HEIMDALL_CATALOG, or create it with "
            f"`python -m tuning.data generate --dataset {name}`"
        )

    def _exists_error(self, name: str) -> AlreadyExistsError:
        info = self.get_dataset(name)
        if info.status == "complete":
            return AlreadyExistsError(
                f"dataset {name!r} already exists and is complete ({info.n_recordings} recordings); "
                f"fix: choose another name, or delete it first with `python -m tuning.data delete {name}`"
            )
        return AlreadyExistsError(
            f"dataset {name!r} already exists and is pending ({info.n_recordings}/{info.planned_recordings} "
            f"recordings in {info.n_shards} shard(s), an interrupted generate or import); fix: rerun the same "
            f"generate command to resume it, choose another name, or `python -m tuning.data delete {name}`"
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _check_dataset_request(
    name: str, kind: str, config: dict[str, Any], seed: int | None, planned: int, shard_size: int, store: str
) -> str:
    """Validate ``create_dataset``'s arguments; returns the config as JSON text."""
    p: list[str] = []
    if not isinstance(name, str) or not _NAME_RULE.match(name):
        p.append(f"name must be 1-128 letters, digits, '-', '_' or '.', got {name!r}")
    if kind not in DATASET_KINDS:
        p.append(f"kind must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    if seed is not None and not isinstance(seed, int | np.integer):
        p.append(f"seed must be an int or None, got {seed!r}")
    if not isinstance(planned, int | np.integer) or planned < 1:
        p.append(f"planned_recordings must be an int >= 1, got {planned!r}")
    if not isinstance(shard_size, int | np.integer) or shard_size < 1:
        p.append(f"shard_size must be an int >= 1, got {shard_size!r}")
    if not isinstance(store, str) or not store:
        p.append(f"store must be the blob store's describe() string, got {store!r}")
    text = ""
    try:
        text = _config_json(name, config)
    except ConfigError as e:
        p.extend(e.problems)
    collect_problems(f"dataset {name!r}", p)
    return text


def _config_json(name: str, config: Any) -> str:
    if not isinstance(config, dict):
        raise ConfigError(f"dataset {name!r}", [f"config must be a dict, got {type(config).__name__}"])
    try:
        return json.dumps(config, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"dataset {name!r}", [f"config must be plain JSON (str keys, lists, numbers, no NaN): {e}"]) from None


def _check_reopen(name: str, kind: str, have: int, planned: int | None) -> None:
    if kind != "imported":
        raise DataError(
            f"dataset {name!r} is {kind}: only imported datasets can be reopened to append shards (a synthetic "
            f"dataset is fixed by its seed and settings); fix: generate a new dataset with another --dataset name"
        )
    if planned is not None and (not isinstance(planned, int | np.integer) or planned < have):
        raise ConfigError(f"dataset {name!r}", [
            f"planned_recordings must be an int >= the {have} recordings it holds (shards are only "
            f"appended), got {planned!r}"
        ])


def _check_shard_info(shard: ShardInfo) -> None:
    p: list[str] = []
    if shard.index < 0:
        p.append(f"index must be >= 0, got {shard.index}")
    if not shard.key:
        p.append("key must be a non-empty object key")
    if not re.fullmatch(r"[0-9a-f]{64}", shard.sha256 or ""):
        p.append(f"sha256 must be 64 lowercase hex digits, got {shard.sha256!r}")
    if shard.n_bytes < 0:
        p.append(f"n_bytes must be >= 0, got {shard.n_bytes}")
    if p:
        raise DataError(f"shard {shard.index} of dataset {shard.dataset!r}: " + "; ".join(p))


def _assemble(name: str, sessions: list[tuple[Any, ...]], measurements: list[tuple[Any, ...]]) -> dict[str, np.ndarray]:
    """Label arrays from session rows (ordered by recording id) and measurement rows."""
    n, r = len(sessions), len(STATIONS)
    if len(measurements) != n * r:
        raise DataError(
            f"dataset {name!r}: {len(measurements)} measurements for {n} recordings x {r} stations in the "
            f"catalogue; fix: delete the dataset (`python -m tuning.data delete {name}`) and regenerate it"
        )
    s = list(zip(*sessions)) or [()] * 10
    m = list(zip(*measurements)) or [()] * 7
    session_ids = np.array(s[0], dtype=np.int64)
    by_id = np.argsort(session_ids)
    where = by_id[np.searchsorted(session_ids, np.array(m[0], dtype=np.int64), sorter=by_id)]
    col = np.array(m[1], dtype=np.int64)

    def grid(values: Sequence[Any], dtype: str) -> np.ndarray:
        out = np.empty((n, r), dtype=dtype)
        out[where, col] = _floats(values, dtype) if dtype.startswith("float") else np.array(values, dtype=dtype)
        return out

    return {
        "recording_id": np.array(s[1], dtype=np.int64),
        "shard_index": np.array(s[2], dtype=np.int32),
        "row": np.array(s[3], dtype=np.int32),
        "split_group": np.array(s[4], dtype=np.int64),
        "tx_lat": _floats(s[5]),
        "tx_lon": _floats(s[6]),
        "tx_power_dbm": _floats(s[7]),
        "frequency_hz": _floats(s[8]),
        "inside_hull": np.array(s[9], dtype=bool),
        "rx_power_dbm": grid(m[2], "float32"),
        "snr_db": grid(m[3], "float32"),
        "heard": grid(m[4], "bool"),
        "iq_sample_rate": grid(m[5], "float64")[:, 0].copy(),
        "iq_samples_count": grid(m[6], "int64")[:, 0].copy(),
    }
