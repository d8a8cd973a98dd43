"""The propagation model behind the synthetic data: who transmits where, and
what power each receiver sees.

This module is the single home of the physical model. The IQ synthesiser
(:mod:`heimdall.synthetic`) turns a :class:`Scene` into waveforms, and the
Bayes oracle (:mod:`heimdall.oracle`) inverts exactly the likelihood written
here, so the oracle is the honest yardstick for any learned model.

Model, per recording and receiver ``i`` at distance ``d_i`` from the transmitter::

    P_rx,i = P_tx + G - FSPL(d0, f) - 10 n log10(d_i / d0) + X_i + D_i,
             X_i ~ N(0, sigma^2),  D_i ~ N(0, gain_drift_sigma_db^2)
    SNR_i  = P_rx,i - N_i                                          (N_i: station noise floor)
    heard_i = SNR_i >= snr_threshold_db

``P_tx`` is uniform in ``tx_power_dbm``; the transmitter lies inside the
receivers' convex hull with probability ``inside_hull_fraction``, otherwise
uniformly in the ring up to ``outside_margin_km`` outside it. Recordings in
which fewer than ``min_heard`` receivers hear are redrawn (a recording exists
only if somebody heard it). Station calibration offsets (the error of each
receiver's absolute level) and noise floors are fixed per station, drawn from
``station_seed``.

Known and unknown gain. The calibration offset is fixed, so a network trained
on one network's data learns it, and the oracle is told it: it is *known*.
``D_i``, the gain drift, is *unknown*: drawn afresh for every recording and
station (a WebSDR whose operator changes its gain, an antenna or feedline
whose loss changes), independent of everything else. It acts on the signal
path, ahead of the receiver's noise, so it moves the recorded signal level and
the SNR but not the noise floor; a gain that also scaled the noise could be read
off the (fixed, learnable) noise floor in the IQ, so it would not be unknown.
``rx_power_dbm`` includes it: it is the power the station records, minus only
its known calibration offset. With ``gain_drift_sigma_db = 0`` (the default)
no drift is drawn and every scene is what it was before the setting existed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heimdall.errors import ConfigError, collect_problems
from heimdall.geometry import LocalFrame, default_frame
from heimdall.receivers import STATIONS

__all__ = [
    "GeneratorConfig",
    "StationParams",
    "Scene",
    "station_params",
    "free_space_loss_db",
    "mean_rx_power_dbm",
    "hull_polygon",
    "region_of",
    "sample_scene",
]

SPEED_OF_LIGHT = 299_792_458.0


@dataclass(frozen=True)
class GeneratorConfig:
    """Every parameter of the synthetic generator, each default in one place.

    Propagation:
        path_loss_exponent: n of the log-distance model (2.0-4.0 is physical).
        reference_distance_km: d0, where free-space loss applies.
        shadowing_sigma_db: std of log-normal shadowing per link.
        system_gain_db: G, antenna gains minus cable losses.
        tx_power_dbm: range of the unknown, uniform transmit power (1 W-50 W).
        bands_hz: carrier frequency ranges (2 m, 70 cm); one picked per recording.
        band_weights: probability of each band.
    Receivers:
        calibration_sigma_db: std of each station's fixed absolute-level error.
        gain_drift_sigma_db: std of the unknown signal-path gain drift, drawn
            per recording and per station (Gaussian, dB; range 0-12, default 0:
            no drift, today's fixed-gain world). Real WebSDR gains move by a few
            dB; 3-6 dB is a realistic harder world.
        noise_floor_dbm: range from which each station's fixed noise floor is drawn
            (in the 12 kHz channel).
        snr_threshold_db: a receiver hears when its SNR reaches this.
        min_heard: recordings heard by fewer receivers are redrawn.
        station_seed: seed of the fixed per-station draws (calibration, noise
            floor, clock error); part of the network, not of a dataset.
    Geography:
        inside_hull_fraction: share of transmitters inside the receivers' hull.
        outside_margin_km: the rest lies up to this far outside the hull.
    Waveform (used by :mod:`heimdall.synthetic`):
        sample_rate_hz, n_samples: 12 kHz complex baseband, 4096 samples (0.34 s),
            which is 32 frames of 128 samples for the features.
        deviation_hz: NBFM peak deviation range.
        tone_fraction: share of recordings modulated by tones rather than voice-like audio.
        ctcss_fraction: share of recordings with a sub-audible CTCSS tone.
        carrier_ppm: transmitter frequency error range (±, uniform).
        receiver_ppm_sigma: std of each station's fixed tuning error.
        rician_k_db: range of the Rician K factor (low end near Rayleigh).
        doppler_hz: range of the maximum Doppler spread of the fading.
        iq_reference_dbm: power that ``|x|^2 = 1`` represents in stored IQ.
    """

    path_loss_exponent: float = 3.0
    reference_distance_km: float = 1.0
    shadowing_sigma_db: float = 6.0
    system_gain_db: float = 0.0
    tx_power_dbm: tuple[float, float] = (30.0, 47.0)
    bands_hz: tuple[tuple[float, float], ...] = ((144.0e6, 146.0e6), (430.0e6, 440.0e6))
    band_weights: tuple[float, ...] = (0.6, 0.4)
    calibration_sigma_db: float = 6.0
    gain_drift_sigma_db: float = 0.0
    noise_floor_dbm: tuple[float, float] = (-128.0, -115.0)
    snr_threshold_db: float = 4.5
    min_heard: int = 1
    station_seed: int = 20240601
    inside_hull_fraction: float = 0.7
    outside_margin_km: float = 50.0
    sample_rate_hz: float = 12_000.0
    n_samples: int = 4096
    deviation_hz: tuple[float, float] = (2_500.0, 5_000.0)
    tone_fraction: float = 0.3
    ctcss_fraction: float = 0.5
    carrier_ppm: float = 2.5
    receiver_ppm_sigma: float = 0.5
    rician_k_db: tuple[float, float] = (0.0, 10.0)
    doppler_hz: tuple[float, float] = (0.0, 15.0)
    iq_reference_dbm: float = -100.0

    def __post_init__(self) -> None:
        p: list[str] = []

        def rng_ok(name: str, lo_hi: tuple[float, float], lo: float | None = None, hi: float | None = None) -> None:
            if len(lo_hi) != 2:
                p.append(f"{name} must be a (low, high) pair, got {lo_hi}")
                return
            a, b = lo_hi
            if not a <= b:
                p.append(f"{name}: low <= high must hold, got {lo_hi}; swap the bounds")
            if lo is not None and a < lo:
                p.append(f"{name}: low must be >= {lo}, got {a}")
            if hi is not None and b > hi:
                p.append(f"{name}: high must be <= {hi}, got {b}")

        if not 1.5 <= self.path_loss_exponent <= 6.0:
            p.append(f"path_loss_exponent must lie in [1.5, 6], got {self.path_loss_exponent}; 2-4 is physical")
        if self.reference_distance_km <= 0:
            p.append(f"reference_distance_km must be > 0, got {self.reference_distance_km}")
        if self.shadowing_sigma_db <= 0:
            p.append(f"shadowing_sigma_db must be > 0 (the oracle needs a proper likelihood), got {self.shadowing_sigma_db}")
        if self.calibration_sigma_db < 0:
            p.append(f"calibration_sigma_db must be >= 0, got {self.calibration_sigma_db}")
        if not 0.0 <= self.gain_drift_sigma_db <= 12.0:
            p.append(f"gain_drift_sigma_db must lie in [0, 12] dB, got {self.gain_drift_sigma_db}; "
                     f"0 turns the drift off, 3-6 is realistic")
        rng_ok("tx_power_dbm", self.tx_power_dbm)
        rng_ok("noise_floor_dbm", self.noise_floor_dbm)
        rng_ok("deviation_hz", self.deviation_hz, 0.0, self.sample_rate_hz / 2)
        rng_ok("rician_k_db", self.rician_k_db)
        rng_ok("doppler_hz", self.doppler_hz, 0.0)
        if len(self.bands_hz) != len(self.band_weights) or not self.bands_hz:
            p.append(f"bands_hz and band_weights need the same non-zero length, got {len(self.bands_hz)} and {len(self.band_weights)}")
        for band in self.bands_hz:
            rng_ok("bands_hz", band, 1e6)
        if any(w < 0 for w in self.band_weights) or sum(self.band_weights) <= 0:
            p.append(f"band_weights must be >= 0 with a positive sum, got {self.band_weights}")
        if not 1 <= self.min_heard <= len(STATIONS):
            p.append(f"min_heard must lie in [1, {len(STATIONS)}], got {self.min_heard}")
        for name in ("inside_hull_fraction", "tone_fraction", "ctcss_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                p.append(f"{name} must lie in [0, 1], got {v}")
        if self.outside_margin_km <= 0 and self.inside_hull_fraction < 1.0:
            p.append(f"outside_margin_km must be > 0 when inside_hull_fraction < 1, got {self.outside_margin_km}")
        for name in ("carrier_ppm", "receiver_ppm_sigma", "station_seed"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sample_rate_hz <= 0:
            p.append(f"sample_rate_hz must be > 0, got {self.sample_rate_hz}")
        if self.n_samples < 256 or self.n_samples % 128:
            p.append(f"n_samples must be a multiple of 128 and >= 256, got {self.n_samples}")
        collect_problems("GeneratorConfig", p)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            collect_problems("GeneratorConfig", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kw[k] = v
        return cls(**kw)


@dataclass(frozen=True)
class StationParams:
    """Fixed per-station properties, arrays of shape (R,) in :data:`STATIONS` order."""

    calibration_offset_db: np.ndarray
    noise_floor_dbm: np.ndarray
    ppm_error: np.ndarray


def station_params(config: GeneratorConfig) -> StationParams:
    """Draw the fixed per-station calibration offset, noise floor and tuning error."""
    rng = np.random.default_rng(config.station_seed)
    r = len(STATIONS)
    cal = rng.normal(0.0, config.calibration_sigma_db, r)
    floor = rng.uniform(*config.noise_floor_dbm, r)
    ppm = rng.normal(0.0, config.receiver_ppm_sigma, r)
    return StationParams(cal, floor, ppm)


def free_space_loss_db(distance_km: np.ndarray | float, frequency_hz: np.ndarray | float) -> np.ndarray:
    """Free-space path loss in dB (about 75.7 dB at 145 MHz and 1 km)."""
    d_m = np.asarray(distance_km, dtype=np.float64) * 1e3
    f = np.asarray(frequency_hz, dtype=np.float64)
    return 20.0 * np.log10(4.0 * np.pi * d_m * f / SPEED_OF_LIGHT)


def mean_rx_power_dbm(
    config: GeneratorConfig,
    tx_power_dbm: np.ndarray | float,
    distance_km: np.ndarray,
    frequency_hz: np.ndarray | float,
) -> np.ndarray:
    """Median received power (before shadowing) of the log-distance model; broadcasts."""
    d = np.maximum(np.asarray(distance_km, dtype=np.float64), config.reference_distance_km)
    d0 = config.reference_distance_km
    return (
        np.asarray(tx_power_dbm, dtype=np.float64)
        + config.system_gain_db
        - free_space_loss_db(d0, frequency_hz)
        - 10.0 * config.path_loss_exponent * np.log10(d / d0)
    )


def hull_polygon(frame: LocalFrame | None = None) -> np.ndarray:
    """Convex hull of the receivers in the local frame, (V, 2) counter-clockwise."""
    pts = (frame or default_frame()).stations_local()
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))

    lower: list[np.ndarray] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[np.ndarray] = []
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _distance_outside(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Distance (km) from each point (..., 2) to the hull; 0 inside."""
    a = hull
    b = np.roll(hull, -1, axis=0)
    p = points[..., None, :]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    dist = np.linalg.norm(p - nearest, axis=-1).min(-1)
    # Counter-clockwise hull: inside means left of every edge.
    side = ab[:, 0] * (p[..., 1] - a[:, 1]) - ab[:, 1] * (p[..., 0] - a[:, 0])
    inside = (side >= 0).all(-1)
    return np.where(inside, 0.0, dist)


def region_of(config: GeneratorConfig, points: np.ndarray, hull: np.ndarray | None = None) -> np.ndarray:
    """Region code per point (..., 2): 0 inside the hull, 1 in the outer ring, -1 beyond."""
    d = _distance_outside(points, hull_polygon() if hull is None else hull)
    return np.where(d == 0.0, 0, np.where(d <= config.outside_margin_km, 1, -1))


@dataclass
class Scene:
    """Ground truth of N recordings (arrays in :data:`STATIONS` order along R).

    Attributes:
        tx_east_km, tx_north_km: transmitter position in the default frame, (N,).
        tx_lat, tx_lon: the same in degrees, (N,).
        tx_power_dbm: transmit power, (N,).
        frequency_hz: carrier frequency, (N,).
        inside_hull: whether the transmitter lies inside the receivers' hull, (N,).
        rx_power_dbm: received power as the station records it, after shadowing and
            the unknown gain drift, before the station's known calibration offset, (N, R).
        snr_db: received power minus the station's noise floor, (N, R).
        heard: ``snr_db >= snr_threshold_db``, (N, R).
        gain_drift_db: the unknown gain drift included in ``rx_power_dbm``, (N, R);
            zeros when ``gain_drift_sigma_db`` is 0, None for scenes not drawn by
            :func:`sample_scene`.
    """

    tx_east_km: np.ndarray
    tx_north_km: np.ndarray
    tx_lat: np.ndarray
    tx_lon: np.ndarray
    tx_power_dbm: np.ndarray
    frequency_hz: np.ndarray
    inside_hull: np.ndarray
    rx_power_dbm: np.ndarray
    snr_db: np.ndarray
    heard: np.ndarray = field(repr=False)
    gain_drift_db: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.tx_east_km.shape[0])


