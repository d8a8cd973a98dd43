"""`tuning.data delete` and `migrate`, and what an interrupted generate leaves behind, on real S3 and
PostgreSQL: a pending dataset that the same command resumes, or that `delete` removes with every
object it wrote; a catalogue beside upstream Heimdall's schema; a version-1 catalogue upgraded."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from heimdall.catalog import open_catalog
from heimdall.datasets import generate_dataset, verify_dataset
from heimdall.errors import NotFoundError
from heimdall.shards import shard_key
from heimdall.store.s3 import S3Store
from tests.heimdall.catalog.test_migration import UPSTREAM_DDL, _dump, _pg, _v1_postgres, _v1_sqlite
from tuning.data.cli import main

pytestmark = [pytest.mark.s3, pytest.mark.postgres]


class Interrupted(Exception):
    """What a Ctrl-C or a lost worker does to a generate: it stops between two shards."""


def _interrupted_generate(catalog_url: str, store: S3Store, name: str) -> None:
    """Generate 3 shards, stop after the first is registered, and leave the object of the next
    one written but unregistered (a crash between put and add_shard)."""
    def stop(_: int) -> None:
        store.put(shard_key(name, 1), b"written, never registered")
        raise Interrupted

    with open_catalog(catalog_url) as catalog, pytest.raises(Interrupted):
        generate_dataset(catalog, store, name, n_recordings=15, seed=2, shard_size=5, progress=stop)
    with open_catalog(catalog_url) as catalog:
        info = catalog.get_dataset(name)
        assert (info.status, info.n_shards, info.n_recordings) == ("pending", 1, 5)


@pytest.fixture
def s3_env(s3_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.endpoint)


def _cli(catalog_url: str, store: S3Store, *args: str) -> int:
    return main([*args, "--catalog", catalog_url, "--store", f"s3://{store.bucket}/{store.prefix}"])


def _name() -> str:
    return f"pending-{uuid.uuid4().hex[:8]}"


def test_an_interrupted_generate_on_s3_is_resumed_by_the_same_command(postgres_url, s3_store) -> None:
    name = _name()
    _interrupted_generate(postgres_url, s3_store, name)
    with open_catalog(postgres_url) as catalog:
        info = generate_dataset(catalog, s3_store, name, n_recordings=15, seed=2, shard_size=5)
        assert (info.status, info.n_shards, info.n_recordings) == ("complete", 3, 15)
        verify_dataset(catalog, s3_store, name, deep=True)  # the unregistered object was rewritten


def test_delete_removes_a_pending_dataset_and_every_object_it_wrote(postgres_url, s3_store, s3_env, capsys) -> None:
    name, kept = _name(), _name()
    _interrupted_generate(postgres_url, s3_store, name)
    s3_store.put(f"features/{name}/abc/split=train/part-00000.parquet", b"a feature cache")
    s3_store.put(f"datasets/{kept}/shard-00000.parquet", b"another dataset's")
    assert _cli(postgres_url, s3_store, "delete", name) == 0
    assert "1 catalogued shard(s), 3 object(s)" in capsys.readouterr().out
    assert s3_store.list() == [f"datasets/{kept}/shard-00000.parquet"]
    with open_catalog(postgres_url) as catalog, pytest.raises(NotFoundError):
        catalog.get_dataset(name)


def test_delete_removes_objects_whose_catalogue_rows_were_never_written(
        postgres_url, s3_store, s3_env, tmp_path: Path, capsys) -> None:
    name = _name()
    for index in range(2):
        s3_store.put(shard_key(name, index), b"shard of a run that never registered one")
    assert _cli(postgres_url, s3_store, "delete", name) == 0
    assert "no catalogue rows (objects only), 2 object(s)" in capsys.readouterr().out
    assert s3_store.list() == []
    # Also without any catalogue at all, which delete does not create.
    s3_store.put(shard_key(name, 0), b"orphan")
    missing = tmp_path / "none" / "catalog.db"
    assert _cli(f"sqlite:///{missing}", s3_store, "delete", name) == 0
    assert s3_store.list() == [] and not missing.parent.exists()
    assert _cli(postgres_url, s3_store, "delete", name) == 1
    assert "error: nothing to delete: dataset" in capsys.readouterr().err


def _database(postgres_url: str, name: str) -> str:
    import psycopg2

    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def test_generate_and_list_beside_upstream_heimdall_leave_its_schema_byte_identical(
        postgres_url, s3_store, s3_env, capsys) -> None:
    url = _database(postgres_url, "heimdall_beside")
    _pg(url, UPSTREAM_DDL)
    before = _dump(url, "heimdall")
    assert _cli(url, s3_store, "generate", "--dataset", "beside", "--recordings", "6", "--shard-size", "3") == 0
    assert _cli(url, s3_store, "list") == 0
    assert "beside" in capsys.readouterr().out
    assert _cli(url, s3_store, "migrate") == 0
    assert "already current, nothing to do" in capsys.readouterr().out
    assert _dump(url, "heimdall") == before


def test_migrate_moves_and_upgrades_a_v1_postgres_catalogue_once(postgres_url, s3_store, s3_env, capsys) -> None:
    url = _v1_postgres(_database(postgres_url, "heimdall_v1"))
    assert _cli(url, s3_store, "list") == 1
    assert "python -m tuning.data migrate" in capsys.readouterr().err
    assert _cli(url, s3_store, "migrate") == 0
    out = capsys.readouterr().out
    assert "moved the version-1 catalogue's 7 tables" in out and "schema version 1 -> 2" in out
    assert "schema version 2: migrated." in out
    assert _cli(url, s3_store, "migrate") == 0
    assert "already current" in capsys.readouterr().out
    assert _cli(url, s3_store, "list") == 0
    assert "old" in capsys.readouterr().out


def test_migrate_upgrades_a_v1_sqlite_catalogue(tmp_path: Path, s3_store, s3_env, capsys) -> None:
    url = _v1_sqlite(tmp_path / "catalog.db")
    assert _cli(url, s3_store, "migrate") == 0
    assert "schema version 1 -> 2: added recording_sessions.split_group" in capsys.readouterr().out
    assert _cli(url, s3_store, "list") == 0
