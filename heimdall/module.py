"""The Lightning wrapper: a network, a loss and an optimizer setting, nothing else.

Batches are dicts:

* ``features``: float (B, R, n_fft, n_frames), :mod:`heimdall.features` units;
* ``mask``: bool (B, R), receivers heard;
* ``target``: float (B, 2), true east/north divided by ``target_scale_km``;
* optional ``oracle_mean`` (B, 2) km and ``oracle_cov`` (B, 2, 2) km^2: the
  Bayes oracle on the same recordings, for ``val/oracle_ratio``.

At the end of each validation epoch the predictions, converted to km, are
scored by :func:`heimdall.metrics.localization_report` and logged as
``val/median_km``, ``val/p90_km``, ``val/nll_km``, ``val/coverage_1sigma``,
``val/coverage_2sigma``, ``val/coverage_95``, ``val/coverage_mad``,
``val/sharpness_km`` (and ``val/oracle_ratio``, ``val/oracle_median_km`` when
the batches carry the oracle). The module never talks to Ray or a tracker:
loggers and callbacks are added by whoever builds the Trainer.

Example::

    model = build_model("resnet", ResNetConfig())
    module = LocalizationModule(model, LossConfig(), OptimizerConfig(max_epochs=12), TargetScaling())
    pl.Trainer(max_epochs=12).fit(module, datamodule)
    restored = LocalizationModule.from_checkpoint("last.ckpt")

A checkpoint is data, never code: :func:`read_checkpoint` loads with
``torch.load(weights_only=True)`` (tensors, dicts, lists, str, numbers, bool,
None) and refuses anything that would build another Python object, with no
fallback. Everything this module writes stays inside that set:
:meth:`LocalizationModule.on_save_checkpoint` checks (and converts numpy
values and paths in) what Lightning, Ray's report callback and our callbacks
put into each checkpoint.
"""
from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path, PurePath
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from heimdall.errors import ConfigError, DataError
from heimdall.features import FeatureConfig, validate_features
from heimdall.losses import LossConfig, localization_loss, validate_model_and_loss
from heimdall.metrics import localization_report
from heimdall.models import GeographicOutput, TargetScaling, build_model, decode_head
from heimdall.optimizer import SCHEDULES, OptimizerConfig  # re-exported: older pickles name heimdall.module

__all__ = ["SCHEDULES", "OptimizerConfig", "LocalizationModule", "CheckpointError", "read_checkpoint", "plain_checkpoint"]

def _lr_factor(schedule: str, progress_epochs: float, warmup: float, max_epochs: int) -> float:
    """Multiplier of the peak lr after ``progress_epochs`` (fractional) epochs.

    Defined for any step count, one step per epoch included: the warm-up ramps
    over whatever steps fall inside it, and never divides by zero.
    """
    if warmup > 0 and progress_epochs < warmup:
        return max(progress_epochs / warmup, 1e-3)
    if schedule == "constant":
        return 1.0
    span = max(max_epochs - warmup, 1e-9)
    t = min(max(progress_epochs - warmup, 0.0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))



def _onecycle_pct_start(warmup_share: float, total_steps: int) -> float:
    """``pct_start`` for torch's ``OneCycleLR`` that keeps both of its phases longer than zero steps.

    ``OneCycleLR`` divides by the length of each phase, ``pct_start * total_steps - 1``
    and ``total_steps - 1`` minus that, so a short run (a batch larger than the
    split gives one step per epoch) with a warm-up share such as 1/2 of 2 steps
    raised ``ZeroDivisionError``. The requested share is kept within
    ``[1.5 / total_steps, 1 - 0.5 / total_steps]`` (and [0.01, 0.99]), which is
    never empty for ``total_steps >= 2``.

    Args:
        warmup_share: the warm-up's share of the run, ``warmup / max_epochs``.
        total_steps: the schedule's steps, >= 2.

    Returns:
        The share to pass as ``pct_start``.
    """
    if total_steps < 2:
        raise ValueError(f"OneCycleLR needs total_steps >= 2, got {total_steps}")
    low, high = max(0.01, 1.5 / total_steps), min(0.99, 1.0 - 0.5 / total_steps)
    return min(max(warmup_share, low), high)


# -- checkpoints are data ---------------------------------------------------------------

_RETRAIN = ("fix: re-train it (python -m tuning.train) or re-run the study (python -m tuning.run): "
            "both write checkpoints of plain tensors and config")
