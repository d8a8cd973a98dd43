"""``python -m tuning.run`` given careless input: one clear error, and a dry run that creates nothing.

No Ray here: every case is refused, or fully checked, before Ray would start.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest

from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.run import main


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _one_error(err: str) -> str:
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed", "-1"], "seed must be an integer in [0,"),
    (["--seed", str(2**40)], "seed must be an integer in [0,"),
    (["--name", ".."], "not start with '.'"),
    (["--name", "."], "not start with '.'"),
    (["--name", "../x"], "letters, digits"),
])
def test_bad_study_settings_are_one_error_before_anything_is_created(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert main(["--dry-run", "--data-dir", str(data), *flags]) == 1
    assert message in _one_error(capsys.readouterr().err)
    assert not data.exists()


@pytest.mark.parametrize("budget", ["0", "0s", "-5m", "soon"])
def test_a_zero_or_malformed_time_budget_is_a_usage_error(budget: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tuning.run", "--dry-run", "--data-dir", str(tmp_path),
                           f"--time-budget={budget}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "'none' for no limit" in done.stderr and "Traceback" not in done.stderr


def test_dry_run_creates_no_file_database_or_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["--dry-run", "--data-dir", str(data), "--name", "nothing-made"]) == 0
    out = capsys.readouterr().out
    assert not data.exists(), _files(data)
    for thing in ("catalogue", "optuna", "run storage", "models store", "mlflow"):
        assert thing in out.split("the run will create:")[1].splitlines()[0], out


def _generate(data: Path, name: str, n: int = 16) -> None:
    done = subprocess.run([sys.executable, "-m", "tuning.data", "generate", "--dataset", name, "--recordings",
                           str(n), "--data-dir", str(data)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dry_run_finds_a_deleted_shard_and_a_taken_name_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _generate(data, "tiny")
    shard = sorted((data / "store").rglob("*.parquet"))[0]
    shard.unlink()
    optuna.create_study(study_name="taken", storage=f"sqlite:///{data / 'optuna.db'}")
    before = _files(data)
    assert main(["--dry-run", "--data-dir", str(data), "--dataset", "tiny", "--name", "taken"]) == 1
    err = _one_error(capsys.readouterr().err)
    assert "dataset shards" in err and shard.name in err and "tuning.data verify tiny" in err, err
    assert "a study named 'taken' already exists" in err, err
    assert _files(data) == before, "the dry run changed the data directory"


def test_dry_run_of_a_resume_without_a_study_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    (data / "studies" / "gone").mkdir(parents=True)
    (data / "studies" / "gone" / "study.json").write_text('{"name": "gone"}')
    assert main(["--dry-run", "--resume", "--name", "gone", "--data-dir", str(data)]) == 1
    err = _one_error(capsys.readouterr().err)
    assert "no Optuna study 'gone' to resume" in err and "no Tune experiment 'gone' to resume" in err, err


@pytest.mark.s3
def test_dry_run_on_s3_creates_no_bucket_and_says_which_will_be_created(
    s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    tag = f"{os.getpid()}-{tmp_path.name[-6:]}".lower().replace("_", "-")
    buckets = {what: f"dry-{what}-{tag}" for what in ("store", "runs", "models")}
    assert main(["--dry-run", "--data-dir", str(tmp_path / "data"), "--name", "s3-dry",
                 "--store", f"s3://{buckets['store']}", "--storage-path", f"s3://{buckets['runs']}/p",
                 "--models-store", f"s3://{buckets['models']}"]) == 0
    out = capsys.readouterr().out
    created = out.split("the run will create:")[1].splitlines()[0]
    assert "store" in created and "run storage" in created and "models store" in created, out
    for bucket in buckets.values():
        assert not S3Store(s3_settings, bucket).root_exists(), f"the dry run created bucket {bucket}"


def _claim(url: str, runs_dir: str, name: str, go: Any, hold: Any, results: Any) -> None:
    from heimdall.errors import AlreadyExistsError
    from tuning.study.tune import check_new_study, open_optuna_storage, open_run_storage

    storage, runs = open_optuna_storage(url), open_run_storage(runs_dir)
    go.wait()
    try:
        check_new_study(storage, runs, name)
        results.put("claimed")
        hold.wait()  # a live driver keeps its claim while it prepares data
    except AlreadyExistsError as exc:
        results.put(f"refused: {exc}")


@pytest.mark.postgres
def test_two_drivers_started_with_one_name_cannot_both_claim_it(postgres_url: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    go, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    name = f"race-{uuid.uuid4().hex[:8]}"
    drivers = [ctx.Process(target=_claim, args=(postgres_url, str(tmp_path / "runs"), name, go, hold, results))
               for _ in range(2)]
    for d in drivers:
        d.start()
    go.set()
    outcomes = sorted(results.get(timeout=120) for _ in drivers)
    hold.set()
    for d in drivers:
        d.join(timeout=60)
    assert outcomes[0] == "claimed" and outcomes[1].startswith("refused:"), outcomes
    assert "claimed by pid" in outcomes[1] and "--resume" in outcomes[1]

    # Both are gone now: the claim of a driver that died before its first trial can be taken over.
    late = ctx.Process(target=_claim, args=(postgres_url, str(tmp_path / "runs"), name, go, hold, results))
    late.start()
    assert results.get(timeout=120) == "claimed"
    late.join(timeout=60)
