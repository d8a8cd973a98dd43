"""Tune the localization network: ``python -m tuning.run --space resnet``.

Resolve settings → prepare the dataset and its feature cache → search (Ray Tune +
Optuna TPE + ASHA over Ray Train Lightning trials) → summarise → release the best
trial (ONNX, parity gate, models store, MLflow) → the study page ``report.html``.
Design: docs/architecture.md.

Commands to copy::

    python -m tuning.run --space resnet                      # the default study (~20 min on 2 cores)
    python -m tuning.run --space resnet --dry-run            # check everything read-only, print the plan
    python -m tuning.run --smoke-test                        # tiny: 128 recordings, 2 trials, 1 epoch
    python -m tuning.run --resume --name resnet-nll-20260101-120000   # after a crash or Ctrl-C

Settings: flag, then environment variable, then default (the table below). Give
PostgreSQL passwords through ``PGPASSWORD``, never in URLs (docs/security.md).
Exit status: 0 done; 1 one ``error:`` line (settings and services fail before any
trial); 2 usage; 130 interrupted (nothing exported; resume with the printed command).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from ray import tune
from ray.data import DataContext
from tqdm import tqdm

from heimdall.catalog import Catalog, DatasetInfo
from heimdall.catalog.base import CatalogMissingError
from heimdall.datasets import VAL, SplitConfig, generate_dataset, split_codes
from heimdall.errors import DataError, HeimdallError, NotFoundError, ServiceUnavailableError
from heimdall.features import feature_config_for
from heimdall.scene import GeneratorConfig
from heimdall.store import BlobStore, open_store
from tuning.console import LOG_NAME, quiet_console
from tuning.data.describe import baseline_reports
from tuning.data.pipeline import FeatureCache, ensure_feature_cache, load_cached_split, materialises, study_datasets
from tuning.release.registry import StudyRecord
from tuning.release.stage import ExportRequest, RegistrySettings, export_and_register, retry_command, trial_records
from tuning.settings import (
    RunSettings,
    StudyLocations,
    add_args,
    add_data_args,
    add_registry_args,
    location_flags,
    parse_duration,
    run_settings,
    setting,
    settings_table,
)
from tuning.study.pareto import export_order, study_front
from tuning.study.report import TrialRow, format_table, save_plots, study_counts, trial_rows, write_summary
from tuning.study.signals import GracefulStop
from tuning.study.spaces import (
    SearchSpace,
    budget_overrides,
    check_space_budget,
    check_space_devices,
    load_space,
    space_summary,
    with_overrides,
)
from tuning.study.tracking import study_tracking
from tuning.study.trial import TrialSpec
from tuning.study.tune import (
    SMOKE_TEST,
    STUDY_FILES,
    WORKER_GROUP_START_TIMEOUT_S,
    ResourcePlan,
    RunStorage,
    StudyConfig,
    StudyProgress,
    build_tuner,
    check_new_study,
    check_resumable,
    describe_url,
    make_searcher,
    make_trainable,
    mark_interrupted,
    open_optuna_storage,
    open_run_storage,
    plan_study,
    plans_reads,
    prune_stopped,
    reconcile_optuna,
    restore_tuner,
    trial_number,
)

__all__ = ["RunMode", "build_parser", "main", "parse_duration", "Connections", "connect", "run_study"]

OBJECT_STORE_BYTES = 1024**3  # the study's datasets (~0.4 GB by default) and batches; Ray's default takes 30% of RAM
#: Train's settings for every process of the study (the job's runtime env, so a cluster gets them too).
#: The controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Train's default: 2 s); a
#: trial's last result and its end wait for that poll, ~1.5 s per trial at the default, 0.2 s at 0.5 s.
#: The poll is a cheap actor call, and it finds a dead worker sooner too.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
#: Train's settings for a local Ray only. Train starts a PreemptionWatcher actor per trial that polls
#: the GCS for nodes being drained (a cloud reclaiming a spot node) to warn the workers ahead; a local
#: Ray has no node to drain, and its extra process boot costs a trial ~1 s of the machine's CPU.
#: (Our workers never read the warning; a drained node's worker death still counts as a preemption.)
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
EXIT_INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT
LATEST = "LATEST"  # file in the output root naming the last study started


# -- command line ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMode:
    """How ``python -m tuning.run`` runs the study (switches, not settings of the study)."""

    dry_run: bool = field(default=False, metadata=setting(
        "validate the space, settings and connections, print the plan and exit (no Ray, no trial)", action="store_true"))
    smoke_test: bool = field(default=False, metadata=setting(
        "tiny study: " + ", ".join(f"{k}={v}" for k, v in SMOKE_TEST.items()), action="store_true"))
    resume: bool = field(default=False, metadata=setting(
        "continue the last study (or --name) after a crash", action="store_true"))
    no_export: bool = field(default=False, metadata=setting(
        "stop after the study: do not export, gate, publish and register the best trial", action="store_true"))
    verbose: bool = field(default=False, metadata=setting(
        "print Ray's and the libraries' messages and the workers' output on the terminal (default: the "
        "messages go to the study's study.log)", action="store_true"))


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.run`` argument parser, generated from the settings' fields (:mod:`tuning.settings`)."""
    parser = argparse.ArgumentParser(
        prog="python -m tuning.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{__doc__}\nConnections (flag, then environment variable, then default):\n\n{settings_table()}\n")
    add_args(parser.add_argument_group("the study (defaults: tuning.study.tune.StudyConfig)"), StudyConfig)
    add_args(parser.add_argument_group("mode"), RunMode)
    add_data_args(parser)
    add_args(parser.add_argument_group("services (flags override environment variables)"), StudyLocations)
    add_registry_args(parser)
    return parser


