"""Split groups through the Ray Data feature cache: no group lands in two cached splits."""
from __future__ import annotations

import numpy as np
import pytest

from heimdall.catalog import open_catalog
from heimdall.datasets import split_codes
from heimdall.store import LocalStore
from tests.heimdall.test_split_groups import FEATURES, SPLIT, assert_no_group_crosses_splits, write_grouped_dataset
from tuning.data.pipeline import SPLIT_NAMES, ensure_feature_cache, read_cached

pytestmark = pytest.mark.ray


def test_the_feature_cache_keeps_every_group_in_one_split(tmp_path, ray_session: object) -> None:
    store = LocalStore(tmp_path / "store")
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        write_grouped_dataset(catalog, store, "g")
        cache = ensure_feature_cache(catalog, store, "g", FEATURES, SPLIT, workers=1, log=lambda _: None)
        labels = catalog.recordings("g")
    ids = {}
    for split in SPLIT_NAMES:
        batches = read_cached(cache, store, split).iter_batches(batch_size=None, batch_format="numpy")
        ids[split] = np.concatenate([b["recording_id"] for b in batches])
    assert_no_group_crosses_splits(ids, 90)
    codes = split_codes(labels["recording_id"], labels["split_group"], SPLIT)
    for code, split in enumerate(SPLIT_NAMES):
        np.testing.assert_array_equal(np.sort(ids[split]), labels["recording_id"][codes == code])
        assert cache.counts[split] == int(np.sum(codes == code))