# How torch's weights-only unpickler names a class or function the file asks for (refused or blocked).
_UNSAFE_GLOBAL = re.compile(r"\bGLOBAL (\S+)")
# Leaves that torch.load(weights_only=True) rebuilds; exact types, since a subclass pickles as its class.
_PLAIN_TYPES = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device)


class CheckpointError(DataError):
    """A file that is not a checkpoint this version can read as data.

    Missing, not a ``torch.save`` archive, holding Python objects beyond tensors
    and plain values (an older format, or a hostile file), or not written by
    :class:`LocalizationModule`.
    """


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data: tensors and plain values only, never code.

    ``torch.load(weights_only=True)``, with no fallback: a file that needs more
    (a pickled class or function) is refused before any of it runs.

    Args:
        path: a ``.ckpt`` file.
        map_location: where tensors go.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: the file is missing, not a PyTorch checkpoint, holds
            Python objects other than tensors and plain values, or is not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; fix: pass the .ckpt file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; fix: pass the .ckpt file written by "
                              "python -m tuning.train (its report.json names it) or by a study's trial")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save archive: another kind of "
                              "file, or truncated); fix: pass the .ckpt file that training wrote")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe is None:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_one_line(exc)}); "
                                  "fix: pass the .ckpt file that training wrote") from None
        raise CheckpointError(
            f"{path} holds Python objects ({unsafe.group(1)}), not only tensors and plain values: loading it could "
            f"run code, so it is refused; a checkpoint from an older Heimdall version, or a file from an untrusted "
            f"source, looks like this; {_RETRAIN}") from None
    except Exception as exc:  # a damaged archive raises many unrelated types; none of its code has run
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_one_line(exc)}); "
                              "fix: pass the .ckpt file that training wrote") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                              "fix: pass the .ckpt file that training wrote")
    return ckpt


