"""The shard format: a few hundred recordings per Parquet file.

One row per recording. ``iq`` is a fixed-size binary column holding the
complex64 IQ of every receiver, C-ordered (R, T), little-endian, so readers can
view it without copying (Ray Data, numpy). Labels sit beside it as plain
columns; per-receiver labels are fixed-size lists in :data:`STATION_IDS` order.
An optional int64 column ``split_group`` (label ``split_group``) names the group
whose split a recording follows (:func:`heimdall.datasets.split_codes`); a shard
without it splits each recording on its own, as synthetic data does.
The file's schema metadata (key ``heimdall``) records the format version, the
receiver order, the sample rate, the sample count and the IQ scale, so a shard
is self-describing.

Reading verifies everything that can go wrong on disk or in transit: checksum,
truncation, schema, dtype and shape, and non-finite samples, and raises
:class:`heimdall.errors.DataError` naming the shard and the fix.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from heimdall.errors import DataError
from heimdall.receivers import STATION_IDS

__all__ = [
    "FORMAT_VERSION",
    "LABEL_COLUMNS",
    "OPTIONAL_LABELS",
    "ShardData",
    "encode_shard",
    "decode_shard",
    "sha256_hex",
    "shard_key",
]

FORMAT_VERSION = 1
R = len(STATION_IDS)
#: Scalar labels per recording (float64 unless noted in LABEL_DTYPES).
SCALAR_LABELS = ("tx_lat", "tx_lon", "tx_power_dbm", "frequency_hz")
#: Per-receiver labels, shape (N, R).
RECEIVER_LABELS = ("rx_power_dbm", "snr_db", "heard")
LABEL_COLUMNS = SCALAR_LABELS + ("inside_hull",) + RECEIVER_LABELS
#: Optional labels: written and read back when present (int64, (N,)).
OPTIONAL_LABELS = ("split_group",)

_FIX = "delete the dataset (`python -m tuning.data delete NAME`) and generate or import it again"


@dataclass
class ShardData:
    """Decoded recordings of one shard.

    Attributes:
        recording_id: dataset-wide ids, (N,) int64.
        iq: complex64 IQ, (N, R, T), receivers in :data:`STATION_IDS` order.
        labels: ``LABEL_COLUMNS`` arrays: scalars (N,), per-receiver (N, R); optionally
            ``split_group`` (N,) int64 >= 0 (absent: each recording is its own group).
        sample_rate_hz: IQ sample rate.
        iq_reference_dbm: the power that ``|x|^2 = 1`` represents.
    """

    recording_id: np.ndarray
    iq: np.ndarray
    labels: dict[str, np.ndarray]
    sample_rate_hz: float
    iq_reference_dbm: float

    def __len__(self) -> int:
        return int(self.recording_id.shape[0])


def shard_key(dataset: str, index: int) -> str:
    """Object key of a dataset's shard ``index``."""
    return f"datasets/{dataset}/shard-{index:05d}.parquet"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the checksum the catalogue stores)."""
    return hashlib.sha256(data).hexdigest()


def encode_shard(shard: ShardData, *, dataset: str, index: int) -> bytes:
    """Serialise ``shard`` to Parquet bytes.

    Args:
        shard: recordings to write; validated first.
        dataset: dataset name, recorded in the file's metadata.
        index: shard index, recorded in the file's metadata.

    Returns:
        The Parquet file's bytes.

    Raises:
        DataError: when the IQ or labels have the wrong dtype, shape or non-finite values.
    """
    _check_arrays(shard, where=f"shard {index} of dataset {dataset!r} (being written)")
    n, r, t = shard.iq.shape
    iq = np.ascontiguousarray(shard.iq, dtype="<c8").reshape(n, r * t)
    iq_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(r * t * 8), n, [None, pa.py_buffer(iq.tobytes())])
    cols: dict[str, pa.Array] = {
        "recording_id": pa.array(shard.recording_id.astype(np.int64)),
        "iq": iq_col,
    }
    for k in SCALAR_LABELS:
        cols[k] = pa.array(np.asarray(shard.labels[k], dtype=np.float64))
    cols["inside_hull"] = pa.array(np.asarray(shard.labels["inside_hull"], dtype=bool))
    for k in OPTIONAL_LABELS:
        if k in shard.labels:
            cols[k] = pa.array(np.asarray(shard.labels[k], dtype=np.int64))
    for k in RECEIVER_LABELS:
        dtype = bool if k == "heard" else np.float32
        flat = pa.array(np.asarray(shard.labels[k], dtype=dtype).reshape(-1))
        cols[k] = pa.FixedSizeListArray.from_arrays(flat, r)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "shard_index": index,
        "receivers": list(STATION_IDS),
        "sample_rate_hz": shard.sample_rate_hz,
        "n_samples": t,
        "iq_dtype": "complex64",
        "iq_reference_dbm": shard.iq_reference_dbm,
    }
    table = pa.table(cols).replace_schema_metadata({"heimdall": json.dumps(meta)})
    sink = io.BytesIO()
    # IQ is noise-like and does not compress; labels do.
    pq.write_table(table, sink, compression={c: ("NONE" if c == "iq" else "ZSTD") for c in cols})
    return sink.getvalue()


def decode_shard(data: bytes, *, key: str, sha256: str | None = None, n_rows: int | None = None) -> ShardData:
    """Parse and verify a shard's bytes.

    Args:
        data: the Parquet file's bytes.
        key: the object key, used in error messages.
        sha256: expected checksum from the catalogue (skipped when None).
        n_rows: expected row count from the catalogue (skipped when None).

    Returns:
        The decoded recordings.

    Raises:
        DataError: checksum mismatch, truncated/corrupt Parquet, unexpected schema,
            wrong IQ size or receiver order, or non-finite samples; the message names
            the shard and the fix.
    """
    if sha256 is not None:
        got = sha256_hex(data)
        if got != sha256:
            raise DataError(
                f"shard {key}: checksum mismatch (catalogue sha256 {sha256[:16]}…, object {got[:16]}…, "
                f"{len(data)} bytes); the object was modified or truncated after it was written; fix: {_FIX}"
            )
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"shard {key} ({len(data)} bytes) is truncated or not Parquet: {exc}; fix: {_FIX}") from None
    return table_to_shard(table, key=key, n_rows=n_rows)


def shard_metadata(table: pa.Table, *, key: str) -> dict[str, Any]:
    """The ``heimdall`` metadata of a shard table, validated."""
    raw = (table.schema.metadata or {}).get(b"heimdall")
    if raw is None:
        raise DataError(f"shard {key} has no 'heimdall' metadata: it was not written by heimdall.shards; fix: {_FIX}")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"shard {key}: format_version must be {FORMAT_VERSION}, got {meta.get('format_version')}; fix: {_FIX}")
    if meta.get("receivers") != list(STATION_IDS):
        raise DataError(f"shard {key}: receiver order must be {list(STATION_IDS)}, got {meta.get('receivers')}; fix: {_FIX}")
    if meta.get("iq_dtype") != "complex64":
        raise DataError(f"shard {key}: IQ dtype must be complex64, got {meta.get('iq_dtype')}; fix: {_FIX}")
    return meta


def table_to_shard(table: pa.Table, *, key: str, n_rows: int | None = None) -> ShardData:
    """Decode an already-read shard table (also used on Ray Data blocks)."""
    meta = shard_metadata(table, key=key)
    missing = [c for c in ("recording_id", "iq", *LABEL_COLUMNS) if c not in table.column_names]
    if missing:
        raise DataError(f"shard {key} lacks column(s) {missing}; fix: {_FIX}")
    n = table.num_rows
    if n_rows is not None and n != n_rows:
        raise DataError(f"shard {key} holds {n} recordings but the catalogue says {n_rows}; fix: {_FIX}")
    t = int(meta["n_samples"])
    iq = iq_from_column(table.column("iq"), n_samples=t, key=key)
    present = [k for k in OPTIONAL_LABELS if k in table.column_names]
    labels: dict[str, np.ndarray] = {k: table.column(k).to_numpy() for k in (*SCALAR_LABELS, "inside_hull", *present)}
    for k in RECEIVER_LABELS:
        col = table.column(k).combine_chunks()
        labels[k] = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(n, R)
    shard = ShardData(
        recording_id=table.column("recording_id").to_numpy(),
        iq=iq,
        labels=labels,
        sample_rate_hz=float(meta["sample_rate_hz"]),
        iq_reference_dbm=float(meta["iq_reference_dbm"]),
    )
    _check_arrays(shard, where=f"shard {key}")
    return shard


def iq_from_column(col: pa.ChunkedArray | pa.Array, *, n_samples: int, key: str) -> np.ndarray:
    """View a fixed-size-binary IQ column as complex64 (N, R, T)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = R * n_samples * 8
    if not pa.types.is_fixed_size_binary(arr.type) or arr.type.byte_width != width:
        raise DataError(
            f"shard {key}: IQ column must be fixed_size_binary[{width}] ({R} receivers × {n_samples} complex64 "
            f"samples), got {arr.type}; fix: {_FIX}"
        )
    buf = arr.buffers()[1]
    raw = np.frombuffer(buf, dtype="<c8", count=len(arr) * R * n_samples, offset=arr.offset * width)
    return raw.reshape(len(arr), R, n_samples)


