"""The propagation model: config validation, path loss, censoring, geography, reproducibility."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import ndtr
from scipy.stats import chi2

from heimdall.errors import ConfigError
from heimdall.geometry import EARTH_RADIUS_KM, default_frame, haversine_km
from heimdall.receivers import STATIONS
from heimdall.scene import (
    GeneratorConfig,
    free_space_loss_db,
    mean_rx_power_dbm,
    region_of,
    sample_scene,
    station_params,
)

# Noise floors far below any received power: every receiver hears every
# recording, so the min_heard redraw never conditions the sample.
EVERYONE_HEARS = dict(noise_floor_dbm=(-250.0, -240.0))


def distances_km(scene) -> np.ndarray:
    """Transmitter-to-receiver distances (N, R) in the default frame."""
    tx = np.stack([scene.tx_east_km, scene.tx_north_km], axis=-1)
    return np.linalg.norm(tx[:, None, :] - default_frame().stations_local()[None], axis=-1)


def test_validation_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        GeneratorConfig(path_loss_exponent=9.0, shadowing_sigma_db=-1.0, tx_power_dbm=(50.0, 30.0))
    text = str(info.value)
    assert len(info.value.problems) == 3
    for name in ("path_loss_exponent", "shadowing_sigma_db", "tx_power_dbm"):
        assert name in text


def test_to_dict_from_dict_round_trip_through_json():
    config = GeneratorConfig(path_loss_exponent=3.5, bands_hz=((144e6, 146e6),), band_weights=(1.0,))
    back = GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert GeneratorConfig.from_dict(GeneratorConfig().to_dict()) == GeneratorConfig()


def test_from_dict_rejects_unknown_keys_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="path_loss_exponent"):
        GeneratorConfig.from_dict({"path_loss_exponnent": 3.0})


def test_free_space_loss_matches_the_textbook_value():
    assert free_space_loss_db(1.0, 145e6) == pytest.approx(75.67, abs=0.01)
    assert free_space_loss_db(2.0, 145e6) - free_space_loss_db(1.0, 145e6) == pytest.approx(6.02, abs=0.01)


@pytest.mark.parametrize("exponent", [2.5, 3.5])
def test_received_power_falls_with_distance_at_the_configured_exponent(exponent):
    config = GeneratorConfig(path_loss_exponent=exponent, **EVERYONE_HEARS)
    scene = sample_scene(config, 3000, np.random.default_rng(7))
    assert scene.heard.all()
    d0 = config.reference_distance_km
    x = 10.0 * np.log10(np.maximum(distances_km(scene), d0) / d0).ravel()
    reference = scene.tx_power_dbm + config.system_gain_db - free_space_loss_db(d0, scene.frequency_hz)
    y = (scene.rx_power_dbm - reference[:, None]).ravel()
    slope, intercept = np.polyfit(x, y, 1)
    # OLS slope standard error with i.i.d. shadowing of std sigma on every link.
    slope_se = config.shadowing_sigma_db / (x.std() * np.sqrt(x.size))
    assert abs(slope + exponent) < 5 * slope_se
    residual = y - (slope * x + intercept)
    # std of a sample std is about sigma / sqrt(2 M).
    assert abs(residual.std() - config.shadowing_sigma_db) < 5 * config.shadowing_sigma_db / np.sqrt(2 * x.size)


def test_censoring_rate_matches_the_noise_floor_model():
    # Exponent 4 leaves 30-70% heard per station, so the rate is informative.
    config = GeneratorConfig(path_loss_exponent=4.0, min_heard=1)
    scene = sample_scene(config, 4000, np.random.default_rng(11))
    floor = station_params(config).noise_floor_dbm
    assert np.array_equal(scene.snr_db, scene.rx_power_dbm - floor)
    assert np.array_equal(scene.heard, scene.snr_db >= config.snr_threshold_db)
    mean_rx = mean_rx_power_dbm(config, scene.tx_power_dbm[:, None], distances_km(scene), scene.frequency_hz[:, None])
    p = ndtr((mean_rx - floor - config.snr_threshold_db) / config.shadowing_sigma_db)
    # Kept recordings are those heard at least once (probability A); with
    # min_heard = 1, hearing at r implies being kept, so P(heard_r | kept) = p_r / A.
    kept = 1.0 - np.prod(1.0 - p, axis=1, keepdims=True)
    predicted = (p / kept).mean(axis=0)
    observed = scene.heard.mean(axis=0)
    z = (observed - predicted) / np.sqrt(observed * (1 - observed) / len(scene))
    assert np.all(np.abs(z) < 4.5), (observed, predicted)
    # Pooled over stations (about chi-square, 7 dof): catches a 1 dB threshold error.
    assert (z**2).sum() < chi2.ppf(1 - 1e-4, len(STATIONS)), z
    assert 0.2 < observed.min() and observed.max() < 0.9


def test_min_heard_is_honoured():
    config = GeneratorConfig(path_loss_exponent=4.0, min_heard=3)
    scene = sample_scene(config, 500, np.random.default_rng(2))
    assert len(scene) == 500
    assert (scene.heard.sum(axis=1) >= 3).all()


def test_inside_hull_fraction_and_outer_ring():
    config = GeneratorConfig(inside_hull_fraction=0.7, **EVERYONE_HEARS)
    n = 4000
    scene = sample_scene(config, n, np.random.default_rng(3))
    frac = scene.inside_hull.mean()
    assert abs(frac - 0.7) < 4.5 * np.sqrt(0.7 * 0.3 / n)
    region = region_of(config, np.stack([scene.tx_east_km, scene.tx_north_km], axis=-1))
    assert np.array_equal(region == 0, scene.inside_hull)
    assert (region[~scene.inside_hull] == 1).all()


def test_scene_is_reproducible_from_the_seed():
    config = GeneratorConfig()
    a = sample_scene(config, 200, np.random.default_rng([5, 1]))
    b = sample_scene(config, 200, np.random.default_rng([5, 1]))
    c = sample_scene(config, 200, np.random.default_rng([5, 2]))
    for name in ("tx_east_km", "tx_power_dbm", "frequency_hz", "rx_power_dbm", "heard"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.rx_power_dbm, c.rx_power_dbm)
    assert a.rx_power_dbm.shape == (200, len(STATIONS))


def test_local_frame_round_trip():
    frame = default_frame()
    rng = np.random.default_rng(0)
    lat = rng.uniform(43.0, 47.0, 1000)
    lon = rng.uniform(6.0, 10.5, 1000)
    east, north = frame.to_local(lat, lon)
    lat2, lon2 = frame.to_geographic(east, north)
    np.testing.assert_allclose(lat2, lat, atol=1e-9)
    np.testing.assert_allclose(lon2, lon, atol=1e-9)


def test_plane_distance_agrees_with_haversine_over_the_generator_area():
    frame = default_frame()
    rng = np.random.default_rng(1)
    box = 150.0  # the hull (about +-75 km) plus the 50 km outer ring, rounded up
    a, b = rng.uniform(-box, box, (2, 5000, 2))
    plane = np.linalg.norm(a - b, axis=-1)
    lat_a, lon_a = frame.to_geographic(a[:, 0], a[:, 1])
    lat_b, lon_b = frame.to_geographic(b[:, 0], b[:, 1])
    great_circle = haversine_km(lat_a, lon_a, lat_b, lon_b)
    # The orthographic plane shrinks radial lengths by cos(rho / R) ~ 1 - (rho/R)^2 / 2.
    bound = (np.sqrt(2) * box / EARTH_RADIUS_KM) ** 2 / 2
    assert np.max(np.abs(plane - great_circle) / great_circle) < bound
    # Known pair: Torino to Milano, about 125 km along the great circle.
    east, north = frame.stations_local()[[2, 6]].T
    assert np.hypot(np.diff(east), np.diff(north))[0] == pytest.approx(
        float(haversine_km(STATIONS[2].lat, STATIONS[2].lon, STATIONS[6].lat, STATIONS[6].lon)), rel=1e-3
    )


def test_gain_drift_off_by_default_and_in_old_configs():
    """Datasets generated before the setting existed keep their meaning: a config
    dict without the key reads as no drift, and no drift draws the same scene."""
    old = GeneratorConfig().to_dict()
    del old["gain_drift_sigma_db"]
    assert GeneratorConfig.from_dict(old).gain_drift_sigma_db == 0.0
    scene = sample_scene(GeneratorConfig(), 50, np.random.default_rng(7))
    assert np.array_equal(scene.gain_drift_db, np.zeros((50, len(STATIONS))))
    drifting = sample_scene(GeneratorConfig(gain_drift_sigma_db=4.0), 50, np.random.default_rng(7))
    # Positions and powers are drawn before the drift, so the first recordings share them.
    assert np.array_equal(drifting.tx_east_km[:5], scene.tx_east_km[:5])
    assert not np.array_equal(drifting.rx_power_dbm, scene.rx_power_dbm)


@pytest.mark.parametrize("bad", [-1.0, 12.5])
def test_gain_drift_sigma_out_of_range_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"gain_drift_sigma_db must lie in \[0, 12\]"):
        GeneratorConfig(gain_drift_sigma_db=bad)


def test_gain_drift_is_gaussian_per_recording_and_station_and_moves_power_and_snr():
    sigma = 5.0
    config = GeneratorConfig(gain_drift_sigma_db=sigma, **EVERYONE_HEARS)
    scene = sample_scene(config, 3000, np.random.default_rng(9))
    drift = scene.gain_drift_db
    assert abs(drift.mean()) < 4.0 * sigma / np.sqrt(drift.size)
    assert abs(drift.std() / sigma - 1.0) < 0.03
    assert np.abs(np.corrcoef(drift.T) - np.eye(len(STATIONS))).max() < 0.08  # independent stations
    # The recorded power holds shadowing plus drift: its spread about the model's mean is their sum.
    mean_rx = mean_rx_power_dbm(config, scene.tx_power_dbm[:, None], distances_km(scene), scene.frequency_hz[:, None])
    assert abs((scene.rx_power_dbm - mean_rx).std() / np.hypot(config.shadowing_sigma_db, sigma) - 1.0) < 0.03
    assert abs((scene.rx_power_dbm - drift - mean_rx).std() / config.shadowing_sigma_db - 1.0) < 0.03
    floor = station_params(config).noise_floor_dbm
    assert np.array_equal(scene.snr_db, scene.rx_power_dbm - floor)
    assert np.array_equal(scene.heard, scene.snr_db >= config.snr_threshold_db)
