"""One trial of a study: a Ray Train run of an ordinary Lightning ``Trainer``.

Each Tune trial is the function :func:`run_trial`, which builds a
``TorchTrainer`` and calls ``fit()``; its workers run
:func:`train_loop_per_worker`, a plain Lightning ``Trainer`` over
:class:`heimdall.module.LocalizationModule` with Ray added from the outside
only. Every validation epoch is one report (metrics and a checkpoint) that ASHA
may stop the trial on. A dead worker restarts the Train run from its last
checkpoint (a finite number of times); a deterministic failure
(:data:`DETERMINISTIC_ERRORS`) is never retried: :class:`TrialFailed` ends it
with the one-line reason. The objectives (:data:`OBJECTIVES`) live here because
the workers compute the calibrated one and the driver ranks trials by the same
names. The design and the Ray facts behind it: docs/architecture.md, "Search".
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import pyarrow.fs
import ray.train
import torch
from ray import tune
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from heimdall.errors import HeimdallError, collect_problems
from heimdall.metrics import NOMINAL_COVERAGE
from heimdall.models import build_model
from heimdall.module import LocalizationModule
from tuning.data.pipeline import FeatureCache, RayBatches
from tuning.release.onnx import build_metadata, export_onnx, onnx_session
from tuning.study.spaces import SearchSpace, TrialConfigs, build_configs, fit_budget

if TYPE_CHECKING:
    import ray.data

    from tuning.study.tune import StudyConfig

__all__ = [
    "Objective",
    "OBJECTIVES",
    "LATENCY_METRIC",
    "MODEL_PARAMS_METRIC",
    "MAX_OBJECTIVES",
    "objective_problems",
    "parse_objectives",
    "objective_arg",
    "LATENCY_THREADS",
    "latency_session",
    "measure_latency_ms",
    "COVERAGE_BAND",
    "COVERAGE_PENALTY",
    "EPOCHS_METRIC",
    "OPTUNA_NUMBER_KEY",
    "calibrated_nll",
    "TrialSpec",
    "TrialMetrics",
    "trial_params",
    "DETERMINISTIC_ERRORS",
    "TrialFailed",
    "deterministic_cause",
    "train_loop_per_worker",
    "run_trial",
]

# -- objectives ----------------------------------------------------------------------

#: Coverage may miss its nominal value by this much (a fraction: 0.05 = 5 points)
#: before the calibrated objective adds a penalty.
COVERAGE_BAND = 0.05
#: Nats added per unit of coverage outside the band (20: 1 nat per 5 points).
COVERAGE_PENALTY = 20.0
#: Epochs completed, counted from 1: ASHA's time axis. Unlike Tune's
#: ``training_iteration`` it survives a restart of the trial function.
EPOCHS_METRIC = "epochs"
#: Key of the Optuna trial number in every Tune trial config (not a parameter).
OPTUNA_NUMBER_KEY = "_optuna_number"


@dataclass(frozen=True)
class Objective:
    """What a study minimises.

    Attributes:
        name: the ``--objective`` value.
        metric: the reported metric, as Tune and Optuna see it.
        mode: ``"min"`` or ``"max"``.
        description: one line for ``--help`` and the plan.
    """

    name: str
    metric: str
    mode: str
    description: str


#: The exported model's onnxruntime latency, ms per recording (:func:`measure_latency_ms`);
#: reported in every result of a study that has it among its objectives.
LATENCY_METRIC = "latency_ms"
#: The trial's model parameter count, reported next to :data:`LATENCY_METRIC`.
MODEL_PARAMS_METRIC = "model_params"
#: A study minimises one objective, or two for a Pareto search (``--objective nll,latency_ms``).
MAX_OBJECTIVES = 2

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("nll", "val/nll_km", "min", "mean negative log-likelihood of the truth, km (default)"),
        Objective("median", "val/median_km", "min", "median localization error, km"),
        Objective(
            "calibrated", "val/calibrated_nll", "min",
            f"NLL + {COVERAGE_PENALTY:g} x (1-/2-sigma coverage outside nominal +-{COVERAGE_BAND * 100:g} points)",
        ),
        Objective(LATENCY_METRIC, LATENCY_METRIC, "min",
                  "onnxruntime latency of the exported model, batch 1, 1 thread, ms (second objective only)"),
    )
}
#: Objectives that do not change from epoch to epoch, so they cannot come first: the first
#: objective ranks a trial's epochs (its best checkpoint) and drives ASHA.
_EPOCH_INVARIANT = (LATENCY_METRIC,)


def objective_problems(text: str) -> list[str]:
    """What is wrong with an ``--objective`` value (empty: it is valid).

    A value is one objective name (:data:`OBJECTIVES`) or two, comma-separated,
    for a Pareto search: at most :data:`MAX_OBJECTIVES`, no name twice, and the
    first one must change with training (``latency_ms`` can only come second).

    Args:
        text: e.g. ``"nll"`` or ``"nll,latency_ms"``.

    Returns:
        One line per broken rule, each ending with its fix.
    """
    if not isinstance(text, str):
        return [f"objective must be a text such as 'nll' or 'nll,latency_ms', got {text!r}"]
    names = [n.strip() for n in text.split(",")]
    valid = ", ".join(OBJECTIVES)
    if len(names) > MAX_OBJECTIVES:
        return [f"objective names at most {MAX_OBJECTIVES} objectives (a Pareto front of two), got {len(names)} in "
                f"{text!r}; fix: keep two, e.g. nll,latency_ms"]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        return [f"objective {n!r} in {text!r} is unknown; fix: use one of {valid}" for n in unknown]
    if len(set(names)) < len(names):
        return [f"objective {text!r} names {names[0]!r} twice; fix: name two different objectives, e.g. nll,latency_ms"]
    if names[0] in _EPOCH_INVARIANT:
        return [f"objective {text!r} puts {names[0]!r} first, but the first objective picks each trial's best epoch "
                f"and drives ASHA, and {names[0]} does not change with training; fix: put an accuracy objective "
                f"first, e.g. nll,{names[0]}"]
    return []


def parse_objectives(text: str) -> tuple[Objective, ...]:
    """The objectives of an ``--objective`` value, first objective first.

    Raises:
        ConfigError: the value breaks a rule of :func:`objective_problems`.
    """
    collect_problems("objective", objective_problems(text))
    return tuple(OBJECTIVES[n.strip()] for n in text.split(","))


def objective_arg(text: str) -> str:
    """``--objective``'s argparse type: the value, checked and with spaces removed.

    Raises:
        argparse.ArgumentTypeError: naming the broken rule (argparse makes it a usage error).
    """
    problems = objective_problems(text)
    if problems:
        raise argparse.ArgumentTypeError(problems[0])
    return ",".join(n.strip() for n in text.split(","))


def calibrated_nll(nll_km: float, coverage_1sigma: float, coverage_2sigma: float) -> float:
    """NLL plus a penalty for 1-/2-sigma coverage outside nominal +- :data:`COVERAGE_BAND`.

    A model that is sharp but overconfident can win on NLL alone; this keeps its
    ellipses honest. The penalty is :data:`COVERAGE_PENALTY` nats per unit of
    coverage beyond the band, summed over the two ellipses.

    Args:
        nll_km: mean negative log-likelihood (positions in km).
        coverage_1sigma: fraction of truths inside the 1-sigma ellipses (nominal 0.3935).
        coverage_2sigma: fraction inside the 2-sigma ellipses (nominal 0.8647).

    Returns:
        The penalised NLL; equal to ``nll_km`` when both coverages are in the band.
    """
    excess = 0.0
    for name, value in (("coverage_1sigma", coverage_1sigma), ("coverage_2sigma", coverage_2sigma)):
        nominal = NOMINAL_COVERAGE[name][1]
        excess += max(0.0, abs(value - nominal) - COVERAGE_BAND)
    return nll_km + COVERAGE_PENALTY * excess


# -- the trial's settings ------------------------------------------------------------


#: Validation batch size (no gradients, so larger than a training batch).
EVAL_BATCH_SIZE = 256
#: Checkpoints a trial keeps: the best by the objective and the latest.
CHECKPOINTS_TO_KEEP = 2


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled parameters; sent to every trial.

    Its settings are the study's (:class:`tuning.study.tune.StudyConfig`, validated
    there: objective, epoch budget and schedule horizon, seed, workers and their
    CPUs, Train restarts); this adds the space and where checkpoints go.

    Attributes:
        study: the study's settings.
        space: the search space the parameters come from.
        train_storage: where Train runs keep checkpoints, a path on
            ``storage_filesystem`` (``bucket/prefix/...`` for S3).
        storage_filesystem: pyarrow filesystem of ``train_storage``; None for local paths.
    """

    study: StudyConfig
    space: SearchSpace
    train_storage: str
    storage_filesystem: pyarrow.fs.FileSystem | None = None

    def __post_init__(self) -> None:
        if not self.train_storage:
            collect_problems("TrialSpec", ["train_storage must name a directory or bucket/prefix, got ''"])

    def configs(self, params: Mapping[str, Any]) -> TrialConfigs:
        """The trial's typed configs, with the study's epoch budget as the schedule horizon.

        :func:`tuning.study.spaces.fit_budget` decides: the horizon is ``max_epochs``;
        a default warm-up that does not end before it is turned off, one the
        space searches or fixes is an error (which
        :func:`tuning.study.spaces.check_space_budget` reports before the study).

        Raises:
            ConfigError: listing every problem of the parameters.
        """
        configs = build_configs(self.space, trial_params(params))
        chosen = set(self.space.fixed) | {p.name for p in self.space.parameters}
        return fit_budget(configs, self.study.max_epochs, chosen)

    def check_rows(self, counts: Mapping[str, int]) -> None:
        """Every Train worker must get at least one training and one validation recording.

        Train splits each dataset into ``workers_per_trial`` equal parts (the
        remainder is dropped); an empty part would train nothing or report
        nothing. A batch larger than a part is fine: one partial batch per epoch.

        Args:
            counts: rows per split (``FeatureCache.counts``).

        Raises:
            ConfigError: naming each split that is too small, with the fix.
        """
        collect_problems("trial data", [
            f"the {split} split has {counts.get(split, 0)} recording(s) for {self.study.workers_per_trial} Train worker(s): "
            f"a worker would get none; fix: use a larger dataset (--recordings) or fewer --workers-per-trial"
            for split in ("train", "val") if counts.get(split, 0) // self.study.workers_per_trial < 1])


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The searched parameters of a Tune trial config (bookkeeping keys removed)."""
    return {k: v for k, v in config.items() if k != OPTUNA_NUMBER_KEY}


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
    resumed from its final checkpoint, which trains no further epoch, can still
    report its result (:meth:`report_if_silent`), and a resumed trial keeps its
    constants without measuring them again.

    Args:
        constants: metrics reported unchanged with every epoch.
    """

    def __init__(self, constants: Mapping[str, float] | None = None) -> None:
        self.constants = dict(constants or {})
        self.last_metrics: dict[str, float] = {}
        self.reported = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add ``epochs``, the calibrated objective and the constants to ``trainer.callback_metrics``."""
        metrics = trainer.callback_metrics
        metrics[EPOCHS_METRIC] = torch.tensor(float(trainer.current_epoch + 1))
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


def _build_trainer(spec: TrialSpec, metrics: TrialMetrics) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=spec.study.max_epochs,
        accelerator="cpu",
        devices="auto",
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
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    module = _build_module(configs, cache)
    checkpoint = ray.train.get_checkpoint()
    # Rank 0 only: Tune takes rank 0's metrics. A resumed run restores them from its checkpoint.
    measure = (any(o.metric == LATENCY_METRIC for o in spec.study.objectives) and checkpoint is None
               and ray.train.get_context().get_world_rank() == 0)
    metrics = TrialMetrics(_architecture_metrics(configs, cache) if measure else None)
    trainer = _build_trainer(spec, metrics)
    world = ray.train.get_context().get_world_size()
    # n_rows gives the loaders a length: the module's lr schedule counts steps per epoch.
    train = RayBatches(ray.train.get_dataset_shard("train"), configs.optimizer.batch_size, shuffle=True,
                       seed=config["seed"], n_rows=cache.counts["train"] // world)
    val = RayBatches(ray.train.get_dataset_shard("val"), EVAL_BATCH_SIZE, shuffle=False,
                     seed=0, n_rows=cache.counts["val"] // world)
    _announce(config.get("trial_id"), checkpoint)
    if checkpoint is None:
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
        return
    # Fit inside the context: for S3 storage the directory is a download that vanishes on exit.
    with checkpoint.as_directory() as directory:
        ckpt = Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME
        # A checkpoint is data: explicit, as Lightning leaves None to torch, whose default an env variable can turn off.
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=str(ckpt), weights_only=True)
    metrics.report_if_silent()


def _announce(trial_id: str | None, checkpoint: ray.train.Checkpoint | None) -> None:
    """One line in the worker's log (dashboard → Logs, or ``worker-*.out`` on its node): which
    trial, which rank, which node, and whether it starts fresh or resumes from a checkpoint."""
    ctx = ray.train.get_context()
    how = f"resuming from {checkpoint.path}" if checkpoint is not None else "starting from scratch"
    print(f"{datetime.now().isoformat(timespec='milliseconds')} heimdall: trial {trial_id} rank "
          f"{ctx.get_world_rank()}/{ctx.get_world_size()} on node {ray.get_runtime_context().get_node_id()} "
          f"pid {os.getpid()}: {how}", flush=True)


# -- trial side (one Tune trial = one Train run) ---------------------------------------

#: Errors a retry would repeat: our own checks (every HeimdallError, ConfigError among them)
#: and what Python and torch raise on a bad configuration or bad data. A failure of
#: anything else (a dead worker or node, a timeout, storage I/O, RuntimeError) may pass.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (HeimdallError, ValueError, TypeError, ArithmeticError)
#: Where a trial's deterministic failure is recorded, inside its Train run's directory.
FAILURE_FILE = "heimdall-failure.txt"


class TrialFailed(HeimdallError):
    """A trial failed in a way a retry would repeat; the message is the one-line reason. Not retried."""


def deterministic_cause(error: BaseException) -> BaseException | None:
    """The error that would make a retry fail the same way, or None for an infrastructure failure.

    A Train run's ``WorkerGroupError`` is deterministic when some worker raised
    one of :data:`DETERMINISTIC_ERRORS` and no worker died: when one dies (an
    error of Ray itself, such as ``ActorDiedError`` or a failed health check)
    the others fail too, with whatever their collective raised, and the run is
    worth restarting.

    Args:
        error: what ``TorchTrainer.fit()`` or the trial's own checks raised.

    Returns:
        The first deterministic worker error (by rank), ``error`` itself if it is one, else None.
    """
    if isinstance(error, ray.train.WorkerGroupError):
        failures = [f for _, f in sorted(error.worker_failures.items())]
        if any(type(f).__module__.split(".")[0] == "ray" for f in failures):
            return None
        return next((f for f in failures if isinstance(f, DETERMINISTIC_ERRORS)), None)
    if isinstance(error, ray.train.TrainingFailedError):
        return None  # the controller's own failures: scheduling, startup, preemption
    return error if isinstance(error, DETERMINISTIC_ERRORS) else None


def _one_line(error: BaseException, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _failure_record(spec: TrialSpec, trial_id: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a trial's failure record (shared storage on a cluster)."""
    return spec.storage_filesystem or pyarrow.fs.LocalFileSystem(), f"{spec.train_storage}/{trial_id}/{FAILURE_FILE}"


def _read_failure(spec: TrialSpec, trial_id: str) -> str | None:
    fs, path = _failure_record(spec, trial_id)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read().decode("utf-8")


def _write_failure(spec: TrialSpec, trial_id: str, reason: str) -> None:
    fs, path = _failure_record(spec, trial_id)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(reason.encode("utf-8"))


def _train_run_config(spec: TrialSpec, run_name: str) -> Any:
    return ray.train.RunConfig(
        name=run_name,
        storage_path=spec.train_storage,
        storage_filesystem=spec.storage_filesystem,
        callbacks=[TuneReportCallback()],
        # Worker failures come back to run_trial at once (max_failures=0), which tells a dead worker
        # from a deterministic error before restarting; Train would retry both alike.
        failure_config=ray.train.FailureConfig(
            max_failures=0,
            controller_failure_limit=spec.study.max_failures,
            max_preemption_failures=spec.study.max_failures,
        ),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_TO_KEEP,
            checkpoint_score_attribute=spec.study.objective_spec.metric,
            checkpoint_score_order=spec.study.objective_spec.mode,
        ),
    )


def run_trial(
    config: dict[str, Any],
    *,
    spec: TrialSpec,
    datasets: Mapping[str, ray.data.Dataset | Callable[[], ray.data.Dataset]],
    cache: FeatureCache,
) -> None:
    """Tune's function trainable: one ``TorchTrainer`` run for one set of parameters.

    Bind the keyword arguments with ``tune.with_parameters``. Metrics reach Tune
    through ``TuneReportCallback``. The configs and the data are checked before
    any worker starts. A run whose worker died is started again, resuming from
    its last checkpoint, up to :attr:`TrialSpec.max_failures` times; a
    deterministic failure (:func:`deterministic_cause`) is never retried.

    Args:
        config: Tune's trial config: the flat parameters plus :data:`OPTUNA_NUMBER_KEY`.
        spec: the study-wide trial settings.
        datasets: ``{"train": ..., "val": ...}`` Ray datasets (or factories) of cached features,
            from :func:`tuning.data.pipeline.trial_datasets`.
        cache: the feature cache they read (row counts, feature config, target scaling).

    Raises:
        TrialFailed: a deterministic failure, now or in an earlier attempt of this trial
            (the message is its one-line reason).
        ray.train.TrainingFailedError: an infrastructure failure that outlived the restarts.
    """
    trial_id = tune.get_context().get_trial_id()
    earlier = _read_failure(spec, trial_id)
    if earlier is not None:
        raise TrialFailed(f"{earlier} (not retried: the trial's first attempt failed so, and would again)")
    try:
        _fit_with_restarts(config, spec, datasets, cache, trial_id)
    except Exception as error:
        cause = deterministic_cause(error)
        if cause is None:
            raise
        reason = _one_line(cause)
        _write_failure(spec, trial_id, reason)
        print(f"{datetime.now().isoformat(timespec='milliseconds')} heimdall: trial {trial_id} failed, "
              f"not retried: {reason}", flush=True)
        raise TrialFailed(reason) from None


def _fit_with_restarts(config: Mapping[str, Any], spec: TrialSpec, datasets: Mapping[str, Any],
                       cache: FeatureCache, trial_id: str) -> None:
    params = trial_params(config)
    spec.configs(params)  # fail here, in one clear error, rather than in every worker
    spec.check_rows(cache.counts)
    seed = spec.study.seed + int(config.get(OPTUNA_NUMBER_KEY, 0))
    for restart in range(spec.study.max_failures + 1):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec, "params": params, "seed": seed, "cache": cache, "trial_id": trial_id},
            scaling_config=ray.train.ScalingConfig(
                num_workers=spec.study.workers_per_trial, resources_per_worker={"CPU": spec.study.cpus_per_worker}
            ),
            datasets=dict(datasets),
            run_config=_train_run_config(spec, trial_id),  # same name: a restart resumes the run
        )
        try:
            trainer.fit()
            return
        except ray.train.WorkerGroupError as error:
            if deterministic_cause(error) is not None or restart == spec.study.max_failures:
                raise
            print(f"{datetime.now().isoformat(timespec='milliseconds')} heimdall: trial {trial_id} lost a worker "
                  f"({_one_line(error, 200)}); restart {restart + 1}/{spec.study.max_failures} from its last checkpoint",
                  flush=True)
