"""``python -m tuning.run``: settings checked before any trial, and real studies end to end.

The fast tests need no Ray. The default end-to-end test runs a tiny study (64
recordings, 2 trials, 1 epoch) on the session's Ray with the catalogue and the
Optuna study in PostgreSQL and the checkpoints in S3. A Train worker is
killed mid-study here; drivers are killed at every moment of a trial's end in
test_hostile_resume.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.run import main, parse_duration
from tuning.study.trial import COVERAGE_BAND, OBJECTIVES, calibrated_nll
from tuning.study.tune import DATA_CPUS_PER_TRIAL, StudyConfig, open_optuna_storage, plan_resources

MALFORMED_SPACE = """\
arch: resnet
parameters:
  model.widht: {choice: [16, 32]}
  optimizer.lr: {loguniform: [1.0e-2, 1.0e-4]}
  loss.family: {gaussian: [1, 2]}
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuning.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _summary(data_dir: Path, name: str) -> dict:
    return json.loads((data_dir / "studies" / name / "summary.json").read_text())


# -- pure pieces --------------------------------------------------------------------------------


def test_calibrated_objective_adds_a_penalty_only_outside_the_band() -> None:
    nominal1, nominal2 = 1 - 0.6065306597, 1 - 0.1353352832
    assert calibrated_nll(5.0, nominal1, nominal2) == pytest.approx(5.0)
    assert calibrated_nll(5.0, nominal1 + COVERAGE_BAND * 0.9, nominal2 - COVERAGE_BAND * 0.9) == pytest.approx(5.0)
    # 10 points under nominal on the 1-sigma ellipse: 5 points beyond the band.
    assert calibrated_nll(5.0, nominal1 - 0.10, nominal2) == pytest.approx(5.0 + 20.0 * 0.05)
    assert OBJECTIVES["calibrated"].metric == "val/calibrated_nll"


def test_two_cores_run_one_reading_trial_at_a_time_and_two_that_do_not_read() -> None:
    plan = plan_resources(2.0, workers_per_trial=1, cpus_per_worker=1.0, trials=12)
    assert plan.max_concurrent == 1
    assert plan.trial_cpus <= 2.0 and plan.data_cpus == DATA_CPUS_PER_TRIAL
    assert "+ 0.5 CPU for Ray Data reads" in plan.describe()
    # Features in the object store: no reads during the trials, so both cores train.
    unread = plan_resources(2.0, workers_per_trial=1, cpus_per_worker=1.0, trials=12, data_cpus=0.0)
    assert (unread.max_concurrent, unread.trial_cpus) == (2, 1.0)
    assert "no reads (features in the object store)" in unread.describe(), unread.describe()
    # The trial function reserves no CPU: Tune's bundle holds memory only, so Ray fits 2 x 1 CPU on 2.
    assert unread.trial_resources().required_resources.get("CPU", 0) == 0
    assert plan_resources(16.0, 1, 1.0, trials=12).max_concurrent == 10
    assert plan_resources(16.0, 1, 1.0, trials=3).max_concurrent == 3
    assert plan_resources(16.0, 1, 1.0, trials=12, max_concurrent=4).max_concurrent == 4


def test_durations_and_study_settings_are_validated() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("none") is None
    for zero in ("0", "0s", "0m"):
        with pytest.raises(argparse.ArgumentTypeError, match="'none' for no limit"):
            parse_duration(zero)
    with pytest.raises(Exception, match="invalid study settings") as err:
        StudyConfig(name="bad name", trials=0, grace_period=5, max_epochs=2, objective="loss")
    assert len(err.value.problems) == 4


# -- everything is checked before Ray or a trial starts -------------------------------------------


