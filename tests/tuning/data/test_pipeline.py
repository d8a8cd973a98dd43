"""The Ray Data feature pipeline against real backends: a local store with SQLite,
and a real S3 server with PostgreSQL. Tiny datasets (48 recordings, 16 per shard)."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from heimdall.catalog import Catalog, open_catalog
from heimdall.datasets import SplitConfig, generate_dataset, iter_shards, split_assignment
from heimdall.errors import ConfigError, DataError
from heimdall.features import FeatureConfig, spectrogram_numpy
from heimdall.geometry import default_frame
from heimdall.models import TargetScaling
from heimdall.oracle import BayesOracle
from heimdall.scene import GeneratorConfig
from heimdall.store import BlobStore, LocalStore
from tuning.data.pipeline import (
    MANIFEST,
    SPLIT_NAMES,
    FeatureCache,
    RayBatches,
    decode_features,
    ensure_feature_cache,
    read_cached,
    trial_datasets,
    worker_batches,
)

pytestmark = pytest.mark.ray

N_RECORDINGS, SHARD_SIZE, R = 48, 16, 7
# float16 keeps 11 significant bits: half an ulp is 0.002 units (0.04 dB) for |x| in [4, 8).
FLOAT16_TOLERANCE = 2.5e-3


def _generate(catalog: Catalog, store: BlobStore, name: str) -> None:
    generate_dataset(catalog, store, name, n_recordings=N_RECORDINGS, seed=7, shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> tuple[Catalog, LocalStore, FeatureCache]:
    """One dataset in a local store + SQLite, with its cache built once for this module."""
    root = tmp_path_factory.mktemp("pipeline")
    catalog = open_catalog(f"sqlite:///{root / 'catalog.db'}")
    store = LocalStore(root / "store")
    _generate(catalog, store, "tiny")
    return catalog, store, ensure_feature_cache(catalog, store, "tiny", FeatureConfig(), workers=1)


@pytest.fixture(scope="module")
def rows(built: tuple[Catalog, LocalStore, FeatureCache]) -> dict[str, dict[str, np.ndarray]]:
    """Every cached row with all its columns, read through Ray Data: ``{split: {column: array}}``."""
    from ray.data.block import BlockAccessor

    _, store, cache = built
    out = {}
    for split in SPLIT_NAMES:
        parts = list(read_cached(cache, store, split).iter_batches(batch_size=None, batch_format="pyarrow"))
        table = pa.concat_tables(parts)
        cols = BlockAccessor.for_block(table.drop_columns(["features"])).to_batch_format("numpy")
        out[split] = {**cols, "features": decode_features(table, cache.feature_config), "_table": table}
    return out


def _by_id(rows: dict[str, dict[str, np.ndarray]], column: str, splits: tuple[str, ...] = SPLIT_NAMES) -> np.ndarray:
    """One column of the given splits, ordered by recording id."""
    ids = np.concatenate([rows[s]["recording_id"] for s in splits])
    return np.concatenate([rows[s][column] for s in splits])[np.argsort(ids)]


def test_cache_is_built_once_then_reused(built: tuple[Catalog, LocalStore, FeatureCache]) -> None:
    catalog, store, cache = built
    manifest = Path(store.root, cache.prefix, MANIFEST)
    mtime = manifest.stat().st_mtime_ns
    lines: list[str] = []
    again = ensure_feature_cache(catalog, store, "tiny", FeatureConfig(), log=lines.append)
    assert (cache.reused, again.reused) == (False, True)
    assert again.key == cache.key and again.manifest == cache.manifest
    assert manifest.stat().st_mtime_ns == mtime, "reusing must not rewrite the cache"
    assert lines and lines[0].startswith("reusing feature cache")


def test_split_counts_match_split_assignment(
    built: tuple[Catalog, LocalStore, FeatureCache], rows: dict[str, dict[str, np.ndarray]]
) -> None:
    catalog, _, cache = built
    codes = split_assignment(catalog.recordings("tiny")["recording_id"], SplitConfig())
    want = {s: int(np.sum(codes == i)) for i, s in enumerate(SPLIT_NAMES)}
    assert {s: cache.counts[s] for s in SPLIT_NAMES} == want
    assert sum(want.values()) == N_RECORDINGS and min(want.values()) > 0
    for i, s in enumerate(SPLIT_NAMES):
        np.testing.assert_array_equal(np.sort(rows[s]["recording_id"]), np.flatnonzero(codes == i))


def test_cached_rows_match_numpy_reference(
    built: tuple[Catalog, LocalStore, FeatureCache], rows: dict[str, dict[str, np.ndarray]]
) -> None:
    catalog, store, _ = built
    shards = list(iter_shards(catalog, store, "tiny"))
    iq = np.concatenate([s.iq for s in shards])
    labels = {k: np.concatenate([s.labels[k] for s in shards]) for k in shards[0].labels}
    features = _by_id(rows, "features")
    assert features.dtype == np.float16 and features.shape == (N_RECORDINGS, R, 128, 32)
    err = np.abs(features.astype(np.float64) - spectrogram_numpy(iq, FeatureConfig(), mask=labels["heard"]))
    assert err.max() < FLOAT16_TOLERANCE, f"float16 cache differs from spectrogram_numpy by {err.max():.2e} units"
    with pytest.raises(DataError, match=r"shape \(7, 128, 32\) but the FeatureConfig implies \(R, 128, 16\)"):
        decode_features(rows["train"]["_table"], FeatureConfig(n_frames=16))
    np.testing.assert_array_equal(_by_id(rows, "mask"), labels["heard"])
    east, north = default_frame().to_local(labels["tx_lat"], labels["tx_lon"])
    want = np.stack([east, north], -1) / TargetScaling().target_scale_km
    np.testing.assert_allclose(_by_id(rows, "target"), want, rtol=1e-6, atol=1e-6)
    assert "oracle_mean" not in rows["train"]
    held = np.sort(np.concatenate([rows[s]["recording_id"] for s in ("val", "test")]))
    oracle = BayesOracle(GeneratorConfig.from_dict(catalog.get_dataset("tiny").config))
    mean, cov = oracle.posterior(labels["rx_power_dbm"][held], labels["heard"][held], labels["frequency_hz"][held])
    np.testing.assert_allclose(_by_id(rows, "oracle_mean", ("val", "test")), mean, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(_by_id(rows, "oracle_cov", ("val", "test")), cov, rtol=1e-5, atol=1e-3)


def test_ray_batches_yield_the_module_batch_and_reshuffle_each_epoch(
    built: tuple[Catalog, LocalStore, FeatureCache]
) -> None:
    _, store, cache = built
    datasets = trial_datasets(cache, store, ("train", "val"))
    # streaming_split is what ray.train.get_dataset_shard hands each worker.
    (shard,) = datasets["train"].streaming_split(1, equal=True)
    n = cache.counts["train"]
    batches = RayBatches(shard, 8, shuffle=True, seed=3, n_rows=n)
    assert len(batches) == -(-n // 8)
    epochs = [list(batches) for _ in range(2)]
    b = epochs[0][0]
    assert set(b) == {"features", "mask", "target"}
    assert (b["features"].dtype, b["mask"].dtype, b["target"].dtype) == (torch.float32, torch.bool, torch.float32)
    shapes = (tuple(b["features"].shape), tuple(b["mask"].shape), tuple(b["target"].shape))
    assert shapes == ((8, R, 128, 32), (8, R), (8, 2))
    targets = [torch.cat([x["target"] for x in e]) for e in epochs]
    assert [len(t) for t in targets] == [n, n]
    assert not torch.equal(targets[0], targets[1]), "each epoch must reshuffle"
    ordered = [t[torch.argsort(t[:, 0])] for t in targets]
    assert torch.equal(ordered[0], ordered[1]), "each epoch must see every row once"
    with pytest.raises(TypeError):
        len(RayBatches(shard, 8, shuffle=False, seed=0))
    # Prefetching changes when batches are prepared, never which rows arrive. (Not their order: the
    # streaming read's blocks arrive in whichever order the read tasks finish.)
    unshuffled = [torch.cat([x["target"] for x in RayBatches(s, 8, shuffle=False, seed=0, prefetch_batches=p)])
                  for p in (0, 4) for (s,) in [trial_datasets(cache, store, ("train",))["train"].streaming_split(1)]]
    rows = [sorted(map(tuple, t.tolist())) for t in unshuffled]
    assert len(rows[0]) == n and rows[0] == rows[1]
    (val,) = worker_batches(datasets["val"], 64, shuffle=False, seed=0)
    assert set(val) == {"features", "mask", "target", "oracle_mean", "oracle_cov"}
    assert tuple(val["oracle_mean"].shape) == (cache.counts["val"], 2)
    assert tuple(val["oracle_cov"].shape) == (cache.counts["val"], 2, 2) and torch.isfinite(val["oracle_cov"]).all()


def test_feature_config_that_does_not_fit_the_shards_is_refused(
    built: tuple[Catalog, LocalStore, FeatureCache]
) -> None:
    catalog, store, _ = built
    with pytest.raises(ConfigError, match=r"reference_dbm must match the shards' -100.0") as err:
        ensure_feature_cache(catalog, store, "tiny", FeatureConfig(reference_dbm=-90.0, n_frames=16))
    assert len(err.value.problems) == 2


def test_truncated_shard_is_a_clear_data_error(tmp_path: Path, local_store: LocalStore) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _generate(catalog, local_store, "cut")
    key = catalog.shards("cut")[1].key
    local_store.put(key, local_store.get(key)[:100_000])
    with pytest.raises(DataError, match=rf"shard {key} has 100000 bytes in the store"):
        ensure_feature_cache(catalog, local_store, "cut", FeatureConfig())


def test_deleted_shard_is_a_data_error_naming_the_key(tmp_path: Path, local_store: LocalStore) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _generate(catalog, local_store, "gone")
    key = catalog.shards("gone")[2].key
    local_store.delete(key)
    with pytest.raises(DataError, match=rf"catalogued shard {key} is missing from file://"):
        ensure_feature_cache(catalog, local_store, "gone", FeatureConfig())


def test_corrupt_shard_found_inside_ray_is_reraised_as_data_error(
    tmp_path: Path, local_store: LocalStore, ray_session: object
) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _generate(catalog, local_store, "flip")
    key = catalog.shards("flip")[0].key
    data = bytearray(local_store.get(key))
    data[len(data) // 2] ^= 0xFF  # same size: passes the driver's size check, fails the checksum in the actor
    local_store.put(key, bytes(data))
    with pytest.raises(DataError) as err:
        ensure_feature_cache(catalog, local_store, "flip", FeatureConfig(), workers=1, log=lambda _: None)
    assert type(err.value) is DataError, "must be the Heimdall error, not Ray's RayTaskError(DataError)"
    assert f"shard {key}: checksum mismatch" in str(err.value) and "ray::" not in str(err.value)


def test_pending_dataset_is_refused(tmp_path: Path, local_store: LocalStore) -> None:
    catalog = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.create_dataset("half", kind="synthetic", config=GeneratorConfig().to_dict(), seed=0,
                           planned_recordings=10, shard_size=5, store=local_store.describe())
    with pytest.raises(DataError, match="dataset 'half' is pending"):
        ensure_feature_cache(catalog, local_store, "half", FeatureConfig())


@pytest.mark.s3
@pytest.mark.postgres
def test_s3_and_postgres_build_reuse_and_rebuild_a_partial_cache(
    postgres_url: str, s3_store: BlobStore, ray_session: object
) -> None:
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    with open_catalog(postgres_url) as catalog:
        _generate(catalog, s3_store, name)
        try:
            cache = ensure_feature_cache(catalog, s3_store, name, FeatureConfig(), workers=1, log=lambda _: None)
            assert not cache.reused and sum(cache.counts[s] for s in SPLIT_NAMES) == N_RECORDINGS
            assert ensure_feature_cache(catalog, s3_store, name, FeatureConfig(), workers=1, log=lambda _: None).reused
            val = trial_datasets(cache, s3_store, ("val",))["val"]
            (batch,) = worker_batches(val, 64, shuffle=False, seed=0)
            assert len(batch["target"]) == cache.counts["val"] and "oracle_mean" in batch
            # A killed build leaves files but no manifest: the next call rebuilds from scratch.
            s3_store.delete(f"{cache.prefix}/{MANIFEST}")
            s3_store.put(f"{cache.prefix}/split=train/stray.parquet", b"partial")
            rebuilt = ensure_feature_cache(catalog, s3_store, name, FeatureConfig(), workers=1, log=lambda _: None)
            assert not rebuilt.reused and rebuilt.counts == cache.counts
            assert f"{cache.prefix}/split=train/stray.parquet" not in s3_store.list(cache.prefix)
        finally:
            catalog.delete_dataset(name)
