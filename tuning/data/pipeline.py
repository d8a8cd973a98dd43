"""The Ray Data pipeline: shards → features computed ONCE per study → per-trial datasets → torch batches.

Features do not depend on a trial's hyperparameters, so :func:`ensure_feature_cache`
computes them once on the driver, before any trial, and keeps them as Parquet
in the same blob store as the shards (``features/{dataset}/{key}/split=*/``,
``manifest.json`` written last marks it complete; ``key`` hashes everything the
features depend on). Trials only read that cache: :func:`study_datasets` (read
once per study into the object store) or :func:`trial_datasets` (read by every
trial) for ``TorchTrainer(datasets=...)``, :class:`RayBatches` in each worker,
:func:`read_cached` for evaluation and export.

Why shards are decoded by our own actors (checksums), why float16, and how the
read tasks fit beside the trials' CPUs: docs/architecture.md, "Data".

Example::

    cache = ensure_feature_cache(catalog, store, "demo", FeatureConfig())
    trainer = TorchTrainer(train_fn, datasets=trial_datasets(cache, store), ...)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from heimdall.catalog import Catalog, DatasetInfo, ShardInfo
from heimdall.datasets import SplitConfig, open_dataset, split_codes, verify_dataset
from heimdall.errors import DataError, HeimdallError, NotFoundError, collect_problems
from heimdall.features import FeatureConfig
from heimdall.geometry import LocalFrame, default_frame
from heimdall.models import TargetScaling
from heimdall.shards import ShardData, decode_shard, shard_metadata
from heimdall.store import BlobStore

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs
    import ray.data
    import torch

    from heimdall.data import HeimdallDataset

__all__ = [
    "CACHE_VERSION",
    "SPLIT_NAMES",
    "READ_NUM_CPUS",
    "READ_CONCURRENCY",
    "FeatureCache",
    "RayBatches",
    "cache_prefix",
    "decode_features",
    "encode_features",
    "ensure_feature_cache",
    "load_cached_split",
    "read_cached",
    "MATERIALIZE_SHARE",
    "materialises",
    "cached_bytes",
    "study_datasets",
    "trial_datasets",
    "worker_batches",
]

#: Bump when the cached columns or their meaning change: old caches are then ignored.
CACHE_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
#: CPUs each Ray Data read task of a trial asks for (see the module docstring).
READ_NUM_CPUS = 0.25
#: Read tasks of one dataset at once. Reading a cached row costs ~0.1 ms of CPU,
#: so two tasks feed far more than one training worker consumes.
READ_CONCURRENCY = 2
#: Largest share of the cluster's object store that :func:`study_datasets` fills with the
#: study's train and val rows. The default study's (8000 recordings) take ~0.4 GB of the
#: 1 GiB that ``tuning.run`` gives a local Ray; a larger cache is streamed from its files
#: by every trial instead, because spilling it to disk would cost more than it saves.
MATERIALIZE_SHARE = 0.5
#: Recordings per SpectrogramFeatures call inside an actor (bounds its memory).
CHUNK = 64
MANIFEST = "manifest.json"
BATCH_KEYS = ("features", "mask", "target")
ORACLE_KEYS = ("oracle_mean", "oracle_cov")
_RAY_RETRY_NOTE = "\nFailed to apply UDF transform"

Log = Callable[[str], object]


@dataclass(frozen=True)
class FeatureCache:
    """A complete feature cache in a blob store (its manifest exists).

    Attributes:
        dataset: the dataset's name.
        key: hash of everything the features depend on.
        prefix: store key prefix of the cache, ``features/{dataset}/{key}``.
        counts: rows per split (``train``, ``val``, ``test``) and ``unlabelled``
            (recordings left out because their transmitter position is unknown).
        files: store keys of each split's Parquet files.
        with_oracle: whether val/test rows carry ``oracle_mean``/``oracle_cov``.
        reused: True when this call found the cache, False when it built it.
        manifest: the manifest as written.
    """

    dataset: str
    key: str
    prefix: str
    counts: dict[str, int]
    files: dict[str, tuple[str, ...]]
    with_oracle: bool
    reused: bool
    manifest: dict[str, Any] = field(repr=False)

    @property
    def feature_config(self) -> FeatureConfig:
        """The FeatureConfig the features were computed with."""
        return FeatureConfig.from_dict(self.manifest["feature_config"])

    @property
    def target_scaling(self) -> TargetScaling:
        """The TargetScaling the targets were normalised with."""
        return TargetScaling.from_dict(self.manifest["target_scaling"])


@dataclass(frozen=True)
class _Plan:
    """Everything a build needs, computed on the driver."""

    info: DatasetInfo
    shards: list[ShardInfo]
    feature_config: FeatureConfig
    split: SplitConfig
    target_scaling: TargetScaling
    generator_config: dict[str, Any] | None  # None: no oracle
    key: str
    prefix: str
    expected: dict[str, int]


def cache_prefix(dataset: str, key: str) -> str:
    """Store key prefix of a dataset's feature cache ``key``."""
    return f"features/{dataset}/{key}"


