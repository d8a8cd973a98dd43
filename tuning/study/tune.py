"""The study: Ray Tune with Optuna's TPE sampler and ASHA, on function trials.

:class:`StudyConfig` holds every default of a study (one typed home; the CLI
only overrides). From it and the connections the driver builds, in order:

* :func:`open_optuna_storage`: the Optuna study lives in PostgreSQL when
  ``--optuna-storage postgresql://...`` is given, else in SQLite in the data
  directory. ``OptunaSearch`` writes every suggestion and result there.
* :func:`open_run_storage`: where Tune's experiment state and Train's
  checkpoints go, a local directory or ``s3://bucket/prefix``.
* :func:`plan_resources`: how many trials run at once, sized from the cluster's
  CPUs and GPUs with CPUs left over for Ray Data, so data tasks never starve;
  :class:`ClusterLimiter` replans as nodes join or leave during the study.
* :func:`build_tuner` (or :func:`restore_tuner` for ``--resume``).

Trials are :func:`tuning.study.trial.run_trial`; their Tune config is the flat
parameter dict plus the Optuna trial number (:data:`~tuning.study.trial.OPTUNA_NUMBER_KEY`),
which lets :func:`reconcile_optuna` match the two bookkeepings after a crash.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import optuna
import pyarrow.fs
import ray
import ray.cloudpickle
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from heimdall.catalog import redact_url
from heimdall.devices import DEFAULT_PRECISION, PRECISIONS
from heimdall.errors import AlreadyExistsError, ConfigError, NotFoundError, ServiceUnavailableError, collect_problems
from heimdall.store import S3Settings, open_store
from tuning.data.pipeline import READ_CONCURRENCY, READ_NUM_CPUS, FeatureCache
from tuning.settings import parse_duration, positive_float, positive_int, setting
from tuning.study.spaces import SearchSpace, to_optuna
from tuning.study.trial import (
    EPOCHS_METRIC,
    LATENCY_METRIC,
    NLL_EPOCHS_METRIC,
    OBJECTIVES,
    OPTUNA_NUMBER_KEY,
    Objective,
    TrialSpec,
    objective_arg,
    objective_problems,
    parse_objectives,
    run_trial,
)

__all__ = [
    "StudyConfig",
    "SMOKE_TEST",
    "RunStorage",
    "ResourcePlan",
    "open_run_storage",
    "open_optuna_storage",
    "check_optuna_url",
    "keep_credentials_out_of_runtime_envs",
    "describe_url",
    "check_new_study",
    "check_resumable",
    "plan_resources",
    "plan_study",
    "ClusterLimiter",
    "NumberedSpace",
    "StudySearch",
    "make_sampler",
    "make_searcher",
    "WARM_START_ATTR",
    "warm_start_trials",
    "make_scheduler",
    "trial_name",
    "make_trainable",
    "build_tuner",
    "restore_tuner",
    "ResumeReconciliation",
    "reconcile_for_resume",
    "reconcile_optuna",
    "prune_stopped",
    "INTERRUPTED_ATTR",
    "mark_interrupted",
    "StudyProgress",
]

#: What Tune reserves for each trial function, which only waits on its TorchTrainer: memory, no CPU
#: (a placement group bundle cannot be empty, and a CPU sliver would keep two one-CPU trials off
#: two CPUs). A logical reservation: Ray does not enforce it; the process holds ~400 MB.
TRIAL_FUNCTION_MEMORY = 256 * 2**20
#: CPUs per trial for its Ray Data read tasks (tuning.data.pipeline runs at most READ_CONCURRENCY at
#: once), counted in the plan but not reserved (see ResourcePlan), and only when the trials read:
#: a study whose features are materialised in the object store (tuning.data.pipeline.study_datasets)
#: starts no read task during its trials.
DATA_CPUS_PER_TRIAL = READ_CONCURRENCY * READ_NUM_CPUS
#: How long a trial's Train run waits for its worker group's resources (Ray's default is
#: 60 s). After a node is lost, trials whose workers no longer fit wait for running ones
#: to finish instead of failing at once (see docs/cluster.md, "Losing a node").
WORKER_GROUP_START_TIMEOUT_S = 600
#: Tune-level retries of a trial function. The trial function already restarts its Train
#: run when a worker dies (StudyConfig.max_failures), but on a cluster a lost node also
#: kills the trial functions and Train controllers it hosted; one retry restarts the trial
#: function, whose new Train run of the same name resumes from the last checkpoint in
#: shared storage. Tune retries every error alike, so a deterministic failure (a bad
#: config or data) is retried too, but only in name: the trial function recorded it, and
#: its retry ends at once with the same reason (tuning.study.trial.run_trial), training nothing.
TUNE_MAX_FAILURES = 1
#: Folder of the study's own files inside its Tune experiment (see RunStorage.write_file).
STUDY_FILES = "heimdall"
#: Largest sampler seed: trial n is seeded with seed + n, and numpy seeds stop at 2**32 - 1.
MAX_SEED = 2**31 - 1
#: ASHA's first rung by default: epochs of NLL training (after a trial's MSE warm-up) before a trial
#: may be stopped. Chosen with bench/bench_tune.py search (docs/benchmarks.md): against a rung of 1,
#: and against rungs on all epochs, this matched random search's best far more often.
GRACE_NLL_EPOCHS = 2
#: Credentials that reach processes only through their own environment, never a runtime env.
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
#: PostgreSQL connect timeout (s): an unreachable server fails fast, not after minutes.
PG_CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class StudyConfig:
    """A study's settings: what is searched, on what, for how long.

    The one home of their defaults: a field declared with :func:`tuning.settings.setting`
    is also a ``tuning.run`` flag, its help in the field's metadata.

    Attributes:
        name: study name: the Optuna study, the Tune experiment and the output directory.
        space: search-space name (``search_spaces/<name>.yaml``) or path.
        dataset: catalogue dataset name; generated on first use if absent.
        dataset_recordings: size of a dataset generated on first use (8000 is ~1.8 GB).
        dataset_seed: seed of a generated dataset.
        objective: ``nll``, ``median`` or ``calibrated`` (:data:`tuning.study.trial.OBJECTIVES`), or two
            of them comma-separated for a Pareto search, e.g. ``nll,latency_ms`` (docs/architecture.md,
            "Accuracy vs latency"); the first ranks epochs and drives ASHA.
        max_latency_ms: two-objective studies with ``latency_ms``: the export takes the Pareto front
            member with the best first objective among those at most this slow (None: no bound).
        trials: number of trials.
        max_epochs: epochs of a trial that ASHA lets finish (ASHA's max_t).
        time_budget_s: Tune stops the study after this long (None: no limit).
        seed: seed of the TPE sampler and (plus the trial number) of each trial.
        workers_per_trial: Train workers (DDP processes) per trial.
        cpus_per_worker: CPUs each Train worker reserves.
        gpus_per_worker: GPUs each Train worker reserves, in [0, 1]: 0 trains on CPUs, a fraction
            packs several trials' workers on one GPU (Ray's fractional GPUs).
        precision: Lightning's training precision (:data:`heimdall.devices.PRECISIONS`).
        grace_period: epochs every trial trains the NLL (after its MSE warm-up) before ASHA may
            stop it, >= 1 and <= ``max_epochs`` (None: :data:`GRACE_NLL_EPOCHS`, or ``max_epochs``
            if fewer; :attr:`first_rung` is the value in use).
        reduction_factor: ASHA keeps the best 1/reduction_factor at each rung.
        max_failures: Train worker-group restarts per trial (finite).
        tpe_startup_trials: random trials before TPE models the results.
        max_concurrent: at most this many trials at once (None: as many as the cluster's CPUs and
            GPUs fit, see :func:`plan_resources`); the limit follows the cluster as nodes join or
            leave (:class:`ClusterLimiter`), this stays its upper bound.
        pin_long_warmups: pin the space's warm-ups that reach ``max_epochs`` to 0 instead of
            refusing the space (``--smoke-test`` only: a real study should fix its space).
        warm_start: name of a finished study of the same space and objective, in the same
            Optuna storage, whose trials TPE starts from (:func:`warm_start_trials`); None: none.
    """

    name: str = field(metadata=setting("study name (Optuna study, Tune experiment, output folder) [space-objective-time]"))
    space: str = field(default="resnet", metadata=setting(
        "search space: a name in search_spaces/ or a path to a .yaml [{default}]"))
    dataset: str = field(default="default", metadata=setting("dataset name; generated on first use if absent [{default}]"))
    dataset_recordings: int = field(default=8000, metadata=setting(
        "size of a dataset generated on first use [{default}, ~0.23 MB each]", flag="--recordings", type=positive_int))
    dataset_seed: int = 0
    objective: str = field(default="nll", metadata=setting(
        "what to minimise: one name, or two comma-separated for an accuracy-vs-latency Pareto search "
        "(nll,latency_ms; the first drives ASHA) [{default}]; "
        + "; ".join(f"{o.name}: {o.description}" for o in OBJECTIVES.values()), type=objective_arg))
    max_latency_ms: float | None = field(default=None, metadata=setting(
        "with --objective X,latency_ms: export the Pareto front member with the best X among those with "
        "latency_ms at most this [no bound]", type=positive_float))
    trials: int = field(default=8, metadata=setting("number of trials [{default}]", type=positive_int))
    max_epochs: int = field(default=4, metadata=setting("epochs of a trial ASHA does not stop [{default}]",
                                                        type=positive_int))
    time_budget_s: float | None = field(default=22 * 60.0, metadata=setting(
        "stop the study after this long: 90s, 30m, 2h or none [{default}]", flag="--time-budget", type=parse_duration,
        shown=lambda s: f"{s / 60:g}m", nullable=True))
    seed: int = field(default=0, metadata=setting("sampler seed; trial n uses seed + n [{default}]", type=int))
    workers_per_trial: int = field(default=1, metadata=setting(
        "Train workers (DDP processes) per trial [{default}]", type=positive_int))
    cpus_per_worker: float = field(default=1.0, metadata=setting(
        "CPUs per Train worker [{default}]", type=positive_float, shown=lambda c: f"{c:g}"))
    gpus_per_worker: float = field(default=0.0, metadata=setting(
        "GPUs per Train worker: 0 trains on CPUs; a fraction (0.25, 0.5) packs several trials on one GPU; "
        "1 gives each worker a whole GPU (more GPUs per trial: more --workers-per-trial) [{default}]",
        type=float, shown=lambda g: f"{g:g}"))
    precision: str = field(default=DEFAULT_PRECISION, metadata=setting(
        "numeric precision of training (Lightning's): 32, bf16-mixed or 16-mixed (GPU only) [{default}]",
        choices=PRECISIONS))
    grace_period: int | None = field(default=None, metadata=setting(
        "epochs every trial trains after its MSE warm-up before ASHA may stop it "
        f"[{GRACE_NLL_EPOCHS}, or --max-epochs if fewer]", type=positive_int))
    reduction_factor: int = 3
    max_failures: int = 2
    tpe_startup_trials: int = 3
    pin_long_warmups: bool = False
    max_concurrent: int | None = field(default=None, metadata=setting(
        "at most this many trials at once [as many as the cluster's CPUs and GPUs fit, rechecked as nodes "
        "join or leave]", type=positive_int))
    warm_start: str | None = field(default=None, metadata=setting(
        "name of an earlier study of the same space and objective, in the same Optuna storage, whose finished "
        "trials TPE starts from (they are not trained again) [none]"))

    @property
    def first_rung(self) -> int:
        """ASHA's first rung in NLL epochs: ``grace_period``, by default :data:`GRACE_NLL_EPOCHS` or
        ``max_epochs`` if fewer."""
        if self.grace_period is not None:
            return self.grace_period
        return min(GRACE_NLL_EPOCHS, self.max_epochs)  # (__post_init__ has checked max_epochs)

    def __post_init__(self) -> None:
        p: list[str] = []
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name.startswith("."):
            p.append(f"name must be non-empty, use letters, digits, '-', '_' or '.' and not start with '.' "
                     f"(it names a folder), got {self.name!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED):
            p.append(f"seed must be an integer in [0, {MAX_SEED}] (numpy's seed range less one per trial), "
                     f"got {self.seed!r}")
        objective = objective_problems(self.objective)
        p += objective
        if self.max_latency_ms is not None:
            if not (isinstance(self.max_latency_ms, (int, float)) and math.isfinite(self.max_latency_ms)
                    and self.max_latency_ms > 0):
                p.append(f"max_latency_ms must be > 0 ms (or None for no bound), got {self.max_latency_ms!r}")
            elif not objective and all(o.metric != LATENCY_METRIC for o in self.objectives):
                p.append(f"max_latency_ms ({self.max_latency_ms:g}) bounds the latency_ms objective, which "
                         f"--objective {self.objective!r} does not have; fix: --objective {self.objective},latency_ms "
                         f"or drop --max-latency-ms")
        for key in ("dataset_recordings", "trials", "max_epochs", "workers_per_trial", "grace_period"):
            value = getattr(self, key)
            if key == "grace_period" and value is None:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                p.append(f"{key} must be an integer >= 1, got {value!r}")
        if isinstance(self.grace_period, int) and isinstance(self.max_epochs, int) and self.grace_period > self.max_epochs:
            # (the default, None, follows a smaller --max-epochs: first_rung)
            p.append(f"grace_period ({self.grace_period}) must not exceed max_epochs ({self.max_epochs})")
        if not (isinstance(self.reduction_factor, int) and self.reduction_factor >= 2):
            p.append(f"reduction_factor must be an integer >= 2, got {self.reduction_factor!r}")
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            p.append(f"time_budget_s must be > 0 seconds (or None for no limit), got {self.time_budget_s}")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            p.append(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if not (isinstance(self.gpus_per_worker, (int, float)) and math.isfinite(self.gpus_per_worker)
                and 0 <= self.gpus_per_worker <= 1):
            p.append(f"gpus_per_worker must lie in [0, 1] (0: CPU only; a fraction packs trials on one GPU), got "
                     f"{self.gpus_per_worker!r}; fix: for several GPUs per trial use --workers-per-trial N with "
                     f"--gpus-per-worker 1")
        elif 0 < self.gpus_per_worker < 1 and isinstance(self.workers_per_trial, int) and self.workers_per_trial > 1:
            # Ray may give both fractions of one trial the same GPU: two NCCL ranks on one device fail.
            p.append(f"a fraction of a GPU per worker (gpus_per_worker {self.gpus_per_worker:g}) packs several trials "
                     f"on one GPU, but a trial of {self.workers_per_trial} workers would put several of its DDP ranks "
                     f"on one device, which NCCL refuses; fix: --gpus-per-worker 1 for multi-GPU trials, or "
                     f"--workers-per-trial 1 to share GPUs")
        if self.precision not in PRECISIONS:
            p.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        elif self.precision == "16-mixed" and not self.gpus_per_worker:
            p.append("precision 16-mixed needs a GPU (float16 autocast on a CPU is slower than float32 and "
                     "loses range), but gpus_per_worker is 0; fix: --precision bf16-mixed on CPUs, or --gpus-per-worker")
        if not (isinstance(self.max_failures, int) and self.max_failures >= 0):
            p.append(f"max_failures must be an integer >= 0 (-1 would retry forever), got {self.max_failures!r}")
        if self.max_concurrent is not None and not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 1):
            p.append(f"max_concurrent must be an integer >= 1 (or None: as many as fit), got {self.max_concurrent!r}")
        if not (isinstance(self.tpe_startup_trials, int) and self.tpe_startup_trials >= 1):
            p.append(f"tpe_startup_trials must be an integer >= 1, got {self.tpe_startup_trials!r}")
        if self.warm_start is not None and (not isinstance(self.warm_start, str) or self.warm_start == self.name):
            p.append(f"warm_start must name another study than this one ({self.name!r}), got {self.warm_start!r}")
        collect_problems("study settings", p)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        """The :class:`~tuning.study.trial.Objective` s named by :attr:`objective`, first first."""
        return parse_objectives(self.objective)

    @property
    def objective_spec(self) -> Objective:
        """The first objective: it ranks a trial's epochs (its best checkpoint) and drives ASHA."""
        return self.objectives[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (saved as ``study.json`` so ``--resume`` rebuilds the same study)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: unknown keys (naming the valid ones) or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        collect_problems("study settings", [f"unknown key {k!r}; valid keys: {', '.join(sorted(names))}"
                                            for k in sorted(set(data) - names)])
        return cls(**data)


#: ``--smoke-test``: a tiny dataset, two one-epoch trials, no time limit (minutes end to end).
SMOKE_TEST: dict[str, Any] = {
    "dataset": "smoke", "dataset_recordings": 128, "trials": 2, "max_epochs": 1, "time_budget_s": None,
    "tpe_startup_trials": 2, "pin_long_warmups": True,
}


# -- storage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStorage:
    """Where Tune's experiment state and Train's checkpoints live.

    Attributes:
        url: as configured: a directory or ``s3://bucket/prefix``.
        path: the same place as a path on :attr:`filesystem` (``bucket/prefix`` for S3).
        filesystem: a pyarrow ``S3FileSystem`` for S3, None for a local directory. It holds
            no keys (:meth:`heimdall.store.S3Store.pyarrow_filesystem`), so Tune can pickle it
            into ``tuner.pkl`` and ship it to trials: each process signs with the
            ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` of its own environment.
    """

    url: str
    path: str
    filesystem: pyarrow.fs.FileSystem | None

    def experiment_path(self, name: str) -> str:
        """The Tune experiment of study ``name``."""
        return f"{self.path}/{name}"

    def train_path(self, name: str) -> str:
        """Parent of the Train runs (one per trial, named by trial id) of study ``name``."""
        return f"{self.path}/{name}/train-runs"

    def describe(self) -> str:
        """Say where it is, without credentials."""
        return self.url

    def write_file(self, name: str, relative: str, data: bytes) -> str:
        """Write ``data`` to ``{experiment of name}/heimdall/{relative}``; returns that path.

        The study's own files (``study.json``, summary, plots) are kept next to
        Tune's state, so a study run as a cluster job can be resumed and read
        from shared storage after the job's working directory is gone.
        """
        path = f"{self.experiment_path(name)}/{STUDY_FILES}/{relative}"
        if self.filesystem is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        else:
            with self.filesystem.open_output_stream(path) as out:
                out.write(data)
        return path

    def read_file(self, name: str, relative: str) -> bytes | None:
        """The bytes :meth:`write_file` wrote, or None if there are none."""
        path = f"{self.experiment_path(name)}/{STUDY_FILES}/{relative}"
        if self.filesystem is None:
            return Path(path).read_bytes() if Path(path).is_file() else None
        try:
            with self.filesystem.open_input_stream(path) as src:
                return src.read()
        except (FileNotFoundError, OSError):
            return None


def open_run_storage(url: str, s3: S3Settings | None = None) -> RunStorage:
    """Open (and for S3, reach) the run storage.

    Args:
        url: a directory, or ``s3://bucket/prefix`` on the S3 server of the store settings.
        s3: S3 server settings; read from the environment when omitted.

    Returns:
        The storage; a local directory is created, an S3 bucket created if missing.

    Raises:
        ServiceUnavailableError: the S3 server cannot be reached.
        ConfigError: the URL or the S3 settings are invalid.
    """
    store = open_store(url, s3)
    fs, base = store.pyarrow_filesystem()
    if url.startswith("s3://"):
        store.ensure_bucket()  # pyarrow will not create buckets; Ray's first upload would fail late
        return RunStorage(url=url, path=base, filesystem=fs)
    os.makedirs(base, exist_ok=True)
    return RunStorage(url=url, path=base, filesystem=None)


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying the driver's S3 keys into every trial's runtime env.

    Tune adds ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and the session
    tokens of the driver's environment to each trial actor's runtime env,
    which Ray's runtime-env agent writes to its log (``runtime_env_agent.log``
    in the Ray temp dir, world-readable) and the dashboard shows. Trials need no
    copy: they inherit the keys from their node's environment (local Ray: the
    driver's; a cluster: ``cluster/.env`` or the Kubernetes Secret).
    """
    from ray.tune.execution import class_cache

    getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set()).difference_update(CREDENTIAL_VARS)


def describe_url(url: str) -> str:
    """``url`` without any password (user part or ``password=`` parameter), safe to print or save.

    The one redactor of the project (:func:`heimdall.catalog.redact_url`), under the name tuning uses.
    """
    return redact_url(url)


def check_optuna_url(url: str) -> None:
    """Refuse an Optuna storage URL that carries a password (see :func:`open_optuna_storage`).

    Raises:
        ConfigError: a password in the user part or a ``password=`` parameter, with the fix.
    """
    parts = urlsplit(url)
    if parts.password is not None or any(k.lower() == "password" for k, _ in parse_qsl(parts.query)):
        raise ConfigError("Optuna storage", [
            f"the URL {describe_url(url)!r} carries a password, and Tune saves the Optuna storage, URL "
            f"included, with the study's state in the run storage; fix: remove the password from "
            f"--optuna-storage / HEIMDALL_OPTUNA_STORAGE and export PGPASSWORD instead"])


def open_optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """Connect to the Optuna study database (tables are created on first use).

    The URL must not carry a password: Tune pickles the searcher, storage and
    URL included, into the study's state (``searcher-state-*.pkl`` in the run
    storage). libpq reads the password from ``PGPASSWORD`` instead, in this
    process and again when ``--resume`` unpickles the storage.

    Args:
        url: ``postgresql://user@host:port/db`` or ``sqlite:///path.db`` (SQLAlchemy URLs).

    Returns:
        An ``RDBStorage``.

    Raises:
        ConfigError: the URL is neither PostgreSQL nor SQLite, or carries a password.
        ServiceUnavailableError: the database cannot be reached (within a few seconds).
    """
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in ("postgresql", "sqlite"):
        raise ConfigError("Optuna storage", [
            f"unsupported Optuna storage URL {describe_url(url)!r}; use postgresql://user@host:5432/db "
            f"or sqlite:///path/optuna.db"])
    check_optuna_url(url)
    engine_kwargs = {"connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S}} if scheme == "postgresql" else {}
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 defaults to psycopg 3, which is not installed; psycopg2 is (the catalogue uses it too).
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    try:
        return _rdb_storage(url, engine_kwargs)
    except Exception as err:  # SQLAlchemy raises OperationalError, but drivers vary
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ServiceUnavailableError(
            f"cannot reach the Optuna storage {describe_url(url)}: {reason}; fix: start the database "
            f"(`python -m tuning.services up`) or point --optuna-storage / HEIMDALL_OPTUNA_STORAGE at a running one"
        ) from None


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """``RDBStorage``, retried when another driver was creating the same tables at the same moment
    (PostgreSQL then refuses the second ``CREATE TABLE`` with a unique violation)."""
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def check_new_study(storage: optuna.storages.BaseStorage, runs: RunStorage, name: str,
                    mode: str | Sequence[str] = "min") -> None:
    """Claim the name of a new study: create its Optuna study now, so of two drivers started with
    the same ``--name`` only one gets it (the database's unique study name decides).

    A claim left by a driver on this host that died before its first trial is
    taken over; any other existing study or Tune experiment is refused.

    Raises:
        AlreadyExistsError: the Optuna study or the Tune experiment exists, with the fix.
    """
    if tune.Tuner.can_restore(runs.experiment_path(name), storage_filesystem=runs.filesystem):
        raise AlreadyExistsError(
            f"a study named {name!r} already exists in the run storage ({runs.describe()}); fix: add --resume to "
            f"continue it, or pick another --name")
    # One mode per objective: a two-objective study is created with both directions.
    directions = ["minimize" if m == "min" else "maximize" for m in ([mode] if isinstance(mode, str) else mode)]
    for attempt in range(2):
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=False)
        except optuna.exceptions.DuplicatedStudyError:
            existing = optuna.load_study(study_name=name, storage=storage)
            if attempt == 0 and not existing.trials and _stale_claim(existing.user_attrs.get(CLAIM_ATTR)):
                optuna.delete_study(study_name=name, storage=storage)
                continue
            claim = existing.user_attrs.get(CLAIM_ATTR) or {}
            by = f" (claimed by pid {claim.get('pid')} on {claim.get('host')})" if claim and not existing.trials else ""
            raise AlreadyExistsError(
                f"a study named {name!r} already exists in the Optuna storage{by}; fix: add --resume to continue "
                f"it, or pick another --name") from None
        study.set_user_attr(CLAIM_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                         "pid_start": _process_start(os.getpid())})
        return


#: Optuna study user attribute naming the driver that created the study (see check_new_study).
CLAIM_ATTR = "heimdall_claimed_by"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stale_claim(claim: Any) -> bool:
    """A claim by a driver on this host that no longer runs, or by this very process (a study that
    failed before its first trial and is started again in-process); other hosts cannot be checked."""
    if not isinstance(claim, dict) or claim.get("host") != socket.gethostname():
        return False
    pid = claim.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or _process_start(pid) != claim.get("pid_start")


def check_resumable(runs: RunStorage, name: str) -> None:
    """Make sure ``--resume`` has an experiment to restore.

    Raises:
        NotFoundError: no Tune experiment of that name in the run storage.
    """
    if not tune.Tuner.can_restore(runs.experiment_path(name), storage_filesystem=runs.filesystem):
        raise NotFoundError(
            f"no study {name!r} to resume in {runs.describe()} (no Tune experiment at "
            f"{runs.experiment_path(name)}); fix: check --name and --storage-path, or start it without --resume")


# -- resources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourcePlan:
    """How a study uses the cluster's CPUs and GPUs.

    A trial reserves memory, no CPU, for its trial function (Tune's placement
    group, :data:`TRIAL_FUNCTION_MEMORY`; the TorchTrainer's controller, 0 CPU,
    lands there too) and its Train workers' CPUs and GPUs (Train's own
    placement group, :attr:`worker_cpus`, :attr:`worker_gpus`). When the trials
    read their data (features not materialised in the object store), the Ray
    Data read tasks run outside both: Train's dataset manager is pinned to a
    node by affinity and Ray Data schedules its tasks with SPREAD, so a CPU
    bundle reserved for them would never be used, and reads that find every
    CPU reserved wait forever (seen after a node loss). So :attr:`data_cpus`
    per trial is left *unreserved*: :func:`plan_resources` counts it when it
    sizes the trials run at once, and it stays free for the reads. A study
    whose features are in the object store has no reads during its trials
    (``data_cpus`` 0): on 2 CPUs, two one-CPU trials run at once.

    Ray packs fractional GPUs per device: workers of 0.25 GPU put four on one
    GPU, workers of 0.3 only three (a worker never spans two GPUs).

    Attributes:
        cluster_cpus: CPUs in the cluster.
        worker_cpus: CPUs of one trial's Train workers.
        data_cpus: CPUs one trial's Ray Data reads need, left unreserved (0: the trials do not read).
        max_concurrent: trials running at once.
        cluster_gpus: GPUs in the cluster.
        worker_gpus: GPUs of one trial's Train workers (0: the trial trains on CPUs).
        gpus_per_worker: GPUs (or the fraction of one) each Train worker reserves.
        bound_by: what limits :attr:`max_concurrent`: ``CPUs``, ``GPUs``, ``--max-concurrent`` or ``trials``.
    """

    cluster_cpus: float
    worker_cpus: float
    data_cpus: float
    max_concurrent: int
    cluster_gpus: float = 0.0
    worker_gpus: float = 0.0
    gpus_per_worker: float = 0.0
    bound_by: str = "CPUs"

    @property
    def trial_cpus(self) -> float:
        """The CPUs one trial uses: reserved (workers) and not (reads)."""
        return self.data_cpus + self.worker_cpus

    @property
    def workers_per_gpu(self) -> int:
        """Train workers that share one GPU (0: CPU trials)."""
        return int(1 / self.gpus_per_worker + 1e-9) if self.gpus_per_worker > 0 else 0

    def trial_resources(self) -> tune.PlacementGroupFactory:
        """The trial function's placement group: memory only (the reads' CPUs stay unreserved)."""
        return tune.PlacementGroupFactory([{"memory": TRIAL_FUNCTION_MEMORY}])

    def describe(self) -> str:
        """One line for the plan, e.g. ``4 trial(s) at a time on 8 CPUs, 1 GPU(s) (per trial: 1 CPU of Train
        workers + 0.5 CPU for Ray Data reads, 0.25 GPU (4 trials share a GPU)); bound by GPUs``."""
        gpus = f", {self.cluster_gpus:g} GPU(s)" if self.worker_gpus else ""
        per_trial = f"{self.worker_cpus:g} CPU of Train workers + " + (
            f"{self.data_cpus:g} CPU for Ray Data reads" if self.data_cpus else "no reads (features in the object store)")
        if self.worker_gpus:
            workers = round(self.worker_gpus / self.gpus_per_worker)
            share = f" ({self.workers_per_gpu // workers} trials share a GPU)" if self.workers_per_gpu >= 2 * workers else ""
            per_trial += f", {self.worker_gpus:g} GPU{share}"
        return (f"{self.max_concurrent} trial(s) at a time on {self.cluster_cpus:g} CPUs{gpus} (per trial: "
                f"{per_trial}); bound by {self.bound_by}")


def plan_resources(cluster_cpus: float, workers_per_trial: int, cpus_per_worker: float, trials: int,
                   max_concurrent: int | None = None, *, cluster_gpus: float = 0.0,
                   gpus_per_worker: float = 0.0, data_cpus: float = DATA_CPUS_PER_TRIAL) -> ResourcePlan:
    """Size the trials run at once so every trial's workers (CPUs and GPUs) and data tasks fit at once.

    Concurrency is the least of what the CPUs allow (each trial's workers and
    reads), what the GPUs allow (workers packed ``floor(1 / gpus_per_worker)``
    to a GPU), ``max_concurrent`` and ``trials``.

    Args:
        cluster_cpus: the CPUs of the cluster that runs the study, ``ray.cluster_resources()["CPU"]``
            (:func:`plan_study` reads them from that dict).
        workers_per_trial: Train workers per trial.
        cpus_per_worker: CPUs per worker.
        trials: the study's trial count (no point running more at once).
        max_concurrent: an upper bound set by the user (None: as many as fit).
        cluster_gpus: the cluster's GPUs, ``ray.cluster_resources()["GPU"]``.
        gpus_per_worker: GPUs per worker in [0, 1] (0: CPU trials).
        data_cpus: CPUs per trial for its Ray Data reads (0: the features are in the object store).

    Returns:
        The plan.

    Raises:
        ConfigError: one trial does not fit in the cluster (CPUs, GPUs or both), with the fix.
    """
    plan = ResourcePlan(cluster_cpus=cluster_cpus, worker_cpus=workers_per_trial * cpus_per_worker,
                        data_cpus=data_cpus, max_concurrent=1, cluster_gpus=cluster_gpus,
                        worker_gpus=workers_per_trial * gpus_per_worker, gpus_per_worker=gpus_per_worker)
    problems = []
    if plan.trial_cpus > cluster_cpus + 1e-9:
        # The rule, with every term shown: the sum must add up on screen, and the fix must be a valid value.
        overhead = data_cpus
        room = math.floor((cluster_cpus - overhead) / workers_per_trial * 100) / 100
        reads = f" + {data_cpus:g} CPU for its Ray Data reads" if data_cpus else ""
        need = (f"a trial needs --workers-per-trial {workers_per_trial} x --cpus-per-worker {cpus_per_worker:g}"
                f"{reads} = {plan.trial_cpus:.2f} CPUs, more than the cluster's {cluster_cpus:g}")
        bigger = "a cluster with more CPUs (each worker's CPUs must also fit on one node)"
        if room > 0:
            fewer = " (or fewer --workers-per-trial)" if workers_per_trial > 1 else ""
            fix = f"--cpus-per-worker {room:g} or less{fewer}, or {bigger}"
        else:
            fix = f"{bigger}: no worker fits beside the {overhead:g} CPU every trial needs"
        problems.append(f"{need}; fix: {fix}")
    by_cpus = int((cluster_cpus + 1e-9) // plan.trial_cpus)
    by_gpus = None
    if plan.worker_gpus:
        # A worker never spans two GPUs: each GPU holds floor(1 / gpus_per_worker) workers.
        by_gpus = plan.workers_per_gpu * int(cluster_gpus + 1e-9) // workers_per_trial
        if by_gpus < 1:
            need = (f"a trial needs --workers-per-trial {workers_per_trial} x --gpus-per-worker {gpus_per_worker:g} "
                    f"= {plan.worker_gpus:g} GPU(s) ({plan.workers_per_gpu} worker(s) per GPU), more than the "
                    f"cluster's {cluster_gpus:g} GPU(s)")
            if cluster_gpus < 1:
                fix = ("--gpus-per-worker 0 to train on CPUs, or a cluster with GPU nodes (Ray counts a node's GPUs "
                       "when it starts; on an autoscaling cluster keep at least one GPU node up, docs/cluster.md)")
            else:
                most = plan.workers_per_gpu * int(cluster_gpus + 1e-9)
                fix = f"--workers-per-trial {most} or fewer, a smaller --gpus-per-worker, or a cluster with more GPUs"
            problems.append(f"{need}; fix: {fix}")
    if problems:
        raise ConfigError("resources", problems)
    limits = [(by_cpus, "CPUs"), (by_gpus, "GPUs"), (max_concurrent, "--max-concurrent"), (trials, "trials")]
    concurrent, bound = min(((n, why) for n, why in limits if n is not None), key=lambda x: x[0])
    return replace(plan, max_concurrent=max(1, concurrent), bound_by=bound)


def plans_reads(*, local: bool, materialised: bool) -> bool:
    """Whether a study's plan gives each trial :data:`DATA_CPUS_PER_TRIAL` for Ray Data reads.

    Not when its features are materialised in the object store of the local Ray the run started
    (``local``): the trials then start no read task. On a cluster (``--ray-address``) always: Ray
    reads the blocks of a lost node again, and those read tasks need CPUs that no trial holds."""
    return not (local and materialised)


def plan_study(config: StudyConfig, resources: Mapping[str, float], *, reads: bool = True) -> ResourcePlan:
    """:func:`plan_resources` for ``config`` on a cluster of ``resources`` (``ray.cluster_resources()``);
    ``reads``: whether the trials get CPUs to read their data (:func:`plans_reads`)."""
    return plan_resources(float(resources.get("CPU", 0.0)), config.workers_per_trial, config.cpus_per_worker,
                          config.trials, config.max_concurrent, cluster_gpus=float(resources.get("GPU", 0.0)),
                          gpus_per_worker=config.gpus_per_worker, data_cpus=DATA_CPUS_PER_TRIAL if reads else 0.0)


# -- the tuner -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberedSpace:
    """The space's define-by-run function, also returning the Optuna trial number.

    The number lands in Tune's trial config (:data:`~tuning.study.trial.OPTUNA_NUMBER_KEY`),
    which seeds the trial and ties each Tune trial to its Optuna trial.
    A picklable object: Tune pickles it with the searcher state.
    """

    define: Callable[[optuna.trial.Trial], None]

    def __call__(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        self.define(trial)  # suggests every parameter; a space has no constants of its own to return
        return {OPTUNA_NUMBER_KEY: trial.number}


#: Set by the driver's SIGINT/SIGTERM handler (:class:`tuning.run.GracefulStop`) while Tune winds
#: the study down: trials stopped by that are interrupted, not failed. A process-wide event because
#: a signal is process-wide, and the searcher of a resumed study is unpickled by Tune, out of reach.
STOPPING = threading.Event()


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records trials the way Optuna's own pruners do, and never writes into a
    trial Optuna has already finished.

    Every validated epoch is an intermediate value of the Optuna trial, keyed by
    epoch (:data:`~tuning.study.trial.EPOCHS_METRIC`), not by Tune iteration,
    which restarts from 1 when a trial function is restarted. A trial's end is
    told as:

    * PRUNED when it ended without error before ``max_epochs`` (ASHA stopped
      it): its value is its last intermediate value, as Optuna gives its own
      pruned trials, so TPE ranks it by how far it got and how well, after
      every complete trial;
    * COMPLETE when it trained ``max_epochs``; FAIL on error;
    * nothing while the study is being interrupted (:data:`STOPPING`):
      ``--resume`` continues the trial, so it stays RUNNING.

    Tune does not pass the searcher the result on which the scheduler stops a
    trial, so the end reports that epoch first: each trial has one value per
    epoch it trained.

    Optuna commits a trial's end (``tell``) the moment Tune stops it, while
    Tune saves its own experiment state only every few seconds. A driver that
    dies in between leaves a trial finished in Optuna and running in Tune's
    state; resumed, Tune restarts it and its replayed result would make
    ``report()`` raise ``UpdateFinishedTrialError`` and end the study.
    :func:`reconcile_for_resume` closes such trials in Tune's state before the
    restore; this class is the second line: results and ends of trials that
    Optuna finished are dropped, whatever the order of events.

    Args:
        max_epochs: epochs of a trial that runs to the end (ASHA's ``max_t``).
        **kwargs: ``OptunaSearch``'s arguments.
    """

    def __init__(self, *, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_epochs = max_epochs

    def _finished_in_optuna(self, trial_id: str) -> bool:
        if trial_id in self._completed_trials:
            return True
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def _report(self, trial_id: str, result: Mapping[str, Any]) -> int | None:
        """Report ``result``'s objective at its epoch (once per epoch); returns the epoch, None without a value.

        With several objectives only the epoch is returned: Optuna keeps no intermediate values for them.
        """
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if any(result.get(m) is None for m in metrics):
            return None
        step = int(result.get(EPOCHS_METRIC) or result.get("training_iteration") or 0)
        if isinstance(self.metric, list):
            return step
        value = result[self.metric]
        trial = self._ot_trials[trial_id]
        if step not in self._ot_study._storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(value), step)
        return step

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the objective at the trial's epoch, unless Optuna finished the trial."""
        if self._finished_in_optuna(trial_id) or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna the trial's end: PRUNED, COMPLETE or FAIL (see the class), unless it already
        knows it, or the trial only ended because the study is being interrupted (:data:`STOPPING`)."""
        if self._finished_in_optuna(trial_id) or (error and STOPPING.is_set()):
            return
        epochs = self._report(trial_id, result) if result and not error and trial_id in self._ot_trials else None
        if epochs is not None and epochs < getattr(self, "max_epochs", epochs):
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        """Load the pickled searcher, then take the trials Optuna finished since as finished."""
        super().restore(checkpoint_path)
        for trial_id in list(self._ot_trials):
            self._finished_in_optuna(trial_id)


def make_sampler(seed: int | None, startup_trials: int, **options: Any) -> optuna.samplers.TPESampler:
    """The study's TPE sampler: the one home of its settings, which bench/bench_tune.py measures.

    ``options`` override TPESampler arguments (the bench's variants); the study passes none.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, **options)


def make_searcher(config: StudyConfig, space: SearchSpace, storage: optuna.storages.BaseStorage) -> StudySearch:
    """A :class:`StudySearch` with a seeded TPE sampler, keeping the study in ``storage``.

    Creating it creates (or loads) the Optuna study, so a storage problem shows here.
    """
    objectives = config.objectives
    sampler = make_sampler(config.seed, config.tpe_startup_trials)
    # Two objectives: lists make a multi-objective Optuna study, whose TPE samples towards the Pareto
    # front; Tune's metric, hence ASHA's and the checkpoints', stays the first objective (build_tuner).
    metric: str | list[str] = [o.metric for o in objectives] if len(objectives) > 1 else objectives[0].metric
    mode: str | list[str] = [o.mode for o in objectives] if len(objectives) > 1 else objectives[0].mode
    searcher = StudySearch(
        space=NumberedSpace(to_optuna(space)), metric=metric, mode=mode,
        sampler=sampler, study_name=config.name, storage=storage, max_epochs=config.max_epochs,
    )
    if config.warm_start is not None and not searcher._ot_study.get_trials(deepcopy=False):
        warm_start_trials(searcher._ot_study, config.warm_start, to_optuna(space))
    return searcher


#: Optuna system attribute naming the study a warm-start trial was copied from.
WARM_START_ATTR = "heimdall:warm_start_from"


def warm_start_trials(study: optuna.Study, source: str, define: Callable[[optuna.trial.BaseTrial], Any]) -> int:
    """Copy the COMPLETE and PRUNED trials of study ``source`` into the empty ``study``, so TPE models them first.

    A trial is copied when the space's define-by-run function, replayed on its
    parameters, asks for exactly the distributions it was sampled from (same
    names, kinds and bounds); the others are skipped. Copies keep their values and
    intermediate values (pruned ones stay PRUNED), take the first trial numbers
    of ``study`` and carry :data:`WARM_START_ATTR`; they also count towards
    TPE's start-up trials. Their training is not repeated.

    Args:
        study: the new study, still without trials.
        source: name of the earlier study in the same storage.
        define: the space's define-by-run function (:func:`tuning.study.spaces.to_optuna`).

    Returns:
        The number of trials copied.

    Raises:
        NotFoundError: no study ``source`` in the storage.
        ConfigError: the directions differ, or none of its finished trials fits the space.
    """
    try:
        earlier = optuna.load_study(study_name=source, storage=study._storage)
    except KeyError:
        raise NotFoundError(f"--warm-start names study {source!r}, which the Optuna storage does not hold; fix: "
                            f"give the name of an earlier study in the same --optuna-storage") from None
    if earlier.directions != study.directions:
        raise ConfigError("warm start", [f"study {source!r} optimises {earlier.directions}, this one "
                                         f"{study.directions}; fix: warm-start from a study of the same objective"])
    finished = earlier.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    copies = [c for c in (_warm_copy(t, define, source) for t in finished) if c is not None]
    if not copies:
        raise ConfigError("warm start", [
            f"none of the {len(finished)} finished trial(s) of study {source!r} fits this search space; fix: "
            f"warm-start from a study of the same space, or drop --warm-start"])
    study.add_trials(copies)
    return len(copies)


def _warm_copy(trial: optuna.trial.FrozenTrial, define: Callable[[optuna.trial.BaseTrial], Any],
               source: str) -> optuna.trial.FrozenTrial | None:
    """``trial`` as a new trial of this space, or None when the space would not have asked for its parameters."""
    replay = optuna.trial.FixedTrial(trial.params)
    try:
        with warnings.catch_warnings():
            # FixedTrial only warns about a value outside the distribution: a trial of other bounds.
            warnings.filterwarnings("error", message=".*out of the range of the distribution")
            define(replay)
    except (ValueError, UserWarning):
        return None
    if any(trial.distributions.get(k) != d for k, d in replay.distributions.items()):
        return None
    return optuna.trial.create_trial(
        state=trial.state, values=trial.values,
        params={k: trial.params[k] for k in replay.distributions}, distributions=dict(replay.distributions),
        intermediate_values=dict(trial.intermediate_values), system_attrs={WARM_START_ATTR: source})


def trial_name(trial: Any) -> str:
    """``trial-0003-1a2b3c4d``: Optuna number and Tune id (Tune's default name lists every parameter)."""
    number = trial.config.get(OPTUNA_NUMBER_KEY)
    return f"trial-{int(number):04d}-{trial.trial_id}" if number is not None else f"trial-{trial.trial_id}"


def trial_number(result: Any) -> int | None:
    """The Optuna number of a Tune ``Result``: from its config, else from its folder's name
    (:func:`trial_name`), which a trial stopped before its first report still has."""
    number = (result.config or {}).get(OPTUNA_NUMBER_KEY)
    if number is None:
        m = re.match(r"trial-(\d+)-", Path(str(result.path)).name)
        number = m and m.group(1)
    return int(number) if number is not None else None


def make_scheduler(config: StudyConfig) -> ASHAScheduler:
    """ASHA on the epochs a trial trained its NLL (:data:`~tuning.study.trial.NLL_EPOCHS_METRIC`:
    epochs after its MSE warm-up), not on all epochs nor Tune's iteration count.

    A trial in its MSE warm-up fits the mean only; its NLL is not comparable
    with that of a trial already training it, and a rung on all epochs cut the
    configurations that end best (bench/bench_tune.py search, docs/benchmarks.md:
    most pruned trials were cut mid-warm-up). Counted this way, every rung
    compares trials after the same number of NLL epochs, and the first rung
    (:attr:`StudyConfig.first_rung`, 2 by default) lets a trial show its NLL
    twice. Epochs survive a restarted trial function (it resumes its Train
    run), so rungs stay correct after a worker failure or ``--resume``. A trial
    that reaches ``max_epochs`` is left to end by itself
    (``stop_last_trials=False``) rather than stopped: a stop kills the trial's
    Train controller while it still shuts its workers down.
    """
    return ASHAScheduler(time_attr=NLL_EPOCHS_METRIC, max_t=config.max_epochs,
                         grace_period=config.first_rung, reduction_factor=config.reduction_factor,
                         stop_last_trials=False)


#: How often (s) :class:`ClusterLimiter` reads the cluster's size while Tune asks for trials.
CLUSTER_CHECK_S = 5.0


class ClusterLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` whose limit follows the cluster's size during the study.

    Tune asks the searcher for a trial whenever it could start one; a ``None``
    answer means "not now" and it asks again later. Before answering, this
    wrapper replans (:func:`plan_resources`, at most every
    :data:`CLUSTER_CHECK_S` seconds) from ``ray.cluster_resources()``: the
    CPUs and GPUs of the nodes alive now, not what is free (running trials hold
    that). A node that joins (an autoscaler's, or a ``ray start --address``)
    raises the limit and the next trials start at once; a node that leaves
    lowers it: no new trial starts until enough running ones end, and trials
    that lost their workers with the node wait for room in the rest (Train's
    worker-group start timeout, :data:`WORKER_GROUP_START_TIMEOUT_S`). Should
    nothing fit any more (the last GPU node gone), one trial is still let
    through, so an autoscaler sees its pending workers and adds a node.
    ``--max-concurrent`` stays an upper bound.

    Its state, with the trials it counts as running, is saved in Tune's search
    state under ``name:ClusterLimiter`` (:func:`reconcile_for_resume` edits it).

    Args:
        searcher: the study's :class:`StudySearch`.
        config: the study (its per-trial resources and bounds; copied as plain numbers).
        plan: the plan printed at the start (None: none): a change from its cluster is printed.
        read_cluster: returns the cluster's resources (None: ``ray.cluster_resources()`` while Ray is up).
        check_s: the least time between two reads.
    """

    def __init__(self, searcher: OptunaSearch, config: StudyConfig, plan: ResourcePlan | None = None, *,
                 read_cluster: Callable[[], Mapping[str, float]] | None = None,
                 check_s: float = CLUSTER_CHECK_S) -> None:
        # Start at the upper bound: Tune reads the limit once, when the study starts, as its cap on trials
        # waiting to start; the first suggest() brings it down to what the cluster fits.
        super().__init__(searcher, max_concurrent=min(config.trials, config.max_concurrent or config.trials))
        self.demand = {"workers_per_trial": config.workers_per_trial, "cpus_per_worker": config.cpus_per_worker,
                       "gpus_per_worker": config.gpus_per_worker, "trials": config.trials,
                       "max_concurrent": config.max_concurrent,
                       "data_cpus": plan.data_cpus if plan else DATA_CPUS_PER_TRIAL}
        self.cluster = {"CPU": plan.cluster_cpus, "GPU": plan.cluster_gpus} if plan else {}
        self.read_cluster, self.check_s = read_cluster, check_s
        self.checked_at: float | None = None

    def follow_cluster(self, resources: Mapping[str, float]) -> int:
        """Set the limit for a cluster of ``resources``; returns it."""
        d = self.demand
        try:
            limit = plan_resources(float(resources.get("CPU", 0.0)), d["workers_per_trial"], d["cpus_per_worker"],
                                   d["trials"], d["max_concurrent"], cluster_gpus=float(resources.get("GPU", 0.0)),
                                   gpus_per_worker=d["gpus_per_worker"],
                                   # (a limiter saved before the plan knew about reads has no data_cpus)
                                   data_cpus=d.get("data_cpus", DATA_CPUS_PER_TRIAL)).max_concurrent
        except ConfigError:
            limit = 1  # nothing fits now: one trial waits for a node (and shows an autoscaler the demand)
        seen = {k: float(resources.get(k, 0.0)) for k in ("CPU", "GPU")}
        if self.cluster and seen != self.cluster:  # (the first limit is the plan's, already printed)
            gpus = f", {seen['GPU']:g} GPU(s)" if d["gpus_per_worker"] else ""
            print(f"cluster:   now {seen['CPU']:g} CPUs{gpus}: up to {limit} trial(s) at a time", flush=True)
        self.cluster, self.max_concurrent = seen, limit
        return limit

    def suggest(self, trial_id: str) -> dict | None:
        """The next trial, or None while the cluster's limit is reached."""
        now = time.monotonic()
        if self.checked_at is None or not 0 <= now - self.checked_at < self.check_s:
            self.checked_at = now  # (a restored state's time is another process's clock: negative is stale)
            if self.read_cluster is not None:
                self.follow_cluster(self.read_cluster())
            elif ray.is_initialized():
                self.follow_cluster(ray.cluster_resources())
        return super().suggest(trial_id)


def make_trainable(spec: TrialSpec, datasets: Mapping[str, Any], cache: FeatureCache, plan: ResourcePlan) -> Any:
    """The trial function with its study-wide arguments bound and its placement group set."""
    keep_credentials_out_of_runtime_envs()
    bound = tune.with_parameters(run_trial, spec=spec, datasets=dict(datasets), cache=cache)
    return tune.with_resources(bound, plan.trial_resources())


def build_tuner(
    config: StudyConfig,
    searcher: OptunaSearch,
    trainable: Any,
    runs: RunStorage,
    plan: ResourcePlan,
    callbacks: Sequence[tune.Callback] = (),
) -> tune.Tuner:
    """A new Tuner for the study.

    Args:
        config: the study.
        searcher: from :func:`make_searcher`.
        trainable: from :func:`make_trainable`.
        runs: where the experiment and checkpoints go.
        plan: from :func:`plan_study`, for the cluster at the start; :class:`ClusterLimiter` then
            follows the cluster as nodes join or leave.
        callbacks: e.g. :class:`StudyProgress`.

    Returns:
        The Tuner; ``fit()`` runs the study.
    """
    objective = config.objective_spec
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=objective.metric, mode=objective.mode, search_alg=ClusterLimiter(searcher, config, plan),
            scheduler=make_scheduler(config), num_samples=config.trials,
            max_concurrent_trials=None,  # the limiter's, which follows the cluster
            time_budget_s=config.time_budget_s,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            # Not reused: a trial that ASHA stops is still inside TorchTrainer.fit(), so handing its
            # actor to the next trial fails the reset, and Tune then errors that next trial.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=config.name, storage_path=runs.path, storage_filesystem=runs.filesystem,
            failure_config=tune.FailureConfig(max_failures=TUNE_MAX_FAILURES),
            callbacks=list(callbacks), verbose=0,
        ),
    )


def restore_tuner(config: StudyConfig, trainable: Any, runs: RunStorage,
                  storage: optuna.storages.BaseStorage | None = None,
                  note: Callable[[str], None] = print) -> tune.Tuner:
    """The Tuner of an interrupted study: finished trials stay, unfinished ones continue.

    First :func:`reconcile_for_resume` makes Tune's saved state agree with the
    Optuna study, whatever moment the driver died at (``note`` gets one line
    when it changed something). Then the searcher (with its Optuna study), the
    scheduler and the callbacks come back from the experiment state;
    unfinished trials restart their trial function, which resumes its Train
    run from the last checkpoint. Errored trials stay errored: their failure
    outlived Train's own retries. Without ``storage`` nothing is reconciled:
    a trial Optuna finished after Tune's last save is then rerun.
    """
    if storage is not None:
        done = reconcile_for_resume(storage, runs, config)
        if done.changed:
            note(f"resume:    {done.describe()}")
    return tune.Tuner.restore(
        runs.experiment_path(config.name), trainable=trainable, resume_unfinished=True, resume_errored=False,
        storage_filesystem=runs.filesystem,
    )


#: Tune's experiment state (trials) and its search wrappers' state (the concurrency limit).
_EXPERIMENT_STATE = "experiment_state-*.json"
_SEARCH_STATE = "search_gen_state-*.json"
_OPTUNA_FINISHED = {
    optuna.trial.TrialState.COMPLETE: "TERMINATED",
    optuna.trial.TrialState.PRUNED: "TERMINATED",
    optuna.trial.TrialState.FAIL: "ERROR",
}


@dataclass(frozen=True)
class ResumeReconciliation:
    """What :func:`reconcile_for_resume` did, by Optuna trial number.

    Attributes:
        closed: trials Optuna had finished but Tune's state had not: closed there, not rerun.
        completed: trials that had trained every epoch, and Tune had logged the last one, but
            whose end neither bookkeeping had saved: told COMPLETE to Optuna and closed in Tune.
        resumed: unfinished in both: Tune reruns them from their last checkpoint.
        orphans: RUNNING in Optuna without a Tune trial (asked just before the driver died): FAIL.
    """

    closed: tuple[int, ...] = ()
    completed: tuple[int, ...] = ()
    resumed: tuple[int, ...] = ()
    orphans: tuple[int, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether any bookkeeping was written."""
        return bool(self.closed or self.completed or self.orphans)

    def describe(self) -> str:
        """One line, naming trials by Optuna number."""
        parts = [(self.closed, "finished in Optuna, closed in Tune's state"),
                 (self.completed, "trained to the end, recorded as complete"),
                 (self.resumed, "continue from their last checkpoint"),
                 (self.orphans, "asked but never started, marked FAIL")]
        return "; ".join(f"{', '.join(f'#{n}' for n in numbers)} {what}" for numbers, what in parts if numbers)


def _experiment_fs(runs: RunStorage, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return runs.filesystem or pyarrow.fs.LocalFileSystem(), runs.experiment_path(name)


def _newest(fs: pyarrow.fs.FileSystem, directory: str, pattern: str) -> str | None:
    """Newest file of ``pattern`` in ``directory``; Tune picks the greatest name too."""
    infos = fs.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True))
    names = fnmatch.filter([i.base_name for i in infos if i.type == pyarrow.fs.FileType.File], pattern)
    return f"{directory}/{max(names)}" if names else None


def _read(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except (FileNotFoundError, OSError):
        return None


def _replace(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a kill mid-write leaves the old file)."""
    temporary = f"{path}.{uuid.uuid4().hex}.part"
    with fs.open_output_stream(temporary) as out:
        out.write(data)
    fs.move(temporary, path)


def _logged_results(fs: pyarrow.fs.FileSystem, trial_dir: str) -> list[dict[str, Any]]:
    """The results Tune logged for a trial (``result.json``, one per line, appended as they came)."""
    text = (_read(fs, f"{trial_dir}/result.json") or b"").decode("utf-8", errors="replace")
    results = []
    for line in text.splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            break  # a line cut short by the kill: nothing after it was logged either
    return results


def reconcile_for_resume(storage: optuna.storages.BaseStorage, runs: RunStorage,
                         config: StudyConfig) -> ResumeReconciliation:
    """Make Tune's saved experiment state agree with the Optuna study before it is restored.

    Optuna commits each trial's end at once; Tune saves its state every few
    seconds. So a killed driver can leave, for a Tune trial still unfinished
    in Tune's state:

    * an Optuna trial already COMPLETE, PRUNED or FAIL, and Tune's saved
      results (``result.json``, synced with its state) reach the last epoch
      Optuna saw: the trial is closed in Tune's state (TERMINATED, or ERROR for
      FAIL) with that result, so it is neither rerun nor lost. When they lag,
      the trial is rerun from its last Train checkpoint, which reports the
      missing result again; :class:`StudySearch` keeps it out of Optuna;
    * an Optuna trial RUNNING whose last logged result is its final epoch: it
      is told COMPLETE with that result's objective and closed the same way
      (rerun, it would log that epoch a second time);
    * otherwise the trial is left to Tune, which reruns it from its last
      checkpoint and reports into its RUNNING Optuna trial.

    Optuna trials RUNNING without any Tune trial are marked FAIL
    (:func:`reconcile_optuna`). Every write is whole-file and the steps are
    idempotent, so a driver killed during the reconciliation itself is
    reconciled on the next ``--resume``.

    Args:
        storage: the Optuna storage.
        runs: the run storage holding the Tune experiment.
        config: the study.

    Returns:
        What was found and done.

    Raises:
        NotFoundError: the run storage holds no Tune experiment state for the study.
    """
    fs, experiment = _experiment_fs(runs, config.name)
    state_path = _newest(fs, experiment, _EXPERIMENT_STATE)
    raw = _read(fs, state_path) if state_path else None
    if raw is None:
        raise NotFoundError(f"no Tune experiment state ({_EXPERIMENT_STATE}) in {experiment}; fix: check --name "
                            f"and --storage-path, or start the study without --resume")
    state = json.loads(raw)
    study_id = storage.get_study_id_from_name(config.name)
    optuna_trials = {t.number: t for t in storage.get_all_trials(study_id, deepcopy=False)}
    metrics = [o.metric for o in config.objectives]  # a two-objective study is told both values
    closed: list[int] = []
    completed: list[int] = []
    resumed: list[int] = []
    closed_ids: list[str] = []
    numbers: set[int] = set()
    for entry in state["trial_data"]:
        trial, meta = json.loads(entry[0]), json.loads(entry[1])
        settings = trial.get("config")  # plain JSON: flat parameters and the Optuna number
        number = settings.get(OPTUNA_NUMBER_KEY) if isinstance(settings, dict) else None
        if number is None:
            continue
        numbers.add(int(number))
        ot = optuna_trials.get(int(number))
        if trial["status"] in ("TERMINATED", "ERROR") or ot is None:
            continue
        logged = _logged_results(fs, f"{experiment}/{trial['relative_logdir']}")
        last = logged[-1] if logged else None
        values = [last.get(m) for m in metrics] if last else []
        finite = len(values) == len(metrics) and all(
            isinstance(v, int | float) and math.isfinite(v) for v in values)
        epochs = int(last.get(EPOCHS_METRIC, 0)) if last else 0
        if ot.state in _OPTUNA_FINISHED:
            if epochs < max(ot.intermediate_values, default=1):
                # Optuna saw epochs that Tune's saved results lack (they are synced with its state):
                # rerun, so the trial reports them again from its Train checkpoint; StudySearch keeps
                # them out of the finished Optuna trial.
                resumed.append(ot.number)
                continue
            trial["status"] = _OPTUNA_FINISHED[ot.state]
            closed.append(ot.number)
        elif epochs >= config.max_epochs and finite:
            # One value per epoch, as StudySearch reports them (Optuna keeps none in a two-objective study).
            if len(metrics) == 1 and epochs not in ot.intermediate_values:
                storage.set_trial_intermediate_value(ot._trial_id, epochs, float(values[0]))
            storage.set_trial_state_values(ot._trial_id, optuna.trial.TrialState.COMPLETE, [float(v) for v in values])
            trial["status"] = "TERMINATED"
            completed.append(ot.number)
        else:
            resumed.append(ot.number)
            continue
        if last is not None and epochs >= int(meta.get("last_result", {}).get(EPOCHS_METRIC, 0)):
            meta["last_result"] = last
            meta["last_result_time"] = last.get("timestamp", meta.get("last_result_time"))
        entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(meta, indent=2)
        closed_ids.append(trial["trial_id"])
    orphans = reconcile_optuna(storage, config.name, numbers)
    if closed_ids:
        # The concurrency limiter counts the closed trials as running until Tune ends them, which it
        # now never will: without this it would wait forever for a free slot. Written first, and
        # idempotent, so a kill between the two writes is repaired by the next resume.
        search_path = _newest(fs, experiment, _SEARCH_STATE)
        search_raw = _read(fs, search_path) if search_path else None
        if search_raw is not None:
            search = ray.cloudpickle.loads(search_raw)
            # ClusterLimiter since issue 10; studies started before keep Tune's fixed ConcurrencyLimiter.
            limiter = search.get("name:ClusterLimiter") or search.get("name:ConcurrencyLimiter")
            if limiter is not None and any(t in limiter["live_trials"] for t in closed_ids):
                for trial_id in closed_ids:
                    if trial_id in limiter["live_trials"]:
                        limiter["live_trials"].discard(trial_id)
                        limiter["num_unfinished_live_trials"] = max(0, limiter["num_unfinished_live_trials"] - 1)
                _replace(fs, search_path, ray.cloudpickle.dumps(search))
        _replace(fs, state_path, json.dumps(state).encode("utf-8"))
    return ResumeReconciliation(tuple(closed), tuple(completed), tuple(resumed), tuple(orphans))


def reconcile_optuna(storage: optuna.storages.BaseStorage, name: str, tune_numbers: set[int]) -> list[int]:
    """Fail Optuna trials left RUNNING that no Tune trial will ever finish.

    A driver killed between asking Optuna for a trial and saving Tune's
    experiment state leaves such an orphan; marking it FAIL keeps the count of
    finished Optuna trials equal to Tune's.

    Args:
        storage: the Optuna storage.
        name: the study name.
        tune_numbers: Optuna trial numbers of every Tune trial (from their configs).

    Returns:
        The numbers of the trials marked FAIL.
    """
    study_id = storage.get_study_id_from_name(name)
    running = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    orphans = [t.number for t in running if t.number not in tune_numbers]
    for number in orphans:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    return orphans


def prune_stopped(storage: optuna.storages.BaseStorage, name: str, stopped: set[int]) -> list[int]:
    """Close the Optuna trials of Tune trials that the time budget stopped: PRUNED, or FAIL without a value.

    Tune stops the trials still running when ``time_budget_s`` runs out without
    telling the searcher, so their Optuna trials would stay RUNNING. Like a
    trial ASHA stops, such a trial ended early through no fault of its own:
    PRUNED with its last intermediate value. Call it once ``fit()`` has
    returned normally (an interrupted study keeps them RUNNING, see
    :func:`mark_interrupted`).

    Args:
        storage: the Optuna storage.
        name: the study name.
        stopped: Optuna numbers of the Tune trials that ended early without error.

    Returns:
        The numbers of the trials closed.
    """
    study = optuna.load_study(study_name=name, storage=storage)
    closed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number in stopped:
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED if trial.intermediate_values
                       else optuna.trial.TrialState.FAIL)
            closed.append(trial.number)
    return closed


#: Optuna system attribute set on trials that were running when the study was interrupted.
INTERRUPTED_ATTR = "heimdall:interrupted"


def mark_interrupted(storage: optuna.storages.BaseStorage, name: str, tune_numbers: set[int]) -> list[int]:
    """Leave Optuna agreeing with Tune after an interrupted ``fit()``.

    Call it once ``Tuner.fit()`` has returned because of SIGINT/SIGTERM (Tune
    has then saved its state, with the running trials as to be resumed), not
    from the signal handler. The trials Tune will resume stay RUNNING in
    Optuna, since ``--resume`` reports their next epochs into them and Optuna
    cannot reopen a finished trial; each gets the system attribute
    :data:`INTERRUPTED_ATTR` (when, UTC) so a study never resumed shows why
    they run. Optuna trials that no Tune trial holds are marked FAIL
    (:func:`reconcile_optuna`).

    Args:
        storage: the Optuna storage.
        name: the study name.
        tune_numbers: Optuna trial numbers of every Tune trial (from their configs).

    Returns:
        The numbers of the trials left RUNNING and marked interrupted.
    """
    reconcile_optuna(storage, name, tune_numbers)
    study_id = storage.get_study_id_from_name(name)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    running = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, when)
    return [t.number for t in running]


# -- live progress ----------------------------------------------------------------------------


def _short(name: str) -> str:
    return name.split(".", 1)[-1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class StudyProgress(tune.Callback):
    """One line per trial event instead of Tune's tables: start, each epoch, end.

    Example lines::

        [  2:41] #3 epoch 2/8  nll_km 6.41  median 18.2 km  cov 41%/86%   best 6.12 (#1)
        [  3:05] #3 stopped by ASHA after 2 epochs (val/nll_km 6.41)

    Args:
        objective: what the study minimises.
        trials: the study's trial count.
        max_epochs: epochs of a full trial.
        write: where lines go (``print`` by default).
    """

    def __init__(self, objective: Objective, trials: int, max_epochs: int, write: Callable[[str], None] = print) -> None:
        self.objective = objective
        self.trials = trials
        self.max_epochs = max_epochs
        self.write = write
        self.started = time.monotonic()
        self.best: tuple[float, str] | None = None
        self.last: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["write"] = None  # print is restored on unpickling; other sinks are not picklable
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.write = self.write or print
        self.started = time.monotonic()

    def _line(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        self.write(f"[{minutes:3d}:{seconds:02d}] {text}")

    @staticmethod
    def _label(trial: Any) -> str:
        return f"#{trial.config.get(OPTUNA_NUMBER_KEY, trial.trial_id)}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Announce a trial and its parameters."""
        params = ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in trial.config.items() if k != OPTUNA_NUMBER_KEY)
        # Counted by starts, not len(trials): Tune creates the next trials before it starts them.
        started = self.__dict__.setdefault("_started", set())  # (a callback pickled before had none)
        started.add(trial.trial_id)
        self._line(f"{self._label(trial)} started ({len(started)}/{self.trials}): {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """One line per validated epoch, with the best so far."""
        self.last[trial.trial_id] = result
        value = result.get(self.objective.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value < self.best[0] if self.objective.mode == "min" else value > self.best[0])
            if better:
                self.best = (float(value), self._label(trial))
        cov = (f"cov {result.get('val/coverage_1sigma', float('nan')):.0%}/"
               f"{result.get('val/coverage_2sigma', float('nan')):.0%}")
        best = f"best {self.best[0]:.4g} ({self.best[1]})" if self.best else ""
        self._line(f"{self._label(trial)} epoch {int(result.get(EPOCHS_METRIC, 0))}/{self.max_epochs}  "
                   f"{self.objective.metric.split('/')[-1]} {_fmt(value)}  "
                   f"median {result.get('val/median_km', float('nan')):.1f} km  {cov}   {best}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Say whether the trial ran all epochs or was stopped early."""
        result = self.last.get(trial.trial_id, {})
        epochs = int(result.get(EPOCHS_METRIC, 0))
        how = "finished" if epochs >= self.max_epochs else "stopped early (ASHA or time budget)"
        self._line(f"{self._label(trial)} {how} after {epochs} epoch(s) "
                   f"({self.objective.metric} {_fmt(result.get(self.objective.metric))})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Say why a trial failed (the last line of its error, e.g. a ``TrialFailed`` reason) and where the rest is."""
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        reason = _last_line(where) if where else ""
        self._line(f"{self._label(trial)} FAILED{': ' + reason if reason else ''}; details in {where}")


def _last_line(path: str) -> str:
    """The last non-empty line of a trial's error file ('' when it cannot be read)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")[:300]

