"""The resource plan knows GPUs, and the concurrency limit follows the cluster.

The GPU cases run against a real Ray head started with declared GPUs
(``ray start --num-gpus 2`` on this CPU machine: Ray schedules them whether
or not CUDA exists), and check that Ray really places as many trials' Train
worker bundles as the plan says, and not one more.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from heimdall.errors import ConfigError
from tuning.ops.localcluster import LocalCluster
from tuning.study.tune import ClusterLimiter, StudyConfig, plan_resources, plan_study, plans_reads

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[3]
HEAD_CPUS, HEAD_GPUS = 16, 2


@pytest.fixture(scope="module")
def gpu_head() -> Iterator[LocalCluster]:
    """A Ray head of 16 logical CPUs and 2 declared GPUs (no worker node)."""
    root = Path(tempfile.mkdtemp(prefix="hg-", dir="/tmp"))  # short: Ray's socket paths live below it
    cluster = LocalCluster.start(root, workers=0, head_cpus=HEAD_CPUS, head_gpus=HEAD_GPUS)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _on_cluster(cluster: LocalCluster, script: str) -> dict:
    """Run ``script`` in a fresh driver of ``cluster``; it prints one JSON line, returned here."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env={**os.environ, **cluster.client_env()})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PLACE = """
import json, ray
from ray.util.placement_group import placement_group, remove_placement_group
from tuning.study.tune import StudyConfig, plan_study

ray.init(logging_level="ERROR", log_to_driver=False)
found = {}
for gpus in (0.25, 0.3):
    config = StudyConfig(name="p", trials=12, gpus_per_worker=gpus)
    plan = plan_study(config, ray.cluster_resources())
    # Each trial's Train workers, as Train's placement group asks for them.
    bundle = {"CPU": config.cpus_per_worker, "GPU": gpus}
    groups = [placement_group([bundle] * config.workers_per_trial) for _ in range(plan.max_concurrent)]
    placed = len(ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=60)[0])
    extra = placement_group([bundle] * config.workers_per_trial)
    extra_placed = bool(ray.wait([extra.ready()], timeout=5)[0])
    for g in [*groups, extra]:
        remove_placement_group(g)
    found[str(gpus)] = {"plan": plan.max_concurrent, "bound": plan.bound_by, "placed": placed,
                        "extra": extra_placed, "line": plan.describe()}
