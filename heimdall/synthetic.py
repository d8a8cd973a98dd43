"""Synthetic WebSDR IQ: turn a :class:`~heimdall.scene.Scene` into NBFM recordings.

Each recording is one transmission heard by all seven receivers at once. The
transmitter is shared (audio, peak deviation, CTCSS, its crystal error and its
speed); each receiver adds its own tuning error, fading, level and noise::

    x_r(t) = c_r * ( sqrt(P_r) * h_r(t) * exp(j(phi_fm(t) + 2 pi f_off,r t)) + n_r(t) )

with ``phi_fm(t) = 2 pi deviation * integral of m(t)``, ``m`` the modulating audio
scaled to peak |m| = 1, and ``n_r`` complex white noise at the station's floor.

Modelling decisions (each one is a choice, stated so it can be questioned):

* **Fading keeps the level.** The complex fading gain ``h_r(t)`` (Rician: a
  line-of-sight ray plus a Rayleigh part from a sum of sinusoids,
  Clarke/Jakes-like) is normalised so that its mean power over the recording
  is exactly 1. The recording's mean signal power is therefore exactly the
  scene's local-mean received power ``P_r`` (``scene.rx_power_dbm``): fast
  fading changes the time/spectral texture, not the level. Unnormalised,
  Rayleigh fading over 0.34 s would add several dB of level noise that the
  Bayes oracle (which inverts :mod:`heimdall.scene`'s likelihood) does not
  model, and the oracle would stop being the honest yardstick.
* **One Doppler per recording, one K per link.** The maximum Doppler
  ``f_D = v f / c`` is set by the transmitter's speed, so it is drawn once per
  recording (uniform in ``config.doppler_hz``); the Rician K factor describes
  each link's line of sight, so it is drawn per receiver (uniform in dB in
  ``config.rician_k_db``). The line-of-sight ray gets its own Doppler shift
  ``f_D cos(theta_r)`` with a random arrival angle.
* **Carrier offset** ``f_off,r = (e_tx + e_r) * 1e-6 * f``: ``e_tx`` uniform in
  ``±config.carrier_ppm``, ``e_r = station_params(config).ppm_error[r]`` read as
  the shift station ``r`` adds to everything it receives.
* **Calibration offset scales the whole receiver.** ``c_r`` is the station's
  absolute-level error (``calibration_offset_db``); it multiplies signal and
  noise alike, so the SNR is that of the scene.
* **Gain drift moves the signal only.** The scene's unknown gain drift
  (``GeneratorConfig.gain_drift_sigma_db``) is already part of
  ``scene.rx_power_dbm``, so ``P_r`` carries it and the noise does not: the
  recorded signal level and SNR move with it, the noise floor in the IQ stays
  the station's (were it scaled too, the fixed floor would reveal the drift).
* **Units.** ``|x|^2 = 1`` represents ``config.iq_reference_dbm`` dBm; the
  noise power is for the whole 12 kHz complex channel, mean
  ``|n|^2 = 10**((floor + cal - ref) / 10)``.
* **No channel filter.** The FM signal is synthesised directly at 12 kHz with
  constant envelope, so spectral content beyond ±6 kHz folds back into the
  band instead of being cut by a receiver filter, and the level stays exact.
  With the defaults the instantaneous frequency (deviation plus offset) passes
  ±6 kHz in about 1e-5 of the samples (under 1% of recordings, mostly
  high-deviation tones at 70 cm), and Carson's rule puts at most a few percent
  of a ±5 kHz tone recording's power beyond ±6 kHz. Real 25 kHz-channel FM
  seen through a 12 kHz WebSDR channel loses that power instead.
* **Audio.** Voice-like audio is a sawtooth glottal source with a wandering
  pitch (90-250 Hz) plus breath noise, shaped in the frequency domain by 2-3
  formant-like resonances in 300-3000 Hz and 750 us pre-emphasis, under a
  3-6 Hz syllabic envelope. Tones are a 1 kHz-ish test tone or a DTMF pair.
  A CTCSS tone (EIA list, 67-254 Hz) takes 10-15% of the deviation.

Randomness: :func:`synthesize_iq` draws every per-recording parameter first
and then the bulk noise from two child generators, so the output does not
depend on the internal chunk size; :func:`generate` seeds with
``[seed, shard_index]`` so any shard can be rebuilt alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heimdall.errors import DataError, collect_problems
from heimdall.receivers import STATIONS
from heimdall.scene import GeneratorConfig, Scene, sample_scene, station_params

__all__ = ["Recordings", "synthesize_iq", "generate", "band_power_dbm"]

# Recordings per vectorised block: bounds peak memory to ~50 MB at 7 x 4096.
_CHUNK = 32
# Fading varies at <= ~15 Hz, so it is computed every 64 samples (5 ms at 12 kHz)
# and interpolated linearly; 64 divides n_samples (a multiple of 128).
_FADING_STEP = 64
_N_SINUSOIDS = 16
_AUDIO_BAND_HZ = (300.0, 3000.0)
_PRE_EMPHASIS_HZ = 1.0 / (2.0 * np.pi * 750e-6)  # 750 us, about 212 Hz
_DTMF_LOW_HZ = (697.0, 770.0, 852.0, 941.0)
_DTMF_HIGH_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
_CTCSS_HZ = (
    67.0, 69.3, 71.9, 74.4, 77.0, 79.7, 82.5, 85.4, 88.5, 91.5, 94.8, 97.4,
    100.0, 103.5, 107.2, 110.9, 114.8, 118.8, 123.0, 127.3, 131.8, 136.5,
    141.3, 146.2, 151.4, 156.7, 159.8, 162.2, 165.5, 167.9, 171.3, 173.8,
    177.3, 179.9, 183.5, 186.2, 189.9, 192.8, 196.6, 199.5, 203.5, 206.5,
    210.7, 218.1, 225.7, 229.1, 233.6, 241.8, 250.3, 254.1,
)
# A receiver whose measured power does not exceed its noise reads this far below the noise.
_FLOOR_BELOW_NOISE_DB = 30.0


@dataclass
class Recordings:
    """Ground truth and IQ of N recordings.

    Attributes:
        scene: the ground truth (positions, powers, who heard).
        iq: complex64 baseband, shape (N, R, n_samples), receivers in
            :data:`~heimdall.receivers.STATIONS` order.
    """

    scene: Scene
    iq: np.ndarray

    def __post_init__(self) -> None:
        if self.iq.ndim != 3 or self.iq.shape[:2] != (len(self.scene), len(STATIONS)):
            raise DataError(
                f"iq must have shape (N={len(self.scene)}, R={len(STATIONS)}, samples), "
                f"got {self.iq.shape}; build it with synthesize_iq(config, scene, rng)"
            )

    def __len__(self) -> int:
        return len(self.scene)


@dataclass(frozen=True)
class _Params:
    """Per-recording (N,) and per-link (N, R) waveform parameters."""

    is_tone: np.ndarray
    deviation_hz: np.ndarray
    ctcss_hz: np.ndarray  # 0 where there is no CTCSS
    ctcss_level: np.ndarray
    offset_hz: np.ndarray  # (N, R)
    doppler_hz: np.ndarray
    k_linear: np.ndarray  # (N, R)
    voice: dict[str, np.ndarray]
    tone: dict[str, np.ndarray]
    fading: dict[str, np.ndarray]


def _draw_voice(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    three = rng.random(n) < 0.5
    return dict(
        f0_hz=rng.uniform(90.0, 250.0, n),
        wander_depth=rng.uniform(0.03, 0.12, n),
        wander_hz=rng.uniform(1.0, 4.0, n),
        formant_hz=np.stack(
            [rng.uniform(300.0, 900.0, n), rng.uniform(900.0, 2300.0, n), rng.uniform(2300.0, 3000.0, n)], -1
        ),
        formant_bw_hz=rng.uniform(100.0, 300.0, (n, 3)),
        formant_gain=np.stack(
            [np.ones(n), rng.uniform(0.3, 1.0, n), np.where(three, rng.uniform(0.1, 0.6, n), 0.0)], -1
        ),
        syllable_hz=rng.uniform(3.0, 6.0, n),
        phases=rng.uniform(0.0, 2.0 * np.pi, (n, 3)),
    )


def _draw_tone(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dtmf = rng.random(n) < 0.5
    single = rng.uniform(900.0, 1100.0, n)
    low = np.asarray(_DTMF_LOW_HZ)[rng.integers(0, 4, n)]
    high = np.asarray(_DTMF_HIGH_HZ)[rng.integers(0, 4, n)]
    return dict(
        freqs_hz=np.stack([np.where(dtmf, low, single), np.where(dtmf, high, 0.0)], -1),
        amps=np.stack([np.where(dtmf, 0.5, 1.0), np.where(dtmf, 0.5, 0.0)], -1),
        phases=rng.uniform(0.0, 2.0 * np.pi, (n, 2)),
    )


def _draw_fading(n: int, r: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return dict(
        los_cos=np.cos(rng.uniform(0.0, 2.0 * np.pi, (n, r))),
        los_phase=rng.uniform(0.0, 2.0 * np.pi, (n, r)),
        # Zheng-Xiao style angles: evenly spread, randomly rotated per link, which
        # approximates Clarke's spectrum well with few sinusoids.
        rotation=rng.uniform(-np.pi, np.pi, (n, r, 1)),
        phases=rng.uniform(0.0, 2.0 * np.pi, (n, r, _N_SINUSOIDS)),
    )


def _draw_params(config: GeneratorConfig, scene: Scene, rng: np.random.Generator) -> _Params:
    n, r = len(scene), len(STATIONS)
    has_ctcss = rng.random(n) < config.ctcss_fraction
    tx_ppm = rng.uniform(-config.carrier_ppm, config.carrier_ppm, n)
    ppm = tx_ppm[:, None] + station_params(config).ppm_error[None, :]
    return _Params(
        is_tone=rng.random(n) < config.tone_fraction,
        deviation_hz=rng.uniform(*config.deviation_hz, n),
        ctcss_hz=np.where(has_ctcss, np.asarray(_CTCSS_HZ)[rng.integers(0, len(_CTCSS_HZ), n)], 0.0),
        ctcss_level=np.where(has_ctcss, rng.uniform(0.10, 0.15, n), 0.0),
        offset_hz=ppm * 1e-6 * np.asarray(scene.frequency_hz, dtype=np.float64)[:, None],
        doppler_hz=rng.uniform(*config.doppler_hz, n),
        k_linear=10.0 ** (rng.uniform(*config.rician_k_db, (n, r)) / 10.0),
        voice=_draw_voice(n, rng),
        tone=_draw_tone(n, rng),
        fading=_draw_fading(n, r, rng),
    )


def _voice_audio(v: dict[str, np.ndarray], t: np.ndarray, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Voice-like audio, (c, T), unnormalised."""
    col = {k: a[:, None] for k, a in v.items() if a.ndim == 1}
    f0 = col["f0_hz"] * (1.0 + col["wander_depth"] * np.sin(2 * np.pi * col["wander_hz"] * t + v["phases"][:, :1]))
    cycles = np.cumsum(f0, axis=-1) / fs + v["phases"][:, 1:2] / (2 * np.pi)
    source = 2.0 * (cycles % 1.0) - 1.0 + 0.1 * rng.standard_normal(cycles.shape)
    f = np.fft.rfftfreq(t.size, 1.0 / fs)
    lo, hi = _AUDIO_BAND_HZ
    band = 1.0 / (1.0 + (lo / np.maximum(f, 1.0)) ** 4) / (1.0 + (f / hi) ** 8)
    emphasis = np.sqrt(1.0 + (f / _PRE_EMPHASIS_HZ) ** 2)
    half_bw = v["formant_bw_hz"][..., None] / 2.0
    peaks = v["formant_gain"][..., None] / (1.0 + ((f - v["formant_hz"][..., None]) / half_bw) ** 2)
    shape = (0.05 + peaks.sum(axis=1)) * band * emphasis
    audio = np.fft.irfft(np.fft.rfft(source, axis=-1) * shape, n=t.size, axis=-1)
    rise = (1.0 + np.sin(2 * np.pi * col["syllable_hz"] * t + v["phases"][:, 2:3])) / 2.0
    syllables = 0.05 + 0.95 * rise * np.sqrt(rise)  # rise**1.5: sharper syllable onsets
    return audio * syllables