def _check_arrays(shard: ShardData, *, where: str) -> None:
    iq = shard.iq
    if iq.dtype != np.complex64:
        raise DataError(f"{where}: IQ dtype must be complex64, got {iq.dtype}; fix: convert with .astype(np.complex64)")
    if iq.ndim != 3 or iq.shape[1] != R:
        raise DataError(f"{where}: IQ shape must be (N, {R}, T), got {iq.shape}")
    n = iq.shape[0]
    if shard.recording_id.shape != (n,):
        raise DataError(f"{where}: recording_id shape must be ({n},), got {shard.recording_id.shape}")
    bad = ~np.isfinite(iq.view(np.float32)).reshape(n, -1).all(axis=1)
    if bad.any():
        ids = shard.recording_id[bad][:5].tolist()
        raise DataError(f"{where}: {int(bad.sum())} recording(s) have NaN/inf IQ samples (ids {ids}…); fix: {_FIX}")
    for k in LABEL_COLUMNS:
        v = shard.labels.get(k)
        want = (n, R) if k in RECEIVER_LABELS else (n,)
        if v is None or np.shape(v) != want:
            raise DataError(f"{where}: label {k!r} must have shape {want}, got {None if v is None else np.shape(v)}")
    group = shard.labels.get("split_group")
    if group is not None:
        group = np.asarray(group)
        if group.shape != (n,) or group.dtype.kind not in "iu" or (group < 0).any():
            raise DataError(f"{where}: label 'split_group' must be ({n},) integers >= 0, got shape {group.shape} "
                            f"dtype {group.dtype}; fix: give every recording a group id >= 0, or leave the label out")
