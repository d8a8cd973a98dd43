"""The Train worker's side of a trial: Lightning, the model and the latency measurement.

:func:`tuning.study.trial.train_loop_per_worker` imports this module when a
Train worker starts, so the processes that only schedule a trial (Tune's trial
actor, Train's controller) never import Lightning: that import costs seconds per
process, and every trial starts three of them. ``tests/tuning/study/test_trial.py``
keeps it so.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import ray.train
import torch
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

from heimdall.devices import Placement, check_precision, choose_placement
from heimdall.models import build_model
from heimdall.module import LocalizationModule
from tuning.data.pipeline import FeatureCache, RayBatches
from tuning.release.onnx import build_metadata, export_onnx, onnx_session
from tuning.study.spaces import TrialConfigs
from tuning.study.trial import (
    EPOCHS_METRIC,
    EVAL_BATCH_SIZE,
    LATENCY_METRIC,
    MODEL_PARAMS_METRIC,
    NLL_EPOCHS_METRIC,
    OBJECTIVES,
    TrialSpec,
    calibrated_nll,
)

__all__ = ["LATENCY_THREADS", "latency_session", "measure_latency_ms", "TrialMetrics", "train_loop_per_worker"]

# -- latency ------------------------------------------------------------------------------

#: onnxruntime intra-op threads of the latency measurement (inter-op: 1). One thread makes
#: the number comparable across trials and machines, whatever else runs beside the trial.
LATENCY_THREADS = 1
#: Untimed runs first (onnxruntime allocates and picks kernels on the first runs).
LATENCY_WARMUP = 10
#: Timed runs; the latency is their median, which shrugs off a busy neighbour's spikes.
LATENCY_RUNS = 100


def latency_session(path: str | Path) -> Any:
    """The onnxruntime session latency is measured with: CPU, :data:`LATENCY_THREADS` intra-op
    thread, one inter-op thread."""
    return onnx_session(path, threads=LATENCY_THREADS)


def measure_latency_ms(module: LocalizationModule, *, runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP) -> float:
    """Median onnxruntime latency of ``module``'s exported graph on one recording, in ms.

    The module is exported exactly as a release is (:func:`tuning.release.onnx.export_onnx`)
    into a temporary file, loaded in a :func:`latency_session` and run on one fixed random
    recording (batch 1): ``warmup`` runs, then the median of ``runs`` timed ones. The
    graph, hence the latency, depends on the architecture, not the weights.

    Args:
        module: any module of the trial's configs (its weights do not matter).
        runs: timed runs (>= 1).
        warmup: untimed runs before them (>= 0).

    Returns:
        Milliseconds per recording (finite, > 0).

    Raises:
        ExportError: the exporter failed.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}; fix: pass valid counts")
    fc = module.feature_config
    n = module.model.n_receivers
    rng = np.random.default_rng(0)
    feed = {"features": rng.normal(0.0, 1.5, (1, n, fc.n_fft, fc.n_frames)).astype(np.float32),
            "mask": np.ones((1, n), dtype=bool)}
    with tempfile.TemporaryDirectory(prefix="heimdall-latency-") as tmp:
        path = export_onnx(module, Path(tmp) / "model.onnx", build_metadata(module))
        session = latency_session(path)  # onnxruntime has read the file: the folder may go
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def _architecture_metrics(configs: TrialConfigs, cache: FeatureCache) -> dict[str, float]:
    """Latency and parameter count of the trial's architecture, on a fresh module of its configs
    (the training module is left alone: exporting switches a module to eval mode)."""
    with torch.random.fork_rng(devices=[]):  # the training's random stream stays as without it
        module = _build_module(configs, cache)
    return {LATENCY_METRIC: measure_latency_ms(module),
            MODEL_PARAMS_METRIC: float(sum(p.numel() for p in module.parameters()))}


# -- worker side ----------------------------------------------------------------------


