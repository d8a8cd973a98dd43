"""The Bayes oracle: the exact posterior of the transmitter position under the
generator's own model, and the centre baseline.

The oracle inverts exactly the likelihood of :mod:`heimdall.scene`, so its
error is the floor any learned model can approach on the same data; a model's
median error divided by the oracle's (``LocalizationReport.ratio_to``) is the
honest score.

Model inverted, per recording (see :mod:`heimdall.scene`)::

    position x ~ inside_hull_fraction * U(hull) + (1 - inside_hull_fraction) * U(ring)
    P_tx       ~ U(tx_power_dbm)
    P_rx,i     = mean_rx_power_dbm(P_tx, |x - s_i|, f) + X_i + D_i,
                 X_i ~ N(0, sigma^2) shadowing,  D_i ~ N(0, s^2) unknown gain drift
    heard_i    = P_rx,i >= noise_floor_i + snr_threshold_db

Likelihood of one recording given (x, P_tx): each heard receiver contributes the
Gaussian density of its observed power; each receiver that did not hear
contributes the censoring probability ``Phi((noise_floor_i + threshold - mean_i) / sigma)``
(``sigma`` here is ``hypot(sigma, s)``, see below).
A heard receiver's power is already at or above its threshold, and the joint
law of (heard_i, P_rx,i) on that event is just the Gaussian density, so no
extra term appears. ``P_tx`` is marginalised on a grid, the position on a grid
of cells covering the prior's support; everything is done in log space.

Three facts the posterior relies on:

- **The min_heard redraw cancels.** ``sample_scene`` keeps a recording only if
  at least ``min_heard`` receivers heard, an event A that is a function of the
  observation alone. For an observation y in A,
  ``p(x | y, A) = p(x) p(y | x) 1_A(y) / p(y, A) ∝ p(x) p(y | x)``: the
  selection changes the marginal law of x in a dataset, not the posterior.
- **Calibration-free powers.** The oracle is given the scene's received
  power (before each station's calibration offset): what a perfect power
  estimator would extract from the IQ once the network's fixed, known
  calibration offsets are removed. With gain drift on, that power still holds
  the drift, as the IQ does; the drift is not given.
- **The unknown gain drift is marginalised exactly.** ``D_i`` is Gaussian,
  independent across recordings and stations and of ``X_i``, and the heard
  flag depends on ``P_rx,i`` only (the drift moves the signal, not the noise),
  so ``X_i + D_i ~ N(0, sigma^2 + s^2)`` and integrating the drift out leaves
  the same likelihood with ``sigma`` replaced by ``hypot(sigma, s)``: in the
  densities of heard powers and in the censoring probabilities alike. With
  ``s = 0`` this is ``sigma`` exactly, so the drift-free oracle is unchanged.

Positions are (east, north) km in :func:`heimdall.geometry.default_frame`.

Example::

    oracle = BayesOracle(GeneratorConfig())
    mean_km, cov_km2 = oracle.predict_scene(scene)
    report = localization_report(mean_km, cov_km2, np.stack([scene.tx_east_km, scene.tx_north_km], -1))
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from heimdall.calibration import CALIBRATION_LEVELS_M2
from heimdall.errors import HeimdallError, collect_problems
from heimdall.geometry import default_frame
from heimdall.receivers import STATIONS
from heimdall.scene import GeneratorConfig, Scene, hull_polygon, mean_rx_power_dbm, region_of, station_params

__all__ = ["OracleConfig", "BayesOracle", "centre_baseline", "prior_grid"]


@dataclass(frozen=True)
class OracleConfig:
    """Numerical settings of the oracle's grids; none changes the model.

    Attributes:
        grid_spacing_km: side of the square position cells. 2 km is converged:
            halving it moves the median error by well under 2%.
        tx_power_step_db: step of the transmit-power quadrature. The power
            posterior is at least ``sigma / sqrt(R)`` (about 2.3 dB) wide, so
            0.5 dB resolves it.
        chunk_recordings: recordings evaluated together (vectorisation width).
        max_block_mb: budget of the largest temporary array (recordings x cells
            x powers, float32). Peak memory is about this plus the censoring
            table (receivers x cells x powers, float32: ~15 MB at 2 km, ~60 MB
            at 1 km).
    """

    grid_spacing_km: float = 2.0
    tx_power_step_db: float = 0.5
    chunk_recordings: int = 32
    max_block_mb: float = 64.0

    def __post_init__(self) -> None:
        p: list[str] = []
        if not 0.1 <= self.grid_spacing_km <= 20.0:
            p.append(f"grid_spacing_km must lie in [0.1, 20], got {self.grid_spacing_km}; 2 km is converged")
        if not 0.01 <= self.tx_power_step_db <= 3.0:
            p.append(f"tx_power_step_db must lie in [0.01, 3], got {self.tx_power_step_db}; 0.5 dB is converged")
        if self.chunk_recordings < 1:
            p.append(f"chunk_recordings must be >= 1, got {self.chunk_recordings}")
        if not self.max_block_mb >= 1.0:
            p.append(f"max_block_mb must be >= 1, got {self.max_block_mb}")
        collect_problems("OracleConfig", p)


def prior_grid(config: GeneratorConfig, oracle_config: OracleConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres covering the prior's support and the prior mass of each cell.

    The prior puts ``inside_hull_fraction`` uniformly over the hull and the rest
    uniformly over the ring up to ``outside_margin_km`` outside it; a cell
    belongs to the region of its centre.

    Args:
        config: generator parameters (hull fraction, margin).
        oracle_config: grid settings; defaults to :class:`OracleConfig`.

    Returns:
        ``(points_km (K, 2), prior (K,))`` with ``prior`` summing to 1.
    """
    h = (oracle_config or OracleConfig()).grid_spacing_km
    hull = hull_polygon(default_frame())
    margin = config.outside_margin_km if config.inside_hull_fraction < 1.0 else 0.0
    lo, hi = hull.min(0) - margin, hull.max(0) + margin
    axes = [np.arange(lo[i] + h / 2.0, hi[i], h) for i in range(2)]
    east, north = np.meshgrid(*axes, indexing="ij")
    points = np.stack([east.ravel(), north.ravel()], axis=-1)
    region = region_of(config, points, hull)
    points, region = points[region >= 0], region[region >= 0]
    n_in, n_out = int((region == 0).sum()), int((region == 1).sum())
    if n_in == 0:
        raise HeimdallError(f"grid_spacing_km={h} leaves no cell centre inside the hull; use a finer grid (e.g. 2 km)")
    f_in = config.inside_hull_fraction if n_out else 1.0
    prior = np.where(region == 0, f_in / n_in, (1.0 - f_in) / max(n_out, 1))
    # Cells of an empty region (hull fraction 0 or 1) carry no mass: drop them.
    return points[prior > 0], prior[prior > 0]


