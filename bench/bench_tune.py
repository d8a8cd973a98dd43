"""Benchmarks of the tuning machinery.

(a) ``overhead``: per-trial fixed overhead of a real study (trial actor,
TorchTrainer controller, Train worker group, dataset split, teardown) against
the trial's wall time. It runs ``tuning.run`` itself (local Ray, one trial at a
time) and times every trial from the driver: overhead = (first epoch reported
- trial start - one epoch) + (trial end - last epoch reported), with one
epoch = the median gap between later epochs. It also extrapolates the ratio
to the default study's trial (6400 training recordings, 8 epochs).

(b) ``search``: TPE + ASHA against random search without early stopping, in
seconds, over several seeds: the fraction of random search's seconds (wall
clock, and CPU seconds of the bench's one-thread process, which other work on
a shared machine does not inflate) that TPE + ASHA needs to match random
search's best objective. Random
search runs ``--trials`` full trials; each TPE + ASHA search runs until it
matches that best or has used as many wall seconds. To be affordable on 2 cores it
trains in this process with Optuna's own ASHA (``SuccessiveHalvingPruner``,
same grace period (``--grace``) and reduction factor as the study's ``ASHAScheduler``)
instead of one Ray Train run per trial; stopped trials are told PRUNED, as
``tuning.study.tune.StudySearch`` does. Two TPE + ASHA variants: cold (the
study's default) and warm-started (``--warm-start``) from the random search
of another seed, as a study of the same space run earlier. Searches of one
seed run one after the other, random and TPE interleaved, so machine load
hits both alike. Caveats: a small dataset and few epochs make the objective
noisy, so differences between seeds are large.

Commands::

    python bench/bench_tune.py overhead --recordings 2000 --epochs 3 --trials 2
    python bench/bench_tune.py overhead --default-study --data-dir /tmp/fresh   # the default study, timed
    python bench/bench_tune.py search --recordings 600 --epochs 4 --trials 8 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import optuna
import ray
import torch
from ray import tune

from heimdall.datasets import generate_dataset
from heimdall.errors import NotFoundError
from heimdall.models import build_model
from heimdall.module import LocalizationModule
from heimdall.store import open_store
from tuning.data.pipeline import FeatureCache, ensure_feature_cache, trial_datasets, worker_batches
from tuning.run import main as run_main
from tuning.settings import DataSettings, resolve
from tuning.study.spaces import load_space, to_optuna
from tuning.study.trial import OBJECTIVES, TrialSpec
from tuning.study.tune import StudyConfig, warm_start_trials

DEFAULT_TRAIN_ROWS = round(StudyConfig(name="x").dataset_recordings * 0.8)
DEFAULT_EPOCHS = StudyConfig(name="x").max_epochs


# -- (a) per-trial overhead ----------------------------------------------------------------------


class TrialTiming(tune.Callback):
    """Driver-side timestamps of each trial's start, reports and end."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.results: dict[str, list[float]] = {}
        self.end: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.start[trial.trial_id] = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results.setdefault(trial.trial_id, []).append(time.time())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end[trial.trial_id] = time.time()


