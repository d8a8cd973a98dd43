"""Post-hoc calibration of predicted ellipses (temperature scaling of σ).

A network trained by Gaussian NLL learns, at best, the moments of the true
posterior; for this problem that posterior is peaked with long tails, so the
moment ellipse holds ~46% of truths at 1σ instead of 39.3% (the Bayes oracle
shows the same). One scalar ``c``, fitted on the validation split and applied
to every covariance (``c · Σ``), trades the levels against each other so that
the coverage of the 1σ and 2σ ellipses (m² = 1 and 4: the ellipse the exported
model returns and the one maps usually draw) is closest, in least squares, to
39.3% and 86.5% — the same criterion as the oracle's calibrated ellipse. It
never changes the positions. (Matching the whole profile m² = 1…5.99 instead
leaves 1σ about 1.5 points higher on this generator.)

Station offsets (:func:`estimate_station_offsets`): a real receiver's absolute
level is off by its operator's gain setting. From recordings of transmitters at
known positions, each station's offset is its mean level above what the
propagation model expects; subtracting it where features are computed
(:attr:`heimdall.features.FeatureConfig.station_offsets_db`) puts every
receiver on the scale the model was trained on.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from heimdall.errors import DataError
from heimdall.geometry import default_frame
from heimdall.receivers import STATION_IDS
from heimdall.scene import GeneratorConfig, mean_rx_power_dbm

__all__ = [
    "CALIBRATION_LEVELS_M2",
    "PROFILE_LEVELS_M2",
    "StationOffsets",
    "coverage_profile",
    "estimate_station_offsets",
    "fit_covariance_scale",
    "iq_signal_level_dbm",
]

CALIBRATION_LEVELS_M2 = np.array([1.0, 4.0])
#: Levels reported by :func:`coverage_profile`: 1σ, 2σ and 95%.
PROFILE_LEVELS_M2 = np.array([1.0, 4.0, 5.991464547107979])
_CANDIDATES = np.exp(np.linspace(np.log(0.25), np.log(4.0), 161))


def _squared_mahalanobis(mean: np.ndarray, cov: np.ndarray, truth: np.ndarray) -> np.ndarray:
    d = np.asarray(truth, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return np.einsum("ni,nij,nj->n", d, np.linalg.inv(np.asarray(cov, dtype=np.float64)), d)


def coverage_profile(mean: np.ndarray, cov: np.ndarray, truth: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Fraction of truths inside the 1σ, 2σ and 95% ellipses of ``scale · cov``."""
    m2 = _squared_mahalanobis(mean, cov, truth) / scale
    return (m2[:, None] <= PROFILE_LEVELS_M2[None, :]).mean(0)


def fit_covariance_scale(mean: np.ndarray, cov: np.ndarray, truth: np.ndarray) -> float:
    """The factor ``c`` minimising the squared distance of the 1σ and 2σ coverage
    of ``c · cov`` from their nominal χ²(2) levels (grid search over 0.25…4).

    Args:
        mean: predicted means (N, 2), any length unit.
        cov: predicted covariances (N, 2, 2), the same unit squared.
        truth: true positions (N, 2).

    Returns:
        The factor (1.0 means already calibrated by this criterion).

    Raises:
        ValueError: with fewer than 20 recordings (too few to calibrate on).
    """
    if len(truth) < 20:
        raise ValueError(f"calibrating ellipses needs at least 20 validation recordings, got {len(truth)}")
    m2 = np.sort(_squared_mahalanobis(mean, cov, truth))
    nominal = 1.0 - np.exp(-CALIBRATION_LEVELS_M2 / 2.0)
    inside = np.searchsorted(m2, _CANDIDATES[:, None] * CALIBRATION_LEVELS_M2[None, :], side="right") / len(m2)
    return float(_CANDIDATES[np.argmin(((inside - nominal) ** 2).sum(1))])


# -- station offsets -------------------------------------------------------------------


@dataclass(frozen=True)
class StationOffsets:
    """Estimated per-station level offsets, arrays (R,) in :data:`STATION_IDS` order.

    Attributes:
        offsets_db: measured minus expected level, dB; 0 where ``counts < min_recordings``.
        counts: labelled recordings that informed each station's estimate.
        min_recordings: the count below which a station's offset is left at 0.
        absolute: True when transmit powers were known (offsets against the
            propagation model itself); False when only relative offsets could be
            estimated and the gauge is "median offset of the estimated stations = 0".
    """

    offsets_db: np.ndarray
    counts: np.ndarray
    min_recordings: int
    absolute: bool

    def as_list(self) -> list[float]:
        """The offsets as the JSON list stored in a dataset's config (``station_offsets_db``)."""
        return [round(float(v), 3) for v in self.offsets_db]

    def summary(self) -> str:
        """One line per station: id, offset, count (the report of an import)."""
        return "\n".join(
            f"{sid:>10}: {off:+6.2f} dB from {n} recording(s)" + ("" if n >= self.min_recordings else " (too few: 0)")
            for sid, off, n in zip(STATION_IDS, self.offsets_db, self.counts, strict=True)
        )


