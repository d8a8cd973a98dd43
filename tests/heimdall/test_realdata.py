"""Importing real Heimdall captures (per-receiver .npy + metadata.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heimdall.catalog import open_catalog
from heimdall.datasets import iter_shards
from heimdall.errors import DataError
from heimdall.realdata import import_sessions, load_session
from heimdall.receivers import station_index


def write_session(root: Path, name: str, stations: dict[str, np.ndarray], **meta) -> Path:
    folder = root / "sessions" / name
    folder.mkdir(parents=True)
    for sid, iq in stations.items():
        np.save(folder / f"websdr_{sid}.npy", iq)
    body = {"frequency_hz": 145.5e6, "sample_rate_hz": 12000,
            "measurements": {sid: {"signal_strength_db": -90.0, "snr_db": 12.0} for sid in stations}}
    body.update(meta)
    (folder / "metadata.json").write_text(json.dumps(body))
    return folder


def noise(n: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=n) + 1j * rng.normal(size=n)).astype(np.complex64)


def test_import_builds_shards_that_join_synthetic_ones(tmp_path: Path, local_store) -> None:
    write_session(tmp_path, "s1", {"torino": noise(), "milano": noise(seed=1)},
                  transmitter={"lat": 45.0, "lon": 7.7, "power_dbm": 37})
    write_session(tmp_path, "s2", {"genova": noise(seed=2)})
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        info = import_sessions(catalog, local_store, "field", tmp_path, shard_size=1)
        assert (info.kind, info.n_recordings, info.n_shards, info.status) == ("imported", 2, 2, "complete")
        shards = list(iter_shards(catalog, local_store, "field"))
        labels = catalog.recordings("field")
    first = shards[0]
    assert first.iq.shape == (1, 7, 4096)
    np.testing.assert_array_equal(first.iq[0, station_index("torino")], noise()[:4096])
    assert first.labels["heard"][0].sum() == 2
    assert np.isnan(labels["tx_lat"][1]) and labels["tx_lat"][0] == 45.0


@pytest.mark.parametrize(
    ("iq", "meta", "match"),
    [
        (noise().astype(np.complex128), {}, "complex64, got complex128"),
        (noise(100), {}, "at least 4096 samples"),
        (np.where(np.arange(5000) == 9, np.nan, noise()).astype(np.complex64), {}, "NaN/inf"),
        (noise(), {"sample_rate_hz": 48000}, "sample rate must be 12000 Hz, got 48000"),
    ],
)
def test_bad_captures_are_refused_with_the_file_named(tmp_path: Path, iq, meta, match) -> None:
    folder = write_session(tmp_path, "s", {"torino": iq}, **meta)
    with pytest.raises(DataError, match=match):
        load_session(folder)


def test_unknown_receiver_lists_valid_ids(tmp_path: Path) -> None:
    folder = write_session(tmp_path, "s", {"paris": noise()})
    with pytest.raises(DataError, match="unknown receiver id 'paris'; valid ids are giaveno"):
        load_session(folder)


def test_sessions_of_one_transmitter_share_a_split_group(tmp_path: Path, local_store) -> None:
    tx = {"lat": 45.0, "lon": 7.7, "power_dbm": 37}
    write_session(tmp_path, "a", {"torino": noise()}, transmitter=tx)
    write_session(tmp_path, "b", {"milano": noise(seed=1)}, transmitter=tx)
    write_session(tmp_path, "c", {"genova": noise(seed=2)})
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        import_sessions(catalog, local_store, "field", tmp_path, shard_size=2)
        groups = catalog.recordings("field")["split_group"]
        config = catalog.get_dataset("field").config
    assert groups[0] == groups[1] != groups[2]
    assert set(config["split"]["groups"]) == {"position:45.00000,7.70000", "session:c"}
