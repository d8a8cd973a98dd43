"""End to end: import a Heimdall installation (upstream's schema, rows and objects) with the one
command, leave it unchanged, rerun it, and run a smoke study on what it imported."""
from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall.catalog import open_catalog
from heimdall.datasets import SplitConfig, split_assignment
from heimdall.store import S3Settings
from tests.heimdall.upstream.heimdall_install import (
    HeimdallInstall,
    bucket_state,
    build_heimdall,
    drop_heimdall,
)
from tuning.data.cli import main

pytestmark = [pytest.mark.postgres, pytest.mark.s3]


@pytest.fixture(scope="module")
def heimdall(postgres_url: str, s3_settings: S3Settings) -> Iterator[HeimdallInstall]:
    tag = uuid.uuid4().hex[:8]
    started = time.monotonic()
    install = build_heimdall(postgres_url, s3_settings, db_name=f"heimdall_e2e_{tag}", bucket=f"heimdall-raw-iq-{tag}")
    print(f"built the Heimdall installation in {time.monotonic() - started:.1f} s")
    try:
        yield install
    finally:
        drop_heimdall(postgres_url, s3_settings, install)


def pg_dump(url: str) -> bytes:
    done = subprocess.run(["pg_dump", "--schema", "heimdall", "--no-owner", "--restrict-key=heimdalltest", url],
                          capture_output=True, check=True)
    return done.stdout


def _import(install: HeimdallInstall, name: str, store: str, *extra: str) -> list[str]:
    return ["import", "--dataset", name, "--from-heimdall", install.url, "--raw-iq-bucket", install.bucket,
            "--catalog", install.url, "--store", store, "--shard-size", "64", *extra]


def test_the_import_reads_everything_writes_nothing_upstream_and_reruns_add_nothing(
        heimdall: HeimdallInstall, s3_settings: S3Settings, s3_store, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.endpoint)  # where a Heimdall user's shell has it
    store = f"s3://{s3_store.bucket}/{s3_store.prefix}"
    name = f"heimdall-{uuid.uuid4().hex[:6]}"
    dump, objects = pg_dump(heimdall.url), bucket_state(s3_settings, heimdall.bucket)
    exp = heimdall.expected

    assert main(_import(heimdall, name, store)) == 1  # the recorded 12500 Hz is not trusted silently
    assert "--iq-sample-rate-hz" in capsys.readouterr().err

    started = time.monotonic()
    assert main(_import(heimdall, name, store, "--iq-sample-rate-hz", "12000")) == 0
    took = time.monotonic() - started
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{out}import took {took:.1f} s")
    assert f"sessions:   {exp.sessions} new ({exp.unlabelled_sessions} without a located known source" in out
    assert f"recordings: {exp.recordings} new, {exp.labelled} labelled" in out
    assert "recorded 12500 Hz, read as 12000 Hz" in out
    assert f"chunk keys: {exp.one_based_folders} session folder(s)" in out
    assert "rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(exp.rejects.items())) in out
    assert "sessions left for a later run: 1 not completed (in_progress)" in out

    assert pg_dump(heimdall.url) == dump, "the import changed Heimdall's schema heimdall"
    assert bucket_state(s3_settings, heimdall.bucket) == objects, "the import changed Heimdall's bucket"

    with open_catalog(heimdall.url, read_only=True) as catalog:  # our tables beside upstream's, same database
        info = catalog.get_dataset(name)
        rec = catalog.recordings(name)
    assert (info.status, info.kind, info.n_recordings) == ("complete", "imported", exp.recordings)
    assert len(info.config["sessions"]) == exp.sessions
    assert len(info.config["station_offsets_db"]) == 7
    groups = info.config["split"]["groups"]
    assert len(groups) == exp.known_sources + exp.unlabelled_sessions
    codes = split_assignment(rec["split_group"], SplitConfig())
    for g in set(rec["split_group"].tolist()):  # no transmitter in two splits
        assert len(set(codes[rec["split_group"] == g].tolist())) == 1
    assert {0, 1, 2} <= set(codes.tolist())

    assert main(_import(heimdall, name, store, "--iq-sample-rate-hz", "12000")) == 0
    again = capsys.readouterr().out
    assert "nothing new in" in again and f"{exp.sessions} session(s) already imported" in again
    with open_catalog(heimdall.url, read_only=True) as catalog:
        assert catalog.get_dataset(name).n_recordings == exp.recordings
    assert pg_dump(heimdall.url) == dump


@pytest.mark.ray
def test_a_smoke_study_runs_on_the_imported_data_and_exports_its_model(
        heimdall: HeimdallInstall, s3_settings: S3Settings, s3_store, ray_session: object, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tuning.run import main as run

    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.endpoint)
    store = f"s3://{s3_store.bucket}/{s3_store.prefix}"
    name = f"heimdall-{uuid.uuid4().hex[:6]}"
    dump = pg_dump(heimdall.url)
    assert main(_import(heimdall, name, store, "--iq-sample-rate-hz", "12000")) == 0
    started = time.monotonic()
    # One one-epoch trial on the shared Ray: the whole study path (features with the dataset's station
    # offsets, the split by transmitter, Tune, summary, export, parity gate, models store, MLflow) on real data.
    code = run(["--smoke-test", "--trials", "1", "--dataset", name, "--name", name, "--catalog", heimdall.url,
                "--store", store, "--data-dir", str(tmp_path), "--models-store", str(tmp_path / "models")])
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"\nsmoke study on the imported data took {time.monotonic() - started:.1f} s")
    assert code == 0, (out + err)[-6000:]
    summary = json.loads((tmp_path / "studies" / name / "summary.json").read_text())
    assert summary["tune_trials"] == 1 and summary["optuna_trials"] == {"COMPLETE": 1}
    assert summary["export"]["status"] == "registered", summary["export"]
    assert pg_dump(heimdall.url) == dump
