"""Datasets: synthetic generation into shards, reading them back, splits.

A dataset is a set of shards in a blob store plus its rows in a catalogue.
Generation is atomic from a reader's point of view: the dataset stays
``pending`` until its last shard is registered, readers refuse pending
datasets, and rerunning the same generation resumes where it stopped (each
shard is reproducible on its own from ``(seed, shard_index)``). A shard's
object is written before its catalogue rows, so an interruption can only leave
an unregistered object, which the resumed run overwrites.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from heimdall.catalog import Catalog, DatasetInfo, ShardInfo
from heimdall.errors import AlreadyExistsError, ConfigError, DataError, NotFoundError
from heimdall.scene import GeneratorConfig
from heimdall.shards import ShardData, decode_shard, encode_shard, sha256_hex, shard_key
from heimdall.store import BlobStore
from heimdall.synthetic import generate

__all__ = [
    "SplitConfig",
    "generate_dataset",
    "open_dataset",
    "verify_dataset",
    "read_shard",
    "iter_shards",
    "split_assignment",
    "split_codes",
    "labels_to_shard_rows",
]

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic train/val/test split by split group (the recording id unless grouped).

    A recording's split depends only on its group id (a fixed integer hash), never
    on shard order, the number of workers or the run; recordings of one group (one
    transmitter, one session) always share a split.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        p = []
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                p.append(f"{name} must lie in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            p.append(f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")
        if p:
            raise ConfigError("SplitConfig", p)


TRAIN, VAL, TEST = 0, 1, 2


def split_assignment(recording_id: np.ndarray, config: SplitConfig = SplitConfig()) -> np.ndarray:
    """Split code per recording: 0 train, 1 val, 2 test (splitmix64 of the id)."""
    z = np.asarray(recording_id, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out = np.full(u.shape, TRAIN, dtype=np.int8)
    out[u >= 1.0 - config.val_fraction - config.test_fraction] = VAL
    out[u >= 1.0 - config.test_fraction] = TEST
    return out


def split_codes(
    recording_id: np.ndarray, split_group: np.ndarray | None = None, config: SplitConfig = SplitConfig()
) -> np.ndarray:
    """Split code per recording (0 train, 1 val, 2 test): that of its split group.

    Every reader of a dataset decides splits here, so that no group can land in two splits.

    Args:
        recording_id: (N,) ids.
        split_group: (N,) group ids, or None: each recording is its own group (synthetic
            data, and shards or catalogues written before groups existed).
        config: split fractions.

    Returns:
        (N,) int8 codes, :func:`split_assignment` of the groups.
    """
    groups = np.asarray(recording_id if split_group is None else split_group)
    if groups.shape != np.shape(recording_id):
        raise DataError(f"split_group has shape {groups.shape} but recording_id {np.shape(recording_id)}; "
                        f"fix: give one group per recording")
    return split_assignment(groups, config)


def labels_to_shard_rows(shard: ShardData, *, key: str) -> dict[str, np.ndarray]:
    """The catalogue's recording arrays for one shard."""
    n, _, t = shard.iq.shape
    rows = {k: np.asarray(v) for k, v in shard.labels.items()}
    rows["recording_id"] = shard.recording_id.astype(np.int64)
    rows["row"] = np.arange(n, dtype=np.int32)
    rows["iq_sample_rate"] = np.full(n, shard.sample_rate_hz)
    rows["iq_samples_count"] = np.full(n, t, dtype=np.int64)
    return rows


def _shard_sizes(n_recordings: int, shard_size: int) -> list[int]:
    n_shards = math.ceil(n_recordings / shard_size)
    return [min(shard_size, n_recordings - i * shard_size) for i in range(n_shards)]


def _check_request(name: str, n_recordings: int, shard_size: int) -> None:
    p = []
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        p.append(f"dataset name must be non-empty and use letters, digits, '-', '_' or '.', got {name!r}")
    if n_recordings < 1:
        p.append(f"recordings must be >= 1, got {n_recordings}")
    if not 1 <= shard_size <= 5000:
        p.append(f"shard_size must lie in [1, 5000], got {shard_size}")
    if p:
        raise ConfigError("dataset request", p)


def _resume_or_create(
    catalog: Catalog, store: BlobStore, name: str, config: GeneratorConfig, n: int, seed: int, shard_size: int
) -> DatasetInfo:
    try:
        info = catalog.get_dataset(name)
    except NotFoundError:
        return catalog.create_dataset(
            name, kind="synthetic", config=config.to_dict(), seed=seed,
            planned_recordings=n, shard_size=shard_size, store=store.describe(),
        )
    if info.status == "complete":
        raise AlreadyExistsError(
            f"dataset {name!r} already exists and is complete ({info.n_recordings} recordings); "
            f"fix: pick another --dataset name, or delete it first with `python -m tuning.data delete {name}`"
        )
    same = (info.config == config.to_dict(), info.seed == seed, info.planned_recordings == n, info.shard_size == shard_size)
    if not all(same):
        raise AlreadyExistsError(
            f"dataset {name!r} is pending from an interrupted generate with different settings "
            f"(seed {info.seed}, {info.planned_recordings} recordings, shard size {info.shard_size}); "
            f"fix: rerun with those settings to resume, or `python -m tuning.data delete {name}` to start over"
        )
    return info