def ensure_feature_cache(
    catalog: Catalog,
    store: BlobStore,
    dataset: str,
    feature_config: FeatureConfig = FeatureConfig(),
    split: SplitConfig = SplitConfig(),
    *,
    target_scaling: TargetScaling | None = None,
    oracle: bool = True,
    workers: int | None = None,
    log: Log = print,
) -> FeatureCache:
    """Return the dataset's feature cache, building it with Ray Data if needed.

    Args:
        catalog: the catalogue holding the dataset.
        store: the blob store holding its shards; the cache is written there too.
        dataset: name of a complete dataset.
        feature_config: how IQ becomes features.
        split: train/val/test fractions.
        target_scaling: frame origin and km per target unit; default ``TargetScaling()``.
        oracle: compute the Bayes oracle for val/test rows (synthetic datasets only;
            ignored for imported ones).
        workers: feature actors (1 CPU each); default: every CPU of the cluster,
            at most one per shard.
        log: where progress lines go.

    Returns:
        The complete cache; ``reused`` says whether it already existed.

    Raises:
        NotFoundError: no such dataset.
        DataError: the dataset is pending, empty, has no labelled recording, a
            shard is missing, truncated, corrupt or non-finite (naming its key).
        ConfigError: the FeatureConfig does not match the shards (sample rate,
            length, IQ scale), or the oracle is asked for in a frame other than
            the default one.
    """
    scaling = target_scaling or TargetScaling()
    info = open_dataset(catalog, dataset)
    shards = catalog.shards(dataset)
    gen = info.config if oracle and info.kind == "synthetic" else None
    if gen is not None:
        _check_oracle_frame(scaling)
    key = _cache_key(info, shards, feature_config, split, scaling, gen)
    cache = _load_cache(store, cache_prefix(dataset, key), dataset, key)
    if cache is not None:  # nothing else to check: it was built from these very shards and settings
        log(f"reusing feature cache {cache.prefix} in {store.describe()} ({_counts_text(cache.counts)})")
        return cache
    plan = _plan(catalog, store, info, feature_config, split, scaling, gen, key)
    log(f"building feature cache {plan.prefix} in {store.describe()} ({_counts_text(plan.expected)})")
    started = time.monotonic()
    written = _build(store, plan, workers)
    cache = _finish(store, plan, written, time.monotonic() - started)
    log(f"built feature cache {plan.prefix} in {cache.manifest['build_seconds']:.1f} s")
    return cache


# -- planning (driver) ----------------------------------------------------------------


def _plan(
    catalog: Catalog, store: BlobStore, info: DatasetInfo, fc: FeatureConfig, split: SplitConfig,
    scaling: TargetScaling, gen: dict[str, Any] | None, key: str,
) -> _Plan:
    """Check everything that can be checked before Ray starts, so errors are Heimdall's."""
    shards = verify_dataset(catalog, store, info.name)  # present, catalogued sizes (truncation)
    if not shards:
        raise DataError(f"dataset {info.name!r} has no shards; fix: generate or import recordings into it first")
    _check_feature_config(store, shards[0], fc)
    expected = _expected_counts(catalog.recordings(info.name), split)
    if expected["train"] == 0:
        raise DataError(
            f"dataset {info.name!r} has no training recording with a known transmitter position "
            f"({_counts_text(expected)}); fix: use a larger dataset, lower val/test fractions, or label the recordings"
        )
    return _Plan(info, shards, fc, split, scaling, gen, key, cache_prefix(info.name, key), expected)


def _check_feature_config(store: BlobStore, first: ShardInfo, fc: FeatureConfig) -> None:
    import pyarrow.parquet as pq

    fs, base = store.pyarrow_filesystem()
    try:
        schema = pq.read_schema(f"{base}/{first.key}", filesystem=fs)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"shard {first.key} in {store.describe()} is not readable Parquet: {exc}") from None
    meta = shard_metadata(schema.empty_table(), key=first.key)
    problems = [
        f"{name} must match the shards' {meta[field_]!r} (shard {first.key}), got {value!r}; "
        f"fix: FeatureConfig({name}={meta[field_]!r})"
        for name, field_, value in (
            ("sample_rate_hz", "sample_rate_hz", fc.sample_rate_hz),
            ("reference_dbm", "iq_reference_dbm", fc.reference_dbm),
        )
        if not math.isclose(float(meta[field_]), float(value))
    ]
    if int(meta["n_samples"]) != fc.n_samples:
        problems.append(
            f"(n_frames - 1) * hop + n_fft = {fc.n_samples} must equal the shards' {meta['n_samples']} samples "
            f"per receiver (shard {first.key}); fix: choose n_frames/hop/n_fft that cover them exactly"
        )
    collect_problems("FeatureConfig for this dataset", problems)


def _check_oracle_frame(scaling: TargetScaling) -> None:
    frame = default_frame()
    same = math.isclose(scaling.origin_lat, frame.origin_lat) and math.isclose(scaling.origin_lon, frame.origin_lon)
    collect_problems("TargetScaling", [] if same else [
        f"the origin must be the network centroid ({frame.origin_lat:.6f}, {frame.origin_lon:.6f}) when the "
        f"oracle is computed (its posterior is in that frame), got ({scaling.origin_lat}, {scaling.origin_lon}); "
        "fix: keep the default origin or pass oracle=False"
    ])