# -- settings -----------------------------------------------------------------------------------


def _saved_study(places: StudyLocations, name: str | None) -> StudyConfig:
    """The study to resume: ``study.json`` of study ``name`` (None: the last one started), from the
    output directory, else from the run storage (a cluster job's output directory does not outlive the job).

    Raises:
        NotFoundError: no such study.
        ConfigError: the saved study is not valid.
    """
    name = name or _latest(places.output_root)
    path = places.output_root / name / "study.json"
    if path.is_file():
        return StudyConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    saved = open_run_storage(places.storage_url).read_file(name, "study.json")
    if saved is None:
        raise NotFoundError(f"no saved study {name!r} to resume ({path} is missing, and so is study.json in the run "
                            f"storage {places.storage_url}); fix: check --name, --storage-path and --output-dir / "
                            f"--data-dir, or start the study without --resume")
    return StudyConfig.from_dict(json.loads(saved.decode("utf-8")))


def _latest(output_root: Path) -> str:
    path = output_root / LATEST
    if not path.is_file():
        raise NotFoundError(f"no study to resume: {path} is missing; fix: give --name, or check --output-dir / --data-dir")
    return path.read_text(encoding="utf-8").strip()


# -- connections (everything that can fail before a trial starts) ----------------------------------


@dataclass
class Connections:
    """Open handles on every service a study uses, checked before Ray starts."""

    catalog: Catalog
    store: BlobStore
    optuna: optuna.storages.BaseStorage
    runs: RunStorage
    dataset: DatasetInfo | None  # None: it will be generated
    registry: RegistrySettings | None = None  # None: no export stage (--no-export)

    def close(self) -> None:
        """Close the catalogue connection."""
        self.catalog.close()


def connect(config: StudyConfig, where: RunSettings, *, resume: bool, export: bool = True) -> Connections:
    """Open and check the catalogue, the store, the Optuna storage, the run storage and (``export``)
    the models store and MLflow, so a service that is down stops the study before it starts.

    Raises:
        ServiceUnavailableError: a service cannot be reached.
        DataError: the dataset exists but is empty.
        AlreadyExistsError / NotFoundError: a new study's name is taken / a resumed one is missing.
    """
    catalog = where.data.open_catalog()
    catalog.initialize()
    store = where.data.open_store()
    store.list(f"datasets/{config.dataset}/")  # reaches an S3 server now rather than mid-study
    dataset = _dataset_info(catalog, config.dataset)
    optuna_storage = open_optuna_storage(where.places.optuna_url)
    runs = open_run_storage(where.places.storage_url)
    registry = check_registry(where.registry) if export else None
    if resume:
        check_resumable(runs, config.name)
    else:  # last: it claims the name
        check_new_study(optuna_storage, runs, config.name, [o.mode for o in config.objectives])
    return Connections(catalog=catalog, store=store, optuna=optuna_storage, runs=runs, dataset=dataset,
                       registry=registry)


def check_registry(settings: RegistrySettings) -> RegistrySettings:
    """Resolve and reach the models store and MLflow (a server must answer ``/health``).

    Raises:
        ServiceUnavailableError: either is down, naming ``--no-export`` as the way to tune without them.
    """
    try:
        settings.check()
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(f"{exc}\n(the best trial is registered at the end of the study; to tune "
                                      f"without a registry, add --no-export)") from None
    return settings


def _dataset_info(catalog: Catalog, name: str) -> DatasetInfo | None:
    try:
        info = catalog.get_dataset(name)
    except NotFoundError:
        return None
    if info.status == "complete" and info.n_recordings == 0:
        raise DataError(f"dataset {name!r} is complete but holds no recordings; fix: delete it "
                        f"(`python -m tuning.data delete {name}`) and let the study regenerate it, or pick another --dataset")
    return info


# -- the plan ------------------------------------------------------------------------------------