def plain_checkpoint(value: Any, where: str = "checkpoint") -> Any:
    """``value`` in the form ``torch.load(weights_only=True)`` reads, converted in place where needed.

    Tensors and plain values stay; numpy arrays become tensors, numpy scalars
    Python numbers, paths strings, dict/list/tuple subclasses their plain base.

    Args:
        value: a checkpoint dict (or any part of one).
        where: its name in messages.

    Returns:
        The plain value (the same object for dicts and lists, filled in place).

    Raises:
        TypeError: any other object (a dataclass, a function, ...), named with its key path:
            store it as a dict (``to_dict()``/``dataclasses.asdict``) or a str instead.
    """
    if type(value) in _PLAIN_TYPES or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        out = value if type(value) in (dict, OrderedDict, Counter) else dict(value)
        for key in list(out):
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{where} has a key of type {type(key).__qualname__} ({key!r}), which a "
                                "weights-only load refuses; use str keys")
            out[key] = plain_checkpoint(out[key], f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, set)):
        items = [plain_checkpoint(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if type(value) is list:
            value[:] = items
            return value
        return items if isinstance(value, list) else set(items)
    if isinstance(value, tuple):
        items = [plain_checkpoint(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value if type(value) is torch.Size else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which "
                    "torch.load(weights_only=True) refuses; store it as a dict (to_dict(), dataclasses.asdict) "
                    "or as str/int/float/bool/list instead")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "…"


class LocalizationModule(pl.LightningModule):
    """Train and validate one localization network.

    Args:
        model: a network from :func:`heimdall.models.build_model` (it carries
            ``arch``, ``config`` and ``n_receivers``, saved to rebuild it).
        loss_config: the objective; defaults to :class:`LossConfig`.
        optimizer_config: AdamW and schedule; defaults to :class:`OptimizerConfig`.
        target_scaling: how targets were normalised; defaults to :class:`TargetScaling`.
        feature_config: how features were computed, saved so inference rebuilds them.

    Raises:
        ConfigError: when the model lacks ``arch``/``config`` or the configs do
            not fit together (every problem listed).
    """

    def __init__(self, model: torch.nn.Module, loss_config: LossConfig | None = None,
                 optimizer_config: OptimizerConfig | None = None, target_scaling: TargetScaling | None = None,
                 feature_config: FeatureConfig | None = None) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("arch", "config", "n_receivers")):
            raise ConfigError("LocalizationModule", [
                f"model must come from heimdall.models.build_model (with arch, config, n_receivers), got {type(model).__name__}"
            ])
        self.model = model
        self.loss_config = loss_config or LossConfig()
        self.optimizer_config = optimizer_config or OptimizerConfig()
        self.target_scaling = target_scaling or TargetScaling()
        self.feature_config = feature_config or FeatureConfig()
        validate_model_and_loss(model.config, self.loss_config, self.optimizer_config)
        self.save_hyperparameters({
            "arch": model.arch,
            "n_receivers": model.n_receivers,
            "model_config": model.config.to_dict(),
            "loss_config": self.loss_config.to_dict(),
            "optimizer_config": self.optimizer_config.to_dict(),
            "target_scaling": self.target_scaling.to_dict(),
            "feature_config": self.feature_config.to_dict(),
        })
        self._val: dict[str, list[torch.Tensor]] = {}
        # Ellipse calibration (heimdall.calibration), fitted after training; saved in
        # checkpoints and exported models. 1.0 until calibrate() is called.
        self.register_buffer("covariance_scale", torch.tensor(1.0, dtype=torch.float64))

    def calibrate(self, scale: float) -> None:
        """Set the covariance scale fitted on validation (applies to predictions and export)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"covariance scale must be finite and > 0, got {scale}")
        self.covariance_scale.fill_(scale)

    # -- rebuilding and inference ------------------------------------------------

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> LocalizationModule:
        """Rebuild an untrained module from saved hyperparameters (``module.hparams``)."""
        model = build_model(hparams["arch"], hparams["model_config"], n_receivers=hparams["n_receivers"])
        return cls(
            model,
            LossConfig.from_dict(hparams["loss_config"]),
            OptimizerConfig.from_dict(hparams["optimizer_config"]),
            TargetScaling.from_dict(hparams["target_scaling"]),
            FeatureConfig.from_dict(hparams["feature_config"]),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LocalizationModule:
        """Rebuild a trained module from a checkpoint written by this class (read as data, never code).

        Raises:
            CheckpointError: see :func:`read_checkpoint`; also a checkpoint without this module's
                hyperparameters, whose hyperparameters no longer build a model, or whose weights
                do not fit them.
        """
        ckpt = read_checkpoint(path, map_location)
        hparams, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
        if not isinstance(hparams, dict) or "arch" not in hparams or not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no LocalizationModule hyperparameters and weights (another "
                                  "module's checkpoint?); fix: pass a checkpoint written by tuning.train or a study")
        try:
            module = cls.from_hparams(dict(hparams))
        except (ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
            raise CheckpointError(f"{path}: its hyperparameters do not build a model in this version "
                                  f"({_one_line(exc)}); {_RETRAIN}") from None
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: its weights do not match the architecture in its own hyperparameters "
                                  f"({_one_line(exc)}); fix: use the checkpoint the training wrote, unmodified") from None
        return module

    def write_checkpoint(self, path: str | Path) -> Path:
        """Save hyperparameters and weights (calibration included) as plain data :meth:`from_checkpoint` reads."""
        ckpt = plain_checkpoint({"hyper_parameters": dict(self.hparams), "state_dict": self.state_dict()})
        torch.save(ckpt, path)
        return Path(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep every checkpoint loadable with ``weights_only=True``.

        Lightning calls this last, after loops, callbacks (Ray's report callback
        included) and optimizers have added their state, so the check sees it all.
        """
        plain_checkpoint(checkpoint)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The network's head (B, 4|5), normalised units."""
        return self.model(features, mask)

    def predict_gaussian(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted mean (B, 2) km and calibrated covariance (B, 2, 2) km^2 in the tangent frame."""
        mean, cov = self._to_km(self.model(features, mask))
        return mean, cov * self.covariance_scale.to(cov.dtype)

    def geographic_model(self) -> GeographicOutput:
        """The network wrapped to output lat/lon and sigmas in meters (what gets exported)."""
        return GeographicOutput(self.model, self.target_scaling, self.loss_config.sigma_floor, self.loss_config.rho_limit,
                                float(self.covariance_scale))

    def _to_km(self, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, sigma, rho = decode_head(head, self.loss_config.sigma_floor, self.loss_config.rho_limit)
        scale = self.target_scaling.target_scale_km
        mean_km, sig_km = mean * scale, sigma * scale
        off = torch.zeros_like(sig_km[:, 0]) if rho is None else rho * sig_km[:, 0] * sig_km[:, 1]
        cov = torch.stack([torch.stack([sig_km[:, 0].square(), off], -1), torch.stack([off, sig_km[:, 1].square()], -1)], -2)
        return mean_km, cov

    # -- steps ---------------------------------------------------------------------

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask, target = batch["features"], batch["mask"], batch["target"]
        validate_features(features, mask, n_receivers=self.model.n_receivers, config=self.feature_config)
        if tuple(target.shape) != (features.shape[0], 2):
            raise ValueError(f"batch['target'] must be (B, 2) normalised east/north, got {tuple(target.shape)}")
        head = self.model(features, mask)
        return head, localization_loss(head, target.to(head.dtype), self.loss_config, self.current_epoch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step; logs ``train/loss``."""
        _, loss = self._step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["target"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        """Forget the previous epoch's gathered predictions."""
        self._val = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss on one batch; predictions (km) are kept for the epoch's metrics."""
        head, loss = self._step(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch["target"].shape[0])
        mean_km, cov_km2 = self._to_km(head)
        parts = {"mean": mean_km, "cov": cov_km2, "true": batch["target"] * self.target_scaling.target_scale_km}
        if "oracle_mean" in batch and "oracle_cov" in batch:
            parts.update(oracle_mean=batch["oracle_mean"], oracle_cov=batch["oracle_cov"])
        for key, value in parts.items():
            self._val.setdefault(key, []).append(value.detach().to(torch.float64))

    def on_validation_epoch_end(self) -> None:
        """Score the epoch's predictions in km and log the ``val/*`` metrics."""
        if not self._val:
            return
        g = {k: self._gathered(torch.cat(v)) for k, v in self._val.items()}
        report = localization_report(g["mean"], g["cov"], g["true"])
        metrics = {f"val/{k}": float(getattr(report, k)) for k in (
            "median_km", "p90_km", "rmse_km", "nll_km", "coverage_1sigma", "coverage_2sigma", "coverage_95",
            "coverage_mad", "sharpness_km")}
        if "oracle_mean" in g and len(g["oracle_mean"]) == len(g["true"]):
            oracle = localization_report(g["oracle_mean"], g["oracle_cov"], g["true"])
            metrics["val/oracle_median_km"] = oracle.median_km
            metrics["val/oracle_ratio"] = report.ratio_to(oracle)
        self.log_dict(metrics, sync_dist=False)
        self._val = {}

    def _gathered(self, t: torch.Tensor) -> np.ndarray:
        """Concatenate a tensor over processes (DDP); needs equal sizes, as DistributedSampler pads them."""
        if self.trainer is not None and self.trainer.world_size > 1:
            t = self.all_gather(t).flatten(0, 1)
        return t.cpu().numpy()

    # -- optimisation ----------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on kernels only) and a per-step schedule from :class:`OptimizerConfig`."""
        oc = self.optimizer_config
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() > 1]
        rest = [p for p in self.model.parameters() if p.requires_grad and p.dim() <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=oc.lr)
        steps_per_epoch = self._steps_per_epoch()
        if oc.schedule == "onecycle":
            total = max(round(steps_per_epoch * oc.max_epochs), 2)
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=oc.lr, total_steps=total, pct_start=_onecycle_pct_start(oc.warmup / oc.max_epochs, total))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: _lr_factor(oc.schedule, step / steps_per_epoch, oc.warmup, oc.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _steps_per_epoch(self) -> float:
        """Optimizer steps per epoch, >= 1: a batch larger than the data is one partial batch.

        Raises:
            ConfigError: the Trainer has no finite epoch count, or its training loader yields no batch
                (an empty split or shard would otherwise "train" nothing and still validate).
        """
        trainer = self.trainer
        total = float(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs
        if not (math.isfinite(total) and epochs and epochs > 0):
            raise ConfigError("Trainer", [
                f"the lr schedule needs a finite Trainer(max_epochs=...), got max_epochs={epochs}; "
                f"use Trainer(max_epochs=optimizer_config.max_epochs={self.optimizer_config.max_epochs})"
            ])
        if total < 1:
            raise ConfigError("Trainer", [
                f"the training loader yields no batch ({total:g} steps in {epochs} epoch(s)); fix: give every "
                f"training process at least one recording (a larger dataset or fewer workers); a batch size "
                f"({self.optimizer_config.batch_size}) above the split is fine: it trains one partial batch"])
        return max(total / epochs, 1.0)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the Trainer's setting if it has one, else by ``optimizer_config.grad_clip``."""
        if gradient_clip_val is None and self.optimizer_config.grad_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.optimizer_config.grad_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
