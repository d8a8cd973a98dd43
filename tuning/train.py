"""Train one localization network outside Ray: the reference and the debugging path.

Examples::

    python -m tuning.data generate --dataset default --recordings 8000 --seed 0
    python -m tuning.train --arch resnet --dataset default
    python -m tuning.train --arch setnet --dataset default --epochs 15 --time-budget 20
    python -m tuning.train --arch resnet --accelerator gpu --precision 16-mixed

It reads the dataset once, computes the features in memory, trains with
Lightning on the GPU when torch sees one (``--accelerator``), else on the CPU, calibrates the ellipse scale on the validation split,
and prints the held-out test report next to the Bayes oracle and the
network-centre baseline on the same recordings. The checkpoint, the metrics
(CSV per epoch) and ``report.json`` go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from heimdall.devices import ACCELERATORS, DEFAULT_PRECISION, PRECISIONS
from heimdall.errors import HeimdallError
from tuning.settings import add_data_args, data_settings

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.train`` argument parser (defaults live in the config dataclasses)."""
    p = argparse.ArgumentParser(prog="python -m tuning.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("resnet", "setnet"), default="resnet", help="network family")
    p.add_argument("--dataset", default="default", help="dataset name (see python -m tuning.data list)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs, also the lr schedule's horizon; warm-ups that would not end before it are "
                        "turned off [OptimizerConfig.max_epochs]")
    p.add_argument("--batch-size", type=int, default=None, help="batch size [OptimizerConfig.batch_size]")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate [OptimizerConfig.lr]")
    p.add_argument("--loss", default=None, help="loss family: gaussian_nll | full_nll | beta_nll [LossConfig.family]")
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and shuffling")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                   help="where to train: auto (the GPU when torch sees CUDA, else the CPU), cpu, or gpu (an error "
                        "when torch cannot see CUDA) [auto]")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help=f"numeric precision (Lightning's): {', '.join(PRECISIONS)}; 16-mixed needs a GPU "
                        f"[{DEFAULT_PRECISION}]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [all cores]")
    p.add_argument("--out", type=Path, default=None, help="output directory [{data-dir}/train/{arch}-{dataset}]")
    p.add_argument("--evaluate", type=Path, default=None, metavar="CKPT",
                   help="skip training: recalibrate and evaluate this checkpoint on the dataset's val/test splits")
    add_data_args(p)
    return p


def _configs(args: argparse.Namespace):
    from heimdall.losses import LossConfig
    from heimdall.models import model_config_from_dict
    from heimdall.module import OptimizerConfig
    from tuning.study.spaces import TrialConfigs, fit_budget

    opt = OptimizerConfig()
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    loss = LossConfig() if args.loss is None else LossConfig(family=args.loss)
    model_config = model_config_from_dict(args.arch, {"head": "full"} if loss.family == "full_nll" else {})
    # The studies' warm-up policy: --epochs is the schedule's horizon, and a default warm-up
    # (no flag sets one) that would not end before it is turned off, e.g. for --epochs 1.
    configs = fit_budget(TrialConfigs(args.arch, model_config, loss, replace(opt, **overrides)),
                         args.epochs if args.epochs is not None else opt.max_epochs)
    return configs.model, configs.loss, configs.optimizer


def run(args: argparse.Namespace) -> dict:
    """Train, calibrate, evaluate; returns the report dict (also written to report.json)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from tqdm import tqdm

    from heimdall.data import HeimdallDataModule, load_feature_splits
    from heimdall.devices import check_precision, choose_placement
    from heimdall.features import feature_config_for
    from heimdall.models import build_model
    from heimdall.module import LocalizationModule

    settings = data_settings(args)
    out = args.out or settings.data_dir / "train" / f"{args.arch}-{args.dataset}"
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config, loss, opt = _configs(args)
    placement = choose_placement(gpu_ids=None, cuda_available=torch.cuda.is_available(), requested=args.accelerator)
    if not args.evaluate:
        check_precision(args.precision, placement.accelerator == "cuda", "--precision")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    # Before the dataset is read: a bad checkpoint fails in a second, not after the features.
    evaluated = LocalizationModule.from_checkpoint(args.evaluate) if args.evaluate else None
    with settings.open_catalog() as catalog:
        info = catalog.get_dataset(args.dataset)
        features = feature_config_for(info.config)  # an imported dataset's station offsets, saved with the model
        with tqdm(total=info.n_recordings, unit="rec", desc="features") as bar:
            splits = load_feature_splits(catalog, settings.open_store(), args.dataset, feature_config=features,
                                         progress=bar.update)
    print("splits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    _require_splits(splits, args.dataset, ("test",) if evaluated else ("train", "test"))
    if evaluated is not None:
        return _report(evaluated, splits, info, out, args, 0.0, 0)
    module = LocalizationModule(build_model(args.arch, model_config), loss, opt, feature_config=features)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/nll_km", mode="min", save_last=True)
    trainer = pl.Trainer(
        max_epochs=opt.max_epochs, accelerator=placement.accelerator, devices=placement.devices,
        precision=args.precision, logger=CSVLogger(out, name="logs"), callbacks=[ckpt],
        max_time={"minutes": args.time_budget} if args.time_budget else None, log_every_n_steps=20,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=HeimdallDataModule(splits, opt.batch_size, args.seed))
    train_s = time.perf_counter() - start
    best = LocalizationModule.from_checkpoint(ckpt.best_model_path or ckpt.last_model_path)
    return _report(best, splits, info, out, args, train_s, trainer.current_epoch)


def _require_splits(splits: dict, dataset: str, names: Sequence[str]) -> None:
    """Refuse an empty split before any work (an empty test split would fail only after training)."""
    from heimdall.datasets import SplitConfig
    from heimdall.errors import DataError

    share = {"train": 1.0 - SplitConfig().val_fraction - SplitConfig().test_fraction, "test": SplitConfig().test_fraction}
    for name in names:
        if len(splits[name]) == 0:
            raise DataError(f"dataset {dataset!r} has no recordings in its {name} split "
                            f"({', '.join(f'{k} {len(v)}' for k, v in splits.items())}); fix: use a dataset with more "
                            f"labelled recordings (about {share[name]:.0%} of them land in {name}), e.g. "
                            f"python -m tuning.data generate --dataset NAME --recordings 1000")


def _report(module, splits, info, out: Path, args: argparse.Namespace, train_s: float, epochs: int) -> dict:
    """Calibrate on val, score on test, save the calibrated checkpoint and report.json."""
    from heimdall.evaluation import evaluate_split

    report = evaluate_split(module, splits, generator_config=info.config if info.kind == "synthetic" else None)
    out.mkdir(parents=True, exist_ok=True)
    calibrated = out / "calibrated.ckpt"
    module.write_checkpoint(calibrated)
    report.update(arch=module.hparams["arch"], dataset=info.name, recordings=info.n_recordings,
                  train_seconds=round(train_s, 1), epochs_run=epochs, checkpoint=str(calibrated), seed=args.seed,
                  precision=args.precision)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(report["table"])
    print(f"trained {epochs} epochs in {train_s / 60:.1f} min; report: {out / 'report.json'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; Heimdall errors print one line and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except HeimdallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
