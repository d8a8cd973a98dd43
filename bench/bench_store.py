"""Shard write + read throughput: a real S3 server (SeaweedFS ``weed mini``) versus
the local directory, on the same encoded shards, in one run.

Each shard is a default-sized one (250 recordings × 7 receivers × 4096 complex64
samples ≈ 57 MB of Parquet). Writes go through ``BlobStore.put`` and reads through
:func:`heimdall.datasets.read_shard` (download, checksum, Parquet decode, checks),
which is what training pays per shard.

Usage::

    python bench/bench_store.py              # 4 shards
    python bench/bench_store.py --shards 8
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from heimdall.catalog import ShardInfo
from heimdall.datasets import read_shard
from heimdall.scene import GeneratorConfig
from heimdall.shards import ShardData, encode_shard, sha256_hex
from heimdall.store import LocalStore, S3Settings
from heimdall.store.s3 import S3Store
from heimdall.synthetic import generate
from tuning.ops.services import SeaweedServer


def make_shards(n: int, size: int) -> list[bytes]:
    config, out = GeneratorConfig(), []
    for i in range(n):
        rec = generate(config, size, seed=0, shard_index=i)
        s = rec.scene
        labels = {"tx_lat": s.tx_lat, "tx_lon": s.tx_lon, "tx_power_dbm": s.tx_power_dbm, "frequency_hz": s.frequency_hz,
                  "inside_hull": s.inside_hull, "rx_power_dbm": s.rx_power_dbm, "snr_db": s.snr_db, "heard": s.heard}
        shard = ShardData(np.arange(i * size, (i + 1) * size), rec.iq, labels, config.sample_rate_hz, config.iq_reference_dbm)
        out.append(encode_shard(shard, dataset="bench", index=i))
    return out


def measure(store, blobs: list[bytes]) -> tuple[float, float]:
    infos = [ShardInfo("bench", i, f"bench/shard-{i:05d}.parquet", sha256_hex(b), None, len(b)) for i, b in enumerate(blobs)]
    t0 = time.perf_counter()
    for info, blob in zip(infos, blobs):
        store.put(info.key, blob)
    t1 = time.perf_counter()
    for info in infos:
        read_shard(store, info)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=250)
    args = p.parse_args()
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; generating {args.shards} shards of {args.shard_size} recordings")
    blobs = make_shards(args.shards, args.shard_size)
    mb = sum(len(b) for b in blobs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        local = measure(LocalStore(base / "local"), blobs)
        with SeaweedServer.start(base / "s3") as server:
            settings = S3Settings(server.endpoint, server.access_key, server.secret_key)
            s3 = measure(S3Store(settings, "heimdall-bench"), blobs)
    print(f"\n{mb:.0f} MB in {args.shards} shards")
    print(f"{'store':8s} {'write MB/s':>11s} {'read MB/s':>11s}")
    for name, (w, r) in (("local", local), ("s3", s3)):
        print(f"{name:8s} {mb / w:11.0f} {mb / r:11.0f}")
    print(f"ratio s3/local: write {local[0] / s3[0]:.2f}, read (incl. checksum+decode) {local[1] / s3[1]:.2f}")


if __name__ == "__main__":
    main()
