"""One trial of a study: a Ray Train run of an ordinary Lightning ``Trainer``.

Each Tune trial is the function :func:`run_trial`, which builds a
``TorchTrainer`` and calls ``fit()``; its workers run
:func:`train_loop_per_worker`, a plain Lightning ``Trainer`` over
:class:`heimdall.module.LocalizationModule` with Ray added from the outside
only (:mod:`tuning.study.worker`, imported only by the workers: this module
stays free of Lightning, which costs seconds to import in every process that
unpickles a trial). Every validation epoch is one report (metrics and a checkpoint) that ASHA
may stop the trial on. A dead worker restarts the Train run from its last
checkpoint (a finite number of times); a deterministic failure
(:data:`DETERMINISTIC_ERRORS`) is never retried: :class:`TrialFailed` ends it
with the one-line reason. The objectives (:data:`OBJECTIVES`) live here because
the workers compute the calibrated one and the driver ranks trials by the same
names. The design and the Ray facts behind it: docs/architecture.md, "Search".
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.tune.integration.ray_train import TuneReportCallback

from heimdall.errors import HeimdallError, collect_problems
from heimdall.metrics import NOMINAL_COVERAGE
from tuning.study.spaces import SearchSpace, TrialConfigs, build_configs, fit_budget

if TYPE_CHECKING:
    import ray.data

    from tuning.data.pipeline import FeatureCache
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
    "COVERAGE_BAND",
    "COVERAGE_PENALTY",
    "EPOCHS_METRIC",
    "NLL_EPOCHS_METRIC",
    "OPTUNA_NUMBER_KEY",
    "calibrated_nll",
    "TrialSpec",
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
#: Epochs completed, counted from 1. Unlike Tune's ``training_iteration`` it
#: survives a restart of the trial function.
EPOCHS_METRIC = "epochs"
#: Epochs completed after the trial's MSE warm-up (``loss.mse_warmup_epochs``):
#: ASHA's time axis, so that no rung judges a trial while it still fits the
#: mean by MSE (its NLL is not yet comparable with that of a trial training it).
NLL_EPOCHS_METRIC = "nll_epochs"
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


# -- worker side ----------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body of every Train worker: :func:`tuning.study.worker.train_loop_per_worker`.

    Imported here, in the worker, so that Lightning stays out of the processes that
    only unpickle this function (Tune's trial actor, Train's controller).
    """
    from tuning.study.worker import train_loop_per_worker as fit

    fit(config)


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


def _train_run_exists(spec: TrialSpec, trial_id: str) -> bool:
    """Whether the trial's Train run (named after it) already has a folder in the run storage."""
    fs = spec.storage_filesystem or pyarrow.fs.LocalFileSystem()
    return fs.get_file_info(f"{spec.train_storage}/{trial_id}").type == pyarrow.fs.FileType.Directory


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
            from :func:`tuning.data.pipeline.study_datasets`.
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


def _scaling_config(spec: TrialSpec) -> ray.train.ScalingConfig:
    """The trial's Train workers and what each reserves.

    With ``gpus_per_worker`` > 0 each worker reserves that share of one GPU (Ray packs
    fractions of several trials onto one device and sets ``CUDA_VISIBLE_DEVICES``);
    the worker then trains on CUDA (:func:`heimdall.devices.choose_placement`).
    """
    gpus = spec.study.gpus_per_worker
    resources = {"CPU": spec.study.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return ray.train.ScalingConfig(num_workers=spec.study.workers_per_trial, use_gpu=bool(gpus),
                                   resources_per_worker=resources)


def _torch_config(spec: TrialSpec) -> TorchConfig:
    """The process group of the trial's workers: NCCL when every worker's torch has CUDA and NCCL.

    Ray Train would pick NCCL for any worker given a GPU and fail in its own set-up
    (a controller error, retried) when the worker's torch is a CPU build; gloo lets
    such a worker reach the training loop, which refuses it with one clear error.
    """
    return _DeviceTorchConfig() if spec.study.gpus_per_worker else TorchConfig()


def _worker_backend() -> str:
    import torch
    import torch.distributed as dist

    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


class _DeviceTorchBackend(_TorchBackend):
    # Ray's own torch backend (ray.train.torch.config, internal; read against Ray 2.60) with the
    # process-group backend chosen from what the workers' torch can do, asked of the workers.
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        backends = set(worker_group.execute(_worker_backend))
        chosen = "nccl" if backends == {"nccl"} else "gloo"
        super().on_start(worker_group, dataclasses.replace(backend_config, backend=chosen))


@dataclass
class _DeviceTorchConfig(TorchConfig):
    backend: str | None = "nccl"  # set: TorchTrainer keeps it; on_start decides

    @property
    def backend_cls(self) -> type:
        return _DeviceTorchBackend


def _dataset_config(spec: TrialSpec) -> ray.train.DataConfig:
    """How Train hands the trial's datasets to its workers.

    One worker: nothing is split, so the worker iterates the study's datasets itself
    (:func:`tuning.data.pipeline.study_datasets`: blocks already in the object store)
    and the trial starts no SplitCoordinator actor per dataset, whose boot and first
    batch cost ~3-4 s per trial on 2 cores. Several workers: Train's streaming split,
    which deals the blocks out afresh every epoch, so the ranks see different rows each
    epoch; one coordinator is a small cost beside a multi-worker trial's length.
    """
    return ray.train.DataConfig(datasets_to_split=[] if spec.study.workers_per_trial == 1 else "all")


def _fit_with_restarts(config: Mapping[str, Any], spec: TrialSpec, datasets: Mapping[str, Any],
                       cache: FeatureCache, trial_id: str) -> None:
    params = trial_params(config)
    spec.configs(params)  # fail here, in one clear error, rather than in every worker
    spec.check_rows(cache.counts)
    seed = spec.study.seed + int(config.get(OPTUNA_NUMBER_KEY, 0))
    # A Train run left by an earlier trial function (a resumed study, Tune's retry after a lost node): its
    # last checkpoint's epoch may never have reached the driver, so the first run here reports it again.
    # This function's own restarts need not: it received every result its runs reported.
    continues = _train_run_exists(spec, trial_id)
    for restart in range(spec.study.max_failures + 1):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec, "params": params, "seed": seed, "cache": cache, "trial_id": trial_id,
                               "report_restored": continues and restart == 0},
            scaling_config=_scaling_config(spec),
            torch_config=_torch_config(spec),
            datasets=dict(datasets),
            dataset_config=_dataset_config(spec),
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
