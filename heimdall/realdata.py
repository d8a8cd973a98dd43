"""Import real Heimdall captures into shards, so they can join synthetic data.

Input layout: a folder of captures exported by hand (a Heimdall installation's own
database and raw-IQ bucket are read directly by :mod:`heimdall.upstream`, with
``python -m tuning.data import --from-heimdall``)::

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

Splits are by transmitter: sessions with the same transmitter position share a
``split_group`` (recorded in the dataset config), a session without one is its
own group (:func:`heimdall.groups.allocate_groups`).

Every ``metadata.json`` is checked before anything is written (:func:`read_metadata`):
latitude in [-90, 90], longitude in [-180, 180], finite numbers elsewhere, a
frequency > 0, known station ids; a field left out (or ``null``) means unknown.
A broken file is one :class:`~heimdall.errors.DataError` naming the file, each
bad field, its value and the valid range.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heimdall.catalog import Catalog, DatasetInfo
from heimdall.datasets import SplitConfig
from heimdall.errors import AlreadyExistsError, DataError, NotFoundError
from heimdall.groups import allocate_groups
from heimdall.receivers import STATION_IDS, station_index
from heimdall.scene import GeneratorConfig
from heimdall.shards import ShardData

__all__ = ["ImportConfig", "read_metadata", "check_sessions", "load_session", "import_sessions"]

# (field, low, high, unit) of the optional numbers in metadata.json; None: unbounded.
_TRANSMITTER_FIELDS = (("lat", -90.0, 90.0, "degrees N"), ("lon", -180.0, 180.0, "degrees E"),
                       ("power_dbm", None, None, "dBm"))
_MEASUREMENT_FIELDS = (("signal_strength_db", None, None, "dBm"), ("snr_db", None, None, "dB"))


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


def _number(value: object, field: str, low: float | None, high: float | None, unit: str) -> str | None:
    """Why ``value`` is not a valid number for ``field``, or None when it is (or is absent/null)."""
    if value is None:
        return None
    if low is None:
        rule = f"a finite number ({unit})"
    elif high is None:
        rule = f"a finite number > {low:g} ({unit})"
    else:
        rule = f"a number in [{low:g}, {high:g}] ({unit})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{field} must be {rule}, got {value!r} (a JSON {type(value).__name__})"
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if high is None else low <= value <= high
    return None if ok else f"{field} must be {rule}, got {value!r}"


def _object(value: object, field: str, problems: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{field} must be a JSON object, got {value!r}")
        return {}
    return value


def _fields(values: dict, prefix: str, specs: tuple[tuple[str, float | None, float | None, str], ...]) -> list[str]:
    found = (_number(values.get(name), f"{prefix}{name}", low, high, unit) for name, low, high, unit in specs)
    return [p for p in found if p]


def _metadata_problems(meta: dict, cfg: ImportConfig) -> list[str]:
    """Every broken rule of one metadata.json, one phrase each."""
    positive_hz = (("frequency_hz", 0.0, None, "Hz"), ("sample_rate_hz", 0.0, None, "Hz"))
    problems = _fields(meta, "", positive_hz)
    rate = meta.get("sample_rate_hz")
    if not problems and rate is not None and rate != cfg.sample_rate_hz:
        problems.append(f"sample rate must be {cfg.sample_rate_hz:.0f} Hz, got {rate:.0f}; resample the "
                        f"captures to {cfg.sample_rate_hz:.0f} Hz before importing")
    tx = _object(meta.get("transmitter"), "transmitter", problems)
    problems += _fields(tx, "transmitter.", _TRANSMITTER_FIELDS)
    if (tx.get("lat") is None) != (tx.get("lon") is None):
        problems.append(f"transmitter needs both lat and lon or neither, "
                        f"got lat={tx.get('lat')!r}, lon={tx.get('lon')!r}")
    for sid, m in _object(meta.get("measurements"), "measurements", problems).items():
        if sid not in STATION_IDS:
            problems.append(f"measurements has unknown station id {sid!r}; valid ids are {', '.join(STATION_IDS)}")
        else:
            problems += _fields(_object(m, f"measurements.{sid}", problems), f"measurements.{sid}.", _MEASUREMENT_FIELDS)
    return problems


def read_metadata(path: Path, cfg: ImportConfig = ImportConfig()) -> dict:
    """Read and check a session's ``metadata.json`` (see the module docstring for its fields).

    Returns:
        The parsed object; absent and ``null`` fields mean unknown.

    Raises:
        DataError: one line naming the file and every bad field with its value and valid range.
    """
    try:
        meta = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; every session needs its metadata.json (see heimdall.realdata)") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}; fix: check the file and its permissions") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); fix: write metadata.json as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}; fix: correct the syntax") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got a JSON {type(meta).__name__}; fix: see heimdall.realdata")
    problems = _metadata_problems(meta, cfg)
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems) + "; fix: correct these fields "
                        "(leave a field out, or write null, when it is unknown)")
    return meta


def _station_files(folder: Path) -> list[tuple[int, Path]]:
    """``(station index, path)`` of the session's receiver files, in name order."""
    found = []
    for path in sorted(folder.glob("websdr_*.npy")):
        try:
            found.append((station_index(path.stem.removeprefix("websdr_")), path))
        except KeyError as exc:
            raise DataError(f"{path}: {exc.args[0]}") from None
    return found