print(json.dumps(found))
"""


@pytest.mark.cluster
def test_quarter_gpus_pack_eight_trials_on_two_gpus_and_ray_places_exactly_those(gpu_head: LocalCluster) -> None:
    found = _on_cluster(gpu_head, PLACE)
    quarter, third = found["0.25"], found["0.3"]
    # 16 CPUs fit 10 trials of 1.5 CPU (1 for the worker, 0.5 for reads); 2 GPUs hold 4 workers of 0.25 each: 8, bound by GPUs.
    assert (quarter["plan"], quarter["bound"], quarter["placed"], quarter["extra"]) == (8, "GPUs", 8, False), quarter
    assert "8 trial(s) at a time on 16 CPUs, 2 GPU(s)" in quarter["line"]
    assert "0.25 GPU (4 trials share a GPU)" in quarter["line"], quarter["line"]
    # A worker never spans two GPUs: 0.3 packs 3 to a GPU (not 6.67 over two), and Ray agrees.
    assert (third["plan"], third["placed"], third["extra"]) == (6, 6, False), third


def test_cpus_bound_gpu_trials_when_the_cpus_run_out_first() -> None:
    resources = {"CPU": float(HEAD_CPUS), "GPU": float(HEAD_GPUS)}
    plan = plan_study(StudyConfig(name="p", trials=12, gpus_per_worker=0.25, cpus_per_worker=4.0), resources)
    assert (plan.max_concurrent, plan.bound_by) == (3, "CPUs")  # 16 // 4.5; the GPUs would fit 8
    whole = plan_study(StudyConfig(name="p", trials=12, gpus_per_worker=1.0, workers_per_trial=2), resources)
    assert (whole.max_concurrent, whole.bound_by, whole.worker_gpus) == (1, "GPUs", 2.0)
    assert plan_study(StudyConfig(name="p", trials=12, gpus_per_worker=0.25, max_concurrent=5),
                      resources).bound_by == "--max-concurrent"
    cpu_only = plan_study(StudyConfig(name="p", trials=12), resources)  # a CPU study ignores the GPUs
    assert (cpu_only.max_concurrent, cpu_only.bound_by, cpu_only.worker_gpus) == (10, "CPUs", 0.0)
    assert "GPU" not in cpu_only.describe()


def test_a_trial_needing_more_gpus_than_the_cluster_has_is_one_error_with_the_fix() -> None:
    with pytest.raises(ConfigError) as too_many:
        plan_resources(16.0, 3, 1.0, trials=4, cluster_gpus=2.0, gpus_per_worker=1.0)
    text = str(too_many.value)
    assert "--workers-per-trial 3 x --gpus-per-worker 1 = 3 GPU(s)" in text and "cluster's 2 GPU(s)" in text
    assert "fix: --workers-per-trial 2 or fewer" in text, text
    with pytest.raises(ConfigError) as none:
        plan_resources(16.0, 1, 1.0, trials=4, cluster_gpus=0.0, gpus_per_worker=0.25)
    assert "cluster's 0 GPU(s)" in str(none.value) and "--gpus-per-worker 0 to train on CPUs" in str(none.value)
    # CPUs and GPUs short at once: both in the one error.
    with pytest.raises(ConfigError) as both:
        plan_resources(1.0, 2, 1.0, trials=4, cluster_gpus=0.0, gpus_per_worker=1.0)
    assert str(both.value).count("fix:") == 2


@pytest.mark.cluster
def test_dry_run_plans_for_the_cluster_at_ray_address(gpu_head: LocalCluster, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tuning.run", "--dry-run", "--no-export", "--data-dir", str(tmp_path / "d"),
           "--name", "gpu-plan", "--gpus-per-worker", "0.25", "--trials", "12", "--ray-address", gpu_head.address]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, **gpu_head.client_env()})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "8 trial(s) at a time on 16 CPUs, 2 GPU(s)" in done.stdout, done.stdout
    assert f"the plan is for the cluster at {gpu_head.address}: 16 CPUs, 2 GPUs" in done.stdout, done.stdout
    assert os.cpu_count() != HEAD_CPUS  # (so the line above cannot come from this machine)


def test_dry_run_against_an_unreachable_cluster_is_one_error_naming_the_fix(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port bound but never listened on: nothing answers there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "tuning.run", "--dry-run", "--no-export", "--data-dir",
                               str(tmp_path / "d"), "--name", "nowhere", "--ray-address", address],
                              capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("error:") == 1 and f"no Ray cluster answers at {address}" in done.stderr, done.stderr
    assert "fix: check --ray-address" in done.stderr
    assert time.monotonic() - started < 60  # not Ray's minutes of retries


def test_cluster_limiter_follows_the_cluster_between_suggestions(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = {"CPU": 2.0}
    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="m", mode="min")
    config = StudyConfig(name="p", trials=8, max_concurrent=3)
    limiter = ClusterLimiter(searcher, config, plan_study(config, cluster), read_cluster=lambda: cluster, check_s=0.0)
    assert limiter.suggest("a") is not None
    assert limiter.suggest("b") is None  # 2 CPUs fit one trial
    assert capsys.readouterr().out == ""  # the cluster of the plan: nothing new to say
    cluster["CPU"] = 5.0  # a node joined: 3 trials of 1.5 CPU fit
    assert limiter.suggest("b") is not None and limiter.suggest("c") is not None
    assert capsys.readouterr().out == "cluster:   now 5 CPUs: up to 3 trial(s) at a time\n"
    cluster["CPU"] = 16.0  # fits 10, but --max-concurrent 3 bounds it
    assert limiter.suggest("d") is None and limiter.max_concurrent == 3
    cluster["CPU"] = 2.0  # nodes left: no new trial until running ones end
    limiter.on_trial_complete("a", {"m": 1.0})
    assert limiter.suggest("d") is None
    limiter.on_trial_complete("b", {"m": 1.0})
    limiter.on_trial_complete("c", {"m": 1.0})
    assert limiter.suggest("d") is not None
    cluster["CPU"] = 0.0  # nothing fits: one trial may still wait for a node (an autoscaler's demand)
    limiter.on_trial_complete("d", {"m": 1.0})
    assert limiter.follow_cluster(cluster) == 1


def test_only_a_local_ray_with_the_features_in_its_object_store_plans_no_reads() -> None:
    assert not plans_reads(local=True, materialised=True)
    assert plans_reads(local=True, materialised=False)  # the trials read the cache files
    assert plans_reads(local=False, materialised=True)  # a cluster reads a lost node's blocks again
    config = StudyConfig(name="p", trials=8)
    assert plan_study(config, {"CPU": 2.0}, reads=False).max_concurrent == 2
    assert plan_study(config, {"CPU": 2.0}).max_concurrent == 1


def test_cluster_limiter_keeps_the_plans_reads_when_it_replans() -> None:
    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="m", mode="min")
    config = StudyConfig(name="p", trials=8)
    unread = ClusterLimiter(searcher, config, plan_study(config, {"CPU": 2.0}, reads=False), check_s=0.0)
    assert unread.follow_cluster({"CPU": 2.0}) == 2 and unread.follow_cluster({"CPU": 5.0}) == 5
    reading = ClusterLimiter(searcher, config, plan_study(config, {"CPU": 2.0}), check_s=0.0)
    assert reading.follow_cluster({"CPU": 2.0}) == 1 and reading.follow_cluster({"CPU": 5.0}) == 3
    # A limiter saved before the plan knew about reads (a resumed study) plans with them, as it did.
    del reading.demand["data_cpus"]
    assert reading.follow_cluster({"CPU": 2.0}) == 1
