"""Losses for a predicted 2-D Gaussian position, in normalised units.

The head's columns are read through :func:`heimdall.models.decode_head`:
``sigma = sigma_floor + exp(s)``, ``rho = rho_limit * tanh(r)``. Per-sample
losses are returned as (B,) tensors; :func:`localization_loss` averages them.

The NLL is the full 2-D density, constant included, so with positions in km it
equals ``LocalizationReport.nll_km`` (here the units are target_scale_km; the
two differ by ``2 log(target_scale_km)``)::

    diag:  NLL = log(2 pi) + log se + log sn + (ze^2 + zn^2) / 2
    full:  NLL = log(2 pi) + log se + log sn + log(1 - rho^2) / 2
                 + (ze^2 - 2 rho ze zn + zn^2) / (2 (1 - rho^2))

with ``ze = (target_e - mean_e) / se`` and likewise north.

beta-NLL (Seitzer et al. 2022) multiplies each sample's NLL by a stop-gradient
weight ``var^beta``. In 2-D we take ``var = sqrt(det Sigma) = se * sn * sqrt(1 - rho^2)``
(the geometric-mean variance; for an isotropic Gaussian it is exactly
``sigma^2``, as in the paper's 1-D form). beta = 0 is the plain NLL; beta = 1
gives the mean the gradient of MSE. The weight is detached, so each sample's
optimum (mean, Sigma) is unchanged: only how hard points are weighted moves.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from heimdall.errors import collect_problems
from heimdall.models import HEADS, rho_from_raw, sigma_from_log

__all__ = [
    "LOSS_FAMILIES",
    "LossConfig",
    "gaussian_nll",
    "full_nll",
    "beta_nll",
    "mse",
    "localization_loss",
    "validate_model_and_loss",
]

LOSS_FAMILIES = ("gaussian_nll", "full_nll", "beta_nll")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class LossConfig:
    """The training objective and the head's output parameterisation.

    Attributes:
        family: ``"gaussian_nll"`` (diagonal head), ``"full_nll"`` (full head)
            or ``"beta_nll"`` (either head; full NLL when the head has rho).
        beta: beta-NLL exponent in [0, 1]; only ``beta_nll`` uses it.
        sigma_floor: smallest sigma, normalised units (0.01 = 1 km at 100 km scale).
        mse_warmup_epochs: epochs at the start during which the mean is fitted by
            MSE; meanwhile the sigma/rho columns are fitted by the NLL with the
            mean detached, so they are ready when the NLL takes over.
        rho_limit: ``|rho| < rho_limit`` (full head), keeps the covariance invertible.
    """

    family: str = "gaussian_nll"
    beta: float = 0.0
    sigma_floor: float = 0.01
    mse_warmup_epochs: int = 1
    rho_limit: float = 0.95

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.family not in LOSS_FAMILIES:
            p.append(f"family must be one of {', '.join(LOSS_FAMILIES)}, got {self.family!r}")
        if not 0.0 <= self.beta <= 1.0:
            p.append(f"beta must lie in [0, 1], got {self.beta}; 0.5 is the paper's recommendation")
        if not 0.0 < self.sigma_floor <= 1.0:
            p.append(f"sigma_floor must lie in (0, 1] normalised units, got {self.sigma_floor}; 0.01 is 1 km at a 100 km scale")
        if not (isinstance(self.mse_warmup_epochs, int) and self.mse_warmup_epochs >= 0):
            p.append(f"mse_warmup_epochs must be an integer >= 0, got {self.mse_warmup_epochs!r}")
        if not 0.0 < self.rho_limit < 1.0:
            p.append(f"rho_limit must lie in (0, 1), got {self.rho_limit}; 0.95 is typical")
        collect_problems("LossConfig", p)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        collect_problems("LossConfig", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        return cls(**data)


def gaussian_nll(mean: torch.Tensor, log_sigma: torch.Tensor, target: torch.Tensor, sigma_floor: float) -> torch.Tensor:
    """Per-sample NLL of a diagonal 2-D Gaussian.

    Args:
        mean: (B, 2) predicted east/north.
        log_sigma: (B, 2) the head's log-sigma columns (see :func:`heimdall.models.sigma_from_log`).
        target: (B, 2) true east/north, same units as ``mean``.
        sigma_floor: smallest sigma.

    Returns:
        (B,) NLL, constant ``log(2 pi)`` included.
    """
    sigma = sigma_from_log(log_sigma, sigma_floor)
    z = (target - mean) / sigma
    return _LOG_2PI + torch.log(sigma).sum(-1) + 0.5 * z.square().sum(-1)


def full_nll(mean: torch.Tensor, log_sigma: torch.Tensor, rho_raw: torch.Tensor, target: torch.Tensor,
             sigma_floor: float, rho_limit: float) -> torch.Tensor:
    """Per-sample NLL of a 2-D Gaussian with correlation.

    Args:
        mean, log_sigma, target, sigma_floor: as in :func:`gaussian_nll`.
        rho_raw: (B,) the head's raw correlation column (see :func:`heimdall.models.rho_from_raw`).
        rho_limit: bound on ``|rho|``.

    Returns:
        (B,) NLL, constant ``log(2 pi)`` included.
    """
    sigma = sigma_from_log(log_sigma, sigma_floor)
    rho = rho_from_raw(rho_raw, rho_limit)
    z = (target - mean) / sigma
    one_minus = 1.0 - rho.square()
    quad = (z[:, 0].square() - 2.0 * rho * z[:, 0] * z[:, 1] + z[:, 1].square()) / one_minus
    return _LOG_2PI + torch.log(sigma).sum(-1) + 0.5 * torch.log(one_minus) + 0.5 * quad


def beta_nll(mean: torch.Tensor, log_sigma: torch.Tensor, target: torch.Tensor, sigma_floor: float, beta: float,
             rho_raw: torch.Tensor | None = None, rho_limit: float = 0.95) -> torch.Tensor:
    """Per-sample beta-NLL: NLL x ``sqrt(det Sigma)^beta``, the weight detached.

    Args:
        mean, log_sigma, target, sigma_floor: as in :func:`gaussian_nll`.
        beta: exponent in [0, 1]; 0 gives exactly the NLL.
        rho_raw: (B,) raw correlation for a full head, or None (diagonal).
        rho_limit: bound on ``|rho|``.

    Returns:
        (B,) weighted NLL.
    """
    sigma = sigma_from_log(log_sigma, sigma_floor)
    if rho_raw is None:
        nll = gaussian_nll(mean, log_sigma, target, sigma_floor)
        var = sigma.prod(-1)
    else:
        nll = full_nll(mean, log_sigma, rho_raw, target, sigma_floor, rho_limit)
        var = sigma.prod(-1) * torch.sqrt(1.0 - rho_from_raw(rho_raw, rho_limit).square())
    return nll * var.detach().pow(beta)


def mse(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error ``|target - mean|^2`` summed over east/north, (B,)."""
    return (target - mean).square().sum(-1)


