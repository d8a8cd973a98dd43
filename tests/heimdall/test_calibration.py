"""Ellipse temperature scaling; station offsets estimated from known-source recordings."""
from __future__ import annotations

import numpy as np
import pytest

from heimdall.calibration import coverage_profile, estimate_station_offsets, fit_covariance_scale, iq_signal_level_dbm
from heimdall.errors import DataError
from heimdall.receivers import STATION_IDS
from heimdall.scene import GeneratorConfig, sample_scene, station_params
from heimdall.synthetic import generate


def gaussian_case(n: int = 20_000, true_sigma: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, 2)) * true_sigma
    return np.zeros((n, 2)), truth


@pytest.mark.parametrize("claimed_over_true_var", [1.0, 1 / 3, 2.5])
def test_scale_recovers_the_variance_ratio(claimed_over_true_var: float) -> None:
    mean, truth = gaussian_case()
    cov = np.broadcast_to(np.eye(2) * 4.0 * claimed_over_true_var, (len(mean), 2, 2))
    scale = fit_covariance_scale(mean, cov, truth)
    assert scale == pytest.approx(1 / claimed_over_true_var, rel=0.05)
    profile = coverage_profile(mean, cov, truth, scale)
    np.testing.assert_allclose(profile, 1 - np.exp(-np.array([1, 4, 5.9915]) / 2), atol=0.015)


def test_too_few_recordings_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        fit_covariance_scale(np.zeros((5, 2)), np.broadcast_to(np.eye(2), (5, 2, 2)), np.zeros((5, 2)))


# -- station offsets -------------------------------------------------------------------

CONFIG = GeneratorConfig()
TRUE_OFFSETS = station_params(CONFIG).calibration_offset_db  # what the generator puts into the IQ


def scene_labels(scene, *, power_known: bool) -> dict[str, np.ndarray]:
    return {"tx_lat": scene.tx_lat, "tx_lon": scene.tx_lon, "frequency_hz": scene.frequency_hz,
            "heard": scene.heard, "snr_db": scene.snr_db,
            "tx_power_dbm": scene.tx_power_dbm if power_known else np.full(len(scene), np.nan)}


@pytest.mark.parametrize("power_known", [True, False])
def test_offsets_are_recovered_from_levels(power_known: bool) -> None:
    """2000 recordings, levels exactly as the IQ holds them (scene power + station offset): within 0.75 dB."""
    scene = sample_scene(CONFIG, 2000, np.random.default_rng(1))
    est = estimate_station_offsets(scene.rx_power_dbm + TRUE_OFFSETS, scene_labels(scene, power_known=power_known), CONFIG)
    want = TRUE_OFFSETS if power_known else TRUE_OFFSETS - np.median(TRUE_OFFSETS)
    assert est.absolute is power_known
    np.testing.assert_allclose(est.offsets_db, want, atol=0.75)
    assert (est.counts > 500).all()
    if not power_known:
        assert np.median(est.offsets_db) == pytest.approx(0.0, abs=1e-9)  # the documented gauge


def test_weak_links_would_bias_without_the_expected_snr_rule() -> None:
    """Heard-only links read high for weak stations (censoring); the default rule removes most of it."""
    scene = sample_scene(CONFIG, 2000, np.random.default_rng(2))
    labels = scene_labels(scene, power_known=True)
    level = scene.rx_power_dbm + TRUE_OFFSETS
    naive = estimate_station_offsets(level, labels, CONFIG, margin_sigmas=-np.inf).offsets_db - TRUE_OFFSETS
    fixed = estimate_station_offsets(level, labels, CONFIG).offsets_db - TRUE_OFFSETS
    assert np.abs(fixed).mean() < np.abs(naive).mean() - 0.1


def test_offsets_are_recovered_from_synthetic_iq() -> None:
    """End to end: the level measured in generated IQ, unknown transmit powers: within 1 dB after the gauge."""
    levels, parts = [], []
    for shard in range(4):
        rec = generate(CONFIG, 200, seed=7, shard_index=shard)
        levels.append(iq_signal_level_dbm(rec.iq, rec.scene.snr_db, CONFIG.iq_reference_dbm))
        parts.append(scene_labels(rec.scene, power_known=False))
    labels = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    est = estimate_station_offsets(np.concatenate(levels), labels, CONFIG)
    np.testing.assert_allclose(est.offsets_db, TRUE_OFFSETS - np.median(TRUE_OFFSETS), atol=1.0)


def test_iq_level_is_the_scene_power_plus_the_station_offset() -> None:
    rec = generate(CONFIG, 100, seed=3)
    level = iq_signal_level_dbm(rec.iq, rec.scene.snr_db, CONFIG.iq_reference_dbm)
    strong = rec.scene.snr_db > 10
    np.testing.assert_allclose(level[strong], (rec.scene.rx_power_dbm + TRUE_OFFSETS)[strong], atol=0.1)
    silent = iq_signal_level_dbm(np.zeros((1, len(STATION_IDS), 64), np.complex64), None, -100.0)
    assert np.isneginf(silent).all()


def test_station_with_too_few_recordings_stays_at_zero_and_is_counted() -> None:
    scene = sample_scene(CONFIG, 600, np.random.default_rng(4))
    labels = scene_labels(scene, power_known=True)
    heard = scene.heard.copy()
    heard[3:, 6] = False  # milano heard in at most 3 recordings
    labels["heard"] = heard
    est = estimate_station_offsets(scene.rx_power_dbm + TRUE_OFFSETS, labels, CONFIG, min_recordings=5)
    assert est.offsets_db[6] == 0.0 and est.counts[6] <= 3
    assert est.offsets_db[:6].any() and (est.counts[:6] >= 5).all()
    assert "too few" in est.summary().splitlines()[6]
    assert len(est.as_list()) == len(STATION_IDS)


def test_unlabelled_recordings_are_ignored() -> None:
    scene = sample_scene(CONFIG, 50, np.random.default_rng(5))
    labels = scene_labels(scene, power_known=False)
    labels["tx_lat"] = np.full(len(scene), np.nan)
    est = estimate_station_offsets(scene.rx_power_dbm, labels, CONFIG)
    assert (est.counts == 0).all() and (est.offsets_db == 0).all()


def test_wrong_shapes_are_data_errors() -> None:
    scene = sample_scene(CONFIG, 10, np.random.default_rng(6))
    labels = scene_labels(scene, power_known=True)
    with pytest.raises(DataError, match=r"level_dbm must have shape \(N, R\) = \(10, 7\)"):
        estimate_station_offsets(scene.rx_power_dbm[:, :3], labels, CONFIG)
    with pytest.raises(DataError, match=r"labels\['heard'\] must have shape"):
        estimate_station_offsets(scene.rx_power_dbm, {**labels, "heard": scene.heard[:5]}, CONFIG)
    with pytest.raises(DataError, match="min_recordings must be >= 1"):
        estimate_station_offsets(scene.rx_power_dbm, labels, CONFIG, min_recordings=0)
