"""Localization metrics: hand-computed values, calibration behaviour, the ellipse
convention, the table, and boundary validation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from heimdall.metrics import (
    NOMINAL_COVERAGE,
    LocalizationReport,
    covariance_from_sigmas,
    ellipse_from_covariance,
    format_reports,
    localization_report,
)

LOG_2PI = math.log(2.0 * math.pi)


def _hand_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two predictions whose every statistic is worked out in the test below."""
    mean = np.zeros((2, 2))
    cov = np.array([[[4.0, 0.0], [0.0, 1.0]], [[9.0, 0.0], [0.0, 9.0]]])
    true = np.array([[2.0, 1.0], [0.0, 3.0]])
    return mean, cov, true


def test_hand_computed_example() -> None:
    rep = localization_report(*_hand_example())
    # Row 0: sigma (2, 1), offset (2, 1): m^2 = 4/4 + 1/1 = 2, error sqrt(5), det 4.
    # Row 1: sigma 3 isotropic, offset (0, 3): m^2 = 9/9 = 1, error 3, det 81.
    err = np.array([math.sqrt(5.0), 3.0])
    nll0 = LOG_2PI + 0.5 * math.log(4.0) + 0.5 * 2.0
    nll1 = LOG_2PI + 0.5 * math.log(81.0) + 0.5 * 1.0
    assert rep.n == 2
    assert rep.median_km == pytest.approx(err.mean())
    assert rep.p90_km == pytest.approx(err[0] + 0.9 * (err[1] - err[0]))
    assert rep.rmse_km == pytest.approx(math.sqrt(7.0))
    assert rep.mean_km == pytest.approx(err.mean())
    assert rep.coverage_1sigma == 0.5  # m^2 = 1 lies on the 1-sigma ellipse: inside
    assert rep.coverage_2sigma == 1.0
    assert rep.coverage_95 == 1.0
    expected_mad = (abs(0.5 - 0.393469) + abs(1.0 - 0.864665) + abs(1.0 - 0.95)) / 3.0
    assert rep.coverage_mad == pytest.approx(expected_mad, abs=1e-6)
    assert rep.nll_km == pytest.approx((nll0 + nll1) / 2.0)
    assert rep.sharpness_km == pytest.approx((math.sqrt(2.0) + 3.0) / 2.0)  # det^(1/4): sqrt 2 and 3


def test_correlated_covariance_uses_full_inverse() -> None:
    cov = covariance_from_sigmas(1.0, 1.0, 0.5)  # [[1, .5], [.5, 1]], det 0.75
    rep = localization_report(np.zeros((1, 2)), cov, np.array([[1.0, 1.0]]))
    m2 = (1.0 - 0.5 - 0.5 + 1.0) / 0.75  # [1 1] C^-1 [1 1]^T = 4/3
    assert rep.nll_km == pytest.approx(LOG_2PI + 0.5 * math.log(0.75) + 0.5 * m2)
    assert rep.coverage_1sigma == 0.0 and rep.coverage_2sigma == 1.0


def _gaussian_truths(n: int, scale_cov: float, seed: int) -> LocalizationReport:
    """Random anisotropic, correlated Gaussians; truth drawn from them; the
    prediction's covariance is the true one times ``scale_cov``."""
    rng = np.random.default_rng(seed)
    cov = covariance_from_sigmas(rng.uniform(1, 40, n), rng.uniform(1, 40, n), rng.uniform(-0.9, 0.9, n))
    mean = rng.uniform(-100, 100, (n, 2))
    true = mean + np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.standard_normal((n, 2)))
    return localization_report(mean, cov * scale_cov, true)


def test_calibrated_gaussians_reach_nominal_coverage() -> None:
    n = 20_000
    rep = _gaussian_truths(n, 1.0, seed=0)
    for name, (_, nominal) in NOMINAL_COVERAGE.items():
        std = math.sqrt(nominal * (1 - nominal) / n)  # binomial std: 0.35, 0.24, 0.15 points
        assert abs(getattr(rep, name) - nominal) < 4 * std, name
    assert rep.coverage_mad < 0.01


def test_overconfident_predictions_undercover() -> None:
    # Predicted cov = true / 4, so m^2_pred = 4 m^2_true and P(m^2_pred <= 1) = 1 - exp(-1/8).
    n = 20_000
    rep = _gaussian_truths(n, 0.25, seed=1)
    expected = 1.0 - math.exp(-1.0 / 8.0)
    assert rep.coverage_1sigma == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))
    assert rep.coverage_95 < 0.6
    assert rep.coverage_mad > 0.3
    # An overconfident model also pays in NLL against the calibrated one.
    assert rep.nll_km > _gaussian_truths(n, 1.0, seed=1).nll_km + 1.0


