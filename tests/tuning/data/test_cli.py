"""`python -m tuning.data`: the commands a user types, in-process and end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuning.data.cli import main


def run(tmp_path: Path, *args: str) -> int:
    return main([*args, "--data-dir", str(tmp_path / "data")])


def test_generate_describe_list_verify_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "generate", "--dataset", "t", "--recordings", "60", "--seed", "1", "--shard-size", "30") == 0
    assert "60 recordings in 2 shards" in capsys.readouterr().out
    assert run(tmp_path, "describe", "t") == 0
    out = capsys.readouterr().out
    assert "60 recordings in 2 shards" in out and "oracle" in out and "centre" in out
    assert run(tmp_path, "list") == 0
    assert "complete" in capsys.readouterr().out
    assert run(tmp_path, "verify", "t", "--deep") == 0
    assert "2 shards OK" in capsys.readouterr().out
    assert run(tmp_path, "delete", "t") == 0
    assert not list((tmp_path / "data" / "store").rglob("*.parquet"))
    assert run(tmp_path, "describe", "t") == 1
    assert "error:" in capsys.readouterr().err


def test_duplicate_dataset_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "generate", "--dataset", "d", "--recordings", "5", "--shard-size", "5") == 0
    assert run(tmp_path, "generate", "--dataset", "d", "--recordings", "5", "--shard-size", "5") == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err


def test_unreachable_database_is_one_clear_error_without_password(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.data", "list", "--catalog", "postgresql://heimdall:s3cret@127.0.0.1:1/heimdall"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "127.0.0.1:1" in proc.stderr and "s3cret" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.postgres
@pytest.mark.s3
def test_generate_against_postgres_and_s3(tmp_path: Path, postgres_url: str, s3_settings, monkeypatch) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    common = ["--catalog", postgres_url, "--store", f"s3://heimdall-datasets/cli-{tmp_path.name}"]
    assert main(["generate", "--dataset", f"cli-{tmp_path.name}", "--recordings", "10", "--shard-size", "5", *common]) == 0
    assert main(["verify", f"cli-{tmp_path.name}", "--deep", *common]) == 0


def test_generate_in_the_unknown_gain_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from heimdall.catalog import open_catalog

    assert run(tmp_path, "generate", "--dataset", "g", "--recordings", "10", "--shard-size", "10", "--gain-drift-db", "4") == 0
    with open_catalog(f"sqlite:///{tmp_path / 'data' / 'catalog.db'}") as catalog:
        assert catalog.get_dataset("g").config["gain_drift_sigma_db"] == 4.0
    assert run(tmp_path, "generate", "--dataset", "h", "--recordings", "10", "--gain-drift-db", "-1") == 1
    assert "gain_drift_sigma_db must lie in [0, 12]" in capsys.readouterr().err