def iq_signal_level_dbm(iq: np.ndarray, snr_db: np.ndarray | None, reference_dbm: float) -> np.ndarray:
    """Each receiver's signal level as the features see it: mean ``|x|^2`` of the IQ, in dBm.

    Where the link's SNR is known, the noise share is removed
    (``S = P / (1 + 10^(-snr/10))``); where it is NaN the total power stands.
    All-zero IQ (a receiver that did not record) gives ``-inf``.

    Args:
        iq: complex (N, R, T) at the stored scale.
        snr_db: (N, R) SNR of each link (NaN: unknown), or None.
        reference_dbm: the power ``|x|^2 = 1`` represents.

    Returns:
        float64 (N, R) dBm.
    """
    x = np.asarray(iq)
    power = np.empty(x.shape[:-1])
    flat, out = x.reshape(-1, x.shape[-1]), power.reshape(-1)
    for start in range(0, flat.shape[0], 256):  # float64 a block at a time: bounded memory
        block = flat[start:start + 256].astype(np.complex128)
        out[start:start + 256] = np.mean(block.real**2 + block.imag**2, axis=-1)
    with np.errstate(divide="ignore"):
        level = 10.0 * np.log10(power) + reference_dbm
    if snr_db is not None:
        noise_share = 10.0 * np.log10(1.0 + 10.0 ** (-np.asarray(snr_db, dtype=np.float64) / 10.0))
        level = level - np.where(np.isfinite(noise_share), noise_share, 0.0)
    return level


def estimate_station_offsets(
    level_dbm: np.ndarray,
    labels: Mapping[str, np.ndarray],
    config: GeneratorConfig = GeneratorConfig(),
    *,
    margin_sigmas: float = 2.0,
    min_recordings: int = 5,
) -> StationOffsets:
    """Estimate each station's level offset from recordings of known transmitters.

    Model of a heard link ``i`` of recording ``n`` (the one :mod:`heimdall.scene` draws)::

        level[n, i] = P_tx[n] + mean_rx_power_dbm(0, d[n, i], f[n]) + offset[i] + X[n, i]

    Least squares over the usable links, alternating between the offsets and,
    where a recording's transmit power is unknown (NaN), that recording's common
    term ``P_tx[n]``; a recording of unknown power needs two usable links to say
    anything. Without any known power only differences between stations are
    identifiable: the gauge is then fixed by setting the median offset of the
    estimated stations to 0 (``absolute`` False).

    Which links are usable matters more than the fit. Near the detection threshold
    a link is heard only when its shadowing happened to be favourable, so the
    heard links of a weak station read high, and keeping only links *measured*
    strong makes that worse (it selects on the shadowing itself). So, after a
    first fit on every heard link, the fit is repeated on the links whose
    *expected* SNR (fitted level minus the station's noise floor, read from the
    IQ level and the ``snr_db`` label) clears ``config.snr_threshold_db`` by
    ``margin_sigmas`` shadowing sigmas: those are heard whatever their shadowing.
    Stations without a known SNR keep every heard link (and that bias).

    Args:
        level_dbm: (N, R) measured signal level, normally :func:`iq_signal_level_dbm`
            of the recordings (the level the network sees).
        labels: shard labels (N,)/(N, R): ``tx_lat``, ``tx_lon``, ``frequency_hz``,
            ``heard``, and optionally ``tx_power_dbm`` and ``snr_db`` (NaN: unknown).
            Recordings without a finite position or frequency are ignored.
        config: the propagation model (path-loss exponent, system gain, d0,
            shadowing sigma, SNR threshold).
        margin_sigmas: how far above the threshold the expected SNR must lie.
        min_recordings: stations informed by fewer recordings keep offset 0.

    Returns:
        The offsets and per-station counts of recordings used.

    Raises:
        DataError: arrays of the wrong shape, or ``min_recordings < 1``.
    """
    if min_recordings < 1:
        raise DataError(f"min_recordings must be >= 1, got {min_recordings}; fix: pass e.g. 5")
    links = _OffsetLinks.build(level_dbm, labels, config)
    fit = _fit(links, links.heard, min_recordings)
    floor = links.noise_floor_dbm()
    power = fit.p
    for _ in range(3):
        expected_snr = links.model_dbm + power[:, None] + fit.c[None, :] - floor[None, :]
        strong = ~(expected_snr < config.snr_threshold_db + margin_sigmas * config.shadowing_sigma_db)
        fit = _fit(links, links.heard & strong, min_recordings)
        power = np.where(fit.used.any(1), fit.p, power)  # a recording left out keeps its last estimate
    absolute = bool((links.known_power & fit.used.any(1)).any())
    offsets = fit.c
    if not absolute and fit.enough.any():
        offsets = offsets - np.median(offsets[fit.enough])
    counts = fit.used.sum(0).astype(np.int64)
    return StationOffsets(np.where(fit.enough, offsets, 0.0), counts, min_recordings, absolute)