class TrialMetrics(pl.Callback):
    """Adds the study's derived metrics before Ray's report callback reads them.

    At the end of each training epoch (validation has run by then) it puts
    ``epochs`` (completed, from 1), ``val/calibrated_nll`` and the trial's
    ``constants`` (its architecture's :data:`LATENCY_METRIC` and
    :data:`MODEL_PARAMS_METRIC`, measured once) into ``trainer.callback_metrics``.
    It also remembers the last metrics in the Lightning checkpoint, so a trial
    resumed by a new trial function reports its checkpoint's epoch again before
    it trains on (:meth:`on_train_start`), a trial resumed from its final checkpoint, which
    trains no further epoch, can still report its result
    (:meth:`report_if_silent`), and a resumed trial keeps its constants without
    measuring them again.

    Args:
        constants: metrics reported unchanged with every epoch.
        warmup_epochs: the trial's MSE warm-up (``LossConfig.mse_warmup_epochs``): ``nll_epochs``
            counts the epochs after it.
        report_restored: the run continues an earlier trial function's run (:meth:`on_train_start`).
    """

    def __init__(self, constants: Mapping[str, float] | None = None, *, warmup_epochs: int = 0,
                 report_restored: bool = False) -> None:
        self.constants = dict(constants or {})
        self.warmup_epochs = warmup_epochs
        self.report_restored = report_restored
        self.last_metrics: dict[str, float] = {}
        self.reported = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add ``epochs``, ``nll_epochs``, the calibrated objective and the constants to ``trainer.callback_metrics``."""
        metrics = trainer.callback_metrics
        metrics[EPOCHS_METRIC] = torch.tensor(float(trainer.current_epoch + 1))
        metrics[NLL_EPOCHS_METRIC] = torch.tensor(float(max(0, trainer.current_epoch + 1 - self.warmup_epochs)))
        if all(k in metrics for k in ("val/nll_km", "val/coverage_1sigma", "val/coverage_2sigma")):
            value = calibrated_nll(*(float(metrics[k]) for k in ("val/nll_km", "val/coverage_1sigma", "val/coverage_2sigma")))
            metrics[OBJECTIVES["calibrated"].metric] = torch.tensor(value)
        for key, value in self.constants.items():
            metrics[key] = torch.tensor(value, dtype=torch.float64)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        self.reported = True

    def state_dict(self) -> dict[str, Any]:
        """The last reported metrics (saved in each Lightning checkpoint)."""
        return {"last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last reported metrics (and from them the constants) from a checkpoint."""
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        for key in (LATENCY_METRIC, MODEL_PARAMS_METRIC):
            if key in self.last_metrics:
                self.constants.setdefault(key, self.last_metrics[key])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that continues an earlier trial function's run (``report_restored``) first reports
        the epoch its checkpoint holds, then trains on.

        That epoch's result may never have reached the driver: trained while the
        driver was stopping (Ctrl-C), or in flight when a node died with the trial
        function. Without this, Optuna would lack that intermediate value and ASHA
        that rung after ``--resume``. A result the driver already had is harmless:
        Optuna keeps one value per epoch, ASHA one per rung, the live MLflow run one
        per step. Every rank calls it (Train's reports are collective).
        """
        if self.report_restored and self.last_metrics and not self.reported:
            ray.train.report(dict(self.last_metrics))
            self.reported = True

    def report_if_silent(self) -> None:
        """Report the restored metrics if this attempt trained no epoch.

        Without it a trial whose run had already finished when the driver died
        would end without any result and count as pruned.
        """
        if not self.reported and self.last_metrics:
            ray.train.report(dict(self.last_metrics))


def _quiet_lightning() -> None:
    """Keep Lightning's per-trial banners (devices, model summary) out of the logs."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _placement(precision: str) -> Placement:
    """This worker's accelerator: CUDA exactly when Ray gave it a GPU, never "auto" (a CPU build
    of torch on a GPU node fails the trial with the fix instead of training on CPUs)."""
    placement = choose_placement(gpu_ids=ray.get_gpu_ids(), cuda_available=torch.cuda.is_available())
    check_precision(precision, placement.accelerator == "cuda", "precision")
    return placement


def _build_trainer(spec: TrialSpec, metrics: TrialMetrics, placement: Placement, precision: str) -> pl.Trainer:
    # RayDDPStrategy puts the model on the device Ray assigned (its root_device), so devices stays "auto".
    trainer = pl.Trainer(
        max_epochs=spec.study.max_epochs,
        accelerator=placement.accelerator,
        devices=placement.devices,
        precision=precision,
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        # Order matters: TrialMetrics must fill callback_metrics before Ray reads them.
        callbacks=[metrics, RayTrainReportCallback()],
        logger=False,
        enable_checkpointing=False,  # Ray's callback writes the only checkpoints
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # a sanity pass would cost a validation per trial start
    )
    return prepare_trainer(trainer)


def _build_module(configs: TrialConfigs, cache: FeatureCache) -> LocalizationModule:
    model = build_model(configs.arch, configs.model)
    return LocalizationModule(model, configs.loss, configs.optimizer, cache.target_scaling, cache.feature_config)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body of every Train worker: fit one LocalizationModule, resuming if Train has a checkpoint.

    Args:
        config: ``{"spec": TrialSpec, "params": flat parameters, "seed": int,
            "cache": FeatureCache, "trial_id": Tune's trial id}`` as :func:`run_trial` builds it.
    """
    _quiet_lightning()
    spec: TrialSpec = config["spec"]
    cache: FeatureCache = config["cache"]
    configs = spec.configs(config["params"])
    precision = configs.trainer.precision or spec.study.precision
    placement = _placement(precision)  # first: a worker that cannot train fails before any other work
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    module = _build_module(configs, cache)
    checkpoint = ray.train.get_checkpoint()
    # Rank 0 only: Tune takes rank 0's metrics. A resumed run restores them from its checkpoint.
    measure = (any(o.metric == LATENCY_METRIC for o in spec.study.objectives) and checkpoint is None
               and ray.train.get_context().get_world_rank() == 0)
    metrics = TrialMetrics(_architecture_metrics(configs, cache) if measure else None,
                           warmup_epochs=configs.loss.mse_warmup_epochs, report_restored=bool(config.get("report_restored")))
    trainer = _build_trainer(spec, metrics, placement, precision)
    world = ray.train.get_context().get_world_size()
    # n_rows gives the loaders a length: the module's lr schedule counts steps per epoch.
    pin = placement.accelerator == "cuda"  # page-locked batches: the copy to the GPU overlaps the step
    train = RayBatches(ray.train.get_dataset_shard("train"), configs.optimizer.batch_size, shuffle=True,
                       seed=config["seed"], n_rows=cache.counts["train"] // world, pin_memory=pin)
    val = RayBatches(ray.train.get_dataset_shard("val"), EVAL_BATCH_SIZE, shuffle=False,
                     seed=0, n_rows=cache.counts["val"] // world, pin_memory=pin)
    _announce(config.get("trial_id"), checkpoint, f"{placement.accelerator} at precision {precision}")
    if checkpoint is None:
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
        return
    # Fit inside the context: for S3 storage the directory is a download that vanishes on exit.
    with checkpoint.as_directory() as directory:
        ckpt = Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME
        # A checkpoint is data: explicit, as Lightning leaves None to torch, whose default an env variable can turn off.
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=str(ckpt), weights_only=True)
    metrics.report_if_silent()


def _announce(trial_id: str | None, checkpoint: ray.train.Checkpoint | None, device: str) -> None:
    """One line in the worker's log (dashboard → Logs, or ``worker-*.out`` on its node): which
    trial, which rank, which node and device, and whether it starts fresh or resumes from a checkpoint."""
    ctx = ray.train.get_context()
    how = f"resuming from {checkpoint.path}" if checkpoint is not None else "starting from scratch"
    print(f"{datetime.now().isoformat(timespec='milliseconds')} heimdall: trial {trial_id} rank "
          f"{ctx.get_world_rank()}/{ctx.get_world_size()} on node {ray.get_runtime_context().get_node_id()} "
          f"pid {os.getpid()}: {how}, training on {device}", flush=True)
