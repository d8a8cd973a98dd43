"""Spectrogram features: numpy/torch parity, absolute units, masking, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from heimdall.errors import ConfigError
from heimdall.features import (
    FeatureConfig,
    SpectrogramFeatures,
    feature_config_for,
    spectrogram_numpy,
    validate_features,
)

CFG = FeatureConfig()


def _iq(rng: np.random.Generator, b: int = 2, r: int = 7, noise_dbm: float = -120.0, tone_dbm: float = -80.0,
        tone_hz: float = 1500.0) -> np.ndarray:
    """White noise at ``noise_dbm`` plus a complex tone, complex64 at the -100 dBm reference."""
    t = np.arange(CFG.n_samples) / CFG.sample_rate_hz
    noise_std = np.sqrt(10 ** ((noise_dbm - CFG.reference_dbm) / 10) / 2)
    x = (rng.standard_normal((b, r, CFG.n_samples)) + 1j * rng.standard_normal((b, r, CFG.n_samples))) * noise_std
    x += np.sqrt(10 ** ((tone_dbm - CFG.reference_dbm) / 10)) * np.exp(2j * np.pi * tone_hz * t)
    return x.astype(np.complex64)


def _to_dbm(features: np.ndarray) -> np.ndarray:
    return features * CFG.db_scale + CFG.db_offset


def test_torch_matches_numpy_reference():
    iq = _iq(np.random.default_rng(0))
    mask = np.ones((2, 7), dtype=bool)
    mask[1, 3] = False
    ref = spectrogram_numpy(iq, CFG, mask)
    got = SpectrogramFeatures(CFG)(torch.from_numpy(iq), torch.from_numpy(mask))
    assert got.shape == (2, 7, 128, 32) and got.dtype == torch.float32
    assert float(np.abs(got.numpy() - ref).max()) < 1e-4


def test_real_view_input_equals_complex_input():
    iq = torch.from_numpy(_iq(np.random.default_rng(1)))
    feats = SpectrogramFeatures(CFG)
    torch.testing.assert_close(feats(torch.view_as_real(iq)), feats(iq))


def test_white_noise_reads_power_over_n_fft_in_every_bin():
    rng = np.random.default_rng(2)
    iq = _iq(rng, b=4, r=7, noise_dbm=-120.0, tone_dbm=-300.0)
    bins_mw = 10 ** (_to_dbm(spectrogram_numpy(iq, CFG)) / 10)
    expected = 10 ** (-120.0 / 10) / CFG.n_fft
    # 4*7*32 frames per bin: the per-bin mean is within a few percent of P / n_fft.
    per_bin = bins_mw.mean(axis=(0, 1, 3))
    np.testing.assert_allclose(per_bin, expected, rtol=0.25)
    assert bins_mw.mean() == pytest.approx(expected, rel=0.03)


def test_frame_bins_sum_to_window_weighted_mean_power():
    iq = _iq(np.random.default_rng(3), b=1, r=2)
    spec_mw = 10 ** (_to_dbm(spectrogram_numpy(iq, CFG)) / 10)  # (1, 2, 128, 32)
    frames = iq.astype(np.complex128).reshape(1, 2, 32, 128)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(128) / 128)
    mean_power_mw = (np.abs(frames) ** 2 * w**2).sum(-1) / (w**2).sum() * 10 ** (CFG.reference_dbm / 10)
    np.testing.assert_allclose(spec_mw.sum(axis=2), mean_power_mw, rtol=1e-5)


def test_tone_lands_in_fftshifted_bin():
    iq = _iq(np.random.default_rng(4), b=1, r=1, tone_hz=1500.0)
    feats = spectrogram_numpy(iq, CFG)[0, 0]
    # Bin 0 is -6 kHz, 93.75 Hz per bin: +1500 Hz is bin 64 + 16.
    assert int(np.argmax(feats.mean(axis=1))) == 80


def test_absolute_level_survives_a_10_db_gain():
    iq = _iq(np.random.default_rng(5))
    feats = SpectrogramFeatures(CFG)
    base = feats(torch.from_numpy(iq))
    louder = feats(torch.from_numpy(iq.astype(np.complex128) * 10 ** (10 / 20)))
    above_floor = base > (CFG.floor_db - CFG.db_offset) / CFG.db_scale + 0.5  # the clamp is not a level
    assert above_floor.float().mean() > 0.99
    shift = (louder - base)[above_floor]
    torch.testing.assert_close(shift, torch.full_like(shift, 10.0 / CFG.db_scale), atol=1e-4, rtol=0)


def test_masked_receivers_are_filled_and_others_untouched():
    iq = torch.from_numpy(_iq(np.random.default_rng(6)))
    mask = torch.tensor([[True] * 7, [False, True, True, False, True, True, True]])
    cfg = FeatureConfig(mask_fill=-1.5)
    feats = SpectrogramFeatures(cfg)
    out, full = feats(iq, mask), feats(iq)
    assert torch.all(out[1, 0] == -1.5) and torch.all(out[1, 3] == -1.5)
    torch.testing.assert_close(out[mask], full[mask])


def test_silence_is_clamped_to_the_floor():
    out = SpectrogramFeatures(CFG)(torch.zeros(1, 7, CFG.n_samples, dtype=torch.complex64))
    torch.testing.assert_close(out, torch.full_like(out, (CFG.floor_db - CFG.db_offset) / CFG.db_scale))


def test_wrong_input_raises():
    feats = SpectrogramFeatures(CFG)
    with pytest.raises(ValueError, match="4096 samples"):
        feats(torch.zeros(1, 7, 4000, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        feats(torch.zeros(1, 7, 4096))
    with pytest.raises(ValueError, match="mask"):
        feats(torch.zeros(1, 7, 4096, dtype=torch.complex64), torch.ones(1, 6, dtype=torch.bool))


@pytest.mark.parametrize(
    ("x", "mask", "match"),
    [
        (torch.zeros(7, 128, 32), None, "rank 4"),
        (torch.zeros(2, 6, 128, 32), None, "7 receivers"),
        (torch.zeros(2, 7, 64, 32), None, "128 bins x 32 frames"),
        (torch.zeros(2, 7, 128, 32), torch.ones(2, 7), "bool"),
        (torch.zeros(2, 7, 128, 32), torch.ones(2, 6, dtype=torch.bool), r"shape \(B, R\)"),
        (torch.zeros(2, 7, 128, 32).index_put_((torch.tensor(1), torch.tensor(4)), torch.tensor(float("nan"))), None,
         "sample 1 receiver 4"),
    ],
)
def test_validate_features_names_the_problem(x, mask, match):
    with pytest.raises(ValueError, match=match):
        validate_features(x, mask, n_receivers=7)


def test_validate_features_accepts_good_input():
    validate_features(torch.zeros(2, 7, 128, 32), torch.ones(2, 7, dtype=torch.bool), n_receivers=7)


def test_config_lists_every_problem_and_roundtrips():
    with pytest.raises(ConfigError) as err:
        FeatureConfig(n_fft=0, window="hamming", db_scale=-1.0, floor_db=float("nan"))
    assert len(err.value.problems) == 4
    cfg = FeatureConfig(db_offset=-140.0)
    assert FeatureConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'nfft'"):
        FeatureConfig.from_dict({"nfft": 64})
    assert CFG.n_samples == 4096 and CFG.bin_hz == pytest.approx(93.75)


OFFSETS = (3.0, -2.5, 0.0, 7.25, -6.0, 1.0, 12.0)


def test_station_offsets_lower_each_receivers_level_in_both_paths():
    iq = _iq(np.random.default_rng(7))
    mask = np.ones((2, 7), dtype=bool)
    mask[0, 6] = False
    cfg = FeatureConfig(station_offsets_db=OFFSETS)
    plain = spectrogram_numpy(iq, CFG, mask)
    ref = spectrogram_numpy(iq, cfg, mask)
    got = SpectrogramFeatures(cfg)(torch.from_numpy(iq), torch.from_numpy(mask)).numpy()
    assert float(np.abs(got - ref).max()) < 1e-4
    shift_db = _to_dbm(ref) - _to_dbm(plain)
    clear = _to_dbm(plain) > CFG.floor_db + 15.0  # a few noise bins sit at the floor, where nothing moves
    for r, offset in enumerate(OFFSETS):
        assert clear[1, r].mean() > 0.99
        np.testing.assert_allclose(shift_db[1, r][clear[1, r]], -offset, atol=1e-3)
    assert (ref[0, 6] == cfg.mask_fill).all()  # a masked receiver is still only the fill


def test_station_offsets_keep_the_floor():
    silent = np.zeros((1, 7, CFG.n_samples), dtype=np.complex64)
    feats = spectrogram_numpy(silent, FeatureConfig(station_offsets_db=OFFSETS))
    np.testing.assert_allclose(_to_dbm(feats), CFG.floor_db, atol=1e-3)


def test_no_station_offsets_leave_every_number_and_saved_form_unchanged():
    iq = _iq(np.random.default_rng(8))
    zero = FeatureConfig(station_offsets_db=(0.0,) * 7)
    assert np.array_equal(spectrogram_numpy(iq, zero), spectrogram_numpy(iq, CFG))
    assert torch.equal(SpectrogramFeatures(zero)(torch.from_numpy(iq)), SpectrogramFeatures(CFG)(torch.from_numpy(iq)))
    # Without offsets the saved form (cache keys, checkpoints, export metadata) is the one from before they existed.
    assert set(CFG.to_dict()) == {"sample_rate_hz", "n_fft", "hop", "n_frames", "window", "reference_dbm",
                                  "db_offset", "db_scale", "floor_db", "mask_fill"}
    assert FeatureConfig.from_dict(CFG.to_dict()) == CFG


def test_station_offsets_roundtrip_through_json():
    import json

    cfg = FeatureConfig(station_offsets_db=list(OFFSETS))  # a list, as a dataset config holds it
    assert cfg.station_offsets_db == OFFSETS
    back = FeatureConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert back.to_dict()["station_offsets_db"] == list(OFFSETS)


@pytest.mark.parametrize("offsets, match", [
    ((1.0, 2.0), "one offset per receiver \\(7"),
    ((0.0,) * 6 + (float("nan"),), "station_offsets_db must be finite"),
    ("abc", "sequence of 7 numbers"),
    (3.0, "sequence of 7 numbers"),
])
def test_bad_station_offsets_are_config_errors(offsets, match):
    with pytest.raises(ConfigError, match=match):
        FeatureConfig(station_offsets_db=offsets)


def test_station_offsets_need_the_same_receiver_count():
    iq = _iq(np.random.default_rng(9), r=5)
    cfg = FeatureConfig(station_offsets_db=OFFSETS)
    with pytest.raises(ValueError, match="7 offsets but the IQ has 5 receivers"):
        spectrogram_numpy(iq, cfg)
    with pytest.raises(ValueError, match="7 offsets but the IQ has 5 receivers"):
        SpectrogramFeatures(cfg)(torch.from_numpy(iq))


def test_feature_config_for_takes_an_imported_datasets_offsets():
    from heimdall.scene import GeneratorConfig

    assert feature_config_for(GeneratorConfig().to_dict()) == CFG  # synthetic: nothing to correct
    base = FeatureConfig(db_offset=-140.0)
    got = feature_config_for({"station_offsets_db": list(OFFSETS), "split": {}}, base)
    assert got == FeatureConfig(db_offset=-140.0, station_offsets_db=OFFSETS)
    with pytest.raises(ConfigError, match="one offset per receiver"):
        feature_config_for({"station_offsets_db": [1.0]})