def describe_plan(config: StudyConfig, space: SearchSpace, where: RunSettings, info: DatasetInfo | None,
                  plan: ResourcePlan, *, resume: bool, registry: RegistrySettings | None = None,
                  cached: ResourcePlan | None = None) -> str:
    """The study as it will run, one setting per line (``info`` None: the dataset will be generated;
    ``registry`` None: no export stage; ``cached``: the plan once the features are cached, shown
    where it runs more trials at once than ``plan``)."""
    o = config.objective_spec
    if info is None:
        data = f"{config.dataset!r} absent: will generate {config.dataset_recordings} recordings (seed {config.dataset_seed})"
    elif info.status != "complete":
        data = f"{info.name!r} pending ({info.n_recordings}/{info.planned_recordings}): generation will resume"
    else:
        data = f"{info.name!r}: {info.n_recordings} recordings in {info.n_shards} shards ({info.kind})"
    budget = "none" if config.time_budget_s is None else f"{config.time_budget_s / 60:g} min"
    bound = "no latency bound" if config.max_latency_ms is None else f"latency_ms <= {config.max_latency_ms:g}"
    rows = [
        ("study", f"{config.name}{' (resuming)' if resume else ''}"),
        ("space", f"{space.name}: arch {space.arch}, {len(space.parameters)} parameters, sha256 {space.sha256[:12]}"),
        ("dataset", data),
        ("objective", f"{o.metric} ({o.mode}): {o.description}" if len(config.objectives) == 1 else
         f"Pareto front of {' and '.join(f'{x.metric} ({x.mode})' for x in config.objectives)}; {o.metric} drives "
         f"ASHA; export: best {o.metric} on the front, {bound}"),
        ("trials", f"{config.trials} x up to {config.max_epochs} epochs; ASHA grace {config.first_rung} epoch(s) after "
                   f"the MSE warm-up, "
                   f"reduction {config.reduction_factor}; time budget {budget}; seed {config.seed}"),
        ("workers", f"{config.workers_per_trial} per trial x {config.cpus_per_worker:g} CPU"
                    + (f" + {config.gpus_per_worker:g} GPU" if config.gpus_per_worker else "") + f"; {plan.describe()}"
                    + (f"; {cached.max_concurrent} at a time if the features fit in the object store "
                       "(known once they are cached: the trials then read nothing)"
                       if cached and cached.max_concurrent > plan.max_concurrent else "")),
        ("catalogue", describe_url(where.data.catalog_url)),
        ("store", describe_url(where.data.store_url)),
        ("optuna", describe_url(where.places.optuna_url)),
        ("runs", f"{describe_url(where.places.storage_url)}/{config.name}"),
        ("output", str(where.places.output_root / config.name)),
        ("ray", where.places.ray_address or "a new local Ray (dashboard on)"),
        ("registry", f"{describe_url(registry.mlflow_uri)} (MLflow); releases to {registry.models_store}"
                     if registry else "off (--no-export)"),
    ]
    return "\n".join(f"  {k:10s} {v}" for k, v in rows)


# -- side effects ------------------------------------------------------------------------------------


def start_ray(address: str | None, verbose: bool) -> bool:
    """Start a local Ray with its dashboard (or join ``address``); print the dashboard URL.

    The dashboard stays on, and every worker gets ``RAY_ADDRESS``: Train's
    placement-group cleaner asks the state API (served by the dashboard)
    whether a trial's Train controller is alive, and without ``RAY_ADDRESS``
    it gives up when several Ray instances run on one machine. A trial that
    ASHA stops kills its controller, so its workers' CPUs would then never be
    released and later trials would time out starting theirs
    (docs/architecture.md, "Ray facts we rely on").

    Returns:
        True when this call started or joined Ray (and the caller should shut it down).
    """
    if ray.is_initialized():
        print("ray:       using this process's running Ray session")
        return False
    # Quiet (not verbose): the workers' output stays in their log files, and Ray Data draws no progress
    # bars; the driver's own messages go to the study's log file (tuning.console), at INFO there.
    kwargs: dict[str, Any] = {"include_dashboard": True, "log_to_driver": verbose, "logging_level": logging.INFO}
    if address:
        kwargs.update(address=address, runtime_env=_ray_address_env(address))
        ctx = ray.init(**kwargs)
    else:
        ctx = _init_local_ray(kwargs)
    if not verbose:
        DataContext.get_current().enable_progress_bars = False
    url = ctx.dashboard_url
    print(f"ray:       dashboard at http://{url} (token authentication: the token is in ~/.ray/auth_token)"
          if url else "ray:       started (no dashboard URL reported)")
    return True


