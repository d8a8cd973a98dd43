"""The catalogue interface: datasets, their shards and the labels of every recording.

A catalogue only *records*: the shards themselves are Parquet objects in a blob
store (:mod:`heimdall.store`), written before the catalogue row that points at
them. Implementations: :class:`~heimdall.catalog.sqlite.SQLiteCatalog` (the
embedded default, one file) and :class:`~heimdall.catalog.postgres.PostgresCatalog`.
Both pass the same contract tests.

The recordings of a shard travel as a dict of numpy arrays, described by
:data:`RECORDING_COLUMNS` and checked by :func:`check_recordings` before any
row is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np

from heimdall.errors import DataError, NotFoundError
from heimdall.receivers import STATIONS

__all__ = [
    "DATASET_KINDS",
    "DATASET_STATUSES",
    "DatasetInfo",
    "ShardInfo",
    "RecordingColumn",
    "RECORDING_COLUMNS",
    "Catalog",
    "CatalogMissingError",
    "check_recordings",
]

class CatalogMissingError(NotFoundError):
    """A read-only open found no catalogue at all (no file, or no tables), as opposed to
    a catalogue without the named dataset; a writer would create it."""


DATASET_STATUSES = ("pending", "complete")
DATASET_KINDS = ("synthetic", "imported")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset as the catalogue sees it.

    Attributes:
        name: unique name (letters, digits, ``-``, ``_``, ``.``).
        status: ``"pending"`` while shards are being added, then ``"complete"``.
        kind: ``"synthetic"`` or ``"imported"``.
        config: the generator config (JSON) or the import metadata.
        seed: base seed of a synthetic dataset, None for imported ones.
        planned_recordings: recordings the dataset will hold once complete.
        shard_size: the most recordings one shard may hold.
        store: the blob store's ``describe()`` string (no secrets).
        created_at: creation time, UTC.
        completed_at: completion time, UTC, None while pending.
        n_recordings: recordings registered so far (counted from the tables).
        n_shards: shards registered so far (counted from the tables).
    """

    name: str
    status: str
    kind: str
    config: dict[str, Any]
    seed: int | None
    planned_recordings: int
    shard_size: int
    store: str
    created_at: datetime
    completed_at: datetime | None
    n_recordings: int
    n_shards: int


@dataclass(frozen=True)
class ShardInfo:
    """One registered shard object.

    Attributes:
        dataset: the dataset's name.
        index: shard number within the dataset, from 0.
        key: object key in the blob store.
        sha256: hex SHA-256 of the object's bytes.
        n_rows: recordings in the shard.
        n_bytes: size of the object.
    """

    dataset: str
    index: int
    key: str
    sha256: str
    n_rows: int
    n_bytes: int


@dataclass(frozen=True)
class RecordingColumn:
    """How one label array of :meth:`Catalog.recordings` looks.

    Attributes:
        dtype: numpy dtype of the array.
        per_station: shape (N, R) in :data:`heimdall.receivers.STATIONS` order if
            True, else (N,).
        nan_ok: whether NaN marks an unknown value (stored as SQL NULL).
        doc: meaning and unit.
    """

    dtype: str
    per_station: bool
    nan_ok: bool
    doc: str


#: Label arrays of N recordings; R = len(STATIONS). ``add_shard`` takes all of
#: them except ``shard_index`` (it comes from the :class:`ShardInfo`; if given it
#: must match) and ``split_group`` (``recording_id`` when absent), ``recordings()``
#: returns all of them.
RECORDING_COLUMNS: dict[str, RecordingColumn] = {
    "recording_id": RecordingColumn("int64", False, False, "dataset-wide unique id, >= 0"),
    "split_group": RecordingColumn("int64", False, False, "recordings of one group share a split, >= 0 "
                                                          "(see heimdall.datasets.split_codes)"),
    "shard_index": RecordingColumn("int32", False, False, "index of the shard holding the IQ"),
    "row": RecordingColumn("int32", False, False, "row of the recording within its shard"),
    "tx_lat": RecordingColumn("float64", False, True, "transmitter latitude, degrees N (NaN: unknown)"),
    "tx_lon": RecordingColumn("float64", False, True, "transmitter longitude, degrees E (NaN: unknown)"),
    "tx_power_dbm": RecordingColumn("float64", False, True, "transmit power, dBm (NaN: unknown)"),
    "frequency_hz": RecordingColumn("float64", False, True, "carrier frequency, Hz (NaN: unknown)"),
    "inside_hull": RecordingColumn("bool", False, False, "transmitter inside the receivers' convex hull"),
    "rx_power_dbm": RecordingColumn("float32", True, True, "received power per station, dBm (NaN: unknown)"),
    "snr_db": RecordingColumn("float32", True, True, "SNR per station, dB (NaN: unknown)"),
    "heard": RecordingColumn("bool", True, False, "whether each station heard the transmission"),
    "iq_sample_rate": RecordingColumn("float64", False, False, "IQ sample rate, Hz, > 0"),
    "iq_samples_count": RecordingColumn("int64", False, False, "IQ samples per station, >= 1"),
}