@dataclass(frozen=True)
class _OffsetLinks:
    """Per link (N, R): level minus the model's expectation at 0 dBm transmit power and known
    transmit power (``y``), which links are heard with a finite level, and the data for noise floors."""

    y: np.ndarray
    heard: np.ndarray
    known_power: np.ndarray
    noise_dbm: np.ndarray  # level - snr_db: the noise power as it appears in the IQ, NaN where unknown
    model_dbm: np.ndarray  # expected level at 0 dBm plus the known transmit power (0 where unknown)

    @classmethod
    def build(cls, level_dbm: np.ndarray, labels: Mapping[str, np.ndarray], config: GeneratorConfig) -> _OffsetLinks:
        level = np.asarray(level_dbm, dtype=np.float64)
        n, r = len(np.asarray(labels["tx_lat"])), len(STATION_IDS)
        if level.shape != (n, r):
            raise DataError(f"level_dbm must have shape (N, R) = ({n}, {r}) (one column per station), got {level.shape}; "
                            "fix: measure every station's level (NaN or -inf where not heard)")

        def column(key: str, shape: tuple[int, ...]) -> np.ndarray:
            value = np.asarray(labels.get(key, np.full(shape, np.nan)), dtype=np.float64)
            if value.shape != shape:
                raise DataError(f"labels[{key!r}] must have shape {shape}, got {value.shape}; "
                                f"fix: pass the labels of the same recordings as level_dbm")
            return value

        lat, lon, freq = (column(k, (n,)) for k in ("tx_lat", "tx_lon", "frequency_hz"))
        power, snr, heard = column("tx_power_dbm", (n,)), column("snr_db", (n, r)), column("heard", (n, r)) > 0
        located = np.isfinite(lat) & np.isfinite(lon) & np.isfinite(freq) & (freq > 0)
        frame = default_frame()
        east, north = frame.to_local(np.where(located, lat, frame.origin_lat), np.where(located, lon, frame.origin_lon))
        dist = np.linalg.norm(np.stack([east, north], -1)[:, None, :] - frame.stations_local()[None], axis=-1)
        known_power = np.isfinite(power)
        model = mean_rx_power_dbm(config, np.where(known_power, power, 0.0)[:, None], dist,
                                  np.where(located, freq, 1e8)[:, None])
        ok = located[:, None] & heard & np.isfinite(level)
        return cls(np.where(ok, level - model, np.nan), ok, known_power, np.where(ok, level - snr, np.nan), model)

    def noise_floor_dbm(self) -> np.ndarray:
        """Each station's noise power in the IQ (R,), median over its links; NaN where no SNR is known."""
        finite = np.isfinite(self.noise_dbm)
        out = np.full(self.y.shape[1], np.nan)
        for i in np.flatnonzero(finite.any(0)):
            out[i] = np.median(self.noise_dbm[finite[:, i], i])
        return out


@dataclass(frozen=True)
class _Fit:
    c: np.ndarray  # offsets (R,), not yet gauge-fixed
    p: np.ndarray  # transmit power of unknown-power recordings (N,), 0 where known
    used: np.ndarray  # links that informed the fit (N, R)
    enough: np.ndarray  # stations with at least min_recordings (R,)


def _fit(links: _OffsetLinks, usable: np.ndarray, min_recordings: int) -> _Fit:
    """Least squares on ``usable`` links, after dropping stations with too few informative recordings."""
    enough = np.ones(links.y.shape[1], dtype=bool)
    for _ in range(links.y.shape[1] + 1):  # dropping a station can make others' recordings uninformative
        used = usable & enough[None, :]
        # Without a known power, a recording's single link only measures its own P_tx.
        used &= (links.known_power | (used.sum(1) >= 2))[:, None]
        now = used.sum(0) >= min_recordings
        if np.array_equal(now & enough, enough):
            break
        enough &= now
    c, p = _alternating_least_squares(np.where(used, links.y, np.nan), links.known_power)
    return _Fit(c, p, used, enough)


def _alternating_least_squares(y: np.ndarray, known_power: np.ndarray,
                               iterations: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(c, p) minimising sum (y - p_n - c_i)^2 over finite y, with p_n = 0 where the power is known."""
    finite = np.isfinite(y)
    counts_r = np.maximum(finite.sum(0), 1)
    counts_n = np.maximum(finite.sum(1), 1)
    yz = np.where(finite, y, 0.0)
    c = np.zeros(y.shape[1])
    p = np.zeros(y.shape[0])
    for _ in range(iterations):
        p = np.where(known_power, 0.0, (yz - c[None, :] * finite).sum(1) / counts_n)
        new = (yz - p[:, None] * finite).sum(0) / counts_r
        if np.max(np.abs(new - c), initial=0.0) < 1e-9:
            return new, p
        c = new
    return c, p