def _expected_counts(labels: dict[str, np.ndarray], split: SplitConfig) -> dict[str, int]:
    known = np.isfinite(labels["tx_lat"]) & np.isfinite(labels["tx_lon"])
    codes = split_codes(labels["recording_id"], labels["split_group"], split)
    counts = {name: int(np.sum(known & (codes == i))) for i, name in enumerate(SPLIT_NAMES)}
    counts["unlabelled"] = int(np.sum(~known))
    return counts


def _cache_key(
    info: DatasetInfo, shards: list[ShardInfo], fc: FeatureConfig, split: SplitConfig,
    scaling: TargetScaling, generator_config: dict[str, Any] | None,
) -> str:
    from heimdall.oracle import OracleConfig

    spec = {
        "cache_version": CACHE_VERSION,
        "dataset": info.name,
        "shards": [[s.index, s.sha256] for s in shards],
        "feature_config": fc.to_dict(),
        "split": dataclasses.asdict(split),
        "target_scaling": scaling.to_dict(),
        "oracle": None if generator_config is None else {
            "generator": generator_config, "oracle_config": dataclasses.asdict(OracleConfig())},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _counts_text(counts: dict[str, int]) -> str:
    text = " / ".join(f"{counts.get(s, 0)} {s}" for s in SPLIT_NAMES)
    return text + (f", {counts['unlabelled']} unlabelled left out" if counts.get("unlabelled") else "")


# -- reading an existing cache ----------------------------------------------------------


def _load_cache(store: BlobStore, prefix: str, dataset: str, key: str) -> FeatureCache | None:
    """The cache if its manifest exists and every listed file is present, else None."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
    except NotFoundError:
        return None
    except ValueError:  # a manifest that is not JSON: treat the cache as partial
        return None
    files = {s: tuple(manifest.get("files", {}).get(s, [])) for s in SPLIT_NAMES}
    present = set(store.list(prefix + "/"))
    if manifest.get("cache_version") != CACHE_VERSION or not all(k in present for f in files.values() for k in f):
        return None
    return FeatureCache(dataset=dataset, key=key, prefix=prefix, counts=dict(manifest["counts"]), files=files,
                        with_oracle=bool(manifest["oracle"]), reused=True, manifest=manifest)


# -- building ---------------------------------------------------------------------------


@contextmanager
def _original_errors() -> Iterator[None]:
    """Let a UDF's own exception reach the driver instead of Ray's UserCodeException."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        yield
    finally:
        ctx.raise_original_map_exception = before


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Plan ``read_parquet`` with Ray Data's V1 Parquet reader.

    Ray 2.60's default V2 reader adds a file-listing task to every execution:
    about 3 s per epoch more than V1 for a cache of a few files on the 2-core
    machine (V1 reads the footers once, on the driver, when the dataset is
    created). Every epoch of every trial re-executes the read, so V1 wins.
    The choice is fixed when ``read_parquet`` is called and travels with the
    dataset to the Train workers.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def _heimdall_cause(err: BaseException) -> HeimdallError | None:
    """The Heimdall error a Ray exception wraps, if any."""
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RayTaskError):  # also an instance of its cause's class: check it first
            current = current.cause
        elif isinstance(current, HeimdallError):
            return current
        else:
            current = current.__cause__ or current.__context__
    return None


def _build(store: BlobStore, plan: _Plan, workers: int | None) -> dict[str, list[tuple[str, int]]]:
    """Run the feature actors; returns each split's ``(file key, rows)``, sorted by key."""
    import ray

    for stale in store.list(plan.prefix + "/"):  # files of an interrupted build
        store.delete(stale)
    fs, base = store.pyarrow_filesystem()
    n_actors = min(workers or max(1, int(ray.cluster_resources().get("CPU", 1))), len(plan.shards))
    items = [{"index": s.index, "key": s.key, "sha256": s.sha256, "n_rows": s.n_rows} for s in plan.shards]
    spec = {
        "prefix": plan.prefix,
        "feature_config": plan.feature_config.to_dict(),
        "split": dataclasses.asdict(plan.split),
        "target_scaling": plan.target_scaling.to_dict(),
        "generator_config": plan.generator_config,
    }
    try:
        with _original_errors():
            written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _ShardFeatures, batch_size=1, batch_format="numpy",
                fn_constructor_kwargs={"fs": fs, "base": base, "spec": spec},
                compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1,
            ).take_all()
    except Exception as err:
        cause = _heimdall_cause(err)
        if cause is None:
            raise
        message = str(cause).split(_RAY_RETRY_NOTE)[0]
        raise DataError(f"building the feature cache of dataset {plan.info.name!r} failed: {message}") from None
    files: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLIT_NAMES}
    for row in sorted(written, key=lambda r: str(r["file"])):
        files[str(row["split"])].append((str(row["file"]), int(row["rows"])))
    return files