def _tone_audio(tone: dict[str, np.ndarray], t: np.ndarray) -> np.ndarray:
    """Single tone or DTMF pair, (c, T), unnormalised."""
    arg = 2 * np.pi * tone["freqs_hz"][..., None] * t + tone["phases"][..., None]
    return (tone["amps"][..., None] * np.sin(arg)).sum(axis=1)


def _modulation(p: _Params, sl: slice, t: np.ndarray, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Modulating signal m(t) with peak |m| = 1 (CTCSS included), (c, T)."""
    tone = p.is_tone[sl]
    idx = np.arange(sl.start, sl.stop)
    audio = np.empty((tone.size, t.size))
    audio[~tone] = _voice_audio({k: a[idx[~tone]] for k, a in p.voice.items()}, t, fs, rng)
    audio[tone] = _tone_audio({k: a[idx[tone]] for k, a in p.tone.items()}, t)
    audio /= np.abs(audio).max(axis=-1, keepdims=True)
    level = p.ctcss_level[sl, None]
    # Fixed CTCSS phase: it is sub-audible and carries no information here.
    return (1.0 - level) * audio + level * np.sin(2 * np.pi * p.ctcss_hz[sl, None] * t)


def _fading(p: _Params, sl: slice, n_samples: int, fs: float, amplitude: np.ndarray) -> np.ndarray:
    """Rician gain times ``amplitude`` (c, R), mean power exactly ``amplitude**2``; (c, R, T) complex64."""
    fd = {k: a[sl] for k, a in p.fading.items()}
    doppler = p.doppler_hz[sl, None, None]
    k = p.k_linear[sl]
    tg = np.arange(n_samples // _FADING_STEP + 1) * (_FADING_STEP / fs)
    los = np.exp(1j * (2 * np.pi * doppler * fd["los_cos"][..., None] * tg + fd["los_phase"][..., None]))
    angles = (2 * np.pi * np.arange(_N_SINUSOIDS) + fd["rotation"]) / _N_SINUSOIDS
    scatter_hz = doppler * np.cos(angles)
    # float32 phases (under ~40 rad): cos/sin run vectorised, several times faster than complex exp.
    arg = (2 * np.pi * scatter_hz[..., None] * tg + fd["phases"][..., None]).astype(np.float32)
    scatter = np.cos(arg).sum(axis=-2, dtype=np.float64) + 1j * np.sin(arg).sum(axis=-2, dtype=np.float64)
    grid = np.sqrt(k / (k + 1))[..., None] * los + np.sqrt(1 / ((k + 1) * _N_SINUSOIDS))[..., None] * scatter
    grid *= (amplitude / np.sqrt(_interpolated_mean_power(grid)))[..., None]
    frac = (np.arange(_FADING_STEP) / _FADING_STEP).astype(np.float32)
    start = grid[..., :-1, None].astype(np.complex64)
    step = np.diff(grid, axis=-1)[..., None].astype(np.complex64)
    return (start + step * frac).reshape(*grid.shape[:-1], n_samples)


def _interpolated_mean_power(grid: np.ndarray) -> np.ndarray:
    """Mean |h|^2 of the linear interpolation of ``grid`` at u = k / step, k < step.

    Exact, so the fine gain can be normalised on the coarse grid.
    """
    u = np.arange(_FADING_STEP) / _FADING_STEP
    s00, s11, s01 = np.mean((1 - u) ** 2), np.mean(u**2), np.mean(u * (1 - u))
    a, b = grid[..., :-1], grid[..., 1:]
    per_segment = s00 * np.abs(a) ** 2 + s11 * np.abs(b) ** 2 + 2 * s01 * np.real(a * np.conj(b))
    return per_segment.mean(axis=-1)


def _check_scene(scene: Scene) -> None:
    n, r = len(scene), len(STATIONS)
    if np.shape(scene.rx_power_dbm) != (n, r) or np.shape(scene.frequency_hz) != (n,):
        raise DataError(
            f"scene.rx_power_dbm must be (N, {r}) and scene.frequency_hz (N,) with N={n}, got "
            f"{np.shape(scene.rx_power_dbm)} and {np.shape(scene.frequency_hz)}; build scenes with sample_scene()"
        )
    if n_bad := int((np.isnan(scene.rx_power_dbm) | np.isposinf(scene.rx_power_dbm)).sum()):
        raise DataError(f"scene.rx_power_dbm has {n_bad} NaN or +inf value(s); use -inf for 'no signal'")


def _levels(config: GeneratorConfig, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Signal amplitude and per-component noise std at the stored scale, (N, R) each."""
    sp = station_params(config)
    cal = sp.calibration_offset_db[None, :]
    signal = 10.0 ** ((scene.rx_power_dbm + cal - config.iq_reference_dbm) / 20.0)
    noise_power = 10.0 ** ((sp.noise_floor_dbm[None, :] + cal - config.iq_reference_dbm) / 10.0)
    return signal, np.broadcast_to(np.sqrt(noise_power / 2.0), signal.shape)


def synthesize_iq(config: GeneratorConfig, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """NBFM IQ of every recording at every receiver.

    Args:
        config: generator parameters (waveform fields, station draws, IQ scale).
        scene: ground truth; ``rx_power_dbm`` sets each receiver's mean signal power.
        rng: source of randomness; consumed in a fixed order, so the same state
            gives the same IQ.

    Returns:
        complex64 array (N, R, config.n_samples) at ``config.sample_rate_hz``,
        receivers in :data:`~heimdall.receivers.STATIONS` order.

    Raises:
        DataError: when the scene's arrays have the wrong shape or hold NaN.
    """
    _check_scene(scene)
    n, r, n_t, fs = len(scene), len(STATIONS), config.n_samples, config.sample_rate_hz
    params = _draw_params(config, scene, rng)
    audio_rng, noise_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2))
    amplitude, noise_std = _levels(config, scene)
    t = np.arange(n_t) / fs
    out = np.empty((n, r, n_t), dtype=np.complex64)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = _modulation(params, sl, t, fs, audio_rng)
        phi_fm = ((2 * np.pi / fs) * params.deviation_hz[sl, None] * np.cumsum(m, axis=-1)).astype(np.float32)
        # float32 phase: at most ~3000 rad after 0.34 s, so rounding stays below 1e-3 rad.
        omega = (2 * np.pi * params.offset_hz[sl, :, None]).astype(np.float32)
        phase = phi_fm[:, None, :] + omega * t.astype(np.float32)
        block = out[sl]
        block.real, block.imag = np.cos(phase), np.sin(phase)
        block *= _fading(params, sl, n_t, fs, amplitude[sl])
        noise = noise_rng.standard_normal((*block.shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
        block += noise * noise_std[sl, :, None].astype(np.float32)
    return out


def generate(config: GeneratorConfig, n: int, seed: int, shard_index: int = 0) -> Recordings:
    """Draw ``n`` recordings (scene, then IQ) reproducibly from ``(seed, shard_index)``.

    Every shard is rebuilt alone from its own pair, which makes interrupted
    generation resumable shard by shard.

    Args:
        config: generator parameters.
        n: number of recordings, >= 1.
        seed: dataset seed, >= 0.
        shard_index: shard number, >= 0.

    Returns:
        :class:`Recordings` with ``len == n``; the IQ takes ``n * 7 * n_samples * 8``
        bytes (229 kB per recording at the defaults).

    Raises:
        ConfigError: listing every argument that breaks its rule.
    """
    problems = [
        f"{name} must be an integer >= {low}, got {value!r}"
        for name, value, low in (("n", n, 1), ("seed", seed, 0), ("shard_index", shard_index, 0))
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low
    ]
    collect_problems("generate() arguments", problems)
    rng = np.random.default_rng([seed, shard_index])
    scene = sample_scene(config, n, rng)
    return Recordings(scene=scene, iq=synthesize_iq(config, scene, rng))


def band_power_dbm(
    iq: np.ndarray,
    config: GeneratorConfig,
    noise_floor_dbm_at_scale: np.ndarray | float | None = None,
) -> np.ndarray:
    """Received power estimated from IQ: mean ``|x|^2`` over the last axis, in dBm.

    With ``noise_floor_dbm_at_scale`` (the receiver's noise power as it appears in
    the stored IQ, i.e. noise floor plus calibration offset), the known noise
    power is subtracted, leaving the signal power. Where nothing is left (a
    noise-only receiver), the result is clipped to 30 dB below the noise, so it
    stays finite; the estimate means little below about 0 dB SNR. For N
    samples at SNR ``s`` (linear) its standard error is roughly
    ``4.34 * sqrt((1 + 2 s) / N) / s`` dB.

    Args:
        iq: complex array (..., samples) at the stored scale.
        config: supplies ``iq_reference_dbm`` (the power ``|x|^2 = 1`` represents).
        noise_floor_dbm_at_scale: noise power in dBm, broadcastable to ``iq.shape[:-1]``.

    Returns:
        float64 array of shape ``iq.shape[:-1]``, dBm.
    """
    total = _mean_power(iq)
    if noise_floor_dbm_at_scale is None:
        return 10.0 * np.log10(total) + config.iq_reference_dbm
    noise = 10.0 ** ((np.asarray(noise_floor_dbm_at_scale, dtype=np.float64) - config.iq_reference_dbm) / 10.0)
    excess = np.maximum(total - noise, noise * 10.0 ** (-_FLOOR_BELOW_NOISE_DB / 10.0))
    return 10.0 * np.log10(excess) + config.iq_reference_dbm


def _mean_power(iq: np.ndarray, rows: int = 256) -> np.ndarray:
    """Mean |x|^2 over the last axis in float64, a block of rows at a time to bound memory."""
    flat = iq.reshape(-1, iq.shape[-1])
    out = np.empty(flat.shape[0])
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows].astype(np.complex128)
        out[start : start + rows] = np.mean(block.real**2 + block.imag**2, axis=-1)
    return out.reshape(iq.shape[:-1])