def _ray_address_env(address: str, local: bool = False) -> dict[str, Any]:
    """Job runtime env: every worker gets the cluster address (``ray://`` client addresses excepted),
    Train's worker-group start timeout (:data:`tuning.study.tune.WORKER_GROUP_START_TIMEOUT_S`) and
    :data:`TRAIN_ENV` (plus :data:`LOCAL_TRAIN_ENV` for a ``local`` Ray)."""
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(WORKER_GROUP_START_TIMEOUT_S), **TRAIN_ENV,
           **(LOCAL_TRAIN_ENV if local else {})}
    if "://" not in address:
        env["RAY_ADDRESS"] = address
    return {"env_vars": env}


def _init_local_ray(kwargs: dict[str, Any]) -> Any:
    """``ray.init`` of a private local instance whose GCS port is chosen here, so workers can be told it."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the head node
    try:
        return ray.init(address="local", dashboard_host="127.0.0.1", object_store_memory=OBJECT_STORE_BYTES,
                        runtime_env=_ray_address_env(address, local=True), **kwargs)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def local_resources() -> dict[str, float]:
    """The CPUs and GPUs a local Ray started by :func:`start_ray` would have, counted the way Ray
    counts them (cgroup-aware CPUs; GPUs from the driver library, capped by ``CUDA_VISIBLE_DEVICES``),
    without starting it or touching CUDA."""
    from ray._private import accelerators
    from ray._private.utils import get_num_cpus

    gpus = 0
    manager = accelerators.get_accelerator_manager_for_resource("GPU")
    if manager is not None:
        gpus = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, len(visible))
    return {"CPU": float(get_num_cpus()), "GPU": float(gpus)}


#: How long a dry run waits for a Ray cluster's port to answer.
RAY_PROBE_TIMEOUT_S = 5.0


def cluster_resources(address: str) -> dict[str, float]:
    """``ray.cluster_resources()`` of the cluster at ``address``: connect, read, disconnect (starts nothing).

    Raises:
        ServiceUnavailableError: nothing answers there, or Ray refuses the connection.
    """
    fix = ("fix: check --ray-address / RAY_ADDRESS (and RAY_AUTH_TOKEN for a cluster with token authentication), "
           "or drop it to plan for a local Ray")
    if ray.is_initialized():  # a caller's own session (tests, notebooks): read it, leave it up
        return dict(ray.cluster_resources())
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if host and port.isdigit():  # fail in seconds: ray.init retries an absent GCS for minutes
        try:
            socket.create_connection((host, int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise ServiceUnavailableError(f"no Ray cluster answers at {address} ({exc}); {fix}") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            return dict(ray.cluster_resources())
        finally:
            ray.shutdown()
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ServiceUnavailableError(f"cannot join the Ray cluster at {address}: {str(exc)[:300]}; {fix}") from None


def ensure_dataset(conn: Connections, config: StudyConfig) -> DatasetInfo:
    """The study's dataset, generated (with a progress bar) or resumed if needed."""
    info = conn.dataset
    if info is not None and info.status == "complete":
        return info
    n, seed, kwargs = config.dataset_recordings, config.dataset_seed, {}
    if info is not None:  # pending: resume with its own settings
        n, seed = info.planned_recordings, info.seed
        kwargs = {"config": GeneratorConfig.from_dict(info.config), "shard_size": info.shard_size}
    with tqdm(total=n, unit="rec", desc=f"generate dataset {config.dataset}") as bar:
        return generate_dataset(conn.catalog, conn.store, config.dataset, n_recordings=n, seed=seed,
                                progress=bar.update, **kwargs)


def baselines(conn: Connections, info: DatasetInfo, split: SplitConfig) -> dict[str, dict[str, float]]:
    """Centre and Bayes-oracle reports on the validation split (synthetic datasets only)."""
    if info.kind != "synthetic":
        return {}
    labels = conn.catalog.recordings(info.name)
    val = np.flatnonzero(split_codes(labels["recording_id"], labels["split_group"], split) == VAL)
    if len(val) == 0:
        return {}
    reports = baseline_reports(GeneratorConfig.from_dict(info.config), {k: v[val] for k, v in labels.items()})
    return {name: {f"val/{k}": v for k, v in r.to_dict().items() if isinstance(v, (int, float))}
            for name, r in reports.items()}


