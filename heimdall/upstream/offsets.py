"""Each station's level offset, estimated from a dataset's recordings of known sources.

Real receivers differ in gain by their operators' settings; the offsets are
stored in the dataset config (``station_offsets_db``) and subtracted where
features are computed. They are re-estimated from every recording of the
dataset after each import, so an incremental import refines them.
"""
from __future__ import annotations

import numpy as np

from heimdall.calibration import StationOffsets, estimate_station_offsets, iq_signal_level_dbm
from heimdall.catalog import Catalog
from heimdall.datasets import read_shard
from heimdall.store import BlobStore

__all__ = ["dataset_station_offsets"]

_LABELS = ("tx_lat", "tx_lon", "tx_power_dbm", "frequency_hz", "heard", "snr_db")


def dataset_station_offsets(catalog: Catalog, store: BlobStore, name: str) -> StationOffsets:
    """Estimate the station offsets from every shard of dataset ``name`` (pending or complete).

    Raises:
        DataError: a shard is missing or corrupt.
    """
    levels, labels = [], {k: [] for k in _LABELS}
    for info in catalog.shards(name):
        shard = read_shard(store, info)
        levels.append(iq_signal_level_dbm(shard.iq, shard.labels["snr_db"], shard.iq_reference_dbm))
        for k in _LABELS:
            labels[k].append(np.asarray(shard.labels[k]))
    return estimate_station_offsets(np.concatenate(levels), {k: np.concatenate(v) for k, v in labels.items()})
