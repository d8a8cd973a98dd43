"""Import real Heimdall captures into shards, so they can join synthetic data.

Input layout (what Heimdall's recorder writes to ``heimdall-raw-iq``)::

    SOURCE/sessions/{session}/websdr_{station}.npy   complex64 IQ, 1-D, one per receiver that recorded
    SOURCE/sessions/{session}/metadata.json          the session's measurement rows

``metadata.json``::

    {"frequency_hz": 145500000, "sample_rate_hz": 12000,
     "transmitter": {"lat": 45.1, "lon": 7.7, "power_dbm": 37.0},      # optional (known source)
     "measurements": {"torino": {"signal_strength_db": -95.2, "snr_db": 14.1}, ...}}

Receivers without a file are recorded as not heard with zero IQ. Longer
captures are cut to the first ``n_samples`` samples; shorter ones, another
sample rate, another dtype or non-finite samples are refused with the file
named. A receiver is heard when it has a file and, if its ``snr_db`` is
given, it reaches the generator's SNR threshold.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heimdall.catalog import Catalog, DatasetInfo
from heimdall.errors import AlreadyExistsError, DataError, NotFoundError
from heimdall.receivers import STATION_IDS, station_index
from heimdall.scene import GeneratorConfig
from heimdall.shards import ShardData

__all__ = ["ImportConfig", "load_session", "import_sessions"]


@dataclass(frozen=True)
class ImportConfig:
    """How captures are read: the network's sample rate, length and IQ scale."""

    sample_rate_hz: float = GeneratorConfig.sample_rate_hz
    n_samples: int = GeneratorConfig.n_samples
    snr_threshold_db: float = GeneratorConfig.snr_threshold_db
    iq_reference_dbm: float = GeneratorConfig.iq_reference_dbm


def _load_iq(path: Path, cfg: ImportConfig) -> np.ndarray:
    try:
        iq = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc}); fix: re-export it with np.save") from None
    if iq.dtype != np.complex64:
        raise DataError(f"{path}: IQ dtype must be complex64, got {iq.dtype}; "
                        f"fix: np.save(path, iq.astype(np.complex64))")
    if iq.ndim != 1:
        raise DataError(f"{path}: IQ must be 1-D (one receiver's samples), got shape {iq.shape}")
    if iq.shape[0] < cfg.n_samples:
        raise DataError(f"{path}: needs at least {cfg.n_samples} samples "
                        f"({cfg.n_samples / cfg.sample_rate_hz:.2f} s at {cfg.sample_rate_hz:.0f} Hz), got {iq.shape[0]}")
    iq = iq[: cfg.n_samples]
    if not np.isfinite(iq.view(np.float32)).all():
        raise DataError(f"{path}: IQ holds NaN/inf samples; fix: re-record or drop this receiver's file")
    return iq


def load_session(folder: Path, cfg: ImportConfig = ImportConfig()) -> tuple[np.ndarray, dict[str, object]]:
    """Read one session folder into IQ (R, T) and its label values."""
    meta_path = folder / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{meta_path} is missing; every session needs its metadata.json (see heimdall.realdata)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path} is not valid JSON: {exc}") from None
    rate = float(meta.get("sample_rate_hz", cfg.sample_rate_hz))
    if rate != cfg.sample_rate_hz:
        raise DataError(f"{meta_path}: sample rate must be {cfg.sample_rate_hz:.0f} Hz, got {rate:.0f}; "
                        f"fix: resample the captures to {cfg.sample_rate_hz:.0f} Hz before importing")
    iq = np.zeros((len(STATION_IDS), cfg.n_samples), dtype=np.complex64)
    heard = np.zeros(len(STATION_IDS), dtype=bool)
    power = np.full(len(STATION_IDS), np.nan, dtype=np.float32)
    snr = np.full(len(STATION_IDS), np.nan, dtype=np.float32)
    measurements = meta.get("measurements", {})
    for path in sorted(folder.glob("websdr_*.npy")):
        sid = path.stem.removeprefix("websdr_")
        try:
            i = station_index(sid)
        except KeyError as exc:
            raise DataError(f"{path}: {exc.args[0]}") from None
        iq[i] = _load_iq(path, cfg)
        m = measurements.get(sid, {})
        power[i] = m.get("signal_strength_db", np.nan)
        snr[i] = m.get("snr_db", np.nan)
        heard[i] = not (np.isfinite(snr[i]) and snr[i] < cfg.snr_threshold_db)
    if not heard.any():
        raise DataError(f"{folder}: no receiver file (websdr_<id>.npy with id in {', '.join(STATION_IDS)}) was heard")
    tx = meta.get("transmitter") or {}
    labels: dict[str, object] = {
        "tx_lat": float(tx.get("lat", np.nan)), "tx_lon": float(tx.get("lon", np.nan)),
        "tx_power_dbm": float(tx.get("power_dbm", np.nan)), "frequency_hz": float(meta.get("frequency_hz", np.nan)),
        "inside_hull": False, "rx_power_dbm": power, "snr_db": snr, "heard": heard,
    }
    return iq, labels


def import_sessions(
    catalog: Catalog, store, name: str, source: Path, *, shard_size: int = 250, cfg: ImportConfig = ImportConfig()
) -> DatasetInfo:
    """Import every ``source/sessions/*`` folder as dataset ``name`` (resumable, atomic).

    Raises:
        DataError: a session with a bad file (named), or no sessions at all.
        AlreadyExistsError: the name is taken by another dataset.
    """
    from heimdall.datasets import write_shard

    folders = sorted(p for p in (Path(source) / "sessions").glob("*") if p.is_dir())
    if not folders:
        raise DataError(f"no session folders under {Path(source) / 'sessions'}; expected sessions/<id>/websdr_<station>.npy")
    manifest = {"source": str(Path(source).resolve()), "sessions": [f.name for f in folders],
                "import": cfg.__dict__}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    manifest["digest"] = digest
    catalog.initialize()
    try:
        info = catalog.get_dataset(name)
        if info.status == "complete" or info.config.get("digest") != digest:
            raise AlreadyExistsError(f"dataset {name!r} already exists ({info.status}, {info.kind}); fix: choose another "
                                     f"--dataset name or `python -m tuning.data delete {name}`")
    except NotFoundError:
        catalog.create_dataset(name, kind="imported", config=manifest, seed=None, planned_recordings=len(folders),
                               shard_size=shard_size, store=store.describe())
    done = {s.index for s in catalog.shards(name)}
    for index in range(math.ceil(len(folders) / shard_size)):
        if index in done:
            continue
        chunk = folders[index * shard_size:(index + 1) * shard_size]
        loaded = [load_session(f, cfg) for f in chunk]
        labels = {k: np.stack([np.asarray(lab[k]) for _, lab in loaded]) for k in loaded[0][1]}
        shard = ShardData(recording_id=index * shard_size + np.arange(len(chunk), dtype=np.int64),
                          iq=np.stack([iq for iq, _ in loaded]), labels=labels,
                          sample_rate_hz=cfg.sample_rate_hz, iq_reference_dbm=cfg.iq_reference_dbm)
        write_shard(catalog, store, name, index, shard)
    catalog.mark_complete(name)
    return catalog.get_dataset(name)
