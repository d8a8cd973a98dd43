"""Trials per hour on one Ray node versus two, each study submitted with ``ray job submit``.

For each cluster shape (head only; head + one worker node) the benchmark
starts a real local cluster (:class:`tuning.ops.localcluster.LocalCluster`, every
node 2 logical CPUs), submits the same study with the Ray CLI, and reads the
study's own ``summary.json``: trials per hour = finished trials / the Tune
run's wall time; every trial runs all its epochs (ASHA's grace period = the
epochs), so both shapes do the same work (dataset and feature cache are built once, before the first
shape, so both shapes time trials only). Both runs use one shared local data
directory: all nodes are on this machine, so its disk is "shared storage".

Caveat: the nodes share this machine's 2 cores. A node of 2 logical CPUs runs
one trial at a time (1 CPU of Train worker + 0.5 for Ray Data), so two nodes
run two trials at once on the same two cores; the ratio measures how well
the study spreads over nodes, not what a second machine would add.

Command::

    python bench/bench_cluster.py --recordings 400 --trials 4 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuning.ops.localcluster import LocalCluster
from tuning.run import main as run_main

REPO = Path(__file__).resolve().parents[1]


def _study_args(args: argparse.Namespace, name: str) -> list[str]:
    return ["--space", args.space, "--dataset", f"bench-{args.recordings}", "--recordings", str(args.recordings),
            "--trials", str(args.trials), "--max-epochs", str(args.epochs), "--grace-period", str(args.epochs),
            "--time-budget", "none", "--data-dir", str(args.data_dir), "--name", name, "--no-export"]


def _prepare(args: argparse.Namespace) -> None:
    """Build the dataset and its feature cache once (a one-trial, one-epoch study in this process)."""
    code = run_main([*_study_args(args, f"bench-cluster-warmup-{time.strftime('%H%M%S')}"),
                     "--trials", "1", "--max-epochs", "1", "--grace-period", "1"])
    if code != 0:
        sys.exit(f"warm-up study failed (exit {code})")


def _run_shape(args: argparse.Namespace, workers: int) -> dict:
    name = f"bench-cluster-{workers + 1}node-{time.strftime('%H%M%S')}"
    root = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    cluster = LocalCluster.start(root, workers=workers, head_cpus=2, worker_cpus=2)
    try:
        started = time.monotonic()
        job = subprocess.run(["ray", "job", "submit", "--working-dir", str(REPO), "--runtime-env",
                              str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", "-m", "tuning.run",
                              *_study_args(args, name)],
                             capture_output=True, text=True, env={**os.environ, **cluster.client_env()}, cwd=REPO)
        job_s = time.monotonic() - started
    finally:
        cluster.stop()
    if job.returncode != 0:
        sys.exit(f"{workers + 1}-node study failed:\n{(job.stdout + job.stderr)[-4000:]}")
    summary = json.loads((args.data_dir / "studies" / name / "summary.json").read_text())
    done = sum(summary["tune_status"].values()) - summary["tune_status"]["error"]
    epochs = sum(t["epochs"] for t in summary["trials"])
    return {"nodes": workers + 1, "trials": done, "epochs": epochs, "tune_s": summary["wall_seconds"],
            "job_s": job_s, "per_hour": 3600.0 * done / summary["wall_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recordings", type=int, default=400)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--space", default="resnet")
    p.add_argument("--data-dir", type=Path, default=Path(".heimdall-bench").resolve())
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    _prepare(args)
    rows = [_run_shape(args, workers) for workers in (0, 1)]
    print(f"\ntrials per hour, one node vs two  [python bench/bench_cluster.py {' '.join(sys.argv[1:])}]")
    print(f"{'nodes':>5} {'trials':>6} {'epochs':>6} {'tune s':>7} {'job s':>6} {'trials/h':>9}")
    for r in rows:
        print(f"{r['nodes']:5d} {r['trials']:6d} {r['epochs']:6d} {r['tune_s']:7.0f} {r['job_s']:6.0f} {r['per_hour']:9.1f}")
    print(f"two nodes / one node: {rows[1]['per_hour'] / rows[0]['per_hour']:.2f}x trials per hour "
          f"(2 + 2 logical CPUs on the same 2 cores: see the caveat in the docstring)")


if __name__ == "__main__":
    main()