def run_study(config: StudyConfig, space: SearchSpace, where: RunSettings, conn: Connections, *,
              resume: bool, verbose: bool, callbacks: Sequence[tune.Callback] = (),
              stop: GracefulStop | None = None, resume_hint: str = "python -m tuning.run --resume") -> int:
    """Start Ray, print the plan, ensure dataset and feature cache, fit, summarise, export, write the study page.
    Returns the exit status.

    ``callbacks`` are added to a new study's Tuner (a resumed one keeps its own). A signal
    caught by ``stop`` during ``fit()`` ends the study without export (exit 130, ``resume_hint``).
    """
    stop = stop or GracefulStop()
    out_dir = where.places.output_root / config.name
    started_ray = start_ray(where.places.ray_address, verbose)
    local = started_ray and not where.places.ray_address  # the local Ray this run started
    try:
        # The plan, from the cluster that runs the study (Ray is up now); whether the trials read their
        # data is known once the features are cached (below), so this first plan assumes they do.
        resources = ray.cluster_resources()
        plan = plan_study(config, resources)
        print("Heimdall Tune: plan\n" + describe_plan(
            config, space, where, conn.dataset, plan, resume=resume, registry=conn.registry,
            cached=plan_study(config, resources, reads=plans_reads(local=local, materialised=True))))
        info = ensure_dataset(conn, config)
        split = SplitConfig()
        # An imported dataset carries its stations' offsets; they enter the features (and the cache key).
        cache = ensure_feature_cache(conn.catalog, conn.store, config.dataset, feature_config_for(info.config), split=split)
        spec = TrialSpec(config, space, train_storage=conn.runs.train_path(config.name),
                         storage_filesystem=conn.runs.filesystem)
        # Materialised: read once here, shared by every trial (the blocks go with this driver; --resume
        # reads them again); the trials then start no reads.
        plan = plan_study(config, resources,
                          reads=plans_reads(local=local, materialised=materialises(cache, conn.store)))
        trainable = make_trainable(spec, study_datasets(cache, conn.store, seed=config.seed), cache, plan)
        print(f"study:     {plan.describe()}; experiment at {conn.runs.experiment_path(config.name)}")
        if resume:
            tuner = restore_tuner(config, trainable, conn.runs, conn.optuna)
        else:
            _save_study(out_dir, where, conn.runs, config)
            tuner = build_tuner(config, make_searcher(config, space, conn.optuna), trainable, conn.runs, plan,
                                callbacks=[StudyProgress(config.objective_spec, config.trials, config.max_epochs),
                                           *study_tracking(config, conn.registry), *callbacks])
        started = time.monotonic()
        with stop.fitting():
            results = tuner.fit()
        if stop.signal is not None:
            return interrupted(config, conn, results, stop.signal, resume_hint)
        previous = _previous_export(out_dir, conn.runs, config.name)
        code, rows, plots = _summarise(config, where, conn, results, out_dir, baselines(conn, info, split),
                                       time.monotonic() - started)
        try:
            if code == 0 and conn.registry is not None:
                code = export_best(config, space, conn, results, rows, plots, cache, out_dir, previous)
        finally:  # also after a refused or unregistered export: the page says what happened
            study_page(config, conn, results, out_dir, info)
        return code
    finally:
        if started_ray:
            ray.shutdown()