def _sample_positions(config: GeneratorConfig, n: int, rng: np.random.Generator, hull: np.ndarray) -> np.ndarray:
    inside = rng.random(n) < config.inside_hull_fraction
    out = np.empty((n, 2))
    lo = hull.min(0) - config.outside_margin_km
    hi = hull.max(0) + config.outside_margin_km
    for want_region, sel in ((0, inside), (1, ~inside)):
        need = int(sel.sum())
        got: list[np.ndarray] = []
        while need > 0:
            cand = rng.uniform(lo, hi, size=(max(4 * need, 64), 2))
            ok = cand[region_of(config, cand, hull) == want_region][:need]
            got.append(ok)
            need -= len(ok)
        if got:
            out[sel] = np.concatenate(got)
    return out


def sample_scene(config: GeneratorConfig, n: int, rng: np.random.Generator) -> Scene:
    """Draw ``n`` recordings' ground truth; vectorised, reproducible from ``rng``.

    Args:
        config: generator parameters.
        n: number of recordings.
        rng: source of randomness (e.g. ``np.random.default_rng([seed, shard])``).

    Returns:
        A :class:`Scene` where every recording is heard by at least ``config.min_heard``
        receivers.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 recordings, got {n}")
    frame = default_frame()
    hull = hull_polygon(frame)
    stations = frame.stations_local()
    sp = station_params(config)
    parts: list[dict[str, np.ndarray]] = []
    need, drawn = n, 0
    while need > 0:
        if drawn > 1000 * n + 10_000:
            raise ConfigError("GeneratorConfig", [
                f"fewer than 1 in 1000 draws reach min_heard={config.min_heard} receivers with noise floors "
                f"{config.noise_floor_dbm} dBm and transmit power {config.tx_power_dbm} dBm; fix: lower the noise "
                f"floor or min_heard, or raise the transmit power"
            ])
        m = max(need + need // 2, 16)
        drawn += m
        pos = _sample_positions(config, m, rng, hull)
        ptx = rng.uniform(*config.tx_power_dbm, m)
        weights = np.asarray(config.band_weights, dtype=np.float64)
        band = rng.choice(len(config.bands_hz), size=m, p=weights / weights.sum())
        bands = np.asarray(config.bands_hz)
        freq = rng.uniform(bands[band, 0], bands[band, 1])
        dist = np.linalg.norm(pos[:, None, :] - stations[None], axis=-1)
        prx = mean_rx_power_dbm(config, ptx[:, None], dist, freq[:, None])
        prx = prx + rng.normal(0.0, config.shadowing_sigma_db, prx.shape)
        # Drawn only when on, so a drift-free config consumes the same random stream as before.
        drift = rng.normal(0.0, config.gain_drift_sigma_db, prx.shape) if config.gain_drift_sigma_db > 0 else np.zeros(prx.shape)
        prx = prx + drift
        snr = prx - sp.noise_floor_dbm[None]
        heard = snr >= config.snr_threshold_db
        keep = heard.sum(1) >= config.min_heard
        keep &= np.cumsum(keep) <= need
        parts.append(dict(pos=pos[keep], ptx=ptx[keep], freq=freq[keep], prx=prx[keep], snr=snr[keep], heard=heard[keep],
                          drift=drift[keep]))
        need -= int(keep.sum())
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    lat, lon = frame.to_geographic(cat["pos"][:, 0], cat["pos"][:, 1])
    return Scene(
        tx_east_km=cat["pos"][:, 0],
        tx_north_km=cat["pos"][:, 1],
        tx_lat=lat,
        tx_lon=lon,
        tx_power_dbm=cat["ptx"],
        frequency_hz=cat["freq"],
        inside_hull=region_of(config, cat["pos"], hull) == 0,
        rx_power_dbm=cat["prx"],
        snr_db=cat["snr"],
        heard=cat["heard"],
        gain_drift_db=cat["drift"],
    )
