"""Split groups: recordings of one group (one transmitter, one session) never land in two splits.

The dataset here is what an import of real captures writes: shards whose recordings carry a
``split_group`` label, several recordings per group, groups spanning shards.
"""
from __future__ import annotations

import numpy as np
import pytest

from heimdall.catalog import Catalog, open_catalog
from heimdall.data import SPLITS, load_feature_splits
from heimdall.datasets import SplitConfig, split_assignment, split_codes, write_shard
from heimdall.features import FeatureConfig
from heimdall.scene import GeneratorConfig
from heimdall.shards import ShardData
from heimdall.store import BlobStore, LocalStore
from heimdall.synthetic import generate

CONFIG = GeneratorConfig(n_samples=256)
FEATURES = FeatureConfig(n_frames=2)  # 2 frames of 128 samples = 256 samples
GROUP_SIZE = 6  # recordings per group; groups straddle the shard boundaries
#: Large held-out fractions, so that a tiny dataset has groups in every split.
SPLIT = SplitConfig(val_fraction=0.25, test_fraction=0.25)


def write_grouped_dataset(catalog: Catalog, store: BlobStore, name: str, n: int = 90, shard_size: int = 40) -> None:
    """An imported-like dataset whose shards carry ``split_group = recording_id // GROUP_SIZE``."""
    catalog.create_dataset(name, kind="imported", config={"split": {"by": "test"}}, seed=None,
                           planned_recordings=n, shard_size=shard_size, store=store.describe())
    for index, start in enumerate(range(0, n, shard_size)):
        size = min(shard_size, n - start)
        rec = generate(CONFIG, size, 3, index)
        s = rec.scene
        ids = start + np.arange(size, dtype=np.int64)
        labels = {"tx_lat": s.tx_lat, "tx_lon": s.tx_lon, "tx_power_dbm": s.tx_power_dbm, "frequency_hz": s.frequency_hz,
                  "inside_hull": s.inside_hull, "rx_power_dbm": s.rx_power_dbm, "snr_db": s.snr_db, "heard": s.heard,
                  "split_group": ids // GROUP_SIZE}
        write_shard(catalog, store, name, index, ShardData(ids, rec.iq, labels, CONFIG.sample_rate_hz,
                                                           CONFIG.iq_reference_dbm))
    catalog.mark_complete(name)


def assert_no_group_crosses_splits(ids_by_split: dict[str, np.ndarray], n: int) -> None:
    """Every recording in exactly one split, the split of its group, and every split non-empty."""
    groups = {name: set((ids // GROUP_SIZE).tolist()) for name, ids in ids_by_split.items()}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not groups[a] & groups[b], f"groups {sorted(groups[a] & groups[b])} are in {a} and {b}"
    assert all(ids_by_split[s].size for s in names), {s: ids_by_split[s].size for s in names}
    assert sorted(np.concatenate(list(ids_by_split.values())).tolist()) == list(range(n))
    # A per-recording hash would have split some group: the test can fail.
    ids = np.arange(n)
    per_recording = split_assignment(ids, SPLIT)
    assert any(np.unique(per_recording[ids // GROUP_SIZE == g]).size > 1 for g in range(n // GROUP_SIZE))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("groups")
    catalog = open_catalog(f"sqlite:///{root / 'c.db'}")
    store = LocalStore(root / "store")
    write_grouped_dataset(catalog, store, "g")
    yield catalog, store
    catalog.close()


def test_the_catalogue_records_each_recordings_group(grouped) -> None:
    catalog, _ = grouped
    labels = catalog.recordings("g")
    np.testing.assert_array_equal(labels["split_group"], labels["recording_id"] // GROUP_SIZE)


def test_load_feature_splits_keeps_every_group_in_one_split(grouped) -> None:
    catalog, store = grouped
    splits = load_feature_splits(catalog, store, "g", feature_config=FEATURES, split_config=SPLIT)
    ids = {name: np.asarray(splits[name].recording_id) for name in SPLITS}
    assert_no_group_crosses_splits(ids, 90)
    labels = catalog.recordings("g")
    codes = split_codes(labels["recording_id"], labels["split_group"], SPLIT)
    for name, code in SPLITS.items():
        np.testing.assert_array_equal(np.sort(ids[name]), labels["recording_id"][codes == code])