def centre_baseline(
    config: GeneratorConfig, n: int, oracle_config: OracleConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Predict the network centre (the frame origin) for every recording.

    The covariance is the prior's second moment about the origin,
    ``E[x x^T]`` (plus the within-cell variance), i.e. the expected squared
    error of this prediction under the prior, so coverage and NLL are
    meaningful. (Datasets keep only recordings somebody heard, which thins the
    far ring slightly; this covariance ignores that.)

    Args:
        config: generator parameters defining the prior.
        n: number of recordings.
        oracle_config: grid settings; defaults to :class:`OracleConfig`.

    Returns:
        ``(mean (n, 2) zeros, cov (n, 2, 2))`` in km and km^2.

    Raises:
        ValueError: when ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}; pass the number of recordings to predict")
    oc = oracle_config or OracleConfig()
    points, prior = prior_grid(config, oc)
    second = np.einsum("k,ki,kj->ij", prior, points, points) + np.eye(2) * oc.grid_spacing_km**2 / 12.0
    return np.zeros((n, 2)), np.broadcast_to(second, (n, 2, 2)).copy()


class BayesOracle:
    """Exact grid posterior of the transmitter position under the generator's model.

    Construction precomputes the prior grid and a table of censoring
    log-probabilities for every (receiver, cell, transmit power); each call
    then groups recordings by which receivers heard them, so the censored part
    is summed once per group.

    Recordings heard by every receiver (most of them) have no censored term,
    and their transmit-power integral is done in closed form; the others use
    the ``tx_power_step_db`` grid.

    Args:
        config: the generator whose model is inverted.
        oracle_config: grid settings; defaults to :class:`OracleConfig`.

    Attributes:
        grid_km: (K, 2) centres of the position cells, the support of
            :meth:`posterior_weights`.
    """

    def __init__(self, config: GeneratorConfig, oracle_config: OracleConfig | None = None) -> None:
        self.config = config
        self.oracle_config = oracle_config or OracleConfig()
        # Shadowing and the unknown gain drift integrated out (module docstring).
        self._sigma = float(np.hypot(config.shadowing_sigma_db, config.gain_drift_sigma_db))
        self.grid_km, prior = prior_grid(config, self.oracle_config)
        self._log_prior = np.log(prior)
        self._f_span = (min(b[0] for b in config.bands_hz), max(b[1] for b in config.bands_hz))
        self._gain = self._distance_gain_db()
        self._u_edges, self._u = self._power_grid()
        self._log_censored = self._censoring_table()
        self._outer = (self.grid_km[:, :, None] * self.grid_km[:, None, :]).reshape(-1, 4)

    # -- construction ---------------------------------------------------------

    def _offset_db(self, frequency_hz: np.ndarray | float) -> np.ndarray:
        """``mean_rx_power_dbm`` at zero transmit power and the reference distance."""
        d0 = np.asarray(self.config.reference_distance_km)
        return mean_rx_power_dbm(self.config, 0.0, d0, frequency_hz)

    def _distance_gain_db(self) -> np.ndarray:
        """Frequency-free part of the mean power, g (K, R): mean = P_tx + offset(f) + g.

        The oracle relies on the model separating into a frequency term and a
        distance term; this is checked against scene.py so a change there
        cannot silently desynchronise the two.
        """
        stations = default_frame().stations_local()
        dist = np.linalg.norm(self.grid_km[:, None, :] - stations[None], axis=-1)
        f_lo, f_hi = self._f_span
        gains = [mean_rx_power_dbm(self.config, 0.0, dist, f) - self._offset_db(f) for f in (f_lo, f_hi)]
        if not np.allclose(gains[0], gains[1], atol=1e-9):
            raise HeimdallError(
                "scene.mean_rx_power_dbm no longer separates into a frequency term plus a distance term; "
                "the oracle's power grid assumes it does, so update heimdall/oracle.py with the model"
            )
        return gains[0]

    def _power_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Cells of u = P_tx + offset(f), wide enough for every carrier in the bands."""
        step = self.oracle_config.tx_power_step_db
        a, b = self.config.tx_power_dbm
        f_lo, f_hi = self._f_span
        u_lo, u_hi = a + float(self._offset_db(f_hi)), b + float(self._offset_db(f_lo))
        n_cells = max(1, int(np.ceil((u_hi - u_lo) / step - 1e-9)))
        edges = u_lo + step * np.arange(n_cells + 1)
        return edges, (edges[:-1] + edges[1:]) / 2.0

    def _censoring_table(self) -> np.ndarray:
        """log P(not heard | cell, u) per receiver, (R, K, M) float32."""
        floor = station_params(self.config).noise_floor_dbm + self.config.snr_threshold_db
        sigma = self._sigma
        table = np.empty((len(STATIONS), len(self.grid_km), len(self._u)), dtype=np.float32)
        for j in range(len(STATIONS)):
            z = (floor[j] - self._gain[:, j, None] - self._u[None, :]) / sigma
            table[j] = log_ndtr(z)
        return table

    # -- public API -----------------------------------------------------------

    def posterior(
        self, rx_power_dbm: np.ndarray, heard: np.ndarray, frequency_hz: np.ndarray, *, ellipse: str = "moments"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and covariance of the transmitter position.

        The exact posterior is not Gaussian (it is peaked with long tails along the
        unknown-power ridge), so its moment covariance over-covers at 1σ (about 47%
        of truths fall inside the 1σ ellipse instead of 39.3%) and is nearly right
        at 2σ. ``ellipse="calibrated"`` keeps the mean and the ellipse's shape but
        scales the covariance per recording so that the posterior's own mass inside
        the 1σ and 2σ ellipses is as close as possible to 39.3/86.5% (least
        squares at m² = 1 and 4, as
        :mod:`heimdall.calibration` does for models): since the posterior is exact, the coverage
        of those ellipses over many recordings then matches their posterior mass.

        Args:
            rx_power_dbm: calibration-free received power, (N, R) in
                :data:`~heimdall.receivers.STATIONS` order; only entries where
                ``heard`` is true are read (others may be NaN). A heard power
                below its receiver's threshold is impossible under the model
                but is not rejected: its Gaussian density is used as is.
            heard: boolean (or integer 0/1) (N, R), whether each receiver heard the recording.
                A recording heard by nobody is valid: its posterior is the prior
                reweighted by the all-censored likelihood.
            frequency_hz: carrier frequency (N,), within the generator's bands' span.
            ellipse: ``"moments"`` (the exact posterior covariance) or ``"calibrated"``.

        Returns:
            ``(mean (N, 2) km, cov (N, 2, 2) km^2)`` in the default frame. The
            covariance includes the within-cell variance ``h^2/12``, so it is
            positive definite even for a posterior concentrated in one cell.

        Raises:
            ValueError: on wrong shapes or dtypes, non-finite heard powers, or
                frequencies outside the generator's bands.
        """
        if ellipse not in ("moments", "calibrated"):
            raise ValueError(f"ellipse must be 'moments' or 'calibrated', got {ellipse!r}")
        y, hd, f = self._validated(rx_power_dbm, heard, frequency_hz)
        mean = np.empty((len(f), 2))
        cov = np.empty((len(f), 2, 2))
        for idx, w in self._weight_chunks(y, hd, f):
            mean[idx], cov[idx] = self._moments(w)
            if ellipse == "calibrated":
                cov[idx] *= coverage_matched_scale(w, self.grid_km, mean[idx], cov[idx])[:, None, None]
        return mean, cov

    def posterior_weights(self, rx_power_dbm: np.ndarray, heard: np.ndarray, frequency_hz: np.ndarray) -> np.ndarray:
        """The full grid posterior: mass of each cell of :attr:`grid_km` per recording.

        Same arguments and errors as :meth:`posterior`. Returns an (N, K) float64
        array whose rows sum to 1; it takes N x K x 8 bytes (about 0.1 MB per
        recording at 2 km), so call it on few recordings at a time.
        """
        y, hd, f = self._validated(rx_power_dbm, heard, frequency_hz)
        out = np.empty((len(f), len(self.grid_km)))
        for idx, w in self._weight_chunks(y, hd, f):
            out[idx] = w
        return out

    def predict_scene(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`posterior` on a scene's true powers, heard flags and carriers."""
        return self.posterior(scene.rx_power_dbm, scene.heard, scene.frequency_hz)

    # -- internals ------------------------------------------------------------

    def _validated(self, rx: np.ndarray, heard: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.asarray(rx, dtype=np.float64)
        hd = np.asarray(heard)
        f = np.asarray(freq, dtype=np.float64)
        r = len(STATIONS)
        if y.ndim != 2 or y.shape[1] != r:
            raise ValueError(f"rx_power_dbm must have shape (N, {r}) (one column per receiver), got {y.shape}")
        if hd.shape != y.shape:
            raise ValueError(f"heard must have the shape of rx_power_dbm {y.shape}, got {hd.shape}")
        if hd.dtype != np.bool_:
            # Catalogues store flags as small integers; accept exactly 0/1.
            if not (np.issubdtype(hd.dtype, np.integer) and np.isin(hd, (0, 1)).all()):
                raise ValueError(f"heard must be boolean (or integer 0/1), got dtype {hd.dtype}; pass e.g. snr_db >= snr_threshold_db")
            hd = hd.astype(bool)
        if f.shape != (y.shape[0],):
            raise ValueError(f"frequency_hz must have shape ({y.shape[0]},) (one carrier per recording), got {f.shape}")
        bad = hd & ~np.isfinite(y)
        if bad.any():
            n = int(np.argwhere(bad)[0, 0])
            raise ValueError(f"rx_power_dbm must be finite where heard, got {y[n].tolist()} in recording {n}; fix the power estimate or mark it not heard")
        f_lo, f_hi = self._f_span
        out = ~(np.isfinite(f) & (f >= f_lo) & (f <= f_hi))
        if out.any():
            n = int(np.argmax(out))
            raise ValueError(f"frequency_hz must lie in the generator's bands' span [{f_lo:g}, {f_hi:g}] Hz, got {f[n]:g} in recording {n}; pass Hz, not MHz")
        return y, hd, f

    def _weight_chunks(self, y: np.ndarray, heard: np.ndarray, f: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (recording indices, normalised posterior weights (n, K)) chunk by chunk."""
        pattern = heard @ (1 << np.arange(heard.shape[1]))
        order = np.lexsort((f, pattern))  # by frequency within a pattern: chunks share u cells
        width = self.oracle_config.chunk_recordings
        for p in np.unique(pattern):
            members = order[pattern[order] == p]
            mask = heard[members[0]]
            censored = None if mask.all() else self._log_censored[~mask].sum(0, dtype=np.float64).astype(np.float32)
            for start in range(0, len(members), width):
                idx = members[start : start + width]
                yield idx, self._chunk_weights(y[idx][:, mask], mask, f[idx], censored)

    def _chunk_weights(self, y_h: np.ndarray, mask: np.ndarray, f: np.ndarray, censored: np.ndarray | None) -> np.ndarray:
        """Normalised posterior (n, K) for recordings sharing one heard pattern."""
        u_mean, resid_ss = self._heard_stats(y_h, mask)
        n_heard = int(mask.sum())
        a, b = self.config.tx_power_dbm
        if censored is None and b > a:
            log_post = self._log_power_marginal_exact(u_mean, n_heard, f)
        else:
            log_post = self._log_power_marginal_grid(u_mean, n_heard, f, censored)
        log_post += self._log_prior[None] - 0.5 * resid_ss / self._sigma**2
        log_post -= log_post.max(1, keepdims=True)
        w = np.exp(log_post)
        return w / w.sum(1, keepdims=True)

    def _log_power_marginal_grid(
        self, u_mean: np.ndarray, n_heard: int, f: np.ndarray, censored: np.ndarray | None
    ) -> np.ndarray:
        """log of sum over u cells of exp(-H (u - u_mean)^2 / 2 sigma^2 + censored) times
        the cell's prior mass, per (recording, cell); censored None means all heard.

        The (recordings, cells, powers) block is float32: it halves the time, and
        its ~1e-5 absolute error in log-likelihoods of order 1e2 changes no
        posterior weight measurably.
        """
        coef = np.float32(-0.5 * n_heard / self._sigma**2)
        log_w, cells = self._power_log_weights(f)
        log_w = log_w.astype(np.float32)[:, None, :]
        u = self._u[cells].astype(np.float32)
        u_mean32 = u_mean.astype(np.float32)
        out = np.empty(u_mean.shape)
        for ks in self._cell_slices(len(f), cells.stop - cells.start):
            block = u_mean32[:, ks, None] - u
            block *= block
            block *= coef
            if censored is not None:
                block += censored[ks, cells]
            block += log_w
            out[:, ks] = _logsumexp_last(block)
        return out

    def _log_power_marginal_exact(self, u_mean: np.ndarray, n_heard: int, f: np.ndarray) -> np.ndarray:
        """The same integral in closed form when nobody is censored (most recordings):
        the integrand is a Gaussian in u of std sigma / sqrt(H) on [a, b] + offset(f)."""
        a, b = self.config.tx_power_dbm
        scale = self._sigma / np.sqrt(n_heard)
        off = self._offset_db(f)[:, None]
        return _log_normal_mass((a + off - u_mean) / scale, (b + off - u_mean) / scale)

    def _heard_stats(self, y_h: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per (recording, cell): the mean of y_i - g_i over heard receivers (the
        u that best explains them) and the residual sum of squares about it.

        The heard Gaussians factor as ``prod_i N(y_i; u + g_i) ∝
        exp(-(S + H (u - u_mean)^2) / (2 sigma^2))``, so only these two matter.
        """
        n, h = y_h.shape
        if h == 0:
            zeros = np.zeros((n, len(self.grid_km)))
            return zeros, zeros
        g = self._gain[:, mask]
        g_mean = g.mean(1)
        yc = y_h - y_h.mean(1, keepdims=True)
        gc = g - g_mean[:, None]
        resid_ss = (yc**2).sum(1)[:, None] - 2.0 * yc @ gc.T + (gc**2).sum(1)[None, :]
        return y_h.mean(1, keepdims=True) - g_mean[None, :], np.maximum(resid_ss, 0.0)

    def _power_log_weights(self, f: np.ndarray) -> tuple[np.ndarray, slice]:
        """log prior mass of each u cell for each recording, on the cells any of them uses.

        u = P_tx + offset(f) is uniform on [a + offset(f), b + offset(f)]; a
        cell's mass is its overlap with that interval (constant factors dropped).
        """
        a, b = self.config.tx_power_dbm
        off = self._offset_db(f)[:, None]
        lo = np.maximum(self._u_edges[None, :-1], a + off)
        hi = np.minimum(self._u_edges[None, 1:], b + off)
        overlap = np.clip(hi - lo, 0.0, None)
        if a == b:  # a point mass: put it all in the cell that holds it
            overlap = ((self._u_edges[None, :-1] <= a + off) & (a + off <= self._u_edges[None, 1:])).astype(np.float64)
        used = np.flatnonzero(overlap.any(0))
        cells = slice(int(used[0]), int(used[-1]) + 1)
        with np.errstate(divide="ignore"):
            return np.log(overlap[:, cells]), cells

    def _cell_slices(self, n: int, m: int) -> Iterator[slice]:
        """Slices of grid cells keeping an (n, cells, m) float32 block under budget."""
        budget = int(self.oracle_config.max_block_mb * 2**20 / 4)
        step = max(1, budget // max(1, n * m))
        k = len(self.grid_km)
        for start in range(0, k, step):
            yield slice(start, min(start + step, k))

    def _moments(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (n, 2) and covariance (n, 2, 2) of grid weights, plus the cell variance."""
        mean = w @ self.grid_km
        second = (w @ self._outer).reshape(-1, 2, 2)
        cov = second - mean[:, :, None] * mean[:, None, :]
        cov += np.eye(2) * self.oracle_config.grid_spacing_km**2 / 12.0
        return mean, cov


# The same levels as the models' calibration (heimdall.calibration): 1σ and 2σ.
_LEVELS_M2 = CALIBRATION_LEVELS_M2
_NOMINAL = 1.0 - np.exp(-_LEVELS_M2 / 2.0)
_SCALES = np.exp(np.linspace(np.log(0.25), np.log(4.0), 97))


def coverage_matched_scale(w: np.ndarray, grid: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Per-recording factor c so that the posterior mass inside the ellipses of
    ``c * cov`` at m² = 1 and 4 (1σ, 2σ) is closest (least squares) to their nominal
    chi²(2) levels. ``w`` (n, K) are grid weights, ``grid`` (K, 2) the cells."""
    d = grid[None, :, :] - mean[:, None, :]
    inv = np.linalg.inv(cov)
    m2 = np.einsum("nki,nij,nkj->nk", d, inv, d)
    order = np.argsort(m2, axis=1)
    m2s = np.take_along_axis(m2, order, 1)
    cum = np.cumsum(np.take_along_axis(w, order, 1), axis=1)
    out = np.empty(len(w))
    thresholds = _SCALES[:, None] * _LEVELS_M2[None, :]
    for i in range(len(w)):
        pos = np.searchsorted(m2s[i], thresholds, side="right")
        mass = np.where(pos > 0, cum[i][np.maximum(pos - 1, 0)], 0.0)
        out[i] = _SCALES[np.argmin(((mass - _NOMINAL) ** 2).sum(1))]
    return out


def _log_normal_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails."""
    # In the upper tail use the mirror image, where log_ndtr keeps its precision.
    flip = lo > 0
    top = log_ndtr(np.where(flip, -lo, hi))
    bottom = log_ndtr(np.where(flip, -hi, lo))
    return top + np.log1p(-np.exp(bottom - top))


def _logsumexp_last(block: np.ndarray) -> np.ndarray:
    """log(sum(exp(block), -1)), overwriting ``block`` to save memory."""
    top = block.max(-1)
    block -= top[..., None]
    np.exp(block, out=block)
    return np.log(block.sum(-1)) + top
