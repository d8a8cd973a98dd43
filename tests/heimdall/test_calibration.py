"""Ellipse temperature scaling."""
from __future__ import annotations

import numpy as np
import pytest

from heimdall.calibration import coverage_profile, fit_covariance_scale


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