def _finish(store: BlobStore, plan: _Plan, written: dict[str, list[tuple[str, int]]], seconds: float) -> FeatureCache:
    files = {s: tuple(k for k, _ in written[s]) for s in SPLIT_NAMES}
    counts = {s: sum(n for _, n in written[s]) for s in SPLIT_NAMES}
    counts["unlabelled"] = plan.expected["unlabelled"]
    if counts != plan.expected:
        raise DataError(
            f"the feature actors wrote {_counts_text(counts)} to {plan.prefix} but the catalogue expects "
            f"{_counts_text(plan.expected)}: the shards and the catalogue labels disagree; "
            f"fix: verify the dataset (`python -m tuning.data verify {plan.info.name} --deep`) or regenerate it"
        )
    manifest = {
        "cache_version": CACHE_VERSION,
        "dataset": plan.info.name,
        "dataset_kind": plan.info.kind,
        "key": plan.key,
        "store": store.describe(),
        "shards": [{"index": s.index, "key": s.key, "sha256": s.sha256, "n_rows": s.n_rows} for s in plan.shards],
        "feature_config": plan.feature_config.to_dict(),
        "split": dataclasses.asdict(plan.split),
        "target_scaling": plan.target_scaling.to_dict(),
        "oracle": plan.generator_config is not None,
        "feature_dtype": "float16",
        "counts": counts,
        "files": {s: list(f) for s, f in files.items()},
        "build_seconds": round(seconds, 3),
        "created": datetime.now(UTC).isoformat(),
    }
    store.put(f"{plan.prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return FeatureCache(dataset=plan.info.name, key=plan.key, prefix=plan.prefix, counts=counts, files=files,
                        with_oracle=manifest["oracle"], reused=False, manifest=manifest)


class _ShardFeatures:
    """Ray Data UDF (an actor): verified shards in, one Parquet file per (shard, split) out.

    Each actor writes its own files: no write tasks compete with the actors for
    CPUs (with Ray's ``write_parquet`` after the actors, a 2-CPU build took 3x
    longer), and file names are deterministic (``split=val/part-00003.parquet``),
    so a retried task overwrites instead of duplicating. Returns one summary
    row (file, split, rows) per file written.
    """

    def __init__(self, fs: pyarrow.fs.FileSystem, base: str, spec: dict[str, Any]) -> None:
        import torch

        from heimdall.features import SpectrogramFeatures
        from heimdall.oracle import BayesOracle
        from heimdall.scene import GeneratorConfig

        torch.set_grad_enabled(False)
        self.fs, self.base, self.prefix = fs, base, spec["prefix"]
        self.folders: set[str] = set()
        self.config = FeatureConfig.from_dict(spec["feature_config"])
        self.features = SpectrogramFeatures(self.config)
        self.split = SplitConfig(**spec["split"])
        self.scaling = TargetScaling.from_dict(spec["target_scaling"])
        gen = spec["generator_config"]
        self.oracle = None if gen is None else BayesOracle(GeneratorConfig.from_dict(gen))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summary: dict[str, list[Any]] = {"file": [], "split": [], "rows": []}
        for index, key, sha256, n_rows in zip(batch["index"], batch["key"], batch["sha256"], batch["n_rows"]):
            shard = decode_shard(self._read(str(key)), key=str(key), sha256=str(sha256), n_rows=int(n_rows))
            rows = self._rows(shard, str(key))
            for code, name in enumerate(SPLIT_NAMES):
                dropped = ("split", *ORACLE_KEYS) if name == "train" else ("split",)
                part = {k: v[rows["split"] == code] for k, v in rows.items() if k not in dropped}
                if len(part["recording_id"]):
                    summary["file"].append(self._write(part, name, int(index)))
                    summary["split"].append(name)
                    summary["rows"].append(len(part["recording_id"]))
        return {"file": np.asarray(summary["file"], dtype=str), "split": np.asarray(summary["split"], dtype=str),
                "rows": np.asarray(summary["rows"], dtype=np.int64)}

    def _read(self, key: str) -> bytes:
        try:
            with self.fs.open_input_file(f"{self.base}/{key}") as f:
                return f.readall()
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"shard {key} could not be read from the store ({exc}); fix: check the store "
                            "settings point where the dataset was written, or regenerate the dataset") from None

    def _write(self, part: dict[str, np.ndarray], split: str, index: int) -> str:
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        folder = f"{self.base}/{self.prefix}/split={split}"
        if folder not in self.folders:  # a local filesystem needs the folder; S3 just gets a marker
            self.fs.create_dir(folder, recursive=True)
            self.folders.add(folder)
        key = f"{self.prefix}/split={split}/part-{index:05d}.parquet"
        # Small tensor columns get Ray's tensor extension type (read back as ndarrays);
        # the features go in as raw bytes, see encode_features.
        small = BlockAccessor.batch_to_block({k: v for k, v in part.items() if k != "features"})
        table = small.append_column(*encode_features(part["features"]))
        pq.write_table(table, f"{self.base}/{key}", filesystem=self.fs)
        return key

    def _rows(self, shard: ShardData, key: str) -> dict[str, np.ndarray]:
        self._check_scale(shard, key)
        frame = LocalFrame(self.scaling.origin_lat, self.scaling.origin_lon)
        east, north = frame.to_local(shard.labels["tx_lat"], shard.labels["tx_lon"])
        target = np.stack([east, north], axis=-1) / self.scaling.target_scale_km
        keep = np.isfinite(target).all(axis=1)
        codes = split_codes(shard.recording_id, shard.labels.get("split_group"), self.split)[keep]
        heard = np.asarray(shard.labels["heard"], dtype=bool)[keep]
        rows = {
            "recording_id": shard.recording_id[keep].astype(np.int64),
            "split": codes,
            "features": self._features(shard.iq[keep], heard),
            "mask": heard,
            "target": target[keep].astype(np.float32),
        }
        if self.oracle is not None:
            rows.update(self._oracle(shard, keep, codes, key))
        return rows

    def _check_scale(self, shard: ShardData, key: str) -> None:
        # The driver checked the first shard against the FeatureConfig; the others must agree with it.
        c = self.config
        same = (math.isclose(shard.sample_rate_hz, c.sample_rate_hz)
                and math.isclose(shard.iq_reference_dbm, c.reference_dbm) and shard.iq.shape[-1] == c.n_samples)
        if not same:
            raise DataError(
                f"shard {key} has {shard.iq.shape[-1]} samples at {shard.sample_rate_hz} Hz with IQ reference "
                f"{shard.iq_reference_dbm} dBm, unlike the dataset's first shard ({c.n_samples} samples at "
                f"{c.sample_rate_hz} Hz, {c.reference_dbm} dBm); fix: a dataset's shards must share one format: "
                "regenerate or re-import it"
            )

    def _features(self, iq: np.ndarray, heard: np.ndarray) -> np.ndarray:
        import torch

        out = np.empty((len(iq), iq.shape[1], self.config.n_fft, self.config.n_frames), dtype=np.float16)
        for i in range(0, len(iq), CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(iq[i:i + CHUNK]))
            out[i:i + CHUNK] = self.features(chunk, torch.from_numpy(heard[i:i + CHUNK])).numpy()
        return out

    def _oracle(self, shard: ShardData, keep: np.ndarray, codes: np.ndarray, key: str) -> dict[str, np.ndarray]:
        n = int(keep.sum())
        mean = np.full((n, 2), np.nan, dtype=np.float32)
        cov = np.full((n, 2, 2), np.nan, dtype=np.float32)
        held_out = codes != SPLIT_NAMES.index("train")
        if held_out.any():
            labels = {k: np.asarray(shard.labels[k])[keep][held_out] for k in ("rx_power_dbm", "heard", "frequency_hz")}
            try:
                m, c = self.oracle.posterior(labels["rx_power_dbm"], labels["heard"].astype(bool),
                                             labels["frequency_hz"])
            except ValueError as exc:
                raise DataError(f"shard {key}: the Bayes oracle refuses its labels: {exc}") from None
            mean[held_out], cov[held_out] = m, c
        return {"oracle_mean": mean, "oracle_cov": cov}


