"""Careless or hostile input to `python -m tuning.data` (and `--space`): one clear error, nothing touched.

Read commands (list, describe, verify) must leave the file system, the database
and the object store exactly as they found them, whatever the catalogue URL
points at. Broken captures are refused before a catalogue or store is created.
Every failure is exit code 1 and a single ``error:`` line, never a traceback.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest

from heimdall.errors import ConfigError
from heimdall.store import S3Settings
from tuning.data.cli import main
from tuning.study.spaces import load_space

READS = [["list"], ["describe", "demo"], ["verify", "demo"], ["verify", "demo", "--deep"]]


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content hash: what a command could have changed."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _fails_with_one_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- catalogues that are missing or not ours ------------------------------------------------------
def _missing(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"


def _foreign(tmp_path: Path) -> str:
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
    conn.execute("INSERT INTO users VALUES (1, 'a@example.org')")
    conn.commit()
    conn.close()
    return f"sqlite:///{tmp_path / 'app.db'}"


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty.db").touch()
    return f"sqlite:///{tmp_path / 'empty.db'}"


def _text(tmp_path: Path) -> str:
    (tmp_path / "notes.db").write_text("shopping list: milk, eggs\n" * 50)
    return f"sqlite:///{tmp_path / 'notes.db'}"


CATALOGUES = {
    "missing": (_missing, "no Heimdall Tune catalogue at"),
    "not ours": (_foreign, "is not a Heimdall Tune catalogue"),
    "empty file": (_empty, "holds no tables"),
    "not a database": (_text, "file is not a database"),
}


@pytest.mark.parametrize("kind", CATALOGUES)
@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_of_a_bad_catalogue_fail_once_and_touch_nothing(tmp_path, capsys, kind, command) -> None:
    make, message = CATALOGUES[kind]
    url = make(tmp_path)
    before = _tree(tmp_path)
    _fails_with_one_error(capsys, [*command, "--catalog", url, "--data-dir", str(tmp_path / "data")],
                          message, "fix: ")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_with_the_default_catalogue_create_no_data_directory(tmp_path, capsys, command, monkeypatch) -> None:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("HEIMDALL_CATALOG", raising=False)
    monkeypatch.delenv("HEIMDALL_STORE", raising=False)
    _fails_with_one_error(capsys, command, f"sqlite:///{tmp_path / 'data' / 'catalog.db'}",
                          "python -m tuning.data generate")
    assert _tree(tmp_path) == {}


def test_the_command_line_reports_a_missing_catalogue_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tuning.data", "list", "--catalog", _missing(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: no Heimdall Tune catalogue at") and "Traceback" not in proc.stderr
    assert _tree(tmp_path) == {}  # no .heimdall in the working directory, no nowhere/


@pytest.mark.parametrize("command", [["generate", "--dataset", "demo", "--recordings", "5", "--shard-size", "5"],
                                     ["delete", "demo"]], ids=lambda c: c[0])
def test_writers_add_nothing_to_a_database_that_is_not_ours(tmp_path, capsys, command) -> None:
    url = _foreign(tmp_path)
    before = _tree(tmp_path)
    _fails_with_one_error(capsys, [*command, "--catalog", url, "--data-dir", str(tmp_path / "data")],
                          "is not a Heimdall Tune catalogue", "(users)")
    assert _tree(tmp_path) == before


def test_import_adds_nothing_to_a_database_that_is_not_ours(tmp_path, capsys) -> None:
    captures = _captures(tmp_path / "captures", {})
    url = _foreign(tmp_path)
    before = _tree(tmp_path)
    _fails_with_one_error(capsys, ["import", "--dataset", "field", str(captures), "--catalog", url,
                                   "--data-dir", str(tmp_path / "data")], "is not a Heimdall Tune catalogue")
    assert _tree(tmp_path) == before


# -- a real catalogue: reading it leaves no trace ------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding dataset ``demo`` (10 recordings, 2 shards)."""
    data = tmp_path_factory.mktemp("generated") / "data"
    assert main(["generate", "--dataset", "demo", "--recordings", "10", "--shard-size", "5", "--data-dir", str(data)]) == 0
    return data


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_of_a_real_catalogue_leave_no_trace(generated: Path, capsys, command) -> None:
    before = _tree(generated)
    assert main([*command, "--data-dir", str(generated)]) == 0
    assert _tree(generated) == before
    assert main([*command[:1], *(["absent"] if len(command) > 1 else []), "--data-dir", str(generated)]) == \
        (1 if len(command) > 1 else 0)
    assert _tree(generated) == before
    capsys.readouterr()