def overhead(args: argparse.Namespace) -> None:
    """Run a small real study and split each trial's wall time into overhead and epochs."""
    timing = TrialTiming()
    name = f"bench-overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.default_study:  # exactly `python -m tuning.run --space SPACE`, timed
        defaults = StudyConfig(name="x")
        args.recordings, args.epochs = defaults.dataset_recordings, defaults.max_epochs
        argv = ["--space", args.space, "--data-dir", str(args.data_dir), "--name", name]
    else:
        argv = ["--space", args.space, "--dataset", f"bench-{args.recordings}", "--recordings", str(args.recordings),
                "--trials", str(args.trials), "--max-epochs", str(args.epochs), "--time-budget", "none",
                "--data-dir", str(args.data_dir), "--name", name]
    started = time.monotonic()
    code = run_main(argv, callbacks=[timing])
    print(f"study wall time (dataset, features, trials, export): {time.monotonic() - started:.0f} s")
    if code != 0:
        sys.exit(f"the study failed (exit {code})")
    rows = []
    order = sorted(timing.start, key=timing.start.get)
    for prev, trial_id in zip([None, *order], order):
        reports = timing.results.get(trial_id, [])
        if len(reports) < 2 or trial_id not in timing.end:
            continue  # stopped before a second epoch: no clean epoch time
        epoch = statistics.median(np.diff(reports))
        # From the previous trial's end: Tune creates this trial's actor only then (one trial at a time).
        gap = timing.start[trial_id] - timing.end[prev] if prev in timing.end else float("nan")
        startup = reports[0] - timing.start[trial_id] - epoch
        teardown = timing.end[trial_id] - reports[-1]
        rows.append((trial_id, len(reports), epoch, gap, startup, teardown, timing.end[trial_id] - timing.start[trial_id]))
    print(f"\n(a) per-trial fixed overhead  [python bench/bench_tune.py overhead {' '.join(sys.argv[2:])}]")
    print(f"{'trial':>10} {'epochs':>6} {'epoch s':>8} {'gap s':>6} {'startup s':>9} {'teardown s':>10} {'wall s':>7}")
    for trial_id, n, epoch, gap, startup, teardown, wall in rows:
        print(f"{trial_id:>10} {n:6d} {epoch:8.1f} {gap:6.1f} {startup:9.1f} {teardown:10.1f} {wall:7.1f}")
    if not rows:
        sys.exit("no trial ran two epochs; use --epochs >= 2")
    gaps = [r[3] for r in rows if math.isfinite(r[3])]
    fixed = statistics.median(r[4] + r[5] for r in rows) + (statistics.median(gaps) if gaps else 0.0)
    epoch = statistics.median(r[2] for r in rows)
    train_rows = args.recordings * 0.8
    trial = args.epochs * epoch
    default_trial = DEFAULT_EPOCHS * epoch * DEFAULT_TRAIN_ROWS / train_rows
    print(f"median fixed overhead {fixed:.1f} s per trial (gap before start + startup + teardown); "
          f"median epoch {epoch:.1f} s on ~{train_rows:.0f} training recordings")
    print(f"this trial ({args.epochs} epochs): overhead / wall = {fixed:.1f} / {fixed + trial:.1f} s = "
          f"{fixed / (fixed + trial):.1%}")
    print(f"extrapolated default trial ({DEFAULT_TRAIN_ROWS} training recordings x {DEFAULT_EPOCHS} epochs, "
          f"~{default_trial:.0f} s of epochs): {fixed / (fixed + default_trial):.1%}; one that ASHA stops after "
          f"1 epoch: {fixed / (fixed + default_trial / DEFAULT_EPOCHS):.1%}")


# -- (b) TPE + ASHA against random search ----------------------------------------------------------


