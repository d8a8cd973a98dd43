"""The Heimdall reader on its own: read-only database, key layouts, IQ decoding, upstream main's shape."""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg2
import pytest

from heimdall.catalog import open_catalog
from heimdall.store import S3Settings
from heimdall.upstream import HeimdallImportConfig, PostgresSource, RawIqBucket, import_from_heimdall
from heimdall.upstream.objects import IqProblem, chunk_key_base, decode_iq, object_key, parse_location
from tests.heimdall.upstream.heimdall_install import HeimdallInstall, build_heimdall, drop_heimdall


def test_locations_parse_in_both_layouts_and_chunk_keys_follow_the_objects() -> None:
    single = parse_location("s3://heimdall-raw-iq/sessions/task-1/websdr_3.npy")
    chunk = parse_location("s3://heimdall-raw-iq/sessions/s-9/chunk_000_websdr_7.npy")
    assert (single.folder, single.chunk, single.n) == ("task-1", None, 3)
    assert (chunk.folder, chunk.chunk, chunk.n) == ("s-9", 0, 7)
    assert parse_location("s3://b/elsewhere/x.npy") is None and parse_location("sessions/../websdr_1.npy") is None
    assert chunk_key_base(["sessions/s-9/chunk_001_websdr_7.npy"], "s-9") == 1
    assert chunk_key_base(["sessions/s-9/chunk_000_websdr_7.npy"], "s-9") == 0
    assert object_key(chunk, 1) == "sessions/s-9/chunk_001_websdr_7.npy"
    assert object_key(single, 1) == "sessions/task-1/websdr_3.npy"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_iq_is_narrowed_to_complex64_and_bad_objects_are_named_by_reason() -> None:
    iq = np.exp(1j * np.arange(5000) / 7.0)  # complex128, as upstream writes it
    out = decode_iq(_npy(iq), n_samples=4096, expected_count=5000)
    assert out.dtype == np.complex64 and out.shape == (4096,)
    np.testing.assert_allclose(out, iq[:4096], atol=1e-6)
    bad = {"not npy": b"junk", "wrong dtype": _npy(np.ones(5000)), "non-finite": _npy(np.full(5000, np.nan + 0j)),
           "wrong length": _npy(iq[:100])}
    for reason, data in bad.items():
        with pytest.raises(IqProblem) as err:
            decode_iq(data, n_samples=4096, expected_count=None)
        assert err.value.reason == reason
    with pytest.raises(IqProblem, match="records 4999"):
        decode_iq(_npy(iq), n_samples=4096, expected_count=4999)
    with pytest.raises(IqProblem, match="non-finite"):
        decode_iq(_npy(np.full(5000, 1e300 + 0j)), n_samples=4096, expected_count=None)


@pytest.fixture(scope="module")
def main_branch(postgres_url: str, s3_settings: S3Settings) -> Iterator[HeimdallInstall]:
    """Upstream main's shape: measurements have no recording_session_id."""
    tag = uuid.uuid4().hex[:8]
    install = build_heimdall(postgres_url, s3_settings, db_name=f"heimdall_main_{tag}", bucket=f"heimdall-main-{tag}",
                             n_sources=3, sessions_per_source=1, chunks=2, session_links=False)
    yield install
    drop_heimdall(postgres_url, s3_settings, install)


@pytest.mark.postgres
@pytest.mark.s3
def test_the_source_is_read_only_a_write_through_it_fails(main_branch: HeimdallInstall) -> None:
    with PostgresSource(main_branch.url) as source:
        snap = source.snapshot()
        assert not snap.session_links and len(snap.stations) == 8
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), source.connection.cursor() as cur:
            cur.execute("DELETE FROM heimdall.models")
        source.connection.rollback()
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), source.connection.cursor() as cur:
            cur.execute("CREATE TABLE heimdall.intruder (x int)")


@pytest.mark.postgres
@pytest.mark.s3
def test_upstream_main_is_read_through_object_folders(main_branch: HeimdallInstall, s3_settings: S3Settings,
                                                       tmp_path: Path, local_store) -> None:
    exp = main_branch.expected
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog, PostgresSource(main_branch.url) as source:
        report = import_from_heimdall(catalog, local_store, "main", source, RawIqBucket(s3_settings, main_branch.bucket),
                                      config=HeimdallImportConfig(iq_sample_rate_hz=12000, shard_size=4))
        assert (report.sessions_imported, report.recordings, report.labelled) == (exp.sessions, exp.recordings,
                                                                                   exp.labelled)
        assert catalog.get_dataset("main").status == "complete"
        again = import_from_heimdall(catalog, local_store, "main", source, RawIqBucket(s3_settings, main_branch.bucket),
                                     config=HeimdallImportConfig(iq_sample_rate_hz=12000, shard_size=4))
        assert again.nothing_new and catalog.get_dataset("main").n_recordings == exp.recordings
