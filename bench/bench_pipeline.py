"""Benchmark the Ray Data feature pipeline (issue "Distributed tuning", item 2c).

Measures, in one run and on the same shards:

1. feature throughput (recordings/s) of an in-process numpy loop
   (``read_shard`` + ``spectrogram_numpy``, the reference), an in-process torch
   loop (``read_shard`` + ``SpectrogramFeatures``), and the Ray Data cache build
   (``ensure_feature_cache``: actor start-up, checksum, features, Parquet
   writes, manifest) with 1 and N actors, with and without the Bayes oracle;
   ratios are against the numpy loop. The build of a one-shard, 8-recording
   dataset is taken as the fixed start-up cost, giving a steady-state rate too;
2. whether a trainer waits for data: epochs of :class:`tuning.data.pipeline.RayBatches`
   over ``streaming_split(1)`` (what ``ray.train.get_dataset_shard`` returns)
   while each batch goes through a real ResNet training step on the CPU (the
   first 10 batches), then through a 20 ms sleep standing for a GPU step (two
   epochs), reporting the fraction of wall time blocked on the iterator;
3. with ``--loader`` (only this): can the loader outrun a step? :class:`RayBatches`
   drained with no step at each ``prefetch_batches`` in :data:`PREFETCHES` (batches/s
   after the first batch, two epochs each on a fresh split), beside the time of one
   training step of the default model (``ResNetConfig()``, batch ``--batch-size``) on
   this CPU, and the share of a simulated ``--step-ms`` step spent waiting for data.
   Pinned memory needs a CUDA build of torch: not measurable on a CPU-only machine.

Usage::

    python bench/bench_pipeline.py                       # 1000 recordings, local store in a temp dir
    python bench/bench_pipeline.py --recordings 4000 --shard-size 250 --keep .bench-data
    python bench/bench_pipeline.py --step-ms 5            # a 5 ms simulated step instead of 20 ms
    python bench/bench_pipeline.py --loader --step-ms 5   # loader batches/s by prefetch vs a training step
    python bench/bench_pipeline.py --store s3://heimdall-bench --catalog postgresql://...   # real services

The datasets (``bench-N-SHARD`` and ``bench-overhead``) are generated on first use,
in the catalogue and store that ``--catalog``/``--store`` (or HEIMDALL_CATALOG /
HEIMDALL_STORE) name, else under ``--keep DIR`` or a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from heimdall.catalog import Catalog
from heimdall.datasets import generate_dataset, read_shard
from heimdall.errors import NotFoundError
from heimdall.features import FeatureConfig, SpectrogramFeatures, spectrogram_numpy
from heimdall.models import ResNetConfig, build_model
from heimdall.store import BlobStore
from tuning.data.pipeline import PREFETCH_BATCHES, RayBatches, ensure_feature_cache, trial_datasets
from tuning.settings import add_data_args, data_settings

#: Recordings of the one-shard dataset whose build time is taken as the start-up cost.
OVERHEAD_RECORDINGS = 8
#: A training step of a small CNN on a GPU: the case where data loading could become the bottleneck.
GPU_STEP_MS = 20.0
#: Batches timed with the real (slow, CPU) ResNet step.
RESNET_BATCHES = 10
#: ``prefetch_batches`` values ``--loader`` compares (RayBatches' default: PREFETCH_BATCHES).
PREFETCHES = (0, 1, PREFETCH_BATCHES, 4)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", type=int, default=1000, help="recordings in the bench dataset (default 1000)")
    p.add_argument("--shard-size", type=int, default=125, help="recordings per shard (default 125)")
    p.add_argument("--workers", type=int, default=None, help="feature actors for the Ray build (default: one per CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--step-ms", type=float, default=None,
                   help=f"sleep per simulated (GPU) step, ms (default {GPU_STEP_MS:g})")
    p.add_argument("--loader", action="store_true",
                   help="only the loader table: batches/s by prefetch_batches vs the default model's CPU step")
    p.add_argument("--keep", type=Path, default=None,
                   help="data directory to keep the datasets in (default: a temp dir, deleted)")
    add_data_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run every measurement and print the tables."""
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        args.data_dir = args.data_dir or args.keep or Path(tmp)
        settings = data_settings(args)
        catalog, store = settings.open_catalog(), settings.open_store()
        name = f"bench-{args.recordings}-{args.shard_size}"
        _ensure_dataset(catalog, store, name, args.recordings, args.shard_size)
        _ensure_dataset(catalog, store, "bench-overhead", OVERHEAD_RECORDINGS, OVERHEAD_RECORDINGS)
        _start_ray()
        if args.loader:
            _report_loader(args, *_loader(catalog, store, name, args.batch_size, args.step_ms or GPU_STEP_MS))
            return
        rows = _throughput(catalog, store, name, args.workers)
        waits = _data_waits(catalog, store, name, args.batch_size, args.step_ms)
        _report(args, rows, waits)