def load_session(folder: Path, cfg: ImportConfig = ImportConfig()) -> tuple[np.ndarray, dict[str, object]]:
    """Read one session folder into IQ (R, T) and its label values.

    Raises:
        DataError: a bad ``metadata.json`` or receiver file, named.
    """
    stations = _station_files(folder)
    meta = read_metadata(folder / "metadata.json", cfg)
    iq = np.zeros((len(STATION_IDS), cfg.n_samples), dtype=np.complex64)
    heard = np.zeros(len(STATION_IDS), dtype=bool)
    power = np.full(len(STATION_IDS), np.nan, dtype=np.float32)
    snr = np.full(len(STATION_IDS), np.nan, dtype=np.float32)
    measurements = meta.get("measurements") or {}
    for i, path in stations:
        iq[i] = _load_iq(path, cfg)
        m = measurements.get(STATION_IDS[i]) or {}
        power[i] = _or_nan(m.get("signal_strength_db"))
        snr[i] = _or_nan(m.get("snr_db"))
        heard[i] = not (np.isfinite(snr[i]) and snr[i] < cfg.snr_threshold_db)
    if not heard.any():
        raise DataError(f"{folder}: no receiver file (websdr_<id>.npy with id in {', '.join(STATION_IDS)}) was heard")
    tx = meta.get("transmitter") or {}
    labels: dict[str, object] = {
        "tx_lat": _or_nan(tx.get("lat")), "tx_lon": _or_nan(tx.get("lon")),
        "tx_power_dbm": _or_nan(tx.get("power_dbm")), "frequency_hz": _or_nan(meta.get("frequency_hz")),
        "inside_hull": False, "rx_power_dbm": power, "snr_db": snr, "heard": heard,
    }
    return iq, labels


def _or_nan(value: object) -> float:
    return np.nan if value is None else float(value)  # type: ignore[arg-type]


def check_sessions(source: Path, cfg: ImportConfig = ImportConfig()) -> list[Path]:
    """Check the session folders under ``source`` before anything is written: every
    receiver file name and every ``metadata.json`` (the IQ files are read at import).

    Returns:
        The session folders, sorted by name.

    Raises:
        DataError: no sessions, or the first session with a bad file (named, with every bad field).
    """
    folders = sorted(p for p in (Path(source) / "sessions").glob("*") if p.is_dir())
    if not folders:
        raise DataError(f"no session folders under {Path(source) / 'sessions'}; expected sessions/<id>/websdr_<station>.npy")
    for folder in folders:
        _station_files(folder)
        read_metadata(folder / "metadata.json", cfg)
    return folders


def _group_key(folder: Path, cfg: ImportConfig) -> str:
    """Sessions of one transmitter position share a split (chunks and repeats never straddle train and test)."""
    tx = read_metadata(folder / "metadata.json", cfg).get("transmitter") or {}
    if tx.get("lat") is not None and tx.get("lon") is not None:
        return f"position:{float(tx['lat']):.5f},{float(tx['lon']):.5f}"
    return f"session:{folder.name}"


def import_sessions(
    catalog: Catalog, store, name: str, source: Path, *, shard_size: int = 250, cfg: ImportConfig = ImportConfig()
) -> DatasetInfo:
    """Import every ``source/sessions/*`` folder as dataset ``name`` (resumable, atomic).

    Raises:
        DataError: a session with a bad file (named), or no sessions at all; every
            ``metadata.json`` is checked before anything is written.
        AlreadyExistsError: the name is taken by another dataset.
    """
    from heimdall.datasets import write_shard

    folders = check_sessions(source, cfg)
    keys = [_group_key(f, cfg) for f in folders]
    groups = allocate_groups(Counter(keys), {}, SplitConfig())
    manifest = {"source": str(Path(source).resolve()), "sessions": [f.name for f in folders],
                "import": cfg.__dict__, "split": {"by": "transmitter position/session", "groups": groups}}
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
        labels["split_group"] = np.array([groups[k] for k in keys[index * shard_size:(index + 1) * shard_size]],
                                         dtype=np.int64)
        shard = ShardData(recording_id=index * shard_size + np.arange(len(chunk), dtype=np.int64),
                          iq=np.stack([iq for iq, _ in loaded]), labels=labels,
                          sample_rate_hz=cfg.sample_rate_hz, iq_reference_dbm=cfg.iq_reference_dbm)
        write_shard(catalog, store, name, index, shard)
    catalog.mark_complete(name)
    return catalog.get_dataset(name)
