"""The NBFM IQ synthesiser: shapes, reproducibility, level, noise, bandwidth, carrier offset."""
from __future__ import annotations

import numpy as np
import pytest

from heimdall import synthetic
from heimdall.errors import ConfigError, DataError
from heimdall.receivers import STATIONS
from heimdall.scene import GeneratorConfig, Scene, station_params
from heimdall.synthetic import Recordings, band_power_dbm, generate, synthesize_iq

R = len(STATIONS)
DB = 10.0 / np.log(10.0)  # dB per unit of relative power change


def hand_scene(n: int, rx_power_dbm: float, frequency_hz: float = 145e6) -> Scene:
    """A scene with the same received power at every receiver (no min_heard redraw)."""
    zeros = np.zeros(n)
    prx = np.full((n, R), rx_power_dbm)
    return Scene(
        tx_east_km=zeros, tx_north_km=zeros, tx_lat=zeros, tx_lon=zeros,
        tx_power_dbm=zeros + 40.0, frequency_hz=np.full(n, frequency_hz),
        inside_hull=np.ones(n, bool), rx_power_dbm=prx, snr_db=prx + 120.0, heard=np.ones((n, R), bool),
    )


def spectrum(iq: np.ndarray, config: GeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Normalised power spectrum per recording and receiver, and its frequencies (Hz)."""
    power = np.abs(np.fft.fft(iq.astype(np.complex128), axis=-1)) ** 2
    return power / power.sum(axis=-1, keepdims=True), np.fft.fftfreq(iq.shape[-1], 1.0 / config.sample_rate_hz)


def around(freqs: np.ndarray, centre: np.ndarray, fs: float) -> np.ndarray:
    """Frequency relative to ``centre``, wrapped into [-fs/2, fs/2) as the sampled band is."""
    return (freqs - centre[..., None] + fs / 2) % fs - fs / 2


def test_shape_dtype_and_finite():
    config = GeneratorConfig(n_samples=512)
    rec = generate(config, 10, seed=0)
    assert isinstance(rec, Recordings) and len(rec) == 10
    assert rec.iq.shape == (10, R, 512) and rec.iq.dtype == np.complex64
    assert np.isfinite(rec.iq.view(np.float32)).all()


def test_reproducible_per_seed_and_shard_and_different_across_shards():
    config = GeneratorConfig(n_samples=256)
    a = generate(config, 6, seed=3, shard_index=1)
    b = generate(config, 6, seed=3, shard_index=1)
    assert np.array_equal(a.iq, b.iq) and np.array_equal(a.scene.rx_power_dbm, b.scene.rx_power_dbm)
    other_shard = generate(config, 6, seed=3, shard_index=2)
    other_seed = generate(config, 6, seed=4, shard_index=1)
    assert not np.array_equal(a.scene.rx_power_dbm, other_shard.scene.rx_power_dbm)
    assert not np.array_equal(a.iq, other_shard.iq)
    assert not np.array_equal(a.iq, other_seed.iq)


def test_output_does_not_depend_on_the_internal_chunk_size(monkeypatch):
    config = GeneratorConfig(n_samples=256)
    scene = hand_scene(11, -90.0)
    whole = synthesize_iq(config, scene, np.random.default_rng(9))
    monkeypatch.setattr(synthetic, "_CHUNK", 4)
    chunked = synthesize_iq(config, scene, np.random.default_rng(9))
    assert np.array_equal(whole, chunked)


def test_generate_rejects_bad_arguments_all_at_once():
    with pytest.raises(ConfigError) as info:
        generate(GeneratorConfig(), 0, seed=-1)
    assert len(info.value.problems) == 2 and "n must" in str(info.value) and "seed must" in str(info.value)


def test_scene_of_the_wrong_shape_is_rejected():
    scene = hand_scene(3, -90.0)
    scene.rx_power_dbm = scene.rx_power_dbm[:, :5]
    with pytest.raises(DataError, match="rx_power_dbm"):
        synthesize_iq(GeneratorConfig(), scene, np.random.default_rng(0))


def test_band_power_of_a_known_level():
    config = GeneratorConfig(iq_reference_dbm=-100.0)
    iq = np.full((2, 1000), 10.0 + 0j, dtype=np.complex64)  # |x|^2 = 100 -> +20 dB
    np.testing.assert_allclose(band_power_dbm(iq, config), -80.0, atol=1e-9)
    # -80 dBm is 1e-8 mW; subtracting a -90 dBm noise (1e-9 mW) leaves 9e-9 mW.
    np.testing.assert_allclose(band_power_dbm(iq, config, -90.0), 10 * np.log10(9e-9), atol=1e-9)


def test_band_power_tracks_the_received_power_of_heard_receivers():
    config = GeneratorConfig()
    rec = generate(config, 150, seed=21)
    sp = station_params(config)
    estimate = band_power_dbm(rec.iq, config, sp.noise_floor_dbm + sp.calibration_offset_db)
    truth = rec.scene.rx_power_dbm + sp.calibration_offset_db
    heard = rec.scene.heard
    error = (estimate - truth)[heard]
    # Fading is normalised, so the only error is the noise: the sample mean of
    # |n|^2 (relative std 1/sqrt(T)) and the cross term 2 Re(s n*) (sqrt(2 snr / T)).
    snr = 10.0 ** (rec.scene.snr_db[heard] / 10.0)
    sigma_db = DB * np.sqrt((1.0 + 2.0 * snr) / config.n_samples) / snr
    assert np.all(np.abs(error) < 6.0 * sigma_db + 1e-3)
    assert np.median(np.abs(error)) < 0.5 and np.median(np.abs(error)) < 2.0 * np.median(sigma_db)
    assert np.corrcoef(estimate[heard], truth[heard])[0, 1] > 0.999


def test_noise_only_receivers_show_the_noise_floor():
    config = GeneratorConfig()
    sp = station_params(config)
    noise_at_scale = sp.noise_floor_dbm + sp.calibration_offset_db
    iq = synthesize_iq(config, hand_scene(40, -np.inf), np.random.default_rng(4))
    total = band_power_dbm(iq, config)
    # Mean of T exponential |n|^2 samples: relative std 1 / sqrt(T).
    assert np.all(np.abs(total - noise_at_scale) < 5.0 * DB / np.sqrt(config.n_samples))
    assert np.abs(np.median(total - noise_at_scale, axis=0)).max() < 0.05
    assert np.all(band_power_dbm(iq, config, noise_at_scale) < noise_at_scale - 10.0)


def test_fading_changes_the_texture_not_the_level():
    prx = -40.0  # 80+ dB SNR: the noise is negligible here
    fast = GeneratorConfig(doppler_hz=(10.0, 15.0), rician_k_db=(0.0, 0.0), ctcss_fraction=0.0)
    static = GeneratorConfig(doppler_hz=(0.0, 0.0), ctcss_fraction=0.0)
    sp = station_params(fast)
    level = {}
    texture = {}
    for name, config in (("fast", fast), ("static", static)):
        iq = synthesize_iq(config, hand_scene(30, prx), np.random.default_rng(5)).astype(np.complex128)
        level[name] = band_power_dbm(iq, config) - (prx + sp.calibration_offset_db)
        envelope = np.abs(iq)
        texture[name] = envelope.std(axis=-1) / envelope.mean(axis=-1)
    for name in level:
        assert np.abs(level[name]).max() < 0.01, name
    assert np.median(texture["fast"]) > 0.2  # K = 0 dB: deep fades within 0.34 s
    assert texture["static"].max() < 1e-3  # constant envelope FM, no Doppler


@pytest.mark.parametrize("tone_fraction, audio_hz", [(0.0, 3000.0), (1.0, 1633.0)])
def test_occupied_bandwidth_follows_carson(tone_fraction, audio_hz):
    deviation = (1000.0, 1500.0)
    config = GeneratorConfig(tone_fraction=tone_fraction, deviation_hz=deviation, carrier_ppm=0.0)
    iq = synthesize_iq(config, hand_scene(40, -40.0), np.random.default_rng(6))
    p, f = spectrum(iq, config)
    carrier = station_params(config).ppm_error * 1e-6 * 145e6
    rel = around(f, np.broadcast_to(carrier, p.shape[:-1]), config.sample_rate_hz)
    carson_half = deviation[1] + audio_hz + config.doppler_hz[1]
    assert (p * (np.abs(rel) <= carson_half)).sum(axis=-1).min() > 0.98
    centroid = (p * rel).sum(axis=-1)
    rms = np.sqrt((p * (rel - centroid[..., None]) ** 2).sum(axis=-1))
    if tone_fraction == 1.0:
        # RMS bandwidth = RMS deviation: 1/sqrt(2) of the peak for one tone, >= 0.5 for DTMF,
        # less up to 15% where CTCSS takes its share.
        assert rms.min() > 0.4 * deviation[0] and rms.max() < 0.72 * deviation[1] + 20.0
    else:
        # Voice rarely reaches its peak: most power lies well inside the deviation.
        assert rms.min() > 50.0 and np.median(rms) < 0.5 * deviation[1]
        assert np.median((p * (np.abs(rel) <= deviation[1] / 2)).sum(axis=-1)) > 0.9


def test_carrier_offset_appears_where_expected():
    base = dict(tone_fraction=1.0, ctcss_fraction=0.0, doppler_hz=(0.0, 0.0), deviation_hz=(1000.0, 1500.0))
    freq = 145e6
    scene = hand_scene(20, -40.0, freq)
    # Larger receiver errors than the default, so the stations are far apart in frequency.
    receiver_only = GeneratorConfig(carrier_ppm=0.0, receiver_ppm_sigma=2.0, **base)
    expected = station_params(receiver_only).ppm_error * 1e-6 * freq
    assert np.ptp(expected) > 300.0
    p, f = spectrum(synthesize_iq(receiver_only, scene, np.random.default_rng(8)), receiver_only)
    centroid = (p * f).sum(axis=-1)
    # Tones average to ~0 over 0.34 s: the spectral centroid sits on the carrier within a few Hz.
    assert np.abs(centroid - expected).max() < 5.0
    with_tx = GeneratorConfig(carrier_ppm=2.5, receiver_ppm_sigma=2.0, **base)
    p, f = spectrum(synthesize_iq(with_tx, scene, np.random.default_rng(8)), with_tx)
    common = (p * f).sum(axis=-1) - expected  # the transmitter's own error, shared by all receivers
    assert np.ptp(common, axis=1).max() < 10.0
    assert np.abs(common).max() < 2.5e-6 * freq + 5.0
    assert np.std(common[:, 0]) > 50.0  # it does vary between recordings


def test_gain_drift_reaches_the_recorded_signal_level():
    """The unknown drift is in the IQ (features see it) and in rx_power_dbm alike."""
    config = GeneratorConfig(gain_drift_sigma_db=6.0)
    rec = generate(config, 150, seed=22)
    sp = station_params(config)
    estimate = band_power_dbm(rec.iq, config, sp.noise_floor_dbm + sp.calibration_offset_db) - sp.calibration_offset_db
    heard = rec.scene.heard & (rec.scene.snr_db > 10.0)
    drift = rec.scene.gain_drift_db[heard]
    assert np.median(np.abs(estimate[heard] - rec.scene.rx_power_dbm[heard])) < 0.5
    slope = np.polyfit(drift, estimate[heard] - (rec.scene.rx_power_dbm[heard] - drift), 1)[0]
    assert abs(slope - 1.0) < 0.02
