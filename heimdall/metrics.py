"""Localization metrics for a predicted 2-D Gaussian: error, calibration, sharpness.

Positions are in the local east/north frame of
:func:`heimdall.geometry.default_frame`, in km, and errors are Euclidean in
that plane. Over this network (a few hundred km across) plane and
great-circle distances agree to better than 0.1%, so the plane is used
everywhere and latitude/longitude only at the edges.

Calibration uses the squared Mahalanobis distance ``m^2`` of the truth from the
predicted mean, which follows chi^2 with 2 degrees of freedom when the
prediction is a calibrated Gaussian. For 2 dof, ``P(m^2 <= k^2) = 1 - exp(-k^2/2)``:

======== ============ =========
ellipse  ``m^2 <=``   nominal
======== ============ =========
1 sigma  1            0.3935
2 sigma  4            0.8647
95%      5.991        0.95
======== ============ =========

Example::

    report = localization_report(mean_km, cov_km2, true_km)
    print(format_reports({"oracle": oracle_report, "model": report}))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "CHI2_2DOF_95",
    "NOMINAL_COVERAGE",
    "LocalizationReport",
    "localization_report",
    "covariance_from_sigmas",
    "ellipse_from_covariance",
    "format_reports",
]

CHI2_2DOF_95 = -2.0 * math.log(0.05)  # 5.991; k = sqrt = 2.448
# Coverage name -> (m^2 threshold, nominal probability under chi^2(2)).
NOMINAL_COVERAGE: dict[str, tuple[float, float]] = {
    "coverage_1sigma": (1.0, 1.0 - math.exp(-0.5)),
    "coverage_2sigma": (4.0, 1.0 - math.exp(-2.0)),
    "coverage_95": (CHI2_2DOF_95, 0.95),
}


@dataclass(frozen=True)
class LocalizationReport:
    """Summary of N predictions against the truth; distances in km.

    Attributes:
        n: number of predictions.
        median_km, p90_km, rmse_km, mean_km: statistics of the Euclidean error.
        coverage_1sigma, coverage_2sigma, coverage_95: fraction of truths inside
            the predicted 1-sigma, 2-sigma and 95% ellipses (nominal 0.3935,
            0.8647, 0.95).
        coverage_mad: mean absolute deviation of the three coverages from nominal.
        nll_km: mean negative log-likelihood of the truth under the predicted
            Gaussian, positions in km (so the density is per km^2).
        sharpness_km: median of ``det(cov)^(1/4)``, i.e. ``sqrt(sigma_x*sigma_y)``
            for an axis-aligned ellipse.
    """

    n: int
    median_km: float
    p90_km: float
    rmse_km: float
    mean_km: float
    coverage_1sigma: float
    coverage_2sigma: float
    coverage_95: float
    coverage_mad: float
    nll_km: float
    sharpness_km: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict of every field, e.g. for logging to a tracker."""
        return dataclasses.asdict(self)

    def ratio_to(self, other: LocalizationReport) -> float:
        """Median error relative to another report (1.0 = as good as ``other``).

        Args:
            other: the yardstick, usually the Bayes oracle on the same recordings.

        Returns:
            ``self.median_km / other.median_km``.

        Raises:
            ValueError: when ``other.median_km`` is not positive.
        """
        if not other.median_km > 0:
            raise ValueError(
                f"ratio_to needs a positive reference median, got {other.median_km}; "
                "compare against a report computed on non-degenerate recordings"
            )
        return self.median_km / other.median_km


def localization_report(pred_mean_km: np.ndarray, pred_cov_km2: np.ndarray, true_km: np.ndarray) -> LocalizationReport:
    """Score predicted Gaussians (mean, covariance) against true positions.

    Args:
        pred_mean_km: predicted (east, north) km, shape (N, 2).
        pred_cov_km2: predicted covariance in km^2, shape (N, 2, 2), symmetric
            positive definite.
        true_km: true (east, north) km, shape (N, 2).

    Returns:
        The :class:`LocalizationReport`.

    Raises:
        ValueError: on wrong shapes, N == 0, non-finite values, or a covariance
            that is not symmetric positive definite.
    """
    mean, cov, true = _validated(pred_mean_km, pred_cov_km2, true_km)
    delta = true - mean
    err = np.hypot(delta[:, 0], delta[:, 1])
    m2 = _mahalanobis_sq(delta, cov)
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
    coverages = {name: float(np.mean(m2 <= thr)) for name, (thr, _) in NOMINAL_COVERAGE.items()}
    mad = float(np.mean([abs(coverages[name] - nominal) for name, (_, nominal) in NOMINAL_COVERAGE.items()]))
    nll = math.log(2.0 * math.pi) + 0.5 * np.log(det) + 0.5 * m2
    return LocalizationReport(
        n=int(err.shape[0]),
        median_km=float(np.median(err)),
        p90_km=float(np.percentile(err, 90)),
        rmse_km=float(np.sqrt(np.mean(err**2))),
        mean_km=float(np.mean(err)),
        coverage_mad=mad,
        nll_km=float(np.mean(nll)),
        sharpness_km=float(np.median(det**0.25)),
        **coverages,
    )


