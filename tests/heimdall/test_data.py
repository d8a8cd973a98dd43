"""Training data: catalogue + store → in-memory feature splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from heimdall.catalog import open_catalog
from heimdall.data import HeimdallDataModule, load_feature_splits
from heimdall.datasets import TEST, TRAIN, VAL, generate_dataset, iter_shards, split_assignment
from heimdall.errors import DataError
from heimdall.features import FeatureConfig, spectrogram_numpy
from heimdall.geometry import default_frame
from heimdall.scene import GeneratorConfig

CONFIG = GeneratorConfig(n_samples=256)
FEATURES = FeatureConfig(n_frames=2)  # 2 frames of 128 samples = 256 samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("data")
    from heimdall.store import LocalStore

    catalog = open_catalog(f"sqlite:///{root / 'c.db'}")
    store = LocalStore(root / "store")
    generate_dataset(catalog, store, "d", n_recordings=120, seed=4, config=CONFIG, shard_size=50)
    yield catalog, store
    catalog.close()


def test_splits_follow_the_id_hash_and_features_match_the_reference(dataset) -> None:
    catalog, store = dataset
    splits = load_feature_splits(catalog, store, "d", feature_config=FEATURES)
    shards = list(iter_shards(catalog, store, "d"))
    ids = np.concatenate([s.recording_id for s in shards])
    iq = np.concatenate([s.iq for s in shards])
    heard = np.concatenate([s.labels["heard"] for s in shards])
    lat = np.concatenate([s.labels["tx_lat"] for s in shards])
    lon = np.concatenate([s.labels["tx_lon"] for s in shards])
    code = split_assignment(ids)
    for name, c in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        ds = splits[name]
        np.testing.assert_array_equal(ds.recording_id, ids[code == c])
        ref = spectrogram_numpy(iq[code == c], FEATURES, heard[code == c])
        np.testing.assert_allclose(ds.features.float().numpy(), ref, atol=4e-3)  # float16 storage
        e, n = default_frame().to_local(lat[code == c], lon[code == c])
        np.testing.assert_allclose(ds.target.numpy(), np.stack([e, n], -1) / 100.0, rtol=1e-5)
        assert (ds.oracle_mean is None) == (name == "train")
    item = splits["val"][0]
    assert item["features"].shape == (7, 128, 2) and item["features"].dtype == torch.float32
    assert item["oracle_cov"].shape == (2, 2)


def test_datamodule_batches_are_dicts_of_the_right_shape(dataset) -> None:
    catalog, store = dataset
    splits = load_feature_splits(catalog, store, "d", feature_config=FEATURES, oracle=False)
    dm = HeimdallDataModule(splits, batch_size=16, seed=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape == (16, 7, 128, 2) and batch["mask"].dtype == torch.bool
    first = [next(iter(HeimdallDataModule(splits, 16, seed=1).train_dataloader()))["target"] for _ in range(2)]
    torch.testing.assert_close(first[0], first[1])  # seeded shuffling


def test_feature_length_mismatch_names_both_numbers(dataset) -> None:
    catalog, store = dataset
    with pytest.raises(DataError, match="holds 256 IQ samples per receiver but the features need 4096"):
        load_feature_splits(catalog, store, "d")