def _ensure_dataset(catalog: Catalog, store: BlobStore, name: str, n: int, shard_size: int) -> None:
    try:
        if catalog.get_dataset(name).status == "complete":
            return
    except NotFoundError:
        pass
    started = time.perf_counter()
    generate_dataset(catalog, store, name, n_recordings=n, seed=1, shard_size=shard_size)
    print(f"generated {name} in {time.perf_counter() - started:.1f} s", flush=True)


def _start_ray() -> None:
    import ray

    # No Train/Tune nesting here, so the dashboard (and its CPU) is not needed.
    ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=1024**3, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


Row = tuple[str, int, float]


def _throughput(catalog: Catalog, store: BlobStore, name: str, workers: int | None) -> list[Row]:
    fc = FeatureConfig()
    shards = catalog.shards(name)
    n = sum(s.n_rows for s in shards)
    feats = SpectrogramFeatures(fc)

    def numpy_loop() -> None:
        for s in shards:
            d = read_shard(store, s)
            spectrogram_numpy(d.iq, fc, mask=d.labels["heard"])

    def torch_loop() -> None:
        with torch.no_grad():
            for s in shards:
                d = read_shard(store, s)
                for i in range(0, len(d), 64):
                    iq, heard = torch.from_numpy(d.iq[i:i + 64]), torch.from_numpy(d.labels["heard"][i:i + 64])
                    feats(iq, heard).to(torch.float16)

    def ray_build(dataset: str, oracle: bool, actors: int) -> Callable[[], object]:
        def run() -> None:
            _drop_caches(store, dataset)
            ensure_feature_cache(catalog, store, dataset, fc, oracle=oracle, workers=actors, log=lambda _: None)
        return run

    actors = workers or os.cpu_count() or 1
    rows = [("numpy loop, in process (read_shard + spectrogram_numpy)", n, _timed(numpy_loop)),
            (f"torch loop, in process ({torch.get_num_threads()} threads)", n, _timed(torch_loop))]
    builds = [("Ray Data build, 1 actor", name, False, 1),
              (f"Ray Data build, {actors} actors", name, False, actors),
              (f"Ray Data build, {actors} actors + oracle on val/test", name, True, actors),
              (f"Ray Data build, 1 shard of {OVERHEAD_RECORDINGS} (start-up cost)", "bench-overhead", True, 1)]
    for label, dataset, oracle, k in builds:
        count = OVERHEAD_RECORDINGS if dataset == "bench-overhead" else n
        rows.append((label, count, _timed(ray_build(dataset, oracle, k))))
        print(f"  {label}: {rows[-1][2]:.1f} s", flush=True)
    return rows


def _drop_caches(store: BlobStore, name: str) -> None:
    for key in store.list(f"features/{name}/"):
        store.delete(key)


Wait = dict[str, float | str]


def _data_waits(catalog: Catalog, store: BlobStore, name: str, batch_size: int, step_ms: float | None) -> list[Wait]:
    cache = ensure_feature_cache(catalog, store, name, FeatureConfig(), log=lambda _: None)
    steps = [("ResNet step (CPU)", _resnet_step(), 1),
             (f"sleep {step_ms or GPU_STEP_MS:g} ms", _sleep_step(step_ms or GPU_STEP_MS), 2)]
    out = []
    for label, step, epochs in steps:
        # A fresh split per run, as each Train run gets: the first epoch pays the start-up.
        (shard,) = trial_datasets(cache, store, ("train",))["train"].streaming_split(1, equal=True)
        batches = RayBatches(shard, batch_size, shuffle=True, seed=0)
        for epoch in range(epochs):
            limit = RESNET_BATCHES if label.startswith("ResNet") else None
            out.append({"step": label, "epoch": epoch, **_one_epoch(batches, step, limit)})
            print(f"  data wait, {label}, epoch {epoch}: done", flush=True)
    return out


def _one_epoch(
    batches: RayBatches, step: Callable[[dict[str, torch.Tensor]], None], limit: int | None
) -> dict[str, float]:
    waits, steps = [], []
    it = iter(batches)
    started = time.perf_counter()
    while limit is None or len(steps) < limit:
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        waits.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        step(batch)
        steps.append(time.perf_counter() - t1)
    wall = time.perf_counter() - started
    return {"batches": len(steps), "wall_s": wall, "step_ms": 1000 * float(np.mean(steps)), "first_s": waits[0],
            "blocked": sum(waits) / wall, "blocked_after_first": sum(waits[1:]) / max(wall - waits[0], 1e-9)}