def interrupted(config: StudyConfig, conn: Connections, results: Any, sig: int, resume_hint: str) -> int:
    """After a signal stopped ``fit()``: leave Tune and Optuna agreeing, say how to resume. Returns 130."""
    numbers = {n for n in map(trial_number, results) if n is not None}
    marked = mark_interrupted(conn.optuna, config.name, numbers)
    if marked:
        print(f"note:      Optuna trial(s) {marked} were running; --resume continues them", file=sys.stderr)
    print(f"interrupted ({signal.Signals(sig).name}): the study's state is saved and nothing was exported; "
          f"continue with:\n    {resume_hint}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _save_study(out_dir: Path, where: RunSettings, runs: RunStorage, config: StudyConfig) -> None:
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(text, encoding="utf-8")
    runs.write_file(config.name, "study.json", text.encode("utf-8"))
    (where.places.output_root / LATEST).write_text(config.name + "\n", encoding="utf-8")


def _summarise(config: StudyConfig, where: RunSettings, conn: Connections, results: Any, out_dir: Path,
               base: dict[str, dict[str, float]], seconds: float) -> tuple[int, list[TrialRow], dict[str, str]]:
    """Print the table, save plots and ``summary.json``. Returns (exit status, rows best first, plots)."""
    objective = config.objective_spec
    rows = trial_rows(results, objective, config.max_epochs)
    orphans = reconcile_optuna(conn.optuna, config.name, {r.number for r in rows if r.number is not None})
    prune_stopped(conn.optuna, config.name, {r.number for r in rows if r.status == "stopped" and r.number is not None})
    study = optuna.load_study(study_name=config.name, storage=conn.optuna)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = save_plots(study, out_dir)
    print()
    print(format_table(rows, objective, baselines={k: base[k] for k in ("centre", "oracle") if k in base}))
    front = study_front(rows, config.objectives, config.max_latency_ms)  # None: one objective
    if front is not None:
        print("\n" + front.text())
    summary = {
        "study": config.to_dict(), "objective": objective.metric, "mode": objective.mode,
        "wall_seconds": round(seconds, 1), "experiment": conn.runs.experiment_path(config.name),
        "storage_path": conn.runs.describe(), "optuna_storage": describe_url(where.places.optuna_url),
        "mlflow_uri": conn.registry and describe_url(conn.registry.mlflow_uri), "tune_trials": len(rows),
        "tune_status": {s: sum(r.status == s for r in rows) for s in ("complete", "stopped", "error")},
        "optuna_trials": study_counts(study), "optuna_orphans_failed": orphans,
        "best": rows[0] if rows and rows[0].value is not None else None, "trials": rows,
        "baselines": base, "plots": plots, "pareto": front and front.to_dict(),
    }
    path = write_summary(out_dir, summary)
    saved = [Path(p) for p in plots.values() if not p.startswith("skipped:")]
    _keep_in_run_storage(conn.runs, config.name, [path, *saved])
    print(f"\nsummary:   {path} (a copy in {conn.runs.experiment_path(config.name)}/{STUDY_FILES})")
    for name, where_ in plots.items():
        print(f"plot:      {name}: {where_}")
    if orphans:
        print(f"note:      {len(orphans)} Optuna trial(s) asked before an interruption and never run were marked FAIL: "
              f"{orphans}")
    if not any(r.value is not None for r in rows):
        print(f"error: no trial reported a result; see the trial logs under {conn.runs.experiment_path(config.name)}",
              file=sys.stderr)
        return 1, rows, plots
    return 0, rows, plots


def _keep_in_run_storage(runs: RunStorage, name: str, files: Sequence[Path]) -> None:
    """Copy the study's summary and plots next to its Tune state (shared storage on a cluster)."""
    for f in files:
        runs.write_file(name, f.name, f.read_bytes())


# -- the export stage --------------------------------------------------------------------------------


def best_checkpoint(rows: Sequence[TrialRow], runs: RunStorage, dest: Path) -> tuple[TrialRow, Path]:
    """Copy the best trial's best checkpoint out of the run storage into ``dest``.

    Returns:
        The trial's row and the checkpoint file.

    Raises:
        NotFoundError: no trial has a checkpoint, or the storage lost it.
    """
    candidates = [r for r in rows if r.value is not None and r.checkpoint_path]
    if not candidates:
        raise NotFoundError("no trial of the study saved a checkpoint, so there is nothing to export; fix: run "
                            "at least one full epoch (check --max-epochs and --time-budget)")
    best = candidates[0]  # rows are sorted best first
    from ray.train import Checkpoint
    from ray.train.lightning import RayTrainReportCallback

    shutil.rmtree(dest, ignore_errors=True)
    try:
        Checkpoint(best.checkpoint_path, filesystem=runs.filesystem).to_directory(str(dest))
    except (OSError, FileNotFoundError) as exc:
        raise NotFoundError(f"the best trial's checkpoint {best.checkpoint_path} cannot be read from "
                            f"{runs.describe()}: {exc}; fix: check the run storage") from None
    path = dest / RayTrainReportCallback.CHECKPOINT_NAME
    if not path.is_file():
        raise NotFoundError(f"the best trial's checkpoint {best.checkpoint_path} holds no "
                            f"{RayTrainReportCallback.CHECKPOINT_NAME}; fix: check the run storage")
    return best, path


def export_best(config: StudyConfig, space: SearchSpace, conn: Connections, results: Any, rows: Sequence[TrialRow],
                plots: dict[str, str], cache: FeatureCache, out_dir: Path,
                previous: dict[str, Any] | None = None) -> int:
    """Export the best trial to ONNX, gate it, publish it and register it (:mod:`tuning.register`).

    The export directory is written first, so a registry that fails now
    loses nothing: the error names the command that finishes the job. A study
    whose ``previous`` export already registered this same checkpoint (a
    ``--resume`` of a finished study) is not exported again.
    """
    from tuning.release.onnx import data_lineage
    from tuning.study.spaces import build_configs

    export_dir = out_dir / "export"
    rows = export_order(rows, config.objectives, config.max_latency_ms)  # two objectives: the Pareto choice first
    candidates = [r for r in rows if r.value is not None and r.checkpoint_path]
    if previous and candidates and previous.get("status") == "registered" \
            and previous.get("checkpoint_path") == candidates[0].checkpoint_path:
        pub = previous["publication"]
        print(f"\nrelease:   this study already released trial #{candidates[0].number}'s checkpoint as "
              f"v{pub['version']} ({pub['model_key']} in {pub['store']}); nothing new to export")
        _record_export(out_dir, conn.runs, config.name, previous)
        return 0
    best, checkpoint = best_checkpoint(rows, conn.runs, out_dir / "best-checkpoint")
    print(f"\nexport:    best trial #{best.number} (epoch {best.best_epoch}) → ONNX, parity gate on the test split, "
          f"models store, MLflow")
    splits = {s: load_cached_split(cache, conn.store, s) for s in ("val", "test")}
    info = conn.catalog.get_dataset(config.dataset)
    statuses = {r.trial_id: r.status for r in rows}
    study = StudyRecord(
        config.name, tuple(trial_records(results, statuses)), best_trial_id=best.trial_id,
        objective=config.objective_spec.metric, plots=tuple(plots.values()),
        seeds={"sampler": config.seed, "trial": f"{config.seed} + Optuna trial number", "best_trial": config.seed
               + (best.number or 0), "dataset": info.seed, "split": "splitmix64 of split_group"},
    )
    try:
        result = export_and_register(ExportRequest(
            checkpoint, splits, export_dir, study, conn.registry, space=space,
            lineage=data_lineage(conn.catalog, config.dataset), expected=build_configs(space, best.params),
            feature_config=cache.feature_config,
            generator_config=info.config if info.kind == "synthetic" else None))
    except ServiceUnavailableError as exc:  # the export is on disk: registration can be finished later
        _record_export(out_dir, conn.runs, config.name, {
            "status": "pending", "export_dir": str(export_dir), "error": str(exc),
            "retry": retry_command(export_dir, conn.registry)})
        raise
    except HeimdallError as exc:  # checkpoint/config mismatch, exporter failure, parity gate
        _record_export(out_dir, conn.runs, config.name,
                       {"status": "refused", "export_dir": str(export_dir), "error": str(exc)})
        raise
    pub = result.publication
    print(f"release:   v{pub.version} {'(already released) ' if pub.reused else ''}{pub.model_key} in {pub.store}")
    print(f"mlflow:    heimdall-localization version {result.mlflow_version} at {describe_url(conn.registry.mlflow_uri)}")
    print(f"champion:  {'yes' if result.champion else 'no'}: {result.comparison['reason']}")
    _record_export(out_dir, conn.runs, config.name, {"status": "registered", "trial_id": best.trial_id,
                                                     "checkpoint_path": best.checkpoint_path, **result.to_dict()})
    return 0


def _previous_export(out_dir: Path, runs: RunStorage, name: str) -> dict[str, Any] | None:
    """The export record of an earlier run of this study (``summary.json``, local or in the run storage)."""
    path = out_dir / "summary.json"
    text = path.read_bytes() if path.is_file() else runs.read_file(name, "summary.json")
    if not text:
        return None
    try:
        export = json.loads(text).get("export")
    except (ValueError, AttributeError):
        return None
    return export if isinstance(export, dict) else None


def _record_export(out_dir: Path, runs: RunStorage, name: str, export: dict[str, Any]) -> None:
    """Add the export stage's outcome to ``summary.json`` (and its copy in the run storage)."""
    path = out_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary["export"] = export
    _keep_in_run_storage(runs, name, [write_summary(out_dir, summary)])


# -- the study page ----------------------------------------------------------------------------------


def study_page(config: StudyConfig, conn: Connections, results: Any, out_dir: Path, info: DatasetInfo) -> Path | None:
    """Write ``report.html`` (:mod:`tuning.study.page`) next to ``summary.json``, copy it to the run storage,
    attach it to the study's MLflow run and print its path. Never raises for a page it cannot finish:
    it says why and the study's outcome stands. Returns the page, or None."""
    from tuning.study import page

    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
        synthetic = info.config if info.kind == "synthetic" else None
        held = page.held_out_or_why(summary, lambda: conn.catalog.recordings(info.name), synthetic)
        study = optuna.load_study(study_name=config.name, storage=conn.optuna)
        path = page.write_page(page.study_page_data(study, results, summary, held), out_dir / page.PAGE_FILE)
        _keep_in_run_storage(conn.runs, config.name, [path])
    except (HeimdallError, OSError, ValueError) as exc:
        print(f"note:      the study page was not written: {exc}", file=sys.stderr)
        return None
    print(f"report:    {path}")
    if conn.registry is not None:
        try:
            conn.registry.registry().log_study_file(config.name, path)
        except HeimdallError as exc:
            print(f"note:      {page.PAGE_FILE} is not in MLflow: {exc}", file=sys.stderr)
    return path


# -- entry point -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, callbacks: Sequence[tune.Callback] = ()) -> int:
    """Parse, validate, (dry run: print the plan) or run the study. Returns the exit status.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
        callbacks: extra Tune callbacks for a new study (benchmarks use them to time trials).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.smoke_test:
        parser.error("--resume continues a saved study with its own settings; drop --smoke-test")
    hint = resume_command(args, args.name)
    try:
        with GracefulStop() as stop:
            return _run(args, callbacks, stop)
    except HeimdallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was exported; continue with:\n    {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def resume_command(args: argparse.Namespace, name: str | None) -> str:
    """``python -m tuning.run --resume --name NAME`` with the connection flags this run was given
    (URLs without passwords: those come from the environment)."""
    parts = ["python", "-m", "tuning.run", "--resume"]
    if name:
        parts += ["--name", name]
    for flag, value in location_flags(args):
        parts += [flag, describe_url(str(value))]
    if args.no_export:
        parts.append("--no-export")
    return shlex.join(parts)


def _run(args: argparse.Namespace, callbacks: Sequence[tune.Callback], stop: GracefulStop) -> int:
    where, ignored = run_settings(args, saved_study=_saved_study)
    if ignored:
        print(f"note: --resume keeps the study's own settings; ignoring {', '.join(ignored)}")
    config = where.study
    space = study_space(config)
    if args.dry_run:
        return dry_run(config, space, where, resume=args.resume, export=not args.no_export)
    with quiet_console(where.places.output_root / config.name / LOG_NAME, verbose=args.verbose) as log:
        if log is not None:
            print(f"log:       {log} (Ray's and the libraries' messages; --verbose prints them here)")
        conn = connect(config, where, resume=args.resume, export=not args.no_export)
        try:
            return run_study(config, space, where, conn, resume=args.resume, verbose=args.verbose,
                             callbacks=callbacks, stop=stop, resume_hint=resume_command(args, config.name))
        finally:
            conn.close()


def dry_run(config: StudyConfig, space: SearchSpace, where: RunSettings, *, resume: bool, export: bool) -> int:
    """Check everything a study needs, read-only, print the plan and what was (not) checked. Returns 0.

    Raises:
        ConfigError: every problem found, at once (nothing printed as checked).
    """
    from tuning.study import preflight as pf

    check = pf.Preflight()
    dataset: list[DatasetInfo | None] = [None]

    def catalogue() -> tuple[str, str]:
        try:
            catalog = where.data.open_catalog(read_only=True)
            catalog.check()
        except CatalogMissingError:
            return "create", f"{describe_url(where.data.catalog_url)} (absent: created by the first dataset)"
        with catalog:
            dataset[0] = _dataset_info(catalog, config.dataset)
            shards = catalog.shards(config.dataset) if dataset[0] is not None else []
        store = where.data.open_store()
        check.probe("store", lambda: pf.store_root(store))
        check.probe("dataset shards", lambda: pf.dataset_shards(store, dataset[0], shards, config.dataset))
        return "ok", catalog.describe()

    check.probe("catalogue", catalogue)
    check.probe("optuna", lambda: pf.optuna_storage(where.places.optuna_url, config.name, resume=resume))
    check.probe("run storage", lambda: pf.run_storage(where.places.storage_url, config.name, resume=resume))
    if export:
        registry = where.registry
        check.probe("models store", lambda: pf.store_root(open_store(registry.models_store)))
        check.probe("mlflow", lambda: pf.mlflow_tracking(registry.mlflow_uri))
    resources: dict[str, float] = {}

    def cluster() -> tuple[str, str]:
        address = where.places.ray_address
        resources.update(cluster_resources(address) if address else local_resources())
        found = f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
        if address:
            return "ok", f"the plan is for the cluster at {address}: {found} now (read, then disconnected)"
        return "unchecked", f"Ray is not started by a dry run; the plan is for the local Ray a run starts: {found}"

    check.probe("ray", cluster)
    check.raise_problems()
    plan = plan_study(config, resources)
    print("Heimdall Tune: plan\n" + describe_plan(config, space, where, dataset[0], plan, resume=resume,
                                                            registry=registry if export else None,
                                                            cached=plan_study(config, resources, reads=plans_reads(
                                                                local=not where.places.ray_address, materialised=True))))
    print("\n" + "\n".join(f"  {f.what:14s} {f.state:9s} {f.detail}" for f in check.findings))
    print("\n" + space_summary(space))
    print("\n" + check.summary())
    return 0


def study_space(config: StudyConfig) -> SearchSpace:
    """The study's search space, checked against its epoch budget (warm-ups that reach
    ``--max-epochs`` are refused, or pinned to 0 for a smoke test: ``pin_long_warmups``).

    Raises:
        ConfigError: the space or its fit with the budget, every problem listed.
    """
    space = load_space(config.space)
    if config.pin_long_warmups:
        pinned = budget_overrides(space, config.max_epochs)
        if pinned:
            space = with_overrides(space, pinned)
            print(f"note:      smoke test: {', '.join(pinned)} pinned to 0 (they reach --max-epochs {config.max_epochs})")
    check_space_budget(space, config.max_epochs)
    check_space_devices(space, config.gpus_per_worker)
    return space


if __name__ == "__main__":
    sys.exit(main())