# -- PostgreSQL: reads create no schema, writers add no table to another schema ------------------
def _database(postgres_url: str, name: str, *setup: str) -> Iterator[str]:
    import psycopg2

    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(postgres_url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    if setup:
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            for sql in setup:
                cur.execute(sql)
        conn.close()
    yield url
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def _schemas_and_tables(url: str) -> tuple[list, list]:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schema_name FROM information_schema.schemata ORDER BY 1")
            schemas = cur.fetchall()
            cur.execute("SELECT table_schema, table_name FROM information_schema.tables "
                        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2")
            return schemas, cur.fetchall()
    finally:
        conn.close()


@pytest.fixture
def empty_postgres(postgres_url: str) -> Iterator[str]:
    yield from _database(postgres_url, "hostile_empty")


@pytest.fixture
def upstream_postgres(postgres_url: str) -> Iterator[str]:
    """A database with somebody else's ``heimdall`` schema (upstream Heimdall's, say)."""
    yield from _database(postgres_url, "hostile_upstream", "CREATE SCHEMA heimdall",
                         "CREATE TABLE heimdall.websdr_stations (id INTEGER PRIMARY KEY, name TEXT)")


@pytest.mark.postgres
@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_of_an_empty_postgres_database_create_no_schema(empty_postgres, tmp_path, capsys, command) -> None:
    before = _schemas_and_tables(empty_postgres)
    _fails_with_one_error(capsys, [*command, "--catalog", empty_postgres, "--data-dir", str(tmp_path / "data")],
                          "no Heimdall Tune catalogue at", "schema 'heimdall_tune'", "holds no tables")
    assert _schemas_and_tables(empty_postgres) == before and ("heimdall_tune",) not in before[0]
    assert _tree(tmp_path) == {}


@pytest.mark.postgres
@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_beside_a_foreign_heimdall_schema_find_no_catalogue(upstream_postgres, tmp_path, capsys, command) -> None:
    before = _schemas_and_tables(upstream_postgres)
    _fails_with_one_error(capsys, [*command, "--catalog", upstream_postgres, "--data-dir", str(tmp_path / "data")],
                          "no Heimdall Tune catalogue at", "schema 'heimdall_tune'")
    assert _schemas_and_tables(upstream_postgres) == before
    assert _tree(tmp_path) == {}


@pytest.mark.postgres
def test_generate_beside_a_foreign_heimdall_schema_leaves_it_alone(upstream_postgres, tmp_path) -> None:
    schemas, tables = _schemas_and_tables(upstream_postgres)
    assert main(["generate", "--dataset", "demo", "--recordings", "5", "--shard-size", "5", "--catalog",
                 upstream_postgres, "--data-dir", str(tmp_path / "data")]) == 0
    after_schemas, after_tables = _schemas_and_tables(upstream_postgres)
    assert after_schemas == sorted([*schemas, ("heimdall_tune",)])
    assert [t for t in after_tables if t[0] != "heimdall_tune"] == tables


# -- S3: reads create no bucket -------------------------------------------------------------------
def _buckets(settings: S3Settings) -> list[str]:
    import minio

    client = minio.Minio(settings.host, access_key=settings.access_key, secret_key=settings.secret_key, secure=False)
    return sorted(b.name for b in client.list_buckets())


@pytest.mark.s3
@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_reads_against_an_absent_bucket_create_no_bucket(generated, s3_settings, capsys, monkeypatch, command) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    bucket = f"heimdall-absent-{uuid.uuid4().hex[:8]}"
    before, files = _buckets(s3_settings), _tree(generated)
    argv = [*command, "--data-dir", str(generated), "--store", f"s3://{bucket}/v1"]
    if command[0] == "verify":
        _fails_with_one_error(capsys, argv, "is missing from s3://", bucket)
    else:
        assert main(argv) == 0
    assert _buckets(s3_settings) == before and bucket not in before
    assert _tree(generated) == files


# -- careless captures ------------------------------------------------------------------------------
def _captures(root: Path, bad_meta: dict | None, raw: bytes | None = None) -> Path:
    """``root/sessions/s1`` (a good session) and ``s2`` whose metadata.json gets ``bad_meta`` (or ``raw``)."""
    rng = np.random.default_rng(0)
    for name in ("s1", "s2"):
        folder = root / "sessions" / name
        folder.mkdir(parents=True)
        np.save(folder / "websdr_torino.npy", (rng.normal(size=4096) + 1j * rng.normal(size=4096)).astype(np.complex64))
        meta = {"frequency_hz": 145.5e6, "sample_rate_hz": 12000,
                "transmitter": {"lat": 45.0, "lon": 7.7, "power_dbm": 37.0},
                "measurements": {"torino": {"signal_strength_db": -90.0, "snr_db": 12.0}}}
        if name == "s2" and bad_meta is not None:
            for key, value in bad_meta.items():
                if isinstance(value, dict) and isinstance(meta.get(key), dict):
                    meta[key] = {**meta[key], **value}
                else:
                    meta[key] = value
        text = json.dumps(meta).encode()  # NaN goes out as the bare NaN token, as a careless writer would
        (folder / "metadata.json").write_bytes(raw if name == "s2" and raw is not None else text)
    return root


BAD_METADATA = {
    "latitude 999": ({"transmitter": {"lat": 999}}, None, "transmitter.lat must be a number in [-90, 90] (degrees N), got 999"),
    "longitude -200": ({"transmitter": {"lon": -200.5}}, None, "transmitter.lon must be a number in [-180, 180] (degrees E), got -200.5"),
    "latitude NaN": ({"transmitter": {"lat": float("nan")}}, None, "transmitter.lat must be a number in [-90, 90] (degrees N), got nan"),
    "power infinite": ({"transmitter": {"power_dbm": float("inf")}}, None, "transmitter.power_dbm must be a finite number (dBm), got inf"),
    "latitude as text": ({"transmitter": {"lat": "45.1"}}, None, "transmitter.lat must be a number in [-90, 90] (degrees N), got '45.1' (a JSON str)"),
    "latitude as bool": ({"transmitter": {"lat": True}}, None, "transmitter.lat must be a number in [-90, 90] (degrees N), got True"),
    "only a latitude": ({"transmitter": {"lon": None}}, None, "transmitter needs both lat and lon or neither"),
    "transmitter as list": ({"transmitter": [45.0, 7.7]}, None, "transmitter must be a JSON object, got [45.0, 7.7]"),
    "negative frequency": ({"frequency_hz": -5}, None, "frequency_hz must be a finite number > 0 (Hz), got -5"),
    "sample rate as text": ({"sample_rate_hz": "12000"}, None, "sample_rate_hz must be a finite number > 0 (Hz), got '12000'"),
    "snr as text": ({"measurements": {"torino": {"snr_db": "high"}}}, None, "measurements.torino.snr_db must be a finite number (dB), got 'high'"),
    "unknown station": ({"measurements": {"paris": {"snr_db": 3.0}}}, None, "measurements has unknown station id 'paris'; valid ids are"),
    "a list": (None, b"[1, 2, 3]", "must hold a JSON object, got a JSON list"),
    "not JSON": (None, b'{"frequency_hz": 1,', "is not valid JSON"),
    "not UTF-8": (None, b'{"transmitter": {"lat": "\xff\xfe"}}', "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_careless_metadata_is_one_error_naming_file_field_value_and_range(tmp_path, capsys, case) -> None:
    bad_meta, raw, message = BAD_METADATA[case]
    captures = _captures(tmp_path / "captures", bad_meta, raw)
    before = _tree(tmp_path)
    line = _fails_with_one_error(capsys, ["import", "--dataset", "field", str(captures),
                                          "--data-dir", str(tmp_path / "data")],
                                 str(captures / "sessions" / "s2" / "metadata.json"), message, "fix: ")
    assert "s1" not in line
    assert _tree(tmp_path) == before  # no catalogue, no store: the captures were checked first


def test_several_bad_fields_are_reported_together(tmp_path, capsys) -> None:
    captures = _captures(tmp_path / "captures", {"transmitter": {"lat": 999, "lon": 200}, "frequency_hz": 0})
    _fails_with_one_error(capsys, ["import", "--dataset", "field", str(captures), "--data-dir", str(tmp_path / "data")],
                          "transmitter.lat", "got 999", "transmitter.lon", "got 200", "frequency_hz", "got 0")


def test_good_captures_with_unknown_fields_left_out_still_import(tmp_path, capsys) -> None:
    captures = _captures(tmp_path / "captures", {"transmitter": None, "frequency_hz": None,
                                                 "measurements": {"torino": {"snr_db": None}}})
    assert main(["import", "--dataset", "field", str(captures), "--data-dir", str(tmp_path / "data")]) == 0
    assert "imported 2 recordings" in capsys.readouterr().out


# -- search-space files ---------------------------------------------------------------------------
def test_a_space_file_that_is_not_utf8_is_one_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\nlearning_rate: {kind: loguniform, low: 1e-4, high: 1e-2}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 9 is b'\\xe9'\).*fix: save the file as UTF-8"):
        load_space(bad)
    proc = subprocess.run([sys.executable, "-m", "tuning.run", "--space", str(bad), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        f"error: invalid search space {bad} (1 problem(s)):"]
    assert "not UTF-8 text" in proc.stderr and _tree(tmp_path) == {"latin1.yaml": _tree(tmp_path)["latin1.yaml"]}