def _loader(catalog: Catalog, store: BlobStore, name: str, batch_size: int,
            step_ms: float) -> tuple[float, list[Wait]]:
    """The default model's CPU step (ms), and per prefetch setting the drained and the stepped epochs."""
    cache = ensure_feature_cache(catalog, store, name, FeatureConfig(), log=lambda _: None)
    (shard,) = trial_datasets(cache, store, ("train",))["train"].streaming_split(1, equal=True)
    batch = next(iter(RayBatches(shard, batch_size, shuffle=False, seed=0)))
    step = _resnet_step()
    for _ in range(2):  # warm-up: first calls allocate
        step(batch)
    model_ms = 1000 * _timed(lambda: [step(batch) for _ in range(RESNET_BATCHES)]) / RESNET_BATCHES
    out: list[Wait] = []
    for prefetch in PREFETCHES:
        for label, fn in (("none (drain)", lambda b: None), (f"sleep {step_ms:g} ms", _sleep_step(step_ms))):
            (shard,) = trial_datasets(cache, store, ("train",))["train"].streaming_split(1, equal=True)
            batches = RayBatches(shard, batch_size, shuffle=True, seed=0, prefetch_batches=prefetch)
            for epoch in range(2):
                out.append({"prefetch": prefetch, "step": label, "epoch": epoch, **_one_epoch(batches, fn, None)})
        print(f"  loader, prefetch_batches={prefetch}: done", flush=True)
    return model_ms, out


def _report_loader(args: argparse.Namespace, model_ms: float, rows: list[Wait]) -> None:
    print(f"\nloader vs step: train split in batches of {args.batch_size}, RayBatches over streaming_split(1), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    print(f"default model (ResNetConfig()) training step on this CPU: {model_ms:.1f} ms/batch "
          f"= {1000 / model_ms:.1f} batches/s ({torch.get_num_threads()} threads)")
    print(f"{'prefetch':>8s} {'step':18s} {'epoch':>5s} {'batches':>7s} {'1st batch s':>11s} {'batches/s after 1st':>19s} "
          f"{'blocked after 1st':>17s}")
    for r in rows:
        rate = (r["batches"] - 1) / max(r["wall_s"] - r["first_s"], 1e-9)
        print(f"{r['prefetch']:8d} {r['step']:18s} {r['epoch']:5d} {r['batches']:7d} {r['first_s']:11.2f} {rate:19.1f} "
              f"{100 * r['blocked_after_first']:16.1f}%")
    print(f"\ncommand: python {shlex.join(sys.argv)}")


def _sleep_step(ms: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda batch: time.sleep(ms / 1000)


def _resnet_step() -> Callable[[dict[str, torch.Tensor]], None]:
    model = build_model("resnet", ResNetConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> None:
        head = model(batch["features"], batch["mask"])
        loss = (head[:, :2] - batch["target"]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _report(args: argparse.Namespace, rows: list[Row], waits: list[Wait]) -> None:
    base = rows[0][1] / rows[0][2]
    overhead = rows[-1][2]
    print(f"\nfeature throughput, {rows[0][1]} recordings in shards of {args.shard_size}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':58s} {'seconds':>8s} {'rec/s':>8s} {'x numpy':>8s} {'rec/s w/o start-up':>19s}")
    for label, n, seconds in rows:
        amortised = label.startswith("Ray") and n > OVERHEAD_RECORDINGS
        steady = f"{n / max(seconds - overhead, 1e-9):19.1f}" if amortised else ""
        print(f"{label:58s} {seconds:8.2f} {n / seconds:8.1f} {n / seconds / base:8.2f} {steady}")
    print(f"\ntrainer data wait: train split in batches of {args.batch_size} (ResNet: first {RESNET_BATCHES}), "
          "RayBatches over streaming_split(1) (= get_dataset_shard)")
    print(f"{'step':22s} {'epoch':>5s} {'batches':>7s} {'step ms':>8s} {'wall s':>7s} {'1st batch s':>11s} {'blocked':>8s} "
          f"{'after 1st':>9s}")
    for w in waits:
        print(f"{w['step']:22s} {w['epoch']:5d} {w['batches']:7d} {w['step_ms']:8.1f} {w['wall_s']:7.2f} {w['first_s']:11.2f} "
              f"{100 * w['blocked']:7.1f}% {100 * w['blocked_after_first']:8.1f}%")
    print(f"\ncommand: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
