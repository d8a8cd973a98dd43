"""One contract for every catalogue: SQLite (a file in tmp_path) and a real PostgreSQL.

The PostgreSQL cases use the session's ``postgres_url`` server; they work in a
database of their own (``catalog_contract``) whose ``heimdall_tune`` schema (and
any ``heimdall`` schema a test made) is dropped before each test, so tests are independent. Raw SQL through the real
drivers checks what the API cannot show (stations, cascades, row counts).
"""
from __future__ import annotations

import hashlib
import multiprocessing
import socket
import sqlite3
import time
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest

from heimdall.catalog import (
    RECORDING_COLUMNS,
    CatalogMissingError,
    PostgresCatalog,
    ShardInfo,
    SQLiteCatalog,
    open_catalog,
)
from heimdall.errors import (
    AlreadyExistsError,
    ConfigError,
    DataError,
    HeimdallError,
    NotFoundError,
    ServiceUnavailableError,
)
from heimdall.receivers import STATIONS

R = len(STATIONS)
CONFIG = {"path_loss_exponent": 3.0, "bands_hz": [[144.0e6, 146.0e6], [430.0e6, 440.0e6]], "min_heard": 1}


# -- fixtures -----------------------------------------------------------------
def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture(scope="module")
def contract_postgres_url(postgres_url: str) -> str:
    """A database of this module's own on the session's PostgreSQL server."""
    import psycopg2

    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS catalog_contract")
        cur.execute("CREATE DATABASE catalog_contract")
    conn.close()
    return _with_database(postgres_url, "catalog_contract")


