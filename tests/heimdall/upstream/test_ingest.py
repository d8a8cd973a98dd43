"""The Heimdall import over runs: interrupted and resumed, then extended by new sessions, on a real
PostgreSQL catalogue and S3 store; and the measurements it reads are only those of the sessions it imports."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from heimdall.catalog import Catalog, open_catalog
from heimdall.datasets import read_shard
from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from heimdall.upstream import HeimdallImportConfig, PostgresSource, RawIqBucket, import_from_heimdall
from tests.heimdall.upstream.heimdall_install import HeimdallInstall, add_sessions, build_heimdall, drop_heimdall

pytestmark = [pytest.mark.postgres, pytest.mark.s3]
CONFIG = HeimdallImportConfig(iq_sample_rate_hz=12000, shard_size=4)


def _install(postgres_url: str, s3: S3Settings, kind: str) -> HeimdallInstall:
    tag = uuid.uuid4().hex[:8]
    return build_heimdall(postgres_url, s3, db_name=f"heimdall_{kind}_{tag}", bucket=f"heimdall-{kind}-{tag}",
                          n_sources=4, sessions_per_source=1, chunks=4)


@pytest.fixture(scope="module")
def heimdall(postgres_url: str, s3_settings: S3Settings) -> Iterator[HeimdallInstall]:
    install = _install(postgres_url, s3_settings, "resume")
    yield install
    drop_heimdall(postgres_url, s3_settings, install)


@pytest.fixture
def growing(postgres_url: str, s3_settings: S3Settings) -> Iterator[HeimdallInstall]:
    """An installation of its own: the test records more sessions in it."""
    install = _install(postgres_url, s3_settings, "grow")
    yield install
    drop_heimdall(postgres_url, s3_settings, install)


@pytest.fixture
def catalog(postgres_url: str) -> Iterator[Catalog]:
    with open_catalog(postgres_url) as c:
        yield c


def _run(catalog: Catalog, store: S3Store, name: str, install: HeimdallInstall, s3: S3Settings, **kw):
    with PostgresSource(install.url) as source:
        return import_from_heimdall(catalog, store, name, source, RawIqBucket(s3, install.bucket), config=CONFIG, **kw)


def _shards(catalog: Catalog, name: str) -> dict[int, tuple[str, str, int]]:
    return {s.index: (s.key, s.sha256, s.n_rows) for s in catalog.shards(name)}


def _content(catalog: Catalog, store: S3Store, name: str) -> list[dict[str, np.ndarray]]:
    """Every shard's arrays (the object's bytes name the dataset, so two datasets' checksums differ)."""
    out = []
    for info in catalog.shards(name):
        shard = read_shard(store, info)
        out.append({"recording_id": shard.recording_id, "iq": shard.iq, **shard.labels})
    return out


def _assert_no_orphans(catalog: Catalog, store: S3Store, name: str) -> None:
    assert store.list(f"datasets/{name}/") == sorted(s.key for s in catalog.shards(name))