def generate_dataset(
    catalog: Catalog,
    store: BlobStore,
    name: str,
    *,
    n_recordings: int,
    seed: int,
    config: GeneratorConfig = GeneratorConfig(),
    shard_size: int = 250,
    progress: ProgressFn | None = None,
) -> DatasetInfo:
    """Generate a synthetic dataset into ``store`` and register it in ``catalog``.

    Resumes a pending dataset of the same name and settings: registered shards are
    skipped (their count is passed to ``progress`` first).

    Args:
        catalog: where datasets, shards and labels are recorded.
        store: where shard objects are written.
        name: dataset name.
        n_recordings: number of recordings.
        seed: base seed; shard ``i`` uses ``(seed, i)``.
        config: generator parameters.
        shard_size: recordings per shard.
        progress: called with the number of recordings finished since the last call.

    Returns:
        The completed dataset's info.

    Raises:
        AlreadyExistsError: the name is taken by a complete dataset, or by a pending
            one with other settings.
        ConfigError: invalid name, count or shard size.
    """
    _check_request(name, n_recordings, shard_size)
    catalog.initialize()
    _resume_or_create(catalog, store, name, config, n_recordings, seed, shard_size)
    done = {s.index for s in catalog.shards(name)}
    sizes = _shard_sizes(n_recordings, shard_size)
    if progress and done:
        progress(sum(sizes[i] for i in done))
    for index, size in enumerate(sizes):
        if index in done:
            continue
        rec = generate(config, size, seed, index)
        scene = rec.scene
        labels = {
            "tx_lat": scene.tx_lat, "tx_lon": scene.tx_lon, "tx_power_dbm": scene.tx_power_dbm,
            "frequency_hz": scene.frequency_hz, "inside_hull": scene.inside_hull,
            "rx_power_dbm": scene.rx_power_dbm, "snr_db": scene.snr_db, "heard": scene.heard,
        }
        shard = ShardData(
            recording_id=index * shard_size + np.arange(size, dtype=np.int64),
            iq=rec.iq, labels=labels,
            sample_rate_hz=config.sample_rate_hz, iq_reference_dbm=config.iq_reference_dbm,
        )
        write_shard(catalog, store, name, index, shard)
        if progress:
            progress(size)
    catalog.mark_complete(name)
    return catalog.get_dataset(name)


def write_shard(catalog: Catalog, store: BlobStore, dataset: str, index: int, shard: ShardData) -> ShardInfo:
    """Write one shard's object, then register it (object first: see module doc)."""
    key = shard_key(dataset, index)
    data = encode_shard(shard, dataset=dataset, index=index)
    store.put(key, data)
    info = ShardInfo(dataset=dataset, index=index, key=key, sha256=sha256_hex(data), n_rows=len(shard), n_bytes=len(data))
    catalog.add_shard(info, labels_to_shard_rows(shard, key=key))
    return info


def open_dataset(catalog: Catalog, name: str) -> DatasetInfo:
    """A complete dataset's info; pending datasets are refused with the fix."""
    info = catalog.get_dataset(name)
    if info.status != "complete":
        raise DataError(
            f"dataset {name!r} is pending: its generation/import stopped after {info.n_shards} shard(s) "
            f"({info.n_recordings}/{info.planned_recordings} recordings); fix: rerun the same "
            f"`python -m tuning.data generate` command to resume it, or `python -m tuning.data delete {name}`"
        )
    return info


def verify_dataset(catalog: Catalog, store: BlobStore, name: str, *, deep: bool = False) -> list[ShardInfo]:
    """Check every catalogued shard exists in ``store`` with the catalogued size.

    Args:
        deep: also download each shard and verify checksum, schema and samples.

    Returns:
        The dataset's shards.

    Raises:
        DataError: naming the first missing, resized or corrupt shard and the fix.
    """
    shards = catalog.shards(open_dataset(catalog, name).name)
    for s in shards:
        if not store.exists(s.key):
            raise DataError(
                f"dataset {name!r}: catalogued shard {s.key} is missing from {store.describe()}; "
                f"fix: check the store settings (HEIMDALL_STORE / --store) point where the dataset was written, "
                f"or delete and regenerate it (`python -m tuning.data delete {name}`)"
            )
        size = store.size(s.key)
        if size != s.n_bytes:
            raise DataError(
                f"dataset {name!r}: shard {s.key} has {size} bytes in the store but {s.n_bytes} in the catalogue "
                f"(truncated or replaced); fix: delete and regenerate the dataset"
            )
        if deep:
            read_shard(store, s)
    return shards


def read_shard(store: BlobStore, shard: ShardInfo) -> ShardData:
    """Download and verify one shard (checksum, schema, dtype, shape, finiteness)."""
    try:
        data = store.get(shard.key)
    except NotFoundError:
        raise DataError(
            f"dataset {shard.dataset!r}: catalogued shard {shard.key} is missing from {store.describe()}; "
            f"fix: point the store setting at where the dataset was written, or delete and regenerate it"
        ) from None
    return decode_shard(data, key=shard.key, sha256=shard.sha256, n_rows=shard.n_rows)


def iter_shards(catalog: Catalog, store: BlobStore, name: str) -> Iterator[ShardData]:
    """Yield every shard of a complete dataset, verified, in index order."""
    for s in catalog.shards(open_dataset(catalog, name).name):
        yield read_shard(store, s)