def _nll(head: torch.Tensor, target: torch.Tensor, config: LossConfig, mean: torch.Tensor) -> torch.Tensor:
    rho_raw = head[:, 4] if head.shape[-1] == 5 else None
    if config.family == "beta_nll":
        return beta_nll(mean, head[:, 2:4], target, config.sigma_floor, config.beta, rho_raw, config.rho_limit)
    if config.family == "full_nll":
        return full_nll(mean, head[:, 2:4], head[:, 4], target, config.sigma_floor, config.rho_limit)
    return gaussian_nll(mean, head[:, 2:4], target, config.sigma_floor)


def localization_loss(head: torch.Tensor, target: torch.Tensor, config: LossConfig, epoch: int) -> torch.Tensor:
    """The training objective, a scalar, for a batch of heads.

    During the first ``config.mse_warmup_epochs`` epochs it is
    ``MSE(mean) + NLL(mean.detach(), sigma)``: the mean moves by MSE alone,
    the sigma columns learn to match the current errors. Afterwards it is the
    configured NLL family.

    Args:
        head: (B, 4) diagonal or (B, 5) full head, normalised units.
        target: (B, 2) true east/north, normalised units.
        config: the loss settings.
        epoch: current epoch, from 0.

    Returns:
        Scalar mean loss.

    Raises:
        ValueError: when shapes disagree or the family needs a full head and got a diagonal one.
    """
    if head.dim() != 2 or head.shape[-1] not in (4, 5) or target.shape != (head.shape[0], 2):
        raise ValueError(f"head must be (B, 4|5) and target (B, 2) with the same B, got {tuple(head.shape)} and {tuple(target.shape)}")
    if config.family == "full_nll" and head.shape[-1] != 5:
        raise ValueError("family 'full_nll' needs a full head (5 columns, with rho); build the model with head='full'")
    mean = head[:, 0:2]
    if epoch < config.mse_warmup_epochs:
        return (mse(mean, target) + _nll(head, target, config, mean.detach())).mean()
    return _nll(head, target, config, mean).mean()


def validate_model_and_loss(model_config: Any, loss_config: LossConfig, optimizer_config: Any | None = None) -> None:
    """Check that a model, a loss and (optionally) an optimizer config fit together.

    Rules: ``full_nll`` needs ``head="full"``; ``gaussian_nll`` needs
    ``head="diag"`` (its loss would leave a full head's rho untrained);
    ``beta_nll`` takes either head; ``beta > 0`` is only meaningful for
    ``beta_nll``; the MSE warm-up must end before ``optimizer_config.max_epochs``.

    Args:
        model_config: a :class:`~heimdall.models.ResNetConfig` or
            :class:`~heimdall.models.SetNetConfig` (anything with a ``head``).
        loss_config: the loss settings.
        optimizer_config: anything with ``max_epochs``, or None.

    Raises:
        ConfigError: listing every problem at once.
    """
    p: list[str] = []
    head = getattr(model_config, "head", None)
    if head not in HEADS:
        p.append(f"model config must have head in {', '.join(HEADS)}, got {head!r} from {type(model_config).__name__}")
    if loss_config.family == "full_nll" and head == "diag":
        p.append("loss family 'full_nll' needs model head 'full', got head 'diag'; set head='full' or family='gaussian_nll'")
    if loss_config.family == "gaussian_nll" and head == "full":
        p.append("loss family 'gaussian_nll' would leave a full head's rho untrained; "
                 "use family 'full_nll' or 'beta_nll', or head 'diag'")
    if loss_config.beta > 0 and loss_config.family != "beta_nll":
        p.append(f"beta={loss_config.beta} only acts in family 'beta_nll', got family {loss_config.family!r}; "
                 "set beta=0 or family='beta_nll'")
    max_epochs = getattr(optimizer_config, "max_epochs", None)
    if max_epochs is not None and loss_config.mse_warmup_epochs >= max_epochs:
        p.append(f"mse_warmup_epochs ({loss_config.mse_warmup_epochs}) must be < max_epochs ({max_epochs}), "
                 "or the NLL never trains; lower the warm-up or train longer")
    collect_problems("model/loss configuration", p)