_DERIVED = ("shard_index", "split_group")


@runtime_checkable
class Catalog(Protocol):
    """Where datasets, shards and recording labels are recorded.

    Every method that touches the database raises
    :class:`~heimdall.errors.ServiceUnavailableError` when it cannot be reached.
    Usable as a context manager (closes on exit).
    """

    def describe(self) -> str:
        """The catalogue's URL without any password."""
        ...

    def check(self) -> None:
        """Check, changing nothing, that a catalogue this code can read exists here
        (a read-only catalogue runs it instead of :meth:`initialize`).

        Raises:
            NotFoundError: no catalogue yet; the message says how to create one.
            DataError: the database is not a Heimdall Tune catalogue, or has a newer schema version, or
                an older one (the fix names ``python -m tuning.data migrate``).
        """
        ...

    def initialize(self) -> None:
        """Create the schema and tables, upgrade an older catalogue (:meth:`migrate`) and
        upsert the receivers; idempotent and safe to run from several processes at once
        (other methods run it once themselves on first use, unless the catalogue was
        opened read-only).

        Raises:
            DataError: the catalogue was written by a newer schema version, or the
                database holds other tables and is not a Heimdall Tune catalogue.
        """
        ...

    def migrate(self) -> list[str]:
        """What :meth:`initialize` does, reporting it: moves an older layout into place and
        upgrades it to the current schema version, in one transaction.

        Returns:
            One line per change made; empty when the catalogue was already current.

        Raises:
            Same as :meth:`initialize`.
        """
        ...

    def create_dataset(
        self,
        name: str,
        *,
        kind: str,
        config: dict[str, Any],
        seed: int | None,
        planned_recordings: int,
        shard_size: int,
        store: str,
    ) -> DatasetInfo:
        """Register a new, pending dataset.

        Raises:
            ConfigError: invalid name, kind, counts or a config that is not JSON.
            AlreadyExistsError: the name is taken (the message says how to proceed).
        """
        ...

    def get_dataset(self, name: str) -> DatasetInfo:
        """One dataset.

        Raises:
            NotFoundError: no such dataset (the message lists the existing ones).
        """
        ...

    def list_datasets(self) -> list[DatasetInfo]:
        """Every dataset, ordered by name."""
        ...

    def add_shard(self, shard: ShardInfo, recordings: dict[str, np.ndarray]) -> None:
        """Register a shard and its recordings in one transaction (all or nothing).

        Args:
            shard: the shard object's description.
            recordings: its label arrays, see :data:`RECORDING_COLUMNS`.

        Raises:
            NotFoundError: the dataset does not exist.
            AlreadyExistsError: the shard index is already registered.
            DataError: bad arrays, a complete dataset, or rows that break a
                constraint (e.g. a recording id used by another shard).
        """
        ...

    def shards(self, name: str) -> list[ShardInfo]:
        """The dataset's shards ordered by index.

        Raises:
            NotFoundError: no such dataset.
        """
        ...

    def mark_complete(self, name: str) -> None:
        """Mark a dataset complete (a no-op when it already is).

        Raises:
            NotFoundError: no such dataset.
            DataError: it holds fewer or more recordings than planned.
        """
        ...

    def reopen_dataset(
        self, name: str, *, planned_recordings: int | None = None, config: dict[str, Any] | None = None
    ) -> DatasetInfo:
        """Make a complete *imported* dataset pending again, so that an incremental import can
        append shards and mark it complete once more (a no-op on the status of a pending one).

        Args:
            name: the dataset.
            planned_recordings: its new total, >= the recordings it holds (unchanged when None).
            config: its new import metadata (unchanged when None).

        Returns:
            The dataset's info, pending.

        Raises:
            NotFoundError: no such dataset.
            DataError: it is synthetic (fixed by its seed: generate another dataset instead).
            ConfigError: a total below the recordings it holds, or a config that is not JSON.
        """
        ...

    def delete_dataset(self, name: str) -> None:
        """Delete a dataset with its shards, recordings and measurements.

        Raises:
            NotFoundError: no such dataset.
        """
        ...

    def recordings(self, name: str) -> dict[str, np.ndarray]:
        """Every label array of the dataset, ordered by ``recording_id``.

        Raises:
            NotFoundError: no such dataset.
        """
        ...

    def close(self) -> None:
        """Close the connection; idempotent."""
        ...

    def __enter__(self) -> Catalog: ...

    def __exit__(self, *exc: object) -> None: ...