@pytest.mark.parametrize(
    ("cov", "rotation"),
    [
        ([[1.0, 0.0], [0.0, 9.0]], 0.0),  # elongated north-south
        ([[9.0, 0.0], [0.0, 1.0]], 90.0),  # elongated east-west
        ([[5.0, 4.0], [4.0, 5.0]], 45.0),  # along north-east
        ([[5.0, -4.0], [-4.0, 5.0]], 135.0),  # along south-east / north-west
        ([[4.0, 0.0], [0.0, 4.0]], 0.0),  # a circle: defined as 0
    ],
)
def test_ellipse_rotation_is_bearing_of_major_axis(cov: list[list[float]], rotation: float) -> None:
    major, minor, rot = ellipse_from_covariance(np.array(cov))
    assert rot == pytest.approx(rotation, abs=1e-9)
    eig = np.linalg.eigvalsh(np.array(cov))
    assert major == pytest.approx(math.sqrt(eig[1]))
    assert minor == pytest.approx(math.sqrt(eig[0]))


def test_ellipse_scales_with_k_and_vectorises() -> None:
    cov = covariance_from_sigmas([3.0, 1.0], [1.0, 2.0], [0.0, 0.3])
    major, minor, rot = ellipse_from_covariance(cov, k=2.448)
    assert major.shape == minor.shape == rot.shape == (2,)
    assert major[0] == pytest.approx(2.448 * 3.0) and minor[0] == pytest.approx(2.448 * 1.0)
    assert rot[0] == pytest.approx(90.0)
    assert 0.0 <= rot[1] < 90.0  # positive correlation, north-dominant: between north and east


def test_covariance_from_sigmas_builds_matrices() -> None:
    cov = covariance_from_sigmas(np.array([2.0, 3.0]), np.array([1.0, 4.0]), np.array([0.5, -0.25]))
    np.testing.assert_allclose(cov[0], [[4.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(cov[1], [[9.0, -3.0], [-3.0, 16.0]])
    np.testing.assert_allclose(covariance_from_sigmas(2.0, 1.0)[0], [[4.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sigma_east=[0.0], sigma_north=[1.0]), "sigma_east must be finite and > 0"),
        (dict(sigma_east=[1.0], sigma_north=[np.nan]), "sigma_north must be finite and > 0"),
        (dict(sigma_east=[1.0], sigma_north=[1.0], rho=[1.0]), r"rho must lie in \(-1, 1\)"),
    ],
)
def test_covariance_from_sigmas_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        covariance_from_sigmas(**kwargs)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m, c, t: (m[:, :1], c, t), r"pred_mean_km must have shape \(N, 2\)"),
        (lambda m, c, t: (m[:0], c[:0], t[:0]), "N >= 1"),
        (lambda m, c, t: (m, c, t[:1]), r"true_km must have shape \(2, 2\)"),
        (lambda m, c, t: (m, c[:, :1], t), r"pred_cov_km2 must have shape \(2, 2, 2\)"),
        (lambda m, c, t: (np.where(np.eye(2, dtype=bool), np.nan, m), c, t), "pred_mean_km must be finite"),
        (lambda m, c, t: (m, c, np.full_like(t, np.inf)), "true_km must be finite"),
        (lambda m, c, t: (m, c * np.array([1.0, -1.0])[:, None, None], t), "must be positive definite"),
        (lambda m, c, t: (m, np.array([[[1.0, 2.0], [2.0, 1.0]]] * 2), t), "must be positive definite"),
        (lambda m, c, t: (m, np.array([[[1.0, 0.1], [0.0, 1.0]]] * 2), t), "must be symmetric"),
    ],
)
def test_report_validates_inputs(mutate, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        localization_report(*mutate(*_hand_example()))


def test_ellipse_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive definite"):
        ellipse_from_covariance(np.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="k must be finite and > 0"):
        ellipse_from_covariance(np.eye(2), k=0.0)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) or \(N, 2, 2\)"):
        ellipse_from_covariance(np.eye(3))


def test_format_reports_table_and_ratio() -> None:
    good = localization_report(*_hand_example())
    mean, cov, true = _hand_example()
    worse = localization_report(mean + 10.0, cov, true)
    table = format_reports({"oracle": good, "model-with-long-name": worse})
    lines = table.splitlines()
    assert len(lines) == 4
    for label in ("name", "n", "median", "p90", "rmse", "cov1s", "cov2s", "cov95", "MAD", "NLL", "sharp", "/oracle"):
        assert label in lines[0]
    assert set(lines[1]) == {"-"}
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[2].rstrip().endswith("1.000")
    assert lines[3].rstrip().endswith(f"{worse.ratio_to(good):.3f}")
    assert worse.ratio_to(good) == pytest.approx(worse.median_km / good.median_km)
    assert "/oracle" not in format_reports({"model": worse})


def test_to_dict_has_every_field() -> None:
    d = localization_report(*_hand_example()).to_dict()
    assert set(d) == {
        "n", "median_km", "p90_km", "rmse_km", "mean_km", "coverage_1sigma", "coverage_2sigma",
        "coverage_95", "coverage_mad", "nll_km", "sharpness_km",
    }
    assert d["n"] == 2


def test_ratio_to_rejects_zero_reference() -> None:
    rep = localization_report(*_hand_example())
    zero = LocalizationReport(**{**rep.to_dict(), "median_km": 0.0})
    with pytest.raises(ValueError, match="positive reference median"):
        rep.ratio_to(zero)
