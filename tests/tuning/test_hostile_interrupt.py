"""Ctrl-C never publishes: SIGINT mid-study exits 130 with the resume command, releases nothing and
moves no alias; ``--resume`` then finishes and publishes exactly once, and again changes nothing.

A real driver process (its own local Ray), the catalogue and Optuna study in
PostgreSQL, shards, checkpoints, Tune state and releases in S3, MLflow in
SQLite in the data directory.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.study.tune import INTERRUPTED_ATTR, open_optuna_storage


def _env(s3: S3Settings) -> dict[str, str]:
    return {**os.environ, "HEIMDALL_S3_ENDPOINT": s3.url, "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key}


def _states(storage: optuna.storages.BaseStorage, name: str) -> dict[str, int]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _registered_versions(mlflow_db: Path) -> list[str]:
    from mlflow import MlflowClient

    if not mlflow_db.is_file():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}", registry_uri=f"sqlite:///{mlflow_db}")
    return [str(v.version) for v in client.search_model_versions("name = 'heimdall-localization'")]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.postgres
def test_sigint_mid_study_publishes_nothing_and_resume_publishes_once(
    postgres_url: str, s3_settings: S3Settings, s3_store: S3Store, tmp_path: Path
) -> None:
    name = f"sigint-{uuid.uuid4().hex[:8]}"
    base = f"s3://{s3_store.bucket}/{s3_store.prefix}"
    flags = ["--name", name, "--data-dir", str(tmp_path), "--catalog", postgres_url, "--store", f"{base}/store",
             "--optuna-storage", postgres_url, "--storage-path", f"{base}/runs", "--models-store", f"{base}/models"]
    study = ["--smoke-test", "--dataset", name, "--recordings", "64", "--trials", "3"]
    storage = open_optuna_storage(postgres_url)
    driver = subprocess.Popen([sys.executable, "-m", "tuning.run", *study, *flags], env=_env(s3_settings),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while _states(storage, name).get("COMPLETE", 0) < 1:  # interrupt while the next trial runs
            assert driver.poll() is None, f"the driver ended before the interrupt: {driver.communicate()}"
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(1)
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, out[-3000:] + err[-3000:]
    assert "nothing was exported" in err and f"--resume --name {name}" in err, err[-3000:]
    assert "release:" not in out and "export:" not in out
    assert s3_store.list("models/") == [], "an interrupted study published a release"
    assert _registered_versions(tmp_path / "mlflow.db") == [], "an interrupted study registered a model"
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert "FAIL" not in _states(storage, name), (_states(storage, name), err[-3000:])
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert all(INTERRUPTED_ATTR in t.system_attrs for t in running), "a RUNNING trial was not marked interrupted"

    resume = [sys.executable, "-m", "tuning.run", "--resume", *flags]
    done = subprocess.run(resume, env=_env(s3_settings), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _states(storage, name) == {"COMPLETE": 3}, _states(storage, name)
    releases = s3_store.list("models/")
    assert releases == ["models/localization-v0.1.0.json", "models/localization-v0.1.0.onnx"], releases
    assert _registered_versions(tmp_path / "mlflow.db") == ["1"]

    again = subprocess.run(resume, env=_env(s3_settings), capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already released" in again.stdout, again.stdout[-3000:]
    assert s3_store.list("models/") == releases and _registered_versions(tmp_path / "mlflow.db") == ["1"]