# -- trials -----------------------------------------------------------------------------


def read_cached(
    cache: FeatureCache,
    store: BlobStore,
    split: str,
    *,
    columns: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
    read_num_cpus: float = READ_NUM_CPUS,
) -> ray.data.Dataset:
    """A lazy Ray dataset over one cached split (all columns unless ``columns`` is given).

    Args:
        cache: from :func:`ensure_feature_cache`.
        store: the store holding it (any node of the cluster can read it).
        split: ``"train"``, ``"val"`` or ``"test"``.
        columns: columns to read; the others are never fetched.
        shuffle_seed: if given, the file order is shuffled, differently on every
            execution (epoch) but reproducibly from this seed.
        read_num_cpus: CPUs per read task (see the module docstring).

    Returns:
        The dataset; nothing is read until it is iterated.

    Raises:
        ConfigError: an unknown split name.
        DataError: the split is empty.
    """
    import ray

    collect_problems("feature cache split", [] if split in SPLIT_NAMES else [
        f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}"])
    if not cache.files[split]:
        raise DataError(
            f"the {split} split of feature cache {cache.prefix} is empty ({_counts_text(cache.counts)}); "
            f"fix: use a larger dataset or a larger {split}_fraction in SplitConfig"
        )
    fs, base = store.pyarrow_filesystem()
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    paths = [f"{base}/{k}" for k in cache.files[split]]
    with _parquet_reader_v1():
        # One block per file (<= shard_size rows): Ray would otherwise split each file into
        # ~6 blocks of 1 MB. At most READ_CONCURRENCY tasks: more fractional-CPU tasks than
        # CPUs start extra worker processes that Ray kills when idle and restarts next epoch
        # (measured: 1-2.5 s per epoch of 1600 rows with 2 tasks, up to 5 s unbounded).
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, shuffle=shuffle, num_cpus=read_num_cpus,
                                   override_num_blocks=len(paths),
                                   concurrency=min(READ_CONCURRENCY, len(paths)))
    # select_columns is pushed down into the Parquet read.
    return ds if columns is None else ds.select_columns(list(columns))