def _ensure_data(args: argparse.Namespace) -> tuple[FeatureCache, dict[str, dict[str, torch.Tensor]]]:
    """The bench dataset's cached features, loaded into memory (Ray only builds the cache)."""
    settings = resolve(DataSettings, {"data_dir": args.data_dir}, environ={})  # the defaults inside --data-dir
    catalog, store = settings.open_catalog(), open_store(settings.store_url)
    catalog.initialize()
    name = f"bench-{args.recordings}"
    try:
        catalog.get_dataset(name)
    except NotFoundError:
        generate_dataset(catalog, store, name, n_recordings=args.recordings, seed=0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    try:
        cache = ensure_feature_cache(catalog, store, name)
        splits = {s: next(worker_batches(ds, 1 << 30, shuffle=False, seed=0))
                  for s, ds in trial_datasets(cache, store).items()}
    finally:
        ray.shutdown()
    return cache, splits


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["target"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class _ReportAndStop(pl.Callback):
    """Reports the objective to the Optuna trial each epoch and stops it when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, prune: bool) -> None:
        self.trial, self.metric, self.prune = trial, metric, prune
        self.values: list[float] = []
        self.pruned = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = float(trainer.callback_metrics.get(self.metric, float("nan")))
        value = value if math.isfinite(value) else 1e9
        self.values.append(value)
        self.trial.report(value, len(self.values))
        if self.prune and self.trial.should_prune():
            trainer.should_stop = self.pruned = True


@dataclass
class SearchRun:
    """One search: per trial, epochs trained, seconds and last value."""

    method: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    pruned: int = 0

    def best(self) -> float:
        return min(self.values)

    def cost_to_reach(self, target: float) -> tuple[int, float, float] | None:
        """Cumulative (epochs, wall seconds, CPU seconds) when the best value first reaches ``target``."""
        best, epochs, seconds, cpu = math.inf, 0, 0.0, 0.0
        for e, s, c, v in zip(self.epochs, self.seconds, self.cpu, self.values):
            epochs, seconds, cpu, best = epochs + e, seconds + s, cpu + c, min(best, v)
            if best <= target:
                return epochs, seconds, cpu
        return None


def _train_one(trial: optuna.Trial, space: Any, cache: FeatureCache, data: dict, args: argparse.Namespace,
               prune: bool) -> tuple[int, float, float, float, bool]:
    """Train one trial in this process; returns (epochs, wall seconds, CPU seconds, last objective value, pruned).

    CPU seconds (this process, one torch thread) are what the trial costs on a core of its own; wall
    seconds also count the waits that other work on a shared machine imposes.
    """
    started, cpu = time.monotonic(), time.process_time()  # model building counts: it is part of a trial's cost
    spec = TrialSpec(StudyConfig(name="bench", max_epochs=args.epochs), space, train_storage="unused")
    to_optuna(space)(trial)
    configs = spec.configs(trial.params)
    pl.seed_everything(trial.number, verbose=False)
    module = LocalizationModule(build_model(configs.arch, configs.model), configs.loss, configs.optimizer,
                                cache.target_scaling, cache.feature_config)
    report = _ReportAndStop(trial, OBJECTIVES["nll"].metric, prune)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[report])
    gen = torch.Generator().manual_seed(trial.number)
    train = torch.utils.data.DataLoader(_Rows(data["train"]), batch_size=configs.optimizer.batch_size,
                                        shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(_Rows(data["val"]), batch_size=256)
    trainer.fit(module, train, val)
    return (len(report.values), time.monotonic() - started, time.process_time() - cpu, report.values[-1],
            report.pruned)


#: One storage for every search of the bench, so a warm start reads another search's study.
_STORAGE = optuna.storages.InMemoryStorage()


def _search(method: str, seed: int, space: Any, cache: FeatureCache, data: dict, args: argparse.Namespace,
            target: float | None = None, seconds: float | None = None, warm_from: str | None = None) -> SearchRun:
    """Random search: ``args.trials`` full trials. TPE + ASHA: until ``target`` is reached or ``seconds`` used."""
    if method == "random":
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    else:
        # Another seed: TPE's startup trials would otherwise replay the random search's first draws.
        sampler = optuna.samplers.TPESampler(seed=seed + 10_000, n_startup_trials=args.startup)
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=args.grace, reduction_factor=3)
    study = optuna.create_study(study_name=f"{method}-{seed}", storage=_STORAGE, sampler=sampler, pruner=pruner)
    if warm_from is not None:
        warm_start_trials(study, warm_from, to_optuna(space))
    run = SearchRun(method, seed)
    while len(run.values) < args.trials if method == "random" else (
            sum(run.seconds) < seconds and (not run.values or run.best() > target)):
        trial = study.ask()
        epochs, secs, cpu, value, pruned = _train_one(trial, space, cache, data, args, prune=method != "random")
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # value: its last intermediate value
        else:
            study.tell(trial, value)
        run.epochs.append(epochs), run.seconds.append(secs), run.cpu.append(cpu), run.values.append(value)
        run.pruned += pruned
        print(f"  {method:14s} seed {seed} trial {trial.number:2d}: {epochs} epoch(s){' pruned' if pruned else ''}, "
              f"nll {value:.3f}, {secs:5.1f} s, {sum(run.seconds):6.0f} s in all", flush=True)
    return run


def search(args: argparse.Namespace) -> None:
    """TPE + ASHA, cold and warm-started, against random search in seconds, for each seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # per-trial device banners
    torch.set_num_threads(1)  # as a Train worker with one CPU
    cache, data = _ensure_data(args)
    space = load_space(args.space)
    seeds = list(args.seeds)
    randoms: dict[int, SearchRun] = {}
    lines = []

    def random(seed: int) -> None:
        if seed not in randoms:
            randoms[seed] = _search("random", seed, space, cache, data, args)

    for i, seed in enumerate(seeds):
        source = seeds[(i + 1) % len(seeds)]  # an earlier study of the same space: another seed's random search
        random(seed), random(source)
        rnd = randoms[seed]
        budget = sum(rnd.seconds)
        for method, warm in (("tpe+asha", None), ("tpe+asha warm", f"random-{source}")):
            run = _search(method, seed, space, cache, data, args, target=rnd.best(), seconds=budget, warm_from=warm)
            lines.append((seed, method, warm, rnd, run, run.cost_to_reach(rnd.best())))
    print(f"\n(b) TPE+ASHA vs random search, in seconds  [python bench/bench_tune.py search {' '.join(sys.argv[2:])}]")
    print(f"random: {args.trials} trials x {args.epochs} epochs; TPE+ASHA: until it matches random's best or has used "
          f"random's seconds; {args.recordings} recordings, objective val/nll_km")
    print(f"{'seed':>4} {'method':>14} {'warm from':>9} {'random best':>11} {'random s':>8} {'random cpu s':>12} "
          f"{'best':>7} {'trials':>6} {'pruned':>6} {'s to match':>10} {'of random s':>11} {'of cpu s':>8} "
          f"{'of epochs':>9}")
    for seed, method, warm, rnd, run, cost in lines:
        e, w, c = cost or (None, None, None)
        print(f"{seed:4d} {method:>14} {warm or '-':>9} {rnd.best():11.3f} {sum(rnd.seconds):8.0f} {sum(rnd.cpu):12.0f} "
              f"{run.best():7.3f} {len(run.values):6d} {run.pruned:6d} "
              + (f"{w:10.0f} {w / sum(rnd.seconds):11.2f} {c / sum(rnd.cpu):8.2f} {e / sum(rnd.epochs):9.2f}"
                 if cost else f"{'-':>10} {'not reached':>11} {'-':>8} {'-':>9}"))
    for method in ("tpe+asha", "tpe+asha warm"):
        costs = [(cost, rnd) for _, m, _, rnd, _, cost in lines if m == method]
        wall = [c[1] / sum(r.seconds) if c else math.inf for c, r in costs]
        cpu = [c[2] / sum(r.cpu) if c else math.inf for c, r in costs]
        print(f"{method}: matched random's best in {sum(map(math.isfinite, wall))}/{len(wall)} seeds; median fraction "
              f"of random's wall seconds {statistics.median(wall):.2f}, of its CPU seconds {statistics.median(cpu):.2f} "
              f"(not reached counts as infinite)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/bench_tune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("overhead", help="(a) per-trial fixed overhead of a real study")
    a.add_argument("--recordings", type=int, default=2000)
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--trials", type=int, default=2)
    a.add_argument("--default-study", action="store_true",
                   help="time the default study itself (`python -m tuning.run --space SPACE`, all defaults)")
    b = sub.add_parser("search", help="(b) TPE+ASHA vs random search, in seconds")
    b.add_argument("--recordings", type=int, default=600)
    b.add_argument("--epochs", type=int, default=4)
    b.add_argument("--trials", type=int, default=8, help="random-search trials (x --epochs each)")
    b.add_argument("--startup", type=int, default=3, help="TPE's random startup trials")
    b.add_argument("--grace", type=int, default=StudyConfig(name="x").grace_period,
                   help="epochs before ASHA may stop a trial (the study's --grace-period) [%(default)s]")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for p in (a, b):
        p.add_argument("--space", default="resnet")
        p.add_argument("--data-dir", type=Path, default=Path(".heimdall-bench").resolve())
    return parser


if __name__ == "__main__":
    ns = build_parser().parse_args()
    {"overhead": overhead, "search": search}[ns.bench](ns)
