"""``python -m tuning.register``: export, gate, publish and register a checkpoint, or finish a registration.

The chain (in :mod:`tuning.release.stage`): load the checkpoint → calibrate and
evaluate → export ONNX → parity gate (onnxruntime versus PyTorch on the held-out
recordings) → model card, all on disk → publish to the models store → MLflow
version, the ``champion`` alias moved only when the new version is better.
When S3 or MLflow was down the export directory keeps everything, and one
command finishes the job (idempotent: nothing is released or registered twice)::

    python -m tuning.register --from .heimdall/studies/NAME/export

Commands to copy::

    # export + register a checkpoint of `python -m tuning.train`
    python -m tuning.register --checkpoint .heimdall/train/resnet-default/calibrated.ckpt --dataset default
    # against the real services
    python -m tuning.register --from DIR --mlflow-uri http://127.0.0.1:5000 --models-store s3://heimdall-models
    python -m tuning.register --from DIR --dry-run     # check the export and the services, change nothing
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from heimdall.errors import HeimdallError
from tuning.release.registry import StudyRecord
from tuning.release.stage import (
    ExportRequest,
    GatedExport,
    RegistrationResult,
    RegistrySettings,
    prepare_export,
    register_export,
)
from tuning.settings import add_data_args, add_registry_args, data_settings, registry_settings

__all__ = ["add_registry_args", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.register`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m tuning.register", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_dir", type=Path, help="finish (or repeat) the registration of an export directory")
    src.add_argument("--checkpoint", type=Path, help="export and register this checkpoint")
    p.add_argument("--dataset", help="with --checkpoint: the dataset whose val/test splits calibrate and gate it")
    p.add_argument("--study", default=None, help="with --checkpoint: the MLflow experiment [train-DATASET]")
    p.add_argument("--space", default=None, help="with --checkpoint: the search space (name or YAML) to record")
    p.add_argument("--out", type=Path, default=None, help="with --checkpoint: export directory [{data-dir}/exports/STUDY]")
    p.add_argument("--force-champion", action="store_true", help="move the champion alias even if not better")
    p.add_argument("--dry-run", action="store_true", help="check the export directory and the services, change nothing")
    add_registry_args(p)
    add_data_args(p)
    return p


def _export_checkpoint(args: argparse.Namespace, out: Path, settings: RegistrySettings) -> None:
    from heimdall.data import load_feature_splits
    from tuning.release.onnx import data_lineage, load_checkpoint
    from tuning.study.spaces import load_space

    data = data_settings(args)
    space = load_space(args.space) if args.space else None
    folder = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    report = folder / "report.json"  # written next to calibrated.ckpt by tuning.train
    seeds = {"train": json.loads(report.read_text()).get("seed")} if report.is_file() else {}
    study = StudyRecord(args.study or f"train-{args.dataset}", seeds=seeds)
    module_fc = load_checkpoint(args.checkpoint).feature_config  # before the data: a bad file fails at once
    with data.open_catalog() as catalog:
        info = catalog.get_dataset(args.dataset)
        lineage = data_lineage(catalog, args.dataset)
        splits = load_feature_splits(catalog, data.open_store(), args.dataset, feature_config=module_fc)
    prepare_export(ExportRequest(args.checkpoint, splits, out, study, settings, space=space, lineage=lineage,
                                 feature_config=module_fc,
                                 generator_config=info.config if info.kind == "synthetic" else None))


def _dry_run(export_dir: Path, settings: RegistrySettings) -> None:
    export = GatedExport.load(export_dir)
    registry = settings.check()
    champion = registry.champion()
    print(f"export:    {export.root} (parity PASSED on {export.parity.n} recordings, "
          f"content {export.request['content_sha256'][:12]}…)")
    print(f"store:     {settings.models_store} reachable")
    print(f"mlflow:    {registry.describe()} reachable; champion: {champion.version if champion else 'none'}")
    print("dry run: nothing published or registered")


def _print_result(result: RegistrationResult) -> None:
    pub = result.publication
    print(f"release:   v{pub.version} {'(already released) ' if pub.reused else ''}{pub.model_key} in {pub.store}")
    print(f"mlflow:    heimdall-localization version {result.mlflow_version} (run {result.release_run_id})")
    c = result.comparison
    print(f"champion:  {'yes' if result.champion else 'no'}: {c['reason']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 done, 1 a Heimdall error (one ``error:`` line), 2 a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and not args.dataset:
        parser.error("--checkpoint needs --dataset (its val/test splits calibrate and gate the export)")
    data = data_settings(args)
    settings = registry_settings(args, data.data_dir)
    out = args.from_dir or args.out or data.data_dir / "exports" / (args.study or f"train-{args.dataset}")
    if args.dry_run and args.checkpoint:
        parser.error("--dry-run checks an export directory: use it with --from")
    try:
        if args.dry_run:
            _dry_run(out, settings)
            return 0
        if args.checkpoint:
            _export_checkpoint(args, out, settings)
            print(f"export:    {out} (parity gate passed)")
        _print_result(register_export(out, settings, force_champion=args.force_champion))
    except HeimdallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