def trial_datasets(
    cache: FeatureCache,
    store: BlobStore,
    splits: Sequence[str] = ("train", "val"),
    *,
    seed: int = 0,
    read_num_cpus: float = READ_NUM_CPUS,
) -> dict[str, ray.data.Dataset]:
    """Lazy Ray datasets over the cached splits, for ``TorchTrainer(datasets=...)``.

    Only the columns a batch needs are read: ``features``, ``mask``, ``target``
    and, for val/test of a cache with the oracle, ``oracle_mean``/``oracle_cov``.

    Args:
        cache: from :func:`ensure_feature_cache`.
        store: the store holding it.
        splits: which splits, by name.
        seed: the train split's file order is reshuffled every epoch from this seed.
        read_num_cpus: CPUs per read task (see the module docstring).

    Returns:
        ``{split: Dataset}``; nothing is read until a worker iterates.

    Raises:
        ConfigError: an unknown split name.
        DataError: a requested split is empty.
    """
    return {
        s: read_cached(cache, store, s, read_num_cpus=read_num_cpus, shuffle_seed=seed if s == "train" else None,
                       columns=_trial_columns(cache, s))
        for s in splits
    }


def study_datasets(
    cache: FeatureCache,
    store: BlobStore,
    splits: Sequence[str] = ("train", "val"),
    *,
    seed: int = 0,
    read_num_cpus: float = READ_NUM_CPUS,
    object_store_bytes: float | None = None,
) -> dict[str, ray.data.Dataset]:
    """The trials' datasets, read ONCE per study into Ray's object store and shared by every trial.

    Each trial then starts without planning a read or starting read tasks: its worker
    iterates blocks that are already in the object store (the first batch in ~0.1 s
    instead of ~3 s on 2 cores). The train split keeps a per-epoch shuffle: its block
    (= cache file) order is drawn again at every execution (epoch) from ``seed``, and
    the workers' local shuffle buffer (:func:`worker_batches`) mixes rows across blocks.

    The blocks belong to this driver: they go when it exits (a resumed study reads them
    again) and, on a cluster, a block on a lost node is read again from the cache by Ray
    (Ray Data's tasks are retried without limit). A cache larger than
    :data:`MATERIALIZE_SHARE` of the cluster's object store is not materialised; then this
    returns :func:`trial_datasets`' lazy datasets, read by every trial as before.

    Args:
        cache: from :func:`ensure_feature_cache`.
        store: the store holding it.
        splits: which splits, by name.
        seed: the train split's block order is reshuffled every epoch from this seed.
        read_num_cpus: CPUs per read task.
        object_store_bytes: the object store to size against; default: the cluster's, all nodes.

    Returns:
        ``{split: Dataset}``: materialised, or lazy when the cache is too large (see above).

    Raises:
        ConfigError: an unknown split name.
        DataError: a requested split is empty.
    """
    from ray.data import RandomSeedConfig

    if not materialises(cache, store, splits, object_store_bytes=object_store_bytes):
        return trial_datasets(cache, store, splits, seed=seed, read_num_cpus=read_num_cpus)
    out = {}
    for s in splits:
        ds = read_cached(cache, store, s, read_num_cpus=read_num_cpus, columns=_trial_columns(cache, s)).materialize()
        out[s] = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed)) if s == "train" else ds
    return out


def materialises(cache: FeatureCache, store: BlobStore, splits: Sequence[str] = ("train", "val"), *,
                 object_store_bytes: float | None = None) -> bool:
    """Whether :func:`study_datasets` puts these splits in the object store (then the trials start no
    read task: the resource plan gives them no CPU for reads): their cache files fit in
    :data:`MATERIALIZE_SHARE` of ``object_store_bytes`` (default: the cluster's, all nodes; Ray is up)."""
    if object_store_bytes is None:
        import ray

        object_store_bytes = ray.cluster_resources().get("object_store_memory", 0)
    return cached_bytes(cache, store, splits) <= MATERIALIZE_SHARE * object_store_bytes


def cached_bytes(cache: FeatureCache, store: BlobStore, splits: Sequence[str] = ("train", "val")) -> int:
    """Bytes of the cache files of ``splits`` in the store: about what they take in memory
    (float16 features are near incompressible: the default study's 383 MB of files materialise as 413 MB)."""
    fs, base = store.pyarrow_filesystem()
    # An unknown split counts 0 here: read_cached names it in its error.
    return sum(info.size or 0 for info in fs.get_file_info([f"{base}/{k}" for s in splits for k in cache.files.get(s, ())]))


def _trial_columns(cache: FeatureCache, split: str) -> list[str]:
    # The columns a batch needs: the oracle only where a trial evaluates (val/test).
    return list(BATCH_KEYS) + (list(ORACLE_KEYS) if cache.with_oracle and split != "train" else [])


