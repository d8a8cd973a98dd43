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
matches that best or has used ``--budget-fraction`` of its CPU seconds.
``--report-trials`` also compares with the best of random search's first N
trials (its draws do not depend on N, so one run answers several sizes). To be affordable on 2 cores it
trains in this process with Optuna's own ASHA (``SuccessiveHalvingPruner``,
same grace period (``--grace``) and reduction factor as the study's ``ASHAScheduler``)
instead of one Ray Train run per trial; stopped trials are told PRUNED, as
``tuning.study.tune.StudySearch`` does. ``--variants`` names the TPE + ASHA
searches (:class:`Variant`): the study's sampler (``tuning.study.tune.make_sampler``)
or univariate / multivariate TPE, ASHA's first rung, TPE's start-up trials,
cold or warm-started (``--warm-start``) from the random search of another
seed, as a study of the same space run earlier. The run ends with the CPU
seconds per epoch by configuration (what a trial's size costs). Searches of one
seed run one after the other, random and TPE interleaved, so machine load
hits both alike. Caveats: a small dataset and few epochs make the objective
noisy, so differences between seeds are large.

Commands::

    python bench/bench_tune.py overhead --recordings 2000 --epochs 3 --trials 2
    python bench/bench_tune.py overhead --default-study --data-dir /tmp/fresh   # the default study, timed
    python bench/bench_tune.py search --recordings 600 --epochs 4 --trials 8 --seeds 0 1 2
    python bench/bench_tune.py search --trials 16 --report-trials 8 16 --seeds 0 1 2 3 4 \\
        --variants study/g1 mv/g2 --budget-fraction 0.4
"""
from __future__ import annotations

import argparse
import logging
import math
import os
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
from tuning.study.tune import StudyConfig, make_sampler, warm_start_trials

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

    def __init__(self, trial: optuna.Trial, metric: str, prune: bool, skip: int = 0) -> None:
        self.trial, self.metric, self.prune, self.skip = trial, metric, prune, skip
        self.values: list[float] = []
        self.pruned = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = float(trainer.callback_metrics.get(self.metric, float("nan")))
        value = value if math.isfinite(value) else 1e9
        self.values.append(value)
        step = len(self.values) - self.skip  # the first `skip` epochs are not shown to the pruner
        if step < 1:
            return
        self.trial.report(value, step)
        if self.prune and self.trial.should_prune():
            trainer.should_stop = self.pruned = True


@dataclass
class SearchRun:
    """One search: per trial, epochs trained, seconds, last value and the parameters that set its epoch cost."""

    method: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    pruned: int = 0

    def best(self, trials: int | None = None) -> float:
        return min(self.values[:trials])

    def cost(self, trials: int | None = None) -> tuple[int, float, float]:
        """(epochs, wall seconds, CPU seconds) of the first ``trials`` trials (all by default)."""
        return sum(self.epochs[:trials]), sum(self.seconds[:trials]), sum(self.cpu[:trials])

    def cost_to_reach(self, target: float) -> tuple[int, float, float] | None:
        """Cumulative (epochs, wall seconds, CPU seconds) when the best value first reaches ``target``."""
        best, epochs, seconds, cpu = math.inf, 0, 0.0, 0.0
        for e, s, c, v in zip(self.epochs, self.seconds, self.cpu, self.values):
            epochs, seconds, cpu, best = epochs + e, seconds + s, cpu + c, min(best, v)
            if best <= target:
                return epochs, seconds, cpu
        return None


@dataclass(frozen=True)
class Variant:
    """A TPE + ASHA search to compare with random search: its sampler options, ASHA's first rung, warm start.

    Written ``SAMPLER[+warm][/gGRACE][/sSTARTUP][/nll]``: SAMPLER is ``study`` (the study's own sampler,
    :func:`tuning.study.tune.make_sampler`), ``uni`` (univariate TPE) or ``mv`` (multivariate TPE
    with grouped conditional parameters); ``+warm`` warm-starts from another seed's random search;
    ``g`` and ``s`` default to ``--grace`` and ``--startup``; ``nll``: ASHA's rungs count only the
    epochs after a trial's MSE warm-up (``loss.mse_warmup_epochs``), so no trial is judged while it
    still fits the mean by MSE (its warm-up epochs are neither reported nor prunable).
    """

    text: str
    sampler: str
    warm: bool
    grace: int
    startup: int
    nll_rungs: bool = False

    SAMPLERS = {"study": {}, "uni": {"multivariate": False}, "mv": {"multivariate": True, "group": True}}

    @classmethod
    def parse(cls, text: str, grace: int, startup: int) -> Variant:
        head, *opts = text.split("/")
        sampler, warm = head.removesuffix("+warm"), head.endswith("+warm")
        if sampler not in cls.SAMPLERS:
            raise argparse.ArgumentTypeError(f"variant {text!r}: sampler must be one of {sorted(cls.SAMPLERS)}")
        nll_rungs = "nll" in opts
        for opt in (o for o in opts if o != "nll"):
            if opt[:1] not in ("g", "s") or not opt[1:].isdigit() or int(opt[1:]) < 1:
                raise argparse.ArgumentTypeError(
                    f"variant {text!r}: options are gN (grace), sN (startup), N >= 1, and nll")
            grace, startup = (int(opt[1:]), startup) if opt[0] == "g" else (grace, int(opt[1:]))
        return cls(text, sampler, warm, grace, startup, nll_rungs)


#: Parameters that set a trial's epoch cost (model size, batch size), reported by configuration.
COST_PARAMS = ("model.stage_depths", "model.width", "model.kernel_size", "model.stem", "model.pooling",
               "model.norm", "optimizer.batch_size")


def _train_one(trial: optuna.Trial, space: Any, cache: FeatureCache, data: dict, args: argparse.Namespace,
               prune: bool, seed: int | None = None,
               nll_rungs: bool = False) -> tuple[int, float, float, float, bool]:
    """Train one trial in this process; returns (epochs, wall seconds, CPU seconds, last objective value, pruned).

    ``nll_rungs``: the pruner sees only the epochs after the trial's MSE warm-up (see :class:`Variant`).

    Weights and batch order are seeded with ``seed``, by default the trial's number.

    CPU seconds (this process, one torch thread) are what the trial costs on a core of its own; wall
    seconds also count the waits that other work on a shared machine imposes.
    """
    started, cpu = time.monotonic(), time.process_time()  # model building counts: it is part of a trial's cost
    spec = TrialSpec(StudyConfig(name="bench", max_epochs=args.epochs), space, train_storage="unused")
    to_optuna(space)(trial)
    configs = spec.configs(trial.params)
    seed = trial.number if seed is None else seed
    pl.seed_everything(seed, verbose=False)
    module = LocalizationModule(build_model(configs.arch, configs.model), configs.loss, configs.optimizer,
                                cache.target_scaling, cache.feature_config)
    report = _ReportAndStop(trial, OBJECTIVES["nll"].metric, prune,
                            skip=configs.loss.mse_warmup_epochs if nll_rungs else 0)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[report])
    gen = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(_Rows(data["train"]), batch_size=configs.optimizer.batch_size,
                                        shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(_Rows(data["val"]), batch_size=256)
    trainer.fit(module, train, val)
    return (len(report.values), time.monotonic() - started, time.process_time() - cpu, report.values[-1],
            report.pruned)


#: One storage for every search of the bench, so a warm start reads another search's study.
_STORAGE = optuna.storages.InMemoryStorage()


def _search(seed: int, space: Any, cache: FeatureCache, data: dict, args: argparse.Namespace,
            variant: Variant | None = None, target: float | None = None, cpu_budget: float | None = None,
            warm_from: str | None = None) -> SearchRun:
    """Random search (``variant`` None): ``args.trials`` full trials. TPE + ASHA: until ``target`` is
    reached or ``cpu_budget`` CPU seconds are used."""
    if variant is None:
        method, sampler, pruner = "random", optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    else:
        # Another seed: TPE's startup trials would otherwise replay the random search's first draws.
        method = variant.text
        sampler = make_sampler(seed + 10_000, variant.startup, **Variant.SAMPLERS[variant.sampler])
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=variant.grace, reduction_factor=3)
    study = optuna.create_study(study_name=f"{method}-{seed}", storage=_STORAGE, sampler=sampler, pruner=pruner)
    if warm_from is not None:
        warm_start_trials(study, warm_from, to_optuna(space))
    run = SearchRun(method, seed)
    while len(run.values) < args.trials if variant is None else (
            sum(run.cpu) < cpu_budget and (not run.values or run.best() > target)):
        trial = study.ask()
        epochs, secs, cpu, value, pruned = _train_one(trial, space, cache, data, args, prune=variant is not None,
                                                      nll_rungs=variant is not None and variant.nll_rungs)
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # value: its last intermediate value
        else:
            study.tell(trial, value)
        run.epochs.append(epochs), run.seconds.append(secs), run.cpu.append(cpu), run.values.append(value)
        run.params.append({k: trial.params[k] for k in COST_PARAMS if k in trial.params})
        run.pruned += pruned
        print(f"  {method:14s} seed {seed} trial {trial.number:2d}: {epochs} epoch(s){' pruned' if pruned else ''}, "
              f"nll {value:.3f}, {secs:5.1f} s, cpu {cpu:5.1f} s ({cpu / epochs:4.2f}/epoch), "
              f"{sum(run.cpu):6.0f} cpu s in all", flush=True)
    return run


def _cost_by_configuration(runs: list[SearchRun]) -> None:
    """Median CPU seconds per epoch by the value of each parameter that sets a trial's size."""
    per_epoch = [(p, c / e) for run in runs for p, c, e in zip(run.params, run.cpu, run.epochs)]
    costs = sorted(c for _, c in per_epoch)
    print(f"\nCPU s per epoch over {len(costs)} trials: median {statistics.median(costs):.2f}, "
          f"10th-90th percentile {costs[len(costs) // 10]:.2f}-{costs[(9 * len(costs)) // 10]:.2f}, "
          f"max / min {costs[-1] / costs[0]:.1f}")
    for name in COST_PARAMS:
        groups: dict[str, list[float]] = {}
        for params, c in per_epoch:
            if name in params:
                groups.setdefault(str(params[name]), []).append(c)
        print(f"  {name:20s} " + ", ".join(f"{v}: {statistics.median(cs):.2f} (n={len(cs)})"
                                           for v, cs in sorted(groups.items())))
    by_method: dict[str, list[float]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(sum(run.cpu) / sum(run.epochs))
    # Above random's: the search spends its epochs on the slower configurations.
    print("  CPU s per epoch of a search, median over seeds: " + ", ".join(
        f"{m} {statistics.median(v):.2f}" for m, v in by_method.items()))


def _reseed(randoms: dict[int, SearchRun], space: Any, cache: FeatureCache, data: dict,
            args: argparse.Namespace) -> None:
    """Train each random search's best configuration again with other seeds: how much of its lead is luck."""
    print(f"\nrandom search's best configuration trained again with {args.reseed} other seed(s)")
    print(f"{'seed':>4} {'best':>7} {'again':>30} {'median':>7} {'median ranks':>12}")
    for seed, rnd in randoms.items():
        best = min(range(len(rnd.values)), key=rnd.values.__getitem__)
        params = optuna.load_study(study_name=f"random-{seed}", storage=_STORAGE).trials[best].params
        study = optuna.create_study(study_name=f"reseed-{seed}", storage=_STORAGE)
        again = []
        for k in range(args.reseed):
            study.enqueue_trial(params)
            trial = study.ask()
            again.append(_train_one(trial, space, cache, data, args, prune=False, seed=100_000 + k)[3])
            study.tell(trial, again[-1])
        typical = statistics.median(again)
        print(f"{seed:4d} {rnd.values[best]:7.3f} {' '.join(f'{v:.3f}' for v in again):>30} {typical:7.3f} "
              f"{1 + sum(v < typical for v in rnd.values):>5d} of {len(rnd.values):<3d}", flush=True)


def search(args: argparse.Namespace) -> None:
    """TPE + ASHA variants against random search in CPU seconds, for each seed and random-search size."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # per-trial device banners
    torch.set_num_threads(1)  # as a Train worker with one CPU
    variants = [Variant.parse(v, args.grace, args.startup) for v in args.variants]
    sizes = sorted(set(args.report_trials or [args.trials]))
    if sizes[-1] > args.trials:
        sys.exit(f"error: --report-trials {sizes[-1]} exceeds --trials {args.trials}")
    cache, data = _ensure_data(args)
    space = load_space(args.space)
    seeds = list(args.seeds)
    randoms: dict[int, SearchRun] = {}
    runs: list[tuple[int, Variant, SearchRun]] = []
    load = [os.getloadavg()[0]]

    def random(seed: int) -> None:
        if seed not in randoms:
            randoms[seed] = _search(seed, space, cache, data, args)

    for i, seed in enumerate(seeds):
        source = seeds[(i + 1) % len(seeds)]  # an earlier study of the same space: another seed's random search
        random(seed)
        if any(v.warm for v in variants):
            random(source)
        rnd = randoms[seed]
        # Every size's target is the best of random search's first N trials (its draws do not depend on
        # N), so one TPE search, run to the largest size's target, answers them all.
        for variant in variants:
            run = _search(seed, space, cache, data, args, variant, target=rnd.best(), cpu_budget=args.budget_fraction
                          * rnd.cost()[2], warm_from=f"random-{source}" if variant.warm else None)
            runs.append((seed, variant, run))
        load.append(os.getloadavg()[0])
    print(f"\n(b) TPE+ASHA vs random search, in seconds  [python bench/bench_tune.py search {' '.join(sys.argv[2:])}]")
    print(f"{args.recordings} recordings, objective val/nll_km, {args.epochs} epochs per full trial; TPE+ASHA runs "
          f"until it matches random's best of {args.trials} or has used {args.budget_fraction:g} of its CPU seconds; "
          f"1-minute load average {min(load):.1f}-{max(load):.1f} (median {statistics.median(load):.1f})")
    for size in sizes:
        print(f"\nrandom search of {size} trials x {args.epochs} epochs")
        print(f"{'seed':>4} {'method':>16} {'random best':>11} {'random s':>8} {'random cpu s':>12} {'best':>7} "
              f"{'trials':>6} {'pruned':>6} {'cpu s to match':>14} {'of random s':>11} {'of cpu s':>8} "
              f"{'of epochs':>9}")
        fractions: dict[str, list[float]] = {}
        for seed, variant, run in runs:
            rnd = randoms[seed]
            target, (r_epochs, r_wall, r_cpu) = rnd.best(size), rnd.cost(size)
            cost = run.cost_to_reach(target)
            limit = min(1.0, args.budget_fraction * rnd.cost()[2] / r_cpu)  # of this size's CPU seconds
            reached = cost is not None and cost[2] / r_cpu <= limit
            fractions.setdefault(variant.text, []).append(cost[2] / r_cpu if reached else math.inf)
            shown = cost if reached else None
            # The search's own trials and best up to the point where it matched (or all of it).
            n = len(run.values) if not reached else next(i + 1 for i, v in enumerate(run.values) if v <= target)
            print(f"{seed:4d} {variant.text:>16} {target:11.3f} {r_wall:8.0f} {r_cpu:12.0f} {run.best(n):7.3f} "
                  f"{n:6d} {sum(1 for i in range(n) if run.epochs[i] < args.epochs):6d} "
                  + (f"{shown[2]:14.0f} {shown[1] / r_wall:11.2f} {shown[2] / r_cpu:8.2f} {shown[0] / r_epochs:9.2f}"
                     if shown else f"{'-':>14} {'not reached' if limit >= 1 else f'> {limit:.2f}':>11} "
                                   f"{'-':>8} {'-':>9}"))
        for name, fr in fractions.items():
            print(f"{name}: matched random's best of {size} in {sum(map(math.isfinite, fr))}/{len(fr)} seeds; "
                  f"median fraction of its CPU seconds {statistics.median(fr):.2f} (not reached counts as infinite)")
    _cost_by_configuration([*randoms.values(), *(r for _, _, r in runs)])
    if args.reseed:
        _reseed({s: randoms[s] for s in seeds}, space, cache, data, args)


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
    b.add_argument("--startup", type=int, default=StudyConfig(name="x").tpe_startup_trials,
                   help="TPE's random startup trials (the study's) [%(default)s]")
    b.add_argument("--grace", type=int, default=StudyConfig(name="x").first_rung,
                   help="epochs before ASHA may stop a trial; NLL epochs in a /nll variant (the study's "
                        "--grace-period) [%(default)s]")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--variants", nargs="+", default=["study/nll", "study+warm/nll"],  # the study's rung rule
                   help="TPE+ASHA searches, SAMPLER[+warm][/gGRACE][/sSTARTUP][/nll] (see Variant) [%(default)s]")
    b.add_argument("--report-trials", type=int, nargs="+",
                   help="also compare with the best of random search's first N trials (default: --trials)")
    b.add_argument("--reseed", type=int, default=0, metavar="K",
                   help="finally train each random search's best configuration K more times with other seeds")
    b.add_argument("--budget-fraction", type=float, default=1.0,
                   help="stop a TPE+ASHA search after this fraction of random search's CPU seconds [%(default)s]")
    for p in (a, b):
        p.add_argument("--space", default="resnet")
        p.add_argument("--data-dir", type=Path, default=Path(".heimdall-bench").resolve())
    return parser


if __name__ == "__main__":
    ns = build_parser().parse_args()
    {"overhead": overhead, "search": search}[ns.bench](ns)
