"""Losses: closed forms, the sigma floor, beta-NLL, warm-up and cross-config validation."""
from __future__ import annotations

import math

import pytest
import torch

from heimdall.errors import ConfigError
from heimdall.losses import (
    LossConfig,
    beta_nll,
    full_nll,
    gaussian_nll,
    localization_loss,
    mse,
    validate_model_and_loss,
)
from heimdall.models import ResNetConfig, SetNetConfig
from heimdall.module import OptimizerConfig

LOG_2PI = math.log(2 * math.pi)


def _log_sigma(sigma: list[float], floor: float) -> torch.Tensor:
    """Head columns giving exactly ``sigma`` under ``sigma = floor + exp(s)``."""
    return torch.log(torch.tensor([sigma], dtype=torch.float64) - floor)


def test_gaussian_nll_matches_hand_computed_value():
    # sigma (1, 2), error (1, 2): log 2pi + log 1 + log 2 + (1^2/1 + 2^2/4) / 2 = log 2pi + log 2 + 1.
    nll = gaussian_nll(torch.zeros(1, 2, dtype=torch.float64), _log_sigma([1.0, 2.0], 0.5),
                       torch.tensor([[1.0, 2.0]], dtype=torch.float64), sigma_floor=0.5)
    assert float(nll) == pytest.approx(LOG_2PI + math.log(2.0) + 1.0, abs=1e-12)


def test_full_nll_matches_hand_computed_value_and_torch_distribution():
    floor, limit, rho = 0.1, 0.95, 0.5
    mean = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    target = torch.tensor([[1.5, 1.5]], dtype=torch.float64)
    rho_raw = torch.atanh(torch.tensor([rho / limit], dtype=torch.float64))
    nll = full_nll(mean, _log_sigma([1.0, 2.0], floor), rho_raw, target, floor, limit)
    # z = (1, 1): quad = (1 - 2*0.5 + 1) / 0.75 = 4/3; NLL = log 2pi + log 2 + log(0.75)/2 + 2/3.
    assert float(nll) == pytest.approx(LOG_2PI + math.log(2.0) + 0.5 * math.log(0.75) + 2.0 / 3.0, abs=1e-12)
    cov = torch.tensor([[1.0, rho * 2.0], [rho * 2.0, 4.0]], dtype=torch.float64)
    ref = -torch.distributions.MultivariateNormal(mean[0], cov).log_prob(target[0])
    assert float(nll) == pytest.approx(float(ref), abs=1e-12)


def test_full_nll_with_zero_rho_equals_diagonal_nll():
    g = torch.Generator().manual_seed(0)
    mean, target, s = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(full_nll(mean, s, torch.zeros(8, dtype=torch.float64), target, 0.01, 0.95),
                               gaussian_nll(mean, s, target, 0.01))


def test_gradients_stay_finite_at_the_sigma_floor_and_at_huge_sigma():
    for value in (-80.0, 50.0):
        log_sigma = torch.full((4, 2), value, requires_grad=True)
        mean = torch.zeros(4, 2, requires_grad=True)
        rho_raw = torch.full((4,), 10.0, requires_grad=True)  # saturated tanh: |rho| at the limit
        loss = full_nll(mean, log_sigma, rho_raw, torch.ones(4, 2), 0.01, 0.95).mean()
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        for t in (log_sigma, mean, rho_raw):
            assert torch.isfinite(t.grad).all()
    # Just above the floor the sigma gradient is still non-zero: the floor is added, not clamped.
    log_sigma = torch.full((1, 2), -5.0, requires_grad=True)
    gaussian_nll(torch.zeros(1, 2), log_sigma, torch.ones(1, 2), 0.01).sum().backward()
    assert (log_sigma.grad.abs() > 0).all()


def test_beta_nll_with_beta_zero_is_the_nll_and_otherwise_weights_by_detached_variance():
    g = torch.Generator().manual_seed(1)
    mean, target, s = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3))
    rho_raw = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(beta_nll(mean, s, target, 0.01, 0.0), gaussian_nll(mean, s, target, 0.01))
    torch.testing.assert_close(beta_nll(mean, s, target, 0.01, 0.0, rho_raw, 0.9), full_nll(mean, s, rho_raw, target, 0.01, 0.9))
    sigma = 0.01 + torch.exp(s)
    torch.testing.assert_close(beta_nll(mean, s, target, 0.01, 0.5),
                               gaussian_nll(mean, s, target, 0.01) * sigma.prod(-1).sqrt())
    # beta = 1: the mean's gradient is the MSE's, halved (NLL's 1/sigma^2 cancelled by sigma^2).
    iso = torch.zeros(6, 2, dtype=torch.float64)
    m = mean.clone().requires_grad_(True)
    beta_nll(m, iso, target, 0.0 + 1e-9, 1.0).sum().backward()
    m2 = mean.clone().requires_grad_(True)
    (0.5 * mse(m2, target)).sum().backward()
    torch.testing.assert_close(m.grad, m2.grad, rtol=1e-6, atol=1e-9)


def test_localization_loss_warmup_moves_the_mean_by_mse_only():
    cfg = LossConfig(mse_warmup_epochs=2)
    head = torch.tensor([[0.2, -0.1, 1.0, -1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0]])
    localization_loss(head, target, cfg, epoch=1).backward()
    torch.testing.assert_close(head.grad[0, :2], 2.0 * (head[0, :2] - target[0]).detach())
    assert (head.grad[0, 2:] != 0).all()  # sigma columns already learn during warm-up
    after = localization_loss(head, target, cfg, epoch=2)
    assert float(after) == pytest.approx(float(gaussian_nll(head[:, :2], head[:, 2:4], target, cfg.sigma_floor).mean()))


def test_localization_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head must be"):
        localization_loss(torch.zeros(2, 3), torch.zeros(2, 2), LossConfig(), 0)
    with pytest.raises(ValueError, match="full head"):
        localization_loss(torch.zeros(2, 4), torch.zeros(2, 2), LossConfig(family="full_nll"), 0)


def test_validate_model_and_loss_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        validate_model_and_loss(ResNetConfig(head="diag"), LossConfig(family="full_nll", beta=0.3, mse_warmup_epochs=5),
                                OptimizerConfig(max_epochs=5))
    problems = err.value.problems
    assert len(problems) == 3
    assert any("needs model head 'full'" in p for p in problems)
    assert any("beta=0.3" in p for p in problems)
    assert any("mse_warmup_epochs" in p for p in problems)
    with pytest.raises(ConfigError, match="rho untrained"):
        validate_model_and_loss(SetNetConfig(head="full"), LossConfig(family="gaussian_nll"))


@pytest.mark.parametrize(
    ("model", "loss"),
    [
        (ResNetConfig(), LossConfig()),
        (ResNetConfig(head="full"), LossConfig(family="full_nll")),
        (SetNetConfig(head="full"), LossConfig(family="beta_nll", beta=0.5)),
        (SetNetConfig(), LossConfig(family="beta_nll", beta=1.0)),
    ],
)
def test_validate_model_and_loss_accepts_consistent_pairs(model, loss):
    validate_model_and_loss(model, loss, OptimizerConfig())


def test_loss_config_lists_every_problem_and_roundtrips():
    with pytest.raises(ConfigError) as err:
        LossConfig(family="mse", beta=2.0, sigma_floor=0.0, mse_warmup_epochs=-1, rho_limit=1.0)
    assert len(err.value.problems) == 5
    cfg = LossConfig(family="beta_nll", beta=0.5)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        LossConfig.from_dict({"familly": "beta_nll"})