def _mahalanobis_sq(delta: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``delta^T cov^-1 delta`` per row, with the closed-form 2x2 inverse."""
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    det = a * c - b * b
    x, y = delta[:, 0], delta[:, 1]
    return (c * x * x - 2.0 * b * x * y + a * y * y) / det


def _validated(mean: ArrayLike, cov: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if mean.ndim != 2 or mean.shape[1] != 2 or mean.shape[0] == 0:
        raise ValueError(f"pred_mean_km must have shape (N, 2) with N >= 1, got {mean.shape}; stack (east, north) km per row")
    n = mean.shape[0]
    if true.shape != (n, 2):
        raise ValueError(f"true_km must have shape {(n, 2)} like pred_mean_km, got {true.shape}; pass one true position per prediction")
    if cov.shape != (n, 2, 2):
        raise ValueError(f"pred_cov_km2 must have shape {(n, 2, 2)}, got {cov.shape}; use covariance_from_sigmas() to build it from sigmas")
    for name, arr in (("pred_mean_km", mean), ("pred_cov_km2", cov), ("true_km", true)):
        bad = ~np.isfinite(arr.reshape(n, -1)).all(1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite, got {arr[i].tolist()} at row {i} ({int(bad.sum())} bad rows); drop or fix those predictions")
    _check_spd(cov, "pred_cov_km2")
    return mean, cov, true


def _check_spd(cov: np.ndarray, name: str) -> None:
    """Raise unless every 2x2 matrix is symmetric positive definite."""
    scale = np.abs(cov).max(axis=(1, 2))
    asym = np.abs(cov[:, 0, 1] - cov[:, 1, 0]) > 1e-9 * np.maximum(scale, 1e-300)
    if asym.any():
        i = int(np.argmax(asym))
        raise ValueError(f"{name} must be symmetric, got {cov[i].tolist()} at row {i}; symmetrise it as (C + C^T) / 2")
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    bad = ~((cov[:, 0, 0] > 0) & (det > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be positive definite (var_east > 0 and det > 0), got {cov[i].tolist()} at row {i} "
            f"({int(bad.sum())} bad rows); predict positive sigmas and |rho| < 1"
        )


def covariance_from_sigmas(sigma_east: ArrayLike, sigma_north: ArrayLike, rho: ArrayLike | None = None) -> np.ndarray:
    """Build (N, 2, 2) covariances from per-axis standard deviations and a correlation.

    Args:
        sigma_east: std along east, km, shape (N,) or scalar (broadcasts).
        sigma_north: std along north, km, same shape rules.
        rho: east/north correlation in (-1, 1); ``None`` means 0.

    Returns:
        Covariance matrices in km^2, shape (N, 2, 2).

    Raises:
        ValueError: when a sigma is not finite and positive or ``|rho| >= 1``.
    """
    se, sn, r = np.broadcast_arrays(
        np.atleast_1d(np.asarray(sigma_east, dtype=np.float64)),
        np.atleast_1d(np.asarray(sigma_north, dtype=np.float64)),
        np.atleast_1d(np.asarray(0.0 if rho is None else rho, dtype=np.float64)),
    )
    if se.ndim != 1:
        raise ValueError(f"sigmas must be scalars or 1-D arrays, got shape {se.shape}; flatten them to (N,)")
    for name, s in (("sigma_east", se), ("sigma_north", sn)):
        bad = ~(np.isfinite(s) & (s > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite and > 0, got {s[i]} at index {i}; clamp it, e.g. softplus + epsilon")
    bad = ~(np.abs(r) < 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"rho must lie in (-1, 1), got {r[i]} at index {i}; squash it, e.g. with tanh")
    cov = np.empty(se.shape + (2, 2))
    cov[:, 0, 0] = se * se
    cov[:, 1, 1] = sn * sn
    cov[:, 0, 1] = cov[:, 1, 0] = r * se * sn
    return cov


def ellipse_from_covariance(cov: ArrayLike, k: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-axes and orientation of the ``k``-sigma ellipse of each covariance.

    Convention: ``rotation_deg`` is the **bearing of the major axis**, in degrees
    clockwise from north, in [0, 180) (an axis has no direction, so 180 deg is
    the same as 0 deg). An ellipse elongated north-south has rotation 0, one
    elongated east-west has rotation 90. This is the convention of mapping
    consumers (an azimuth), not the mathematical counter-clockwise-from-east
    angle. A circle reports rotation 0.

    Args:
        cov: covariance in km^2, shape (2, 2) or (N, 2, 2), (east, north) order.
        k: scale of the ellipse in sigmas (2.448 gives the 95% ellipse in 2-D).

    Returns:
        ``(semi_major, semi_minor, rotation_deg)``, each of shape (N,) (or scalar
        arrays for a single (2, 2) input), axes in the units of sqrt(cov) (km).

    Raises:
        ValueError: on a wrong shape, ``k <= 0`` or a covariance that is not
            symmetric positive definite.
    """
    c = np.asarray(cov, dtype=np.float64)
    single = c.shape == (2, 2)
    c = c[None] if single else c
    if c.ndim != 3 or c.shape[1:] != (2, 2):
        raise ValueError(f"cov must have shape (2, 2) or (N, 2, 2), got {np.shape(cov)}")
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"k must be finite and > 0, got {k}; use 1 for 1-sigma, 2.448 for 95%")
    if not np.isfinite(c).all():
        raise ValueError("cov must be finite; found NaN or inf")
    _check_spd(c, "cov")
    a, b, d = c[:, 0, 0], c[:, 0, 1], c[:, 1, 1]
    half_gap = np.hypot((a - d) / 2.0, b)
    lam_major = (a + d) / 2.0 + half_gap
    lam_minor = np.maximum((a + d) / 2.0 - half_gap, 0.0)
    # Major eigenvector (east, north) is along (b, lam_major - a) or (lam_major - d, b).
    ve = np.where(a >= d, lam_major - d, b)
    vn = np.where(a >= d, b, lam_major - a)
    rotation = np.degrees(np.arctan2(ve, vn)) % 180.0
    rotation = np.where(half_gap == 0.0, 0.0, rotation)
    rotation = np.where(np.isclose(rotation, 180.0), 0.0, rotation)
    out = (k * np.sqrt(lam_major), k * np.sqrt(lam_minor), rotation)
    return tuple(x[0] for x in out) if single else out  # type: ignore[return-value]


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "n", "{:>6d}"),
    ("median_km", "median", "{:>8.2f}"),
    ("p90_km", "p90", "{:>8.2f}"),
    ("rmse_km", "rmse", "{:>8.2f}"),
    ("coverage_1sigma", "cov1s", "{:>7.3f}"),
    ("coverage_2sigma", "cov2s", "{:>7.3f}"),
    ("coverage_95", "cov95", "{:>7.3f}"),
    ("coverage_mad", "MAD", "{:>7.3f}"),
    ("nll_km", "NLL", "{:>7.2f}"),
    ("sharpness_km", "sharp", "{:>8.2f}"),
)


def format_reports(rows: dict[str, LocalizationReport]) -> str:
    """A fixed-width text table of reports, one row per name, distances in km.

    When a row is named ``"oracle"``, a last column gives each row's median
    error relative to it (:meth:`LocalizationReport.ratio_to`).

    Args:
        rows: name -> report, printed in insertion order.

    Returns:
        The table as one string (header, rule, rows), no trailing newline.
    """
    name_w = max([len("name")] + [len(name) for name in rows])
    widths = [len(fmt.format(0 if key == "n" else 0.0)) for key, _, fmt in _COLUMNS]
    header = [f"{'name':<{name_w}}"] + [f"{label:>{w}}" for (_, label, _), w in zip(_COLUMNS, widths)]
    oracle = rows.get("oracle")
    if oracle is not None:
        header.append(f"{'/oracle':>8}")
    lines = [" ".join(header)]
    lines.append("-" * len(lines[0]))
    for name, rep in rows.items():
        cells = [f"{name:<{name_w}}"] + [fmt.format(getattr(rep, key)) for key, _, fmt in _COLUMNS]
        if oracle is not None:
            cells.append(f"{rep.ratio_to(oracle):>8.3f}" if oracle.median_km > 0 else f"{'n/a':>8}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
