"""The optimiser's settings: AdamW and its learning-rate schedule.

Apart from :mod:`heimdall.module` so that code which only validates or searches
these settings (Tune's trial actors, Train's controller) does not import
Lightning. :mod:`heimdall.module` re-exports both names, so pickles and imports
that say ``heimdall.module.OptimizerConfig`` keep working.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from heimdall.errors import collect_problems

__all__ = ["SCHEDULES", "OptimizerConfig"]

SCHEDULES = ("cosine", "constant", "onecycle")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW decay, applied to weight matrices and kernels only
            (not to biases or normalisation scales).
        batch_size: recordings per step (read by the data module).
        schedule: ``"cosine"`` (linear warm-up, cosine decay to 0 at
            ``max_epochs``), ``"constant"`` (warm-up, then flat) or
            ``"onecycle"`` (torch's OneCycleLR, warm-up share = warmup / max_epochs,
            kept long enough for both phases when the run has few steps).
        warmup: warm-up length in epochs (fractions allowed).
        max_epochs: the schedule's horizon; build the Trainer with the same value.
            12 epochs of ~6400 recordings fit a 20-minute run on 2 CPU cores
            with the default ResNet (~0.3 s per step of 64 on one free core).
        grad_clip: gradient-norm clip (0 disables); a Trainer's own
            ``gradient_clip_val`` takes precedence.
    """

    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    schedule: str = "cosine"
    warmup: float = 1.0
    max_epochs: int = 12
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        p: list[str] = []
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1.0):
            p.append(f"lr must lie in (0, 1], got {self.lr}")
        if not self.weight_decay >= 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            p.append(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.max_epochs, int) and self.max_epochs >= 1):
            p.append(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        elif not 0 <= self.warmup < self.max_epochs:
            p.append(f"warmup must lie in [0, max_epochs={self.max_epochs}) epochs, got {self.warmup}")
        if not self.grad_clip >= 0:
            p.append(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        collect_problems("OptimizerConfig", p)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        collect_problems("OptimizerConfig", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}" for k in unknown])
        return cls(**data)