def test_dry_run_of_a_malformed_space_lists_every_problem_without_starting_ray(tmp_path: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(MALFORMED_SPACE)
    ray_tmp = tmp_path / "ray-tmp"
    done = _cli(["--space", str(space), "--dry-run", "--data-dir", str(tmp_path / "data")],
                env={"RAY_TMPDIR": str(ray_tmp)}, timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    assert err.startswith("error: invalid search space") and err.count("error:") == 1
    for problem in ("model.widht", "optimizer.lr", "gaussian"):
        assert problem in err, err
    assert not ray_tmp.exists(), "Ray created its temp directory: it was started"
    assert "dashboard" not in done.stdout


def test_unknown_space_name_lists_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--space", "resnett", "--dry-run", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown search space 'resnett'" in err and "resnet" in err.split("valid names:")[1]


@pytest.mark.parametrize("flag", ["--optuna-storage", "--catalog"])
def test_unreachable_postgresql_is_one_clear_error_before_any_trial(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/heimdall"
    started = time.monotonic()
    code = main(["--smoke-test", flag, url, "--data-dir", str(tmp_path), "--name", "unreachable"])
    out = capsys.readouterr()
    assert code == 1
    assert out.err.count("error:") == 1 and "127.0.0.1" in out.err, out.err
    assert "ray:" not in out.out and "started" not in out.out  # failed before Ray and before any trial
    assert time.monotonic() - started < 60


def test_unreachable_mlflow_server_stops_the_study_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    code = main(["--smoke-test", "--mlflow-uri", url, "--data-dir", str(tmp_path), "--name", "no-mlflow"])
    out = capsys.readouterr()
    assert code == 1
    assert out.err.count("error:") == 1 and url in out.err and "--no-export" in out.err, out.err
    assert "ray:" not in out.out


def test_dry_run_prints_the_plan_and_the_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--space", "resnet", "--dry-run", "--data-dir", str(tmp_path), "--name", "plan"]) == 0
    out = capsys.readouterr().out
    for line in ("study      plan", "will generate 8000 recordings", "val/nll_km (min)", "trial(s) at a time",
                 "dry run: settings and search space valid; found and checked: nothing yet", "the run will create: catalogue", "not checked: ray"):
        assert line in out, out
    assert "everything checked" not in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "the dry run created files"


# -- real studies ------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_settings: S3Settings, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The S3 settings in the environment, where the CLI reads them; ``s3_store`` is a private, emptied prefix."""
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    return s3_store


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.postgres
def test_tiny_study_keeps_its_study_in_postgresql_and_checkpoints_in_s3(
    ray_session: object, postgres_url: str, s3_env: S3Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    base = f"s3://{s3_env.bucket}/{s3_env.prefix}"
    code = main([
        "--smoke-test", "--recordings", "64", "--dataset", name, "--name", name, "--data-dir", str(tmp_path),
        "--catalog", postgres_url, "--store", f"{base}/store", "--optuna-storage", postgres_url,
        "--storage-path", f"{base}/runs", "--models-store", f"{base}/models",
    ])
    out, err = capsys.readouterr()
    assert code == 0, out + err

    study = optuna.load_study(study_name=name, storage=open_optuna_storage(postgres_url))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.value is not None for t in study.trials)

    keys = s3_env.list("runs/")
    assert any(k.startswith(f"runs/{name}/train-runs/") and k.endswith("checkpoint.ckpt") for k in keys), keys
    assert f"runs/{name}/tuner.pkl" in keys

    summary = _summary(tmp_path, name)
    assert summary["tune_trials"] == 2 and summary["optuna_trials"] == {"COMPLETE": 2}
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    assert summary["best"]["checkpoint_path"].startswith(f"{s3_env.bucket}/{s3_env.prefix}/runs/{name}/train-runs/")
    for plot in summary["plots"].values():
        assert plot.endswith(".png") and Path(plot).stat().st_size > 0
    assert "best trials by val/nll_km" in out and "centre" in out

    # The export stage: the best trial's checkpoint, gated, released to the models store, registered in MLflow.
    export = summary["export"]
    assert export["status"] == "registered" and export["champion"] is True, export
    assert export["publication"]["model_key"] == "localization-v0.1.0.onnx"
    assert {"models/localization-v0.1.0.onnx", "models/localization-v0.1.0.json"} <= set(s3_env.list("models/"))
    card = json.loads((tmp_path / "studies" / name / "export" / "model_card.json").read_text())
    assert card["study"]["best_trial_id"] == summary["best"]["trial_id"]
    assert card["study"]["n_trials"] == 2
    runs = mlflow_runs(tmp_path / "mlflow.db", name)  # one run per trial, named by Tune's trial id
    assert sorted(runs) == sorted(r["trial_id"] for r in summary["trials"]), runs


def mlflow_runs(db: Path, experiment: str) -> list[str]:
    """Run names of the trials' runs of an MLflow experiment in a SQLite tracking store (the study's
    parent run left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return [r.info.run_name for r in client.search_runs([found.experiment_id]) if "heimdall.trial_id" in r.data.tags]


def _descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every process below ``root`` (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(pid)
    return found


class _WorkerKiller(threading.Thread):
    """SIGKILLs this process's Ray Train worker once the trial has a checkpoint; records worker pids.

    Only descendants of this process are considered: the session's Ray was
    started here, other people's Ray clusters on the machine were not.
    """

    def __init__(self, train_runs: Path) -> None:
        super().__init__(daemon=True)
        self.train_runs = train_runs
        self.killed: int | None = None
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            workers = sorted(pid for pid, cmd in _descendants(os.getpid()).items() if "RayTrainWorker" in cmd)
            self.seen.update(workers)
            if self.killed is None and workers and list(self.train_runs.glob("*/checkpoint_*")):
                self.killed = workers[0]
                os.kill(workers[0], signal.SIGKILL)
            time.sleep(0.3)


@pytest.mark.ray
def test_killed_train_worker_restarts_from_its_checkpoint_and_the_study_completes(
    ray_session: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "worker-kill"
    killer = _WorkerKiller(tmp_path / "runs" / name / "train-runs")
    killer.start()
    try:
        code = main(["--recordings", "64", "--dataset", "tiny", "--trials", "1", "--max-epochs", "4",
                     "--time-budget", "none", "--data-dir", str(tmp_path), "--name", name])
    finally:
        killer.stop.set()
        killer.join()
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert killer.killed is not None, "the worker finished before it could be killed"
    assert len(killer.seen - {killer.killed}) >= 1, "no new Train worker started after the kill"
    result = next((tmp_path / "runs" / name).glob("trial-0000-*/result.json"))
    epochs = [json.loads(line)["epochs"] for line in result.read_text().splitlines()]
    # Resumed from its checkpoint: every epoch reported once, in order; a restart from scratch repeats epoch 1.
    assert epochs == [1, 2, 3, 4], epochs
    assert _summary(tmp_path, name)["tune_status"] == {"complete": 1, "stopped": 0, "error": 0}
