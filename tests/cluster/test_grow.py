"""A node that joins a running study raises its concurrency, without restarting it.

A real Ray head of 2 logical CPUs (:class:`tuning.ops.localcluster.LocalCluster`)
fits one trial at a time (1 CPU of Train worker + 0.5 CPU of reads + the
trial function). ``python -m tuning.run --ray-address`` runs a study of
short trials against it; once the first trial has started, a worker node of
3 CPUs joins (5 CPUs: 3 trials at a time). The Optuna trials' start and end
times (asked when Tune's limiter lets a trial through, told when it ends)
must show one trial at a time before the node joined and several at once
after it, and the driver says when it saw the cluster grow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest

from tuning.ops.localcluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STUDY_TIMEOUT_S = 1200


@pytest.fixture
def head_only() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="hj-", dir="/tmp"))  # short: Ray's socket paths live below it
    started = LocalCluster.start(root, workers=0, head_cpus=2)
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(root, ignore_errors=True)


def _most_at_once(intervals: list[tuple[datetime, datetime]], after: datetime | None = None,
                  before: datetime | None = None) -> int:
    """The largest number of ``intervals`` open at one moment (within [after, before] when given)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for when, step in events:
        now += step
        if (after is None or when >= after) and (before is None or when <= before):
            best = max(best, now)
    return best


def test_a_node_joining_mid_study_runs_more_trials_at_once(head_only: LocalCluster, tmp_path: Path) -> None:
    name = f"grow-{uuid.uuid4().hex[:8]}"
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "tuning.run", "--smoke-test", "--recordings", "128", "--trials", "5",
           "--dataset", name, "--name", name, "--data-dir", str(tmp_path), "--optuna-storage", optuna_url,
           "--no-export", "--ray-address", head_only.address]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env={**os.environ, **head_only.client_env()})
    lines: list[str] = []
    joined: list[datetime] = []

    def watch() -> None:
        assert driver.stdout is not None
        for line in driver.stdout:
            lines.append(line)
            if not joined and " started (1/" in line:  # StudyProgress: the first trial runs
                joined.append(datetime.now())  # before the call: the node cannot be up earlier
                head_only.add_worker(cpus=3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        driver.wait(timeout=STUDY_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            driver.kill()
        watcher.join(timeout=60)
    log = "".join(lines)
    (tmp_path / "driver.log").write_text(log)
    assert driver.returncode == 0, log[-6000:]
    assert joined, "the first trial never started: " + log[-3000:]
    assert "1 trial(s) at a time on 2 CPUs" in log, log[-3000:]
    assert "cluster:   now 5 CPUs: up to 3 trial(s) at a time" in log, log[-3000:]

    study = optuna.load_study(study_name=name, storage=optuna_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    # Optuna's times are naive local datetimes, like datetime.now().
    intervals = [(t.datetime_start, t.datetime_complete) for t in study.trials]
    assert _most_at_once(intervals, before=joined[0]) == 1, intervals
    assert _most_at_once(intervals, after=joined[0]) >= 2, (joined, intervals)
