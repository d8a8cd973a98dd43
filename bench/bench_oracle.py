"""Cost and accuracy of the Bayes oracle against the network-centre baseline.

For the default grid (2 km) and half its spacing (1 km): the time to build the
oracle, the time per recording of the posterior (best of a few runs), the peak
memory numpy allocates (traced on a separate, smaller run), and then the
localization tables of oracle versus centre on the same recordings, overall and
inside the receivers' hull only (each table's ratio column is against its own
oracle row).

Usage::

    python bench/bench_oracle.py
    python bench/bench_oracle.py --recordings 2000 --seed 1 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np

from heimdall.metrics import LocalizationReport, format_reports, localization_report
from heimdall.oracle import BayesOracle, OracleConfig, centre_baseline
from heimdall.scene import GeneratorConfig, Scene, sample_scene


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=1000, help="recordings scored (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="scene seed (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed posterior runs per grid; the best is reported (default 2)")
    parser.add_argument("--memory-recordings", type=int, default=64, help="recordings in the traced-memory run (default 64)")
    args = parser.parse_args()
    if min(args.recordings, args.repeats, args.memory_recordings) < 1:
        parser.error("--recordings, --repeats and --memory-recordings must be >= 1")
    return args


def machine_info() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"machine: {platform.processor() or platform.machine()}, {usable} usable cores{load}; numpy {np.__version__}"


def peak_memory_mb(config: GeneratorConfig, oc: OracleConfig, scene: Scene) -> float:
    """Peak bytes numpy allocates while building the oracle and scoring ``scene``."""
    tracemalloc.start()
    try:
        BayesOracle(config, oc).predict_scene(scene)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def time_grid(config: GeneratorConfig, oc: OracleConfig, scene: Scene, repeats: int) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """(build seconds, best posterior ms per recording, the posterior)."""
    start = time.perf_counter()
    oracle = BayesOracle(config, oc)
    build_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = oracle.predict_scene(scene)
        best = min(best, time.perf_counter() - start)
    return build_s, 1e3 * best / len(scene), result


def reports(
    config: GeneratorConfig, scene: Scene, posteriors: dict[str, tuple[np.ndarray, np.ndarray]], sel: np.ndarray | slice
) -> dict[str, LocalizationReport]:
    """One report per predictor (plus the centre baseline) on the selected recordings."""
    truth = np.stack([scene.tx_east_km, scene.tx_north_km], axis=-1)
    rows = {**posteriors, "centre": centre_baseline(config, len(scene))}
    return {name: localization_report(mean[sel], cov[sel], truth[sel]) for name, (mean, cov) in rows.items()}


def main() -> None:
    args = parse_args()
    config = GeneratorConfig()
    scene = sample_scene(config, args.recordings, np.random.default_rng(args.seed))
    small = sample_scene(config, args.memory_recordings, np.random.default_rng(args.seed + 1))
    print(machine_info())
    print(f"config: default GeneratorConfig; {args.recordings} recordings, seed {args.seed}, "
          f"{int(scene.inside_hull.sum())} inside the hull; best of {args.repeats}")
    print(f"{'grid':<8} {'cells':>7} {'build s':>8} {'ms/recording':>13} {'peak MB':>8}")
    posteriors = {}
    for label, spacing in (("oracle", 2.0), ("oracle 1km", 1.0)):
        oc = OracleConfig(grid_spacing_km=spacing)
        build_s, ms, posteriors[label] = time_grid(config, oc, scene, args.repeats)
        cells = len(BayesOracle(config, oc).grid_km)
        print(f"{spacing:>5.1f} km {cells:>7d} {build_s:>8.2f} {ms:>13.2f} {peak_memory_mb(config, oc, small):>8.0f}")
    for title, sel in (("all recordings", slice(None)), ("transmitter inside the receivers' hull", scene.inside_hull)):
        print(f"\n{title} (km; 'oracle' is the 2 km grid):")
        print(format_reports(reports(config, scene, posteriors, sel)))


if __name__ == "__main__":
    main()