def _cast(name: str, value: Any, n: int, where: str) -> np.ndarray:
    spec = RECORDING_COLUMNS[name]
    arr = np.asarray(value)
    shape = (n, len(STATIONS)) if spec.per_station else (n,)
    if arr.shape != shape:
        raise DataError(f"{where}: {name!r} must have shape {shape} (n_rows={n}, R={len(STATIONS)}), got {arr.shape}")
    if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
        raise DataError(f"{where}: {name!r} must be castable to {spec.dtype}, got dtype {arr.dtype}")
    arr = arr.astype(spec.dtype, copy=False)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) if not spec.nan_ok else np.isinf(arr)
        if bad.any():
            allowed = "NaN (unknown) is allowed, infinities are not" if spec.nan_ok else "NaN and inf are not allowed"
            raise DataError(f"{where}: {name!r} has {int(bad.sum())} non-finite value(s); {allowed}")
    return arr


def _check_values(a: dict[str, np.ndarray], n: int, where: str) -> None:
    problems = []
    if (a["recording_id"] < 0).any():
        problems.append("'recording_id' must be >= 0")
    if (a["split_group"] < 0).any():
        problems.append("'split_group' must be >= 0")
    if np.unique(a["recording_id"]).size != n:
        problems.append("'recording_id' must be unique")
    if ((a["row"] < 0) | (a["row"] >= n)).any() or np.unique(a["row"]).size != n:
        problems.append(f"'row' must hold each of 0..{n - 1} once")
    if (a["iq_sample_rate"] <= 0).any():
        problems.append("'iq_sample_rate' must be > 0")
    if (a["iq_samples_count"] < 1).any():
        problems.append("'iq_samples_count' must be >= 1")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))


def check_recordings(shard: ShardInfo, recordings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate a shard's label arrays and cast them to :data:`RECORDING_COLUMNS`.

    Args:
        shard: the shard they belong to (gives ``n_rows`` and ``shard_index``).
        recordings: label arrays; ``shard_index`` and ``split_group`` are optional.

    Returns:
        Every column of :data:`RECORDING_COLUMNS`, cast to its dtype.

    Raises:
        DataError: a missing or unknown column, a wrong shape or dtype, a
            non-finite value where none is allowed, or out-of-range values.
    """
    where = f"shard {shard.index} of dataset {shard.dataset!r}"
    required = set(RECORDING_COLUMNS) - set(_DERIVED)
    missing = sorted(required - set(recordings))
    unknown = sorted(set(recordings) - set(RECORDING_COLUMNS))
    if missing or unknown:
        raise DataError(
            f"{where}: recording arrays must be exactly {sorted(required)} (plus optional 'shard_index' "
            f"and 'split_group'); "
            f"missing {missing}, unknown {unknown}"
        )
    n = shard.n_rows
    if n < 1:
        raise DataError(f"{where}: n_rows must be >= 1, got {n}")
    out = {k: _cast(k, v, n, where) for k, v in recordings.items()}
    if "shard_index" in out and (out["shard_index"] != shard.index).any():
        raise DataError(f"{where}: 'shard_index' must equal the shard's index {shard.index} on every row")
    out["shard_index"] = np.full(n, shard.index, dtype=np.int32)
    if "split_group" not in out:
        out["split_group"] = out["recording_id"]  # no group given: each recording is split on its own
    _check_values(out, n, where)
    return {k: out[k] for k in RECORDING_COLUMNS}