class _StopAfterFirstShard:
    """A progress callback that interrupts the import as Ctrl-C would, once the first shard is written."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, n: int) -> None:
        self.calls += 1
        raise KeyboardInterrupt


def test_an_interrupted_import_stays_pending_and_resumes_to_the_uninterrupted_result(
        heimdall: HeimdallInstall, catalog: Catalog, s3_store: S3Store, s3_settings: S3Settings) -> None:
    whole, cut = f"whole-{uuid.uuid4().hex[:6]}", f"cut-{uuid.uuid4().hex[:6]}"
    _run(catalog, s3_store, whole, heimdall, s3_settings)

    stop = _StopAfterFirstShard()
    with pytest.raises(KeyboardInterrupt):
        _run(catalog, s3_store, cut, heimdall, s3_settings, progress=stop)
    assert stop.calls == 1
    info = catalog.get_dataset(cut)
    assert info.status == "pending" and info.n_shards == 1 and info.n_recordings == 4
    assert info.config["pending"]["first_shard"] == 0 and info.config["sessions"] == []
    first = _shards(catalog, cut)
    _assert_no_orphans(catalog, s3_store, cut)

    report = _run(catalog, s3_store, cut, heimdall, s3_settings)  # the same call again
    assert report.resumed_shards == 1 and report.sessions_imported == heimdall.expected.sessions
    assert report.recordings == heimdall.expected.recordings - 4  # the kept shard's four are not read again
    done, ref = catalog.get_dataset(cut), catalog.get_dataset(whole)
    assert done.status == "complete" and "pending" not in done.config
    assert (done.n_recordings, done.n_shards) == (ref.n_recordings, ref.n_shards)
    for key in ("sessions", "split", "station_offsets_db", "iq_sample_rate"):
        assert done.config[key] == ref.config[key], key
    assert _shards(catalog, cut)[0] == first[0], "the shard written before the interruption was rewritten"
    assert [n for _, _, n in _shards(catalog, cut).values()] == [n for _, _, n in _shards(catalog, whole).values()]

    got, want = catalog.recordings(cut), catalog.recordings(whole)
    for col in want:
        if col not in ("dataset", "shard_key"):
            np.testing.assert_array_equal(np.asarray(got[col]), np.asarray(want[col]), err_msg=col)
    for a, b in zip(_content(catalog, s3_store, cut), _content(catalog, s3_store, whole), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    _assert_no_orphans(catalog, s3_store, cut)
    assert [d.name for d in catalog.list_datasets() if d.status == "pending" and d.name in (cut, whole)] == []
    assert _run(catalog, s3_store, cut, heimdall, s3_settings).nothing_new


def test_a_rerun_imports_only_new_sessions_into_new_shards_and_keeps_every_transmitter_in_its_split(
        growing: HeimdallInstall, catalog: Catalog, s3_store: S3Store, s3_settings: S3Settings) -> None:
    name = f"grow-{uuid.uuid4().hex[:6]}"
    first = _run(catalog, s3_store, name, growing, s3_settings)
    before_shards, before = _shards(catalog, name), catalog.get_dataset(name)
    before_rec = catalog.recordings(name)

    added, ids = add_sessions(growing, s3_settings, seen_source="repeater-0", new_source="repeater-new")
    second = _run(catalog, s3_store, name, growing, s3_settings)
    assert (second.sessions_imported, second.sessions_before) == (2, first.sessions_imported)
    assert (second.recordings, second.labelled) == (added.recordings, added.labelled)
    text = second.text()
    assert f"sessions:   2 new (0 without a located known source: unlabelled, never trained on), " \
           f"{first.sessions_imported} imported before" in text
    assert f"recordings: {added.recordings} new" in text and "new this run: 1, " in text

    after = catalog.get_dataset(name)
    now = _shards(catalog, name)
    assert {i: now[i] for i in before_shards} == before_shards, "an earlier shard changed"
    assert min(set(now) - set(before_shards)) == max(before_shards) + 1
    assert after.n_recordings == before.n_recordings + added.recordings
    old_groups, groups = before.config["split"]["groups"], after.config["split"]["groups"]
    assert {k: groups[k] for k in old_groups} == old_groups, "a transmitter changed its split group"
    assert set(groups) - set(old_groups) == {ids["repeater-new"]}
    assert after.config["sessions"][:len(before.config["sessions"])] == before.config["sessions"]

    rec = catalog.recordings(name)
    new_rows = rec["recording_id"] > before_rec["recording_id"].max()
    assert int(new_rows.sum()) == added.recordings
    seen_group = groups[ids["repeater-0"]]
    assert seen_group in before_rec["split_group"].tolist()  # the source had recordings before
    assert set(rec["split_group"][new_rows].tolist()) == {seen_group, groups[ids["repeater-new"]]}
    _assert_no_orphans(catalog, s3_store, name)

    third = _run(catalog, s3_store, name, growing, s3_settings)
    assert third.nothing_new and _shards(catalog, name) == now
    assert catalog.get_dataset(name).n_recordings == after.n_recordings


def test_only_the_chosen_sessions_measurements_are_read(heimdall: HeimdallInstall) -> None:
    with PostgresSource(heimdall.url) as source:
        every = source.snapshot()
        chunked = next(s for s in every.sessions if s.name == "0-0")
        single = next(s for s in every.sessions if s.name == "single-a")  # its rows carry no session link
        picked = source.snapshot(lambda rows: [r for r in rows if r.id in (chunked.id, single.id)])
        nothing = source.snapshot(lambda rows: [])
    assert [s.id for s in picked.selected] == [chunked.id, single.id] and len(picked.sessions) == len(every.sessions)
    folders = {chunked.id, single.celery_task_id}
    assert picked.measurements and all(m.location.split("/")[-2] in folders for m in picked.measurements)
    want = [m for m in every.measurements if m.location and m.location.split("/")[-2] in folders]
    assert picked.measurements == want
    assert {m.session_id for m in picked.measurements} == {chunked.id, None}
    assert nothing.measurements == [] and nothing.unattributed == every.unattributed == 0
