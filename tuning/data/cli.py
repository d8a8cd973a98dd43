"""Manage Heimdall datasets: generate synthetic recordings, import real ones, describe.

Examples::

    python -m tuning.data generate --dataset demo --recordings 2000 --seed 1
    python -m tuning.data describe demo
    python -m tuning.data list
    python -m tuning.data verify demo --deep
    python -m tuning.data import --dataset field-2024 captures/
    python -m tuning.data import --dataset heimdall --from-heimdall postgresql://heimdall@db:5432/heimdall \\
        --iq-sample-rate-hz 12000          # reruns import only new sessions (docs/heimdall-data.md)
    python -m tuning.data delete demo
    python -m tuning.data migrate    # upgrade a catalogue made by an older version (generate/import do too)

    # against the real services (see tuning/settings.py for every variable)
    python -m tuning.data generate --dataset demo --recordings 2000 --seed 1 \\
        --catalog postgresql://heimdall@db:5432/heimdall --store s3://heimdall-datasets

``list``, ``describe`` and ``verify`` only read: they create no file, directory,
schema, table or bucket, and a catalogue that does not exist yet is an error
saying how to create one. ``generate`` and ``import`` create what they need, but
never add tables to a database that is not a Heimdall Tune catalogue.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from heimdall.errors import HeimdallError
from tuning.settings import DataSettings, add_data_args, data_settings

__all__ = ["main", "build_parser"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.data`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m tuning.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a synthetic dataset (resumes an interrupted one)")
    g.add_argument("--dataset", required=True, help="dataset name")
    g.add_argument("--recordings", type=int, default=8000, help="number of recordings (default 8000, ~1.8 GB)")
    g.add_argument("--seed", type=int, default=0, help="base seed; shard i uses (seed, i)")
    g.add_argument("--shard-size", type=int, default=250, help="recordings per shard (default 250, ~57 MB)")
    g.add_argument("--gain-drift-db", type=float, default=None, metavar="SIGMA",
                   help="unknown per-recording gain drift, dB std [GeneratorConfig.gain_drift_sigma_db]")
    d = sub.add_parser("describe", help="counts, sizes, SNR statistics and the oracle/centre baselines")
    d.add_argument("name")
    d.add_argument("--max-oracle", type=_positive, default=2000, help="cap on held-out recordings given to the oracle")
    sub.add_parser("list", help="list datasets")
    v = sub.add_parser("verify", help="check every shard exists (and with --deep, decodes cleanly)")
    v.add_argument("name")
    v.add_argument("--deep", action="store_true", help="download and verify every shard's checksum and samples")
    x = sub.add_parser("delete", help="delete a dataset (complete, pending, or objects of a run that never "
                                      "registered any): its catalogue rows, shards, every object under "
                                      "datasets/NAME/ and its feature caches")
    x.add_argument("name")
    m = sub.add_parser("migrate", help="upgrade the catalogue to this version's schema (PostgreSQL: moves a "
                                       "catalogue of schema 'heimdall' to 'heimdall_tune'); says what it did")
    i = sub.add_parser("import", help="import real recordings: from a Heimdall installation (--from-heimdall) "
                                      "or a captures folder (sessions/{id}/websdr_{station}.npy + metadata.json)")
    i.add_argument("--dataset", required=True)
    where = i.add_mutually_exclusive_group(required=True)
    where.add_argument("source", type=Path, nargs="?", help="directory holding sessions/")
    where.add_argument("--from-heimdall", metavar="POSTGRES_URL",
                       help="Heimdall's database (read-only; IQ from --raw-iq-bucket on the S3 endpoint of "
                            "HEIMDALL_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); reruns add new sessions only")
    i.add_argument("--raw-iq-bucket", default=None, metavar="BUCKET",
                   help="Heimdall's raw-IQ bucket, read-only (default heimdall-raw-iq)")
    i.add_argument("--iq-sample-rate-hz", type=float, default=None, metavar="HZ",
                   help="the true IQ sample rate, required when measurements record another rate than the network's "
                        "(Heimdall records 12500 for 12 kHz captures)")
    i.add_argument("--shard-size", type=int, default=250)
    for p in (g, d, v, x, i, m, sub.choices["list"]):
        add_data_args(p)
    return parser


def _generate(args: argparse.Namespace, settings: DataSettings) -> None:
    from heimdall.datasets import generate_dataset
    from heimdall.scene import GeneratorConfig

    drift = {} if args.gain_drift_db is None else {"gain_drift_sigma_db": args.gain_drift_db}
    config = GeneratorConfig(**drift)  # a bad value fails before any service is touched
    store, catalog = settings.open_store(), settings.open_catalog()
    print(f"catalogue: {catalog.describe()}\nstore:     {store.describe()}")
    with catalog:
        catalog.initialize()  # a catalogue that is not ours is refused before the progress bar starts
        with tqdm(total=args.recordings, unit="rec", desc=f"generate {args.dataset}") as bar:
            info = generate_dataset(catalog, store, args.dataset, n_recordings=args.recordings, seed=args.seed,
                                    config=config, shard_size=args.shard_size, progress=bar.update)
    print(f"dataset {info.name!r}: {info.n_recordings} recordings in {info.n_shards} shards — done. "
          f"Next: python -m tuning.data describe {info.name}")


def _describe(args: argparse.Namespace, settings: DataSettings) -> None:
    from tuning.data.describe import describe_dataset

    with settings.open_catalog(read_only=True) as catalog:
        print(describe_dataset(catalog, args.name, max_oracle=args.max_oracle))


def _list(args: argparse.Namespace, settings: DataSettings) -> None:
    with settings.open_catalog(read_only=True) as catalog:
        rows = catalog.list_datasets()
    if not rows:
        print(f"no datasets in {settings.catalog_url}; create one with `python -m tuning.data generate --dataset demo`")
    for r in rows:
        print(f"{r.name:24s} {r.status:9s} {r.kind:10s} {r.n_recordings:7d} rec {r.n_shards:4d} shards  {r.store}")


def _verify(args: argparse.Namespace, settings: DataSettings) -> None:
    from heimdall.datasets import verify_dataset

    with settings.open_catalog(read_only=True) as catalog:
        shards = verify_dataset(catalog, settings.open_store(), args.name, deep=args.deep)
    print(f"dataset {args.name!r}: {len(shards)} shards OK ({'checksums and samples' if args.deep else 'presence and sizes'})")


def _delete(args: argparse.Namespace, settings: DataSettings) -> None:
    from heimdall.catalog import CatalogMissingError
    from heimdall.errors import NotFoundError

    store = settings.open_store()
    shards, missing = [], None
    try:
        with settings.open_catalog(read_only=True) as catalog:  # a missing catalogue is not created to be emptied
            catalog.check()
        with settings.open_catalog() as catalog:
            shards = catalog.shards(args.name)
            catalog.delete_dataset(args.name)  # rows first: a crash below leaves objects only, which a rerun deletes
    except (CatalogMissingError, NotFoundError) as exc:
        missing = exc
    # Registered shards, then whatever a run wrote before registering it, and the study's feature caches.
    keys = [s.key for s in shards]
    keys += [k for prefix in (f"datasets/{args.name}/", f"features/{args.name}/") for k in store.list(prefix)]
    keys = sorted(set(keys))
    if missing is not None and not keys:
        raise NotFoundError(
            f"nothing to delete: dataset {args.name!r} has no catalogue rows ({str(missing).split('; fix:')[0]}) "
            f"and no objects under datasets/{args.name}/ in {store.describe()}; fix: check the name "
            f"(`python -m tuning.data list`) and HEIMDALL_CATALOG / HEIMDALL_STORE") from None
    for key in keys:
        store.delete(key)
    rows = "no catalogue rows (objects only)" if missing is not None else f"{len(shards)} catalogued shard(s)"
    print(f"deleted dataset {args.name!r}: {rows}, {len(keys)} object(s) from {store.describe()}")


def _migrate(args: argparse.Namespace, settings: DataSettings) -> None:
    from heimdall.catalog.sql import SCHEMA_VERSION

    with settings.open_catalog() as catalog:
        done = catalog.migrate()
        print(f"catalogue: {catalog.describe()}")
    for line in done:
        print(f"  {line}")
    print(f"schema version {SCHEMA_VERSION}: " + ("migrated." if done else "already current, nothing to do."))


def _import(args: argparse.Namespace, settings: DataSettings) -> None:
    if args.from_heimdall is not None:
        _import_heimdall(args, settings)
        return
    from heimdall.realdata import check_sessions, import_sessions

    check_sessions(args.source)  # careless captures fail before a catalogue or store is created
    store, catalog = settings.open_store(), settings.open_catalog()
    with catalog:
        info = import_sessions(catalog, store, args.dataset, args.source, shard_size=args.shard_size)
    print(f"imported {info.n_recordings} recordings into dataset {info.name!r} ({info.n_shards} shards)")


def _import_heimdall(args: argparse.Namespace, settings: DataSettings) -> None:
    from heimdall.store import S3Settings
    from heimdall.upstream import HeimdallImportConfig, PostgresSource, RawIqBucket, import_from_heimdall

    given = {"raw_iq_bucket": args.raw_iq_bucket, "iq_sample_rate_hz": args.iq_sample_rate_hz,
             "shard_size": args.shard_size}
    config = HeimdallImportConfig(**{k: v for k, v in given.items() if v is not None})
    bucket = RawIqBucket(S3Settings.from_env(), config.raw_iq_bucket)
    store, catalog = settings.open_store(), settings.open_catalog()
    print(f"catalogue: {catalog.describe()}\nstore:     {store.describe()}")
    with PostgresSource(args.from_heimdall) as source, catalog:
        print(f"reading:   {source.describe()} and {bucket.describe()} (read-only)")
        with tqdm(total=0, unit="rec", desc=f"import {args.dataset}") as bar:
            report = import_from_heimdall(catalog, store, args.dataset, source, bucket, config=config,
                                          progress=bar.update, on_plan=lambda n: bar.reset(total=n))
    print(report.text())


COMMANDS = {"generate": _generate, "describe": _describe, "list": _list, "verify": _verify,
            "delete": _delete, "import": _import, "migrate": _migrate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; Heimdall errors print one clear message and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args, data_settings(args))
    except HeimdallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