def _wipe_postgres(url: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA IF EXISTS heimdall_tune CASCADE")
        cur.execute("DROP SCHEMA IF EXISTS heimdall CASCADE")
    conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty catalogue's URL, for each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    pg = request.getfixturevalue("contract_postgres_url")
    _wipe_postgres(pg)
    return pg


@pytest.fixture
def catalog(url: str):
    with open_catalog(url) as c:
        yield c


def _sql(url: str, query: str) -> list[tuple[Any, ...]]:
    """Run raw SQL (``{p}`` = table prefix) on the catalogue behind ``url``."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        try:
            return conn.execute(query.format(p="")).fetchall()
        finally:
            conn.close()
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query.format(p="heimdall_tune."))
            return cur.fetchall()
    finally:
        conn.close()


def _count(url: str, table: str) -> int:
    return _sql(url, f"SELECT COUNT(*) FROM {{p}}{table}")[0][0]


# -- data helpers -------------------------------------------------------------
def _recordings(n: int, first_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Labels of ``n`` recordings; rows shuffled against ids, NaNs sprinkled in."""
    rng = np.random.default_rng(seed)
    rx = rng.normal(-100.0, 12.0, (n, R)).astype(np.float32)
    rx[rng.random((n, R)) < 0.2] = np.nan
    tx_lat = rng.uniform(44.0, 46.0, n)
    tx_lat[0] = np.nan  # an imported capture whose transmitter is unknown
    freq = rng.uniform(144e6, 146e6, n)
    freq[-1] = np.nan
    return {
        "recording_id": first_id + np.arange(n, dtype=np.int64),
        "row": rng.permutation(n).astype(np.int32),
        "tx_lat": tx_lat,
        "tx_lon": rng.uniform(7.0, 9.5, n),
        "tx_power_dbm": rng.uniform(30.0, 47.0, n),
        "frequency_hz": freq,
        "inside_hull": rng.random(n) < 0.7,
        "rx_power_dbm": rx,
        "snr_db": rng.normal(8.0, 6.0, (n, R)).astype(np.float32),
        "heard": rng.random((n, R)) < 0.5,
        "iq_sample_rate": np.full(n, 12_000.0),
        "iq_samples_count": np.full(n, 4096, dtype=np.int64),
    }


def _shard(dataset: str, index: int, n: int) -> ShardInfo:
    key = f"datasets/{dataset}/shard-{index:05d}.parquet"
    return ShardInfo(dataset, index, key, hashlib.sha256(key.encode()).hexdigest(), n, 1000 + index)


def _create(catalog, name: str, planned: int = 20, shard_size: int = 10, kind: str = "synthetic"):
    return catalog.create_dataset(
        name, kind=kind, config=CONFIG, seed=7 if kind == "synthetic" else None,
        planned_recordings=planned, shard_size=shard_size, store="/data/store",
    )


def _fill(catalog, name: str, sizes: list[int], first_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Create ``name`` and add one shard per size; returns the label arrays added."""
    _create(catalog, name, planned=sum(sizes), shard_size=max(sizes))
    added = []
    for index, n in enumerate(sizes):
        labels = _recordings(n, first_id, seed=index)
        catalog.add_shard(_shard(name, index, n), labels)
        added.append(labels)
        first_id += n
    return added


# -- initialize ---------------------------------------------------------------
def test_initialize_is_idempotent_and_stores_the_stations(catalog, url):
    catalog.initialize()
    catalog.initialize()
    rows = _sql(url, "SELECT id, name, latitude, longitude, array_index FROM {p}websdr_stations ORDER BY array_index")
    assert rows == [(s.id, s.name, s.lat, s.lon, i) for i, s in enumerate(STATIONS)]
    assert _sql(url, "SELECT version FROM {p}schema_version") == [(2,)]


def _initialize(url: str) -> None:
    with open_catalog(url) as c:
        c.initialize()


def test_initialize_from_several_processes_at_once(url):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_initialize, args=(url,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert _count(url, "websdr_stations") == R
    assert _sql(url, "SELECT version FROM {p}schema_version") == [(2,)]


def test_a_newer_schema_version_is_refused(catalog, url):
    catalog.initialize()
    catalog.close()
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        conn.execute("INSERT INTO schema_version VALUES (99, '2030-01-01T00:00:00+00:00')")
        conn.commit()
        conn.close()
    else:
        import psycopg2

        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO heimdall_tune.schema_version VALUES (99, now())")
        conn.close()
    with open_catalog(url) as c, pytest.raises(DataError, match="schema version 99.*upgrade"):
        c.initialize()
    with open_catalog(url, read_only=True) as c, pytest.raises(DataError, match="schema version 99.*upgrade"):
        c.list_datasets()


# -- read-only catalogues and databases that are not ours --------------------
def _footprint(url: str) -> object:
    """What a command could have changed: the SQLite file's folder (names, sizes, bytes), or
    PostgreSQL's schemas and the ``heimdall_tune`` schema's tables."""
    if url.startswith("sqlite:"):
        folder = Path(url[len("sqlite:///"):]).parent
        return sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.iterdir() if p.is_file())
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schema_name FROM information_schema.schemata ORDER BY 1")
            schemas = cur.fetchall()
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'heimdall_tune' "
                        "ORDER BY 1")
            return schemas, cur.fetchall()
    finally:
        conn.close()


def _not_ours(url: str) -> None:
    """Make the catalogue's place (the SQLite file, the ``heimdall_tune`` schema) hold somebody else's tables."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users VALUES (1, 'a@example.org')")
        conn.commit()
        conn.close()
        return
    import psycopg2

    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE SCHEMA heimdall_tune")
        cur.execute("CREATE TABLE heimdall_tune.websdr_stations (id INTEGER PRIMARY KEY, name TEXT)")
    conn.close()


def test_read_only_open_of_a_missing_catalogue_creates_nothing(url):
    before = _footprint(url)
    with pytest.raises(CatalogMissingError, match="no Heimdall Tune catalogue at .*fix: create one with `python -m tuning.data generate"):
        with open_catalog(url, read_only=True) as c:
            c.list_datasets()
    assert _footprint(url) == before


def test_read_only_catalogue_reads_and_refuses_writes(catalog, url):
    added = _fill(catalog, "ro", [4])
    catalog.close()
    before = _footprint(url)
    with open_catalog(url, read_only=True) as c:
        c.check()
        assert [d.name for d in c.list_datasets()] == ["ro"]
        assert c.get_dataset("ro").n_recordings == 4 and len(c.shards("ro")) == 1
        np.testing.assert_array_equal(np.sort(c.recordings("ro")["recording_id"]), np.sort(added[0]["recording_id"]))
        for write in (c.initialize, lambda: _create(c, "new"), lambda: c.delete_dataset("ro"), lambda: c.mark_complete("ro")):
            with pytest.raises(HeimdallError, match="opened read-only"):
                write()
    assert _footprint(url) == before


def test_a_database_that_is_not_a_catalogue_is_left_alone(url):
    _not_ours(url)
    before = _footprint(url)
    with open_catalog(url) as c:
        with pytest.raises(DataError, match="is not a Heimdall Tune catalogue.*nothing was .*added to it; fix: "):
            c.initialize()
        with pytest.raises(DataError, match="is not a Heimdall Tune catalogue"):
            _create(c, "intruder")
    with open_catalog(url, read_only=True) as c, pytest.raises(DataError, match="is not a Heimdall Tune catalogue"):
        c.list_datasets()
    assert _footprint(url) == before


def test_an_empty_sqlite_file_is_no_catalogue_to_read_but_can_become_one(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(CatalogMissingError, match="holds no tables"), open_catalog(str(path), read_only=True) as c:
        c.list_datasets()
    assert path.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    with open_catalog(str(path)) as c:
        assert c.list_datasets() == []
    with open_catalog(str(path), read_only=True) as c:
        assert c.list_datasets() == []


# -- datasets -----------------------------------------------------------------
def test_create_get_and_list_datasets(catalog):
    created = _create(catalog, "beta", planned=30, shard_size=10)
    _create(catalog, "alpha", kind="imported")
    assert created == catalog.get_dataset("beta")
    assert (created.name, created.status, created.kind, created.seed) == ("beta", "pending", "synthetic", 7)
    assert (created.planned_recordings, created.shard_size, created.store) == (30, 10, "/data/store")
    assert created.config == CONFIG
    assert (created.n_recordings, created.n_shards, created.completed_at) == (0, 0, None)
    assert created.created_at.tzinfo is not None and created.created_at.utcoffset().total_seconds() == 0
    assert [d.name for d in catalog.list_datasets()] == ["alpha", "beta"]
    assert catalog.get_dataset("alpha").seed is None


def test_a_taken_name_says_whether_to_resume_or_delete(catalog):
    _create(catalog, "demo", planned=10)
    with pytest.raises(AlreadyExistsError, match=r"pending.*resume.*tuning\.data delete demo"):
        _create(catalog, "demo")
    catalog.add_shard(_shard("demo", 0, 10), _recordings(10, 0))
    catalog.mark_complete("demo")
    with pytest.raises(AlreadyExistsError, match=r"complete \(10 recordings\).*another name.*tuning\.data delete demo"):
        _create(catalog, "demo")


def test_create_reports_every_bad_argument(catalog):
    with pytest.raises(ConfigError) as e:
        catalog.create_dataset("bad name!", kind="real", config={"x": float("nan")}, seed=1,
                               planned_recordings=0, shard_size=0, store="")
    assert len(e.value.problems) == 6
    assert catalog.list_datasets() == []


def test_missing_datasets_list_the_existing_names(catalog):
    _create(catalog, "one")
    _create(catalog, "two")
    calls = [catalog.get_dataset, catalog.shards, catalog.recordings, catalog.mark_complete, catalog.delete_dataset]
    for call in calls:
        with pytest.raises(NotFoundError, match=r"'three'.*existing datasets: one, two"):
            call("three")


# -- shards and recordings ----------------------------------------------------
def test_shards_and_recordings_round_trip_exactly(catalog):
    _create(catalog, "rt", planned=25, shard_size=10)
    first = _recordings(10, 0, seed=1)
    second = _recordings(10, 10, seed=2)
    last = _recordings(5, 20, seed=3)
    # Registered out of order: shards() and recordings() must still sort.
    catalog.add_shard(_shard("rt", 2, 5), last)
    catalog.add_shard(_shard("rt", 0, 10), first)
    catalog.add_shard(_shard("rt", 1, 10), {**second, "shard_index": np.ones(10, dtype=np.int64)})
    assert catalog.shards("rt") == [_shard("rt", 0, 10), _shard("rt", 1, 10), _shard("rt", 2, 5)]
    got = catalog.recordings("rt")
    assert set(got) == set(RECORDING_COLUMNS)
    for name, spec in RECORDING_COLUMNS.items():
        assert got[name].dtype == np.dtype(spec.dtype), name
    for name in set(RECORDING_COLUMNS) - {"shard_index", "split_group"}:
        expected = np.concatenate([first[name], second[name], last[name]])
        np.testing.assert_array_equal(got[name], expected, err_msg=name)  # NaN == NaN here
    np.testing.assert_array_equal(got["shard_index"], np.repeat([0, 1, 2], [10, 10, 5]))
    np.testing.assert_array_equal(got["split_group"], got["recording_id"])  # no group given: its own
    assert np.isnan(got["rx_power_dbm"]).any() and np.isnan(got["tx_lat"][0])
    info = catalog.get_dataset("rt")
    assert (info.n_recordings, info.n_shards) == (25, 3)


def test_measurements_follow_the_upstream_schema(catalog, url):
    _create(catalog, "m", planned=4, shard_size=4)
    labels = _recordings(4, 100)
    catalog.add_shard(_shard("m", 0, 4), labels)
    rows = _sql(url, "SELECT r.recording_id, m.websdr_station_id, m.signal_strength_db, m.heard, m.iq_data_location, "
                     "m.iq_sample_rate, m.iq_samples_count FROM {p}measurements m JOIN {p}recording_sessions r "
                     "ON r.id = m.recording_session_id WHERE r.recording_id = 101")
    by_station = {r[1]: r for r in rows}
    assert set(by_station) == {s.id for s in STATIONS}
    for r, station in enumerate(STATIONS):
        _, _, strength, heard, location, rate, count = by_station[station.id]
        rx = labels["rx_power_dbm"][1, r]  # recording 101 is the second of the shard's arrays
        if np.isnan(rx):
            assert strength is None  # NaN is stored as NULL
        else:
            assert np.float32(strength) == rx
        assert bool(heard) == labels["heard"][1, r]
        assert location == f"datasets/m/shard-00000.parquet#{labels['row'][1]}"
        assert (rate, count) == (12_000.0, 4096)


def test_bad_arrays_are_refused_before_anything_is_written(catalog):
    _create(catalog, "v", planned=10)
    good = _recordings(10, 0)
    bad_cases = {
        "missing column": {k: v for k, v in good.items() if k != "heard"},
        "unknown column": {**good, "colour": np.zeros(10)},
        "wrong shape": {**good, "rx_power_dbm": good["rx_power_dbm"][:, :3]},
        "wrong dtype": {**good, "recording_id": good["recording_id"].astype(np.float64)},
        "infinity": {**good, "snr_db": np.full((10, R), np.inf, dtype=np.float32)},
        "NaN where not allowed": {**good, "iq_sample_rate": np.full(10, np.nan)},
        "duplicate ids": {**good, "recording_id": np.zeros(10, dtype=np.int64)},
        "rows out of range": {**good, "row": np.arange(10, dtype=np.int32) + 1},
        "wrong shard_index": {**good, "shard_index": np.full(10, 3)},
        "negative split_group": {**good, "split_group": np.full(10, -1)},
        "fractional split_group": {**good, "split_group": np.full(10, 0.5)},
    }
    for labels in bad_cases.values():
        with pytest.raises(DataError, match="shard 0 of dataset 'v'"):
            catalog.add_shard(_shard("v", 0, 10), labels)
    with pytest.raises(DataError, match=r"shape \(9,\)"):
        catalog.add_shard(_shard("v", 0, 9), good)  # n_rows disagrees with the arrays
    with pytest.raises(DataError, match="sha256"):
        catalog.add_shard(ShardInfo("v", 0, "k", "not-a-hash", 10, 1), good)
    assert catalog.shards("v") == []


def test_adding_a_registered_shard_again_is_an_error(catalog):
    _create(catalog, "twice", planned=20)
    catalog.add_shard(_shard("twice", 0, 10), _recordings(10, 0))
    with pytest.raises(AlreadyExistsError, match="shard 0 of dataset 'twice' is already registered"):
        catalog.add_shard(_shard("twice", 0, 10), _recordings(10, 10))
    assert catalog.get_dataset("twice").n_recordings == 10


def test_add_shard_is_all_or_nothing(catalog, url):
    _create(catalog, "atomic", planned=20)
    catalog.add_shard(_shard("atomic", 0, 10), _recordings(10, 0))
    before = {t: _count(url, t) for t in ("shards", "recording_sessions", "measurements")}
    # Ids 5..14 overlap shard 0: the shard row and the first rows insert fine,
    # then the dataset-wide unique recording id fails, so all must roll back.
    with pytest.raises(DataError, match="nothing was registered"):
        catalog.add_shard(_shard("atomic", 1, 10), _recordings(10, 5))
    assert {t: _count(url, t) for t in before} == before
    assert [s.index for s in catalog.shards("atomic")] == [0]
    catalog.add_shard(_shard("atomic", 1, 10), _recordings(10, 10))  # still writable
    assert catalog.get_dataset("atomic").n_recordings == 20


def test_a_complete_dataset_is_read_only(catalog):
    _create(catalog, "done", planned=20)
    catalog.add_shard(_shard("done", 0, 10), _recordings(10, 0))
    with pytest.raises(DataError, match="holds 10 of 20 planned"):
        catalog.mark_complete("done")
    catalog.add_shard(_shard("done", 1, 10), _recordings(10, 10))
    catalog.mark_complete("done")
    catalog.mark_complete("done")  # a no-op
    info = catalog.get_dataset("done")
    assert info.status == "complete" and info.completed_at >= info.created_at
    with pytest.raises(DataError, match="complete and read-only"):
        catalog.add_shard(_shard("done", 2, 10), _recordings(10, 20))
    assert catalog.get_dataset("done").n_shards == 2


def test_delete_cascades_and_leaves_other_datasets_alone(catalog, url):
    kept = _fill(catalog, "kept", [6, 4])
    _fill(catalog, "gone", [10, 10], first_id=1000)
    assert _count(url, "measurements") == 30 * R
    catalog.delete_dataset("gone")
    assert [d.name for d in catalog.list_datasets()] == ["kept"]
    assert _count(url, "shards") == 2
    assert _count(url, "recording_sessions") == 10
    assert _count(url, "measurements") == 10 * R
    survivors = catalog.recordings("kept")
    for name in ("recording_id", "tx_lat", "rx_power_dbm", "heard"):
        np.testing.assert_array_equal(survivors[name], np.concatenate([k[name] for k in kept]), err_msg=name)
    with pytest.raises(NotFoundError, match="existing datasets: kept"):
        catalog.delete_dataset("gone")


def test_split_groups_round_trip(catalog, url):
    _create(catalog, "grouped", planned=10, kind="imported")
    labels = _recordings(10, 0)
    groups = np.array([7, 7, 7, 2**62, 2**62, 0, 0, 0, 0, 5], dtype=np.int64)  # several recordings per group
    catalog.add_shard(_shard("grouped", 0, 10), {**labels, "split_group": groups})
    got = catalog.recordings("grouped")
    np.testing.assert_array_equal(got["split_group"], groups)
    assert got["split_group"].dtype == np.int64
    assert _sql(url, "SELECT COUNT(DISTINCT split_group) FROM {p}recording_sessions")[0][0] == 4


def test_a_complete_imported_dataset_reopens_to_append_shards(catalog):
    _create(catalog, "field", planned=10, kind="imported")
    catalog.add_shard(_shard("field", 0, 10), _recordings(10, 0))
    catalog.mark_complete("field")
    info = catalog.reopen_dataset("field", planned_recordings=15, config={"split": {"groups": {"a": 1}}})
    assert (info.status, info.completed_at, info.planned_recordings) == ("pending", None, 15)
    assert info.config == {"split": {"groups": {"a": 1}}}
    catalog.add_shard(_shard("field", 1, 5), _recordings(5, 10))
    catalog.mark_complete("field")
    info = catalog.get_dataset("field")
    assert (info.status, info.n_recordings, info.n_shards) == ("complete", 15, 2)
    again = catalog.reopen_dataset("field")  # totals and config unchanged
    assert (again.status, again.planned_recordings, again.config) == ("pending", 15, info.config)
    catalog.mark_complete("field")  # nothing appended: complete again as it was
    with pytest.raises(ConfigError, match="planned_recordings must be an int >= the 15 recordings"):
        catalog.reopen_dataset("field", planned_recordings=14)
    with pytest.raises(ConfigError, match="config must be plain JSON"):
        catalog.reopen_dataset("field", config={"x": float("nan")})
    assert catalog.get_dataset("field").status == "complete"  # refused requests change nothing


def test_a_synthetic_dataset_cannot_be_reopened(catalog):
    _fill(catalog, "synth", [10])
    catalog.mark_complete("synth")
    with pytest.raises(DataError, match="'synth' is synthetic: only imported datasets can be reopened.*fix: generate"):
        catalog.reopen_dataset("synth")
    assert catalog.get_dataset("synth").status == "complete"
    with pytest.raises(NotFoundError, match="existing datasets: synth"):
        catalog.reopen_dataset("nope")


def test_an_empty_dataset_has_empty_arrays(catalog):
    _create(catalog, "empty")
    got = catalog.recordings("empty")
    assert got["rx_power_dbm"].shape == (0, R) and got["recording_id"].shape == (0,)


# -- opening ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_postgres_fails_fast_without_the_password():
    url = f"postgresql://heimdall:s3cr3t-pw@127.0.0.1:{_free_port()}/heimdall"
    start = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as e:
        open_catalog(url)
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "s3cr3t-pw" not in message
    assert "postgresql://heimdall@127.0.0.1" in message
    assert "python -m tuning.services up" in message and "HEIMDALL_CATALOG" in message


@pytest.mark.postgres
def test_postgres_describe_hides_the_password(contract_postgres_url):
    parts = urlsplit(contract_postgres_url)
    user, host = parts.netloc.split("@")
    with_password = urlunsplit((parts.scheme, f"{user}:hunter2@{host}", parts.path, "password=hunter2", ""))
    with open_catalog(with_password) as c:  # trust auth ignores the password
        assert isinstance(c, PostgresCatalog)
        assert "hunter2" not in c.describe() and "hunter2" not in repr(c)
        assert c.describe().startswith(f"postgresql://{user}@{host}/")


def test_open_catalog_understands_sqlite_urls_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        f"sqlite:///{tmp_path}/abs/one.db": tmp_path / "abs" / "one.db",
        "sqlite:///rel/two.db": tmp_path / "rel" / "two.db",
        str(tmp_path / "plain" / "three.sqlite"): tmp_path / "plain" / "three.sqlite",
        "four.db": tmp_path / "four.db",
    }
    for url, path in cases.items():
        with open_catalog(url) as c:
            assert isinstance(c, SQLiteCatalog) and c.describe() == f"sqlite:///{path}"
            c.initialize()
        assert path.is_file()  # parent directories were created
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "", "catalog.txt", "mysql://u:pw9@h/db"])
def test_open_catalog_rejects_other_urls_naming_the_accepted_forms(url):
    with pytest.raises(ConfigError) as e:
        open_catalog(url)
    message = str(e.value)
    assert "pw9" not in message
    assert "sqlite:///" in message
    if "memory" not in url and url != "sqlite://":
        assert "postgresql://" in message


def test_created_at_is_utc(catalog):
    assert _create(catalog, "utc").created_at.tzinfo == UTC
