"""The shard format: round trip and every way a shard can be bad."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from heimdall.errors import DataError
from heimdall.receivers import STATION_IDS
from heimdall.shards import LABEL_COLUMNS, ShardData, decode_shard, encode_shard, sha256_hex

R = len(STATION_IDS)


def make_shard(n: int = 5, t: int = 256, seed: int = 0) -> ShardData:
    rng = np.random.default_rng(seed)
    iq = (rng.normal(size=(n, R, t)) + 1j * rng.normal(size=(n, R, t))).astype(np.complex64)
    labels = {
        "tx_lat": rng.uniform(44, 46, n), "tx_lon": rng.uniform(7, 9, n),
        "tx_power_dbm": rng.uniform(30, 47, n), "frequency_hz": rng.uniform(144e6, 146e6, n),
        "inside_hull": rng.random(n) < 0.5,
        "rx_power_dbm": rng.normal(-100, 10, (n, R)).astype(np.float32),
        "snr_db": rng.normal(10, 5, (n, R)).astype(np.float32),
        "heard": rng.random((n, R)) < 0.8,
    }
    return ShardData(np.arange(10, 10 + n, dtype=np.int64), iq, labels, 12_000.0, -100.0)


def test_round_trip_is_exact() -> None:
    shard = make_shard()
    data = encode_shard(shard, dataset="t", index=3)
    back = decode_shard(data, key="k", sha256=sha256_hex(data), n_rows=5)
    np.testing.assert_array_equal(back.iq, shard.iq)
    np.testing.assert_array_equal(back.recording_id, shard.recording_id)
    for k in LABEL_COLUMNS:
        np.testing.assert_array_equal(back.labels[k], shard.labels[k])
    assert back.sample_rate_hz == 12_000.0 and back.iq_reference_dbm == -100.0
    meta = pq.read_schema(io.BytesIO(data)).metadata[b"heimdall"]
    assert b'"shard_index": 3' in meta


def test_checksum_mismatch_names_shard_and_fix() -> None:
    data = encode_shard(make_shard(), dataset="t", index=0)
    with pytest.raises(DataError, match=r"shard s/0\.parquet: checksum mismatch.*delete the dataset"):
        decode_shard(data, key="s/0.parquet", sha256="0" * 64)


def test_truncated_shard_is_a_clear_error() -> None:
    data = encode_shard(make_shard(), dataset="t", index=0)
    with pytest.raises(DataError, match="truncated or not Parquet"):
        decode_shard(data[: len(data) // 2], key="s/0.parquet")


def test_row_count_mismatch() -> None:
    data = encode_shard(make_shard(n=4), dataset="t", index=0)
    with pytest.raises(DataError, match="holds 4 recordings but the catalogue says 5"):
        decode_shard(data, key="k", n_rows=5)


def test_wrong_dtype_is_refused_on_write() -> None:
    shard = make_shard()
    shard.iq = shard.iq.astype(np.complex128)
    with pytest.raises(DataError, match="complex64, got complex128"):
        encode_shard(shard, dataset="t", index=0)


def test_wrong_receiver_count_is_refused() -> None:
    shard = make_shard()
    shard.iq = shard.iq[:, :3]
    with pytest.raises(DataError, match=rf"\(N, {R}, T\)"):
        encode_shard(shard, dataset="t", index=0)


def test_nan_samples_are_refused_naming_recordings() -> None:
    shard = make_shard()
    shard.iq[2, 1, 7] = np.nan
    with pytest.raises(DataError, match=r"NaN/inf IQ samples \(ids \[12\]"):
        encode_shard(shard, dataset="t", index=0)


def test_nan_samples_in_a_stored_shard_are_refused() -> None:
    shard = make_shard()
    data = bytearray(encode_shard(shard, dataset="t", index=0))
    # Overwrite one sample of the uncompressed IQ column with a float32 NaN.
    needle = shard.iq[1, 0, 0].tobytes()
    at = bytes(data).find(needle)
    assert at > 0
    data[at:at + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(DataError, match=r"NaN/inf IQ samples \(ids \[11\]"):
        decode_shard(bytes(data), key="k")


def test_split_group_is_an_optional_int64_column() -> None:
    shard = make_shard()
    back = decode_shard(encode_shard(shard, dataset="t", index=0), key="k")
    assert "split_group" not in back.labels  # absent: each recording is its own group
    groups = np.array([3, 3, 2**62, 0, 3], dtype=np.int64)
    shard.labels["split_group"] = groups
    back = decode_shard(encode_shard(shard, dataset="t", index=0), key="k")
    np.testing.assert_array_equal(back.labels["split_group"], groups)
    assert back.labels["split_group"].dtype == np.int64


@pytest.mark.parametrize("groups", [np.array([0, 1, -1, 2, 3]), np.zeros(4, dtype=np.int64), np.full(5, 0.5)])
def test_bad_split_groups_are_refused_on_write(groups: np.ndarray) -> None:
    shard = make_shard()
    shard.labels["split_group"] = groups
    with pytest.raises(DataError, match="label 'split_group' must be \\(5,\\) integers >= 0"):
        encode_shard(shard, dataset="t", index=0)
