"""Dataset generation, resume, verification and corruption, on every backend pair:
SQLite + local directory (the embedded default) and PostgreSQL + S3 server."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from heimdall.catalog import open_catalog
from heimdall.datasets import (
    TEST,
    TRAIN,
    VAL,
    SplitConfig,
    generate_dataset,
    iter_shards,
    open_dataset,
    read_shard,
    split_assignment,
    split_codes,
    verify_dataset,
)
from heimdall.errors import AlreadyExistsError, ConfigError, DataError
from heimdall.scene import GeneratorConfig
from heimdall.synthetic import generate

SMALL = GeneratorConfig(n_samples=256)


@pytest.fixture(params=["embedded", pytest.param("services", marks=[pytest.mark.postgres, pytest.mark.s3])])
def backends(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "embedded":
        catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        store = request.getfixturevalue("local_store")
    else:
        catalog = open_catalog(request.getfixturevalue("postgres_url"))
        store = request.getfixturevalue("s3_store")
    with catalog:
        yield catalog, store


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_generate_registers_every_shard_and_round_trips(backends) -> None:
    catalog, store = backends
    name = unique("gen")
    info = generate_dataset(catalog, store, name, n_recordings=25, seed=3, config=SMALL, shard_size=10)
    assert (info.status, info.n_recordings, info.n_shards) == ("complete", 25, 3)
    shards = verify_dataset(catalog, store, name, deep=True)
    assert [s.n_rows for s in shards] == [10, 10, 5]
    data = list(iter_shards(catalog, store, name))
    ids = np.concatenate([d.recording_id for d in data])
    np.testing.assert_array_equal(ids, np.arange(25))
    # Shard i is reproducible on its own from (seed, i): what makes resume exact.
    again = generate(SMALL, 10, 3, 1)
    np.testing.assert_array_equal(data[1].iq, again.iq)
    labels = catalog.recordings(name)
    np.testing.assert_allclose(labels["rx_power_dbm"][10:20], again.scene.rx_power_dbm, rtol=1e-6)


def test_interrupted_generate_stays_pending_and_resumes(backends) -> None:
    catalog, store = backends
    name = unique("resume")
    calls = []

    def die_after_first_shard(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(catalog, store, name, n_recordings=30, seed=5, config=SMALL, shard_size=10,
                         progress=die_after_first_shard)
    assert catalog.get_dataset(name).status == "pending"
    with pytest.raises(DataError, match="pending.*rerun the same"):
        open_dataset(catalog, name)
    with pytest.raises(AlreadyExistsError, match="different settings"):
        generate_dataset(catalog, store, name, n_recordings=30, seed=6, config=SMALL, shard_size=10)
    progress: list[int] = []
    info = generate_dataset(catalog, store, name, n_recordings=30, seed=5, config=SMALL, shard_size=10,
                            progress=progress.append)
    assert progress[0] == 20, "resume must report the shards already done, not redo them"
    assert info.n_recordings == 30 and info.status == "complete"
    fresh = unique("fresh")
    generate_dataset(catalog, store, fresh, n_recordings=30, seed=5, config=SMALL, shard_size=10)
    a = np.concatenate([d.iq for d in iter_shards(catalog, store, name)])
    b = np.concatenate([d.iq for d in iter_shards(catalog, store, fresh)])
    np.testing.assert_array_equal(a, b)


def test_duplicate_complete_dataset_is_refused_with_fix(backends) -> None:
    catalog, store = backends
    name = unique("dup")
    generate_dataset(catalog, store, name, n_recordings=5, seed=1, config=SMALL, shard_size=5)
    with pytest.raises(AlreadyExistsError, match=rf"{name}.*already exists.*tuning.data delete"):
        generate_dataset(catalog, store, name, n_recordings=5, seed=1, config=SMALL, shard_size=5)


def test_missing_and_corrupt_shards_are_named(backends) -> None:
    catalog, store = backends
    name = unique("bad")
    generate_dataset(catalog, store, name, n_recordings=20, seed=2, config=SMALL, shard_size=10)
    first, second = catalog.shards(name)
    store.delete(first.key)
    with pytest.raises(DataError, match=rf"{first.key} is missing from"):
        verify_dataset(catalog, store, name)
    with pytest.raises(DataError, match=rf"{first.key} is missing from"):
        read_shard(store, first)
    data = store.get(second.key)
    store.put(second.key, data[: len(data) - 100])
    with pytest.raises(DataError, match="checksum mismatch"):
        read_shard(store, second)


def test_request_is_validated_all_at_once(backends) -> None:
    catalog, store = backends
    with pytest.raises(ConfigError) as err:
        generate_dataset(catalog, store, "bad name!", n_recordings=0, seed=1, shard_size=0)
    assert len(err.value.problems) == 3


def test_split_is_deterministic_and_has_the_configured_fractions() -> None:
    ids = np.arange(50_000)
    split = split_assignment(ids)
    np.testing.assert_array_equal(split, split_assignment(ids.copy()))
    np.testing.assert_array_equal(split[123:456], split_assignment(ids[123:456]))
    fractions = [np.mean(split == s) for s in (TRAIN, VAL, TEST)]
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.01)
    with pytest.raises(ConfigError):
        SplitConfig(val_fraction=0.6, test_fraction=0.5)


def test_split_codes_follow_the_group_and_default_to_the_recording() -> None:
    ids = np.arange(1000, dtype=np.int64)
    np.testing.assert_array_equal(split_codes(ids), split_assignment(ids))  # synthetic splits unchanged
    groups = ids // 10  # ten recordings per group
    codes = split_codes(ids, groups, SplitConfig(val_fraction=0.2, test_fraction=0.2))
    assert all(np.unique(codes[groups == g]).size == 1 for g in np.unique(groups))
    np.testing.assert_array_equal(codes, split_assignment(groups, SplitConfig(val_fraction=0.2, test_fraction=0.2)))
    assert (split_codes(ids, groups) != split_assignment(ids)).any()
    with pytest.raises(DataError, match="split_group has shape"):
        split_codes(ids, groups[:5])