def load_cached_split(cache: FeatureCache, store: BlobStore, split: str) -> HeimdallDataset:
    """One cached split in memory, as the domain's :class:`~heimdall.data.HeimdallDataset`.

    The export at the end of a study calibrates on ``val`` and gates on
    ``test`` with exactly the features the trials saw, without recomputing
    them from the IQ shards. Needs a running Ray (the files are read with Ray
    Data, like a trial's). Rows are ordered by recording id.

    Raises:
        ConfigError: an unknown split name.
        DataError: the split is empty, or a cached column is malformed.
    """
    import torch
    from ray.data.block import BlockAccessor

    from heimdall.data import HeimdallDataset

    oracle = cache.with_oracle and split != "train"
    columns = ["recording_id", *BATCH_KEYS, *(ORACLE_KEYS if oracle else ())]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in columns}
    for table in read_cached(cache, store, split, columns=columns).iter_batches(batch_format="pyarrow", batch_size=None):
        parts["features"].append(np.array(decode_features(table, cache.feature_config)))
        small = BlockAccessor.for_block(table.drop_columns(["features"])).to_batch_format("numpy")
        for k in columns[:1] + columns[2:]:
            parts[k].append(np.asarray(small[k]))
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["recording_id"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    if len(order) != cache.counts[split]:
        raise DataError(f"the {split} split of feature cache {cache.prefix} has {len(order)} rows but its manifest "
                        f"says {cache.counts[split]}; fix: delete the cache folder and let the study rebuild it")

    def as_tensor(key: str, dtype: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(cols[key], dtype=dtype))

    return HeimdallDataset(
        as_tensor("features", np.float16), as_tensor("mask", bool), as_tensor("target", np.float32),
        cols["recording_id"].astype(np.int64),
        oracle_mean=as_tensor("oracle_mean", np.float32) if oracle else None,
        oracle_cov=as_tensor("oracle_cov", np.float32) if oracle else None,
    )


def encode_features(features: np.ndarray) -> tuple[pa.Field, pa.FixedSizeBinaryArray]:
    """Features (N, R, F, T) → a ``fixed_size_binary`` column: one little-endian
    float16 C-ordered tensor per row (as the shard format stores IQ), its shape
    in the field's metadata (``heimdall.shape``), which Ray Data carries through
    reads, shuffles and splits to the collate function.

    Why not Ray's tensor extension type: it stores a tensor as a Parquet list,
    whose reader decodes a repetition level per element. Reading one 95-row
    file took 96 ms of CPU that way and 6 ms as fixed-size binary; every epoch
    of every trial pays the read, and at 1 ms per recording one CPU could not
    feed a GPU step of batch 64 faster than every 64 ms.

    Returns:
        The field and the column.
    """
    import pyarrow as pa

    flat = np.ascontiguousarray(features, dtype="<f2").reshape(len(features), -1)
    type_ = pa.binary(flat.shape[1] * 2)
    meta = {"heimdall.shape": ",".join(str(d) for d in features.shape[1:]), "heimdall.dtype": "<f2"}
    column = pa.FixedSizeBinaryArray.from_buffers(type_, len(flat), [None, pa.py_buffer(flat)])
    return pa.field("features", type_, nullable=False, metadata=meta), column


def decode_features(table: pa.Table, feature_config: FeatureConfig | None = None) -> np.ndarray:
    """View the ``features`` column of a cached table as float16 (N, R, n_fft, n_frames),
    without copying when the column has one chunk.

    Args:
        table: a batch of a cached split (e.g. ``read_cached(...).iter_batches(batch_format="pyarrow")``).
        feature_config: if given, the shape must be the one it implies (R from the data).

    Returns:
        A read-only float16 array.

    Raises:
        DataError: the column is not fixed-size binary of its recorded shape, has no
            recorded shape, or does not match ``feature_config``.
    """
    import pyarrow as pa

    field = table.schema.field("features")
    raw = (field.metadata or {}).get(b"heimdall.shape")
    if raw is None:
        raise DataError(f"the features column has no 'heimdall.shape' metadata (type {field.type}); it was not "
                        "written by tuning.data.pipeline; fix: rebuild the feature cache")
    shape = tuple(int(d) for d in raw.decode().split(","))
    width = 2 * math.prod(shape)
    if not pa.types.is_fixed_size_binary(field.type) or field.type.byte_width != width:
        raise DataError(f"cached features must be fixed_size_binary[{width}] (float16 {shape}), got {field.type}; "
                        "fix: rebuild the feature cache")
    if feature_config is not None and shape[1:] != (feature_config.n_fft, feature_config.n_frames):
        raise DataError(f"cached features have shape {shape} but the FeatureConfig implies (R, {feature_config.n_fft}, "
                        f"{feature_config.n_frames}); fix: use the cache's own FeatureCache.feature_config")
    col = table.column("features").combine_chunks()
    flat = np.frombuffer(col.buffers()[1], dtype="<f2", count=len(col) * width // 2, offset=col.offset * width)
    return flat.reshape(len(col), *shape)


class _TrainingBatch:
    """Arrow batch → exactly the tensors LocalizationModule reads (runs in Ray's collate threads)."""

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        import torch
        from ray.data.block import BlockAccessor

        small = BlockAccessor.for_block(table.drop_columns(["features"])).to_batch_format("numpy")
        # torch.tensor copies: the small columns are views of read-only Arrow memory.
        out = {
            "features": torch.from_numpy(decode_features(table).astype(np.float32)),
            "mask": torch.tensor(np.asarray(small["mask"], dtype=bool)),
            "target": torch.tensor(np.asarray(small["target"], dtype=np.float32)),
        }
        for k in ORACLE_KEYS:
            if k in small:
                out[k] = torch.tensor(np.asarray(small[k], dtype=np.float32))
        return out


@functools.cache
def _collate_class() -> type:
    # Built on first use so that importing this module does not import Ray Data (~2 s).
    from ray.data.collate_fn import ArrowBatchCollateFn

    return type("TrainingBatch", (_TrainingBatch, ArrowBatchCollateFn), {})


def worker_batches(
    shard: ray.data.DataIterator | ray.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of training batches from a worker's dataset shard.

    Args:
        shard: ``ray.train.get_dataset_shard(split)`` inside a Train worker (or a
            Dataset, e.g. in tests).
        batch_size: rows per batch.
        shuffle: shuffle through a local buffer of ``max(4 * batch_size, 128)`` rows
            (on top of the per-epoch file order of :func:`trial_datasets`); for training.
        seed: shuffle seed; pass a different one each epoch.
        drop_last: drop a final short batch.
        prefetch_batches: batches prepared ahead in background threads.
        pin_memory: collate into page-locked host memory (a CUDA worker only: a CPU
            build of torch cannot pin), so Ray Data's copy to the GPU is truly non-blocking.

    Yields:
        ``features`` float32 (B, R, 128, 32), ``mask`` bool (B, R), ``target``
        float32 (B, 2), plus ``oracle_mean`` float32 (B, 2) and ``oracle_cov``
        float32 (B, 2, 2) when the split carries them; on the Train worker's device.

    Raises:
        ConfigError: a batch size below 1.
        DataError: the features column is not one :func:`encode_features` wrote.
    """
    collect_problems("worker_batches", [] if batch_size >= 1 else [f"batch_size must be >= 1, got {batch_size}"])
    yield from shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=_collate_class()(),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        pin_memory=pin_memory,
        local_shuffle_buffer_size=max(4 * batch_size, 128) if shuffle else None,
        local_shuffle_seed=seed if shuffle else None,
    )


#: Batches :class:`RayBatches` prepares ahead of the step (Ray Data's background threads).
PREFETCH_BATCHES = 2


class RayBatches(Iterable[dict[str, "torch.Tensor"]]):
    """A re-iterable of :func:`worker_batches`: each ``iter()`` is a fresh epoch.

    Pass it as ``train_dataloaders=`` / ``val_dataloaders=`` to a Lightning
    ``Trainer``. Epoch ``e`` shuffles with ``seed + e``. Nothing is read until
    the first batch is asked for (Lightning calls ``iter()`` once just to check).

    Batches arrive on the Train worker's device: Ray Data collates
    ``prefetch_batches`` ahead in background threads and copies each to the GPU
    there (non-blocking), so the step never waits for a host-to-device copy; with
    ``pin_memory`` (set it on a CUDA worker) the copy reads page-locked memory and
    overlaps the step. ``bench/bench_pipeline.py --loader`` measures the loader's
    batches/s against a training step (docs/benchmarks.md).

    Args:
        shard: ``ray.train.get_dataset_shard(split)`` (or a Dataset).
        batch_size: rows per batch.
        shuffle: shuffle each epoch (training).
        seed: base shuffle seed.
        n_rows: rows this worker sees per epoch, if known (e.g.
            ``cache.counts["train"] // world_size``: Train splits datasets into
            equal parts); enables ``len()``, which Lightning uses for progress.
        drop_last: drop a final short batch.
        prefetch_batches: batches prepared ahead (:data:`PREFETCH_BATCHES`).
        pin_memory: page-locked host batches; only where the worker trains on CUDA.
    """

    def __init__(self, shard: Any, batch_size: int, *, shuffle: bool, seed: int,
                 n_rows: int | None = None, drop_last: bool = False,
                 prefetch_batches: int = PREFETCH_BATCHES, pin_memory: bool = False) -> None:
        self.shard, self.batch_size, self.shuffle, self.seed = shard, batch_size, shuffle, seed
        self.n_rows, self.drop_last = n_rows, drop_last
        self.prefetch_batches, self.pin_memory = prefetch_batches, pin_memory
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        # A generator: the epoch (and its seed) starts at the first next(), not at iter().
        seed, self.epoch = self.seed + self.epoch, self.epoch + 1
        yield from worker_batches(self.shard, self.batch_size, shuffle=self.shuffle, seed=seed,
                                  drop_last=self.drop_last, prefetch_batches=self.prefetch_batches,
                                  pin_memory=self.pin_memory)

    def __len__(self) -> int:
        if self.n_rows is None:
            raise TypeError("RayBatches has no length unless n_rows is given")
        rounding = math.floor if self.drop_last else math.ceil
        return int(rounding(self.n_rows / self.batch_size))
