"""Recordings as training data: catalogue + blob store → features, targets, masks.

:func:`load_feature_splits` reads every shard of a dataset once, computes the
spectrogram features (:class:`heimdall.features.SpectrogramFeatures`) with the
heard mask applied, and keeps them in memory as float16 (features span about
−2.5…4.5 network units, where float16's step is ≤ 0.004 units = 0.08 dB, far
below the ~0.1 dB power-estimation noise). The split of each recording comes
from :func:`heimdall.datasets.split_codes`, by split group (the recording id unless
the shards carry groups).

Each item is a dict: ``features`` (R, 128, 32) float32, ``mask`` (R,) bool,
``target`` (2,) float32 — east/north of the transmitter in units of
``TargetScaling.target_scale_km`` — and, for val/test rows of synthetic data,
``oracle_mean`` (2,) km and ``oracle_cov`` (2, 2) km² of the Bayes oracle on the
same recording (its coverage-calibrated ellipse), so every validation reports
the ratio to the oracle.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from heimdall.catalog import Catalog
from heimdall.datasets import TEST, TRAIN, VAL, SplitConfig, open_dataset, read_shard, split_codes
from heimdall.errors import DataError
from heimdall.features import FeatureConfig, SpectrogramFeatures
from heimdall.geometry import LocalFrame
from heimdall.models import TargetScaling
from heimdall.oracle import BayesOracle
from heimdall.scene import GeneratorConfig
from heimdall.store import BlobStore

__all__ = ["SPLITS", "HeimdallDataset", "HeimdallDataModule", "load_feature_splits"]

SPLITS = {"train": TRAIN, "val": VAL, "test": TEST}


@dataclass
class _Columns:
    recording_id: list[np.ndarray]
    features: list[torch.Tensor]
    mask: list[np.ndarray]
    target: list[np.ndarray]


class HeimdallDataset(torch.utils.data.Dataset):
    """In-memory features of one split; index with an int (one sample) or a list (a batch).

    Args:
        features: (N, R, 128, 32), stored as float16.
        mask: (N, R) bool heard flags.
        target: (N, 2) normalised east/north.
        recording_id: (N,) ids.
        oracle_mean, oracle_cov: optional (N, 2) km and (N, 2, 2) km².
    """

    def __init__(self, features: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, recording_id: np.ndarray,
                 oracle_mean: torch.Tensor | None = None, oracle_cov: torch.Tensor | None = None) -> None:
        n = features.shape[0]
        if not (mask.shape[0] == target.shape[0] == len(recording_id) == n):
            raise DataError(f"split arrays disagree on length: features {n}, mask {mask.shape[0]}, "
                            f"target {target.shape[0]}, ids {len(recording_id)}")
        self.features = features.to(torch.float16)
        self.mask = mask.to(torch.bool)
        self.target = target.to(torch.float32)
        self.recording_id = np.asarray(recording_id)
        self.oracle_mean = oracle_mean
        self.oracle_cov = oracle_cov

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index)
        item = {"features": self.features[idx].float(), "mask": self.mask[idx], "target": self.target[idx]}
        if self.oracle_mean is not None and self.oracle_cov is not None:
            item["oracle_mean"] = self.oracle_mean[idx]
            item["oracle_cov"] = self.oracle_cov[idx]
        return item


def _targets(labels: dict[str, np.ndarray], scaling: TargetScaling) -> np.ndarray:
    east, north = LocalFrame(scaling.origin_lat, scaling.origin_lon).to_local(labels["tx_lat"], labels["tx_lon"])
    return np.stack([east, north], axis=-1) / scaling.target_scale_km


def load_feature_splits(
    catalog: Catalog,
    store: BlobStore,
    name: str,
    *,
    feature_config: FeatureConfig = FeatureConfig(),
    split_config: SplitConfig = SplitConfig(),
    scaling: TargetScaling | None = None,
    oracle: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, HeimdallDataset]:
    """Read a complete dataset once and return its train/val/test splits.

    Args:
        catalog, store: where the dataset lives.
        name: dataset name.
        feature_config: spectrogram settings (saved with the model by the caller).
        split_config: split fractions.
        scaling: target scaling; default :class:`TargetScaling`.
        oracle: attach the Bayes oracle's posterior to val/test rows (synthetic data only).
        progress: called with the number of recordings read after each shard.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.

    Raises:
        DataError: a pending dataset, a missing/corrupt shard, or IQ whose length does
            not match ``feature_config`` (naming both numbers).
    """
    info = open_dataset(catalog, name)
    scaling = scaling or TargetScaling()
    featurize = SpectrogramFeatures(feature_config)
    cols = {s: _Columns([], [], [], []) for s in SPLITS}
    labels_all: dict[str, list[np.ndarray]] = {"rx_power_dbm": [], "heard": [], "frequency_hz": [], "split": []}
    for shard_info in catalog.shards(info.name):
        shard = read_shard(store, shard_info)
        if shard.iq.shape[-1] != feature_config.n_samples:
            raise DataError(f"dataset {name!r} holds {shard.iq.shape[-1]} IQ samples per receiver but the features "
                            f"need {feature_config.n_samples} ({feature_config.n_frames} frames × hop {feature_config.hop}); "
                            f"fix: use a FeatureConfig matching the data, or regenerate the dataset")
        known = np.isfinite(shard.labels["tx_lat"]) & np.isfinite(shard.labels["tx_lon"])
        codes = split_codes(shard.recording_id, shard.labels.get("split_group"), split_config)
        split = np.where(known, codes, -1)
        heard = shard.labels["heard"].astype(bool)
        with torch.no_grad():
            feats = torch.cat([featurize(torch.from_numpy(shard.iq[i:i + 64]), torch.from_numpy(heard[i:i + 64]))
                               .to(torch.float16) for i in range(0, len(shard), 64)])
        target = _targets(shard.labels, scaling)
        for s, code in SPLITS.items():
            sel = split == code
            c = cols[s]
            c.recording_id.append(shard.recording_id[sel])
            c.features.append(feats[torch.from_numpy(sel)])
            c.mask.append(heard[sel])
            c.target.append(target[sel])
        for k in ("rx_power_dbm", "heard", "frequency_hz"):
            labels_all[k].append(shard.labels[k])
        labels_all["split"].append(split)
        if progress:
            progress(len(shard))
    generator = GeneratorConfig.from_dict(info.config) if info.kind == "synthetic" and oracle else None
    split_all = np.concatenate(labels_all["split"]) if labels_all["split"] else np.empty(0)
    out = {}
    for s, code in SPLITS.items():
        c = cols[s]
        om = oc = None
        if generator is not None and s != "train" and (split_all == code).any():
            sel = split_all == code
            mean, cov = BayesOracle(generator).posterior(
                np.concatenate(labels_all["rx_power_dbm"])[sel], np.concatenate(labels_all["heard"])[sel],
                np.concatenate(labels_all["frequency_hz"])[sel], ellipse="calibrated")
            om, oc = torch.from_numpy(mean).float(), torch.from_numpy(cov).float()
        out[s] = HeimdallDataset(
            torch.cat(c.features) if c.features else torch.empty(0, 0, 0, 0),
            torch.from_numpy(np.concatenate(c.mask)), torch.from_numpy(np.concatenate(c.target)).float(),
            np.concatenate(c.recording_id), om, oc)
    if len(out["train"]) == 0:
        raise DataError(f"dataset {name!r} has no training recordings with a known transmitter position; "
                        f"fix: generate a synthetic dataset or import captures with 'transmitter' metadata")
    return out


class HeimdallDataModule(pl.LightningDataModule):
    """Batches of in-memory splits; shuffling is seeded, evaluation is in id order.

    Batches are assembled by slicing whole index lists (no per-item collate), which
    keeps the loader far cheaper than a training step.
    """

    def __init__(self, splits: dict[str, HeimdallDataset], batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.splits, self.batch_size, self.seed = splits, batch_size, seed

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.splits[split]
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)) if shuffle else SequentialSampler(ds)
        return DataLoader(ds, sampler=BatchSampler(sampler, self.batch_size, drop_last=False), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
