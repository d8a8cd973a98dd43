"""Throughput of the synthetic generator: scene only versus scene plus NBFM IQ.

Runs on one core (numpy's element-wise kernels and FFTs here are single-threaded)
with the default :class:`~heimdall.scene.GeneratorConfig` (7 receivers x 4096
samples) and reports the best of a few repeats, which is the least disturbed by
other work on the machine.

Usage::

    python bench/bench_generate.py
    python bench/bench_generate.py --recordings 2000 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from heimdall.scene import GeneratorConfig, sample_scene
from heimdall.synthetic import generate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=500, help="recordings per timed run (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage; the best is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    args = parser.parse_args()
    if args.recordings < 1 or args.repeats < 1:
        parser.error(f"--recordings and --repeats must be >= 1, got {args.recordings} and {args.repeats}")
    return args


def best_seconds(run: Callable[[int], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls of ``run(repeat_index)``, after one warm-up."""
    run(-1)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable){load}; "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )


def main() -> None:
    args = parse_args()
    config = GeneratorConfig()
    n = args.recordings
    scene_s = best_seconds(lambda i: sample_scene(config, n, np.random.default_rng([args.seed, i + 1])), args.repeats)
    full_s = best_seconds(lambda i: generate(config, n, args.seed, shard_index=i + 1), args.repeats)
    iq_mb = n * 7 * config.n_samples * np.dtype(np.complex64).itemsize / 1e6
    print(machine_info())
    print(f"config: default GeneratorConfig, {config.n_samples} samples x 7 receivers, {n} recordings, "
          f"best of {args.repeats}")
    print(f"{'stage':<12} {'seconds':>9} {'recordings/s':>13} {'IQ MB/s':>9}")
    print(f"{'scene only':<12} {scene_s:>9.3f} {n / scene_s:>13.0f} {'-':>9}")
    print(f"{'scene + IQ':<12} {full_s:>9.3f} {n / full_s:>13.0f} {iq_mb / full_s:>9.0f}")
    print(f"ratio (scene + IQ time) / (scene-only time): {full_s / scene_s:.1f}")


if __name__ == "__main__":
    main()
