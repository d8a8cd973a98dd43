"""`python -m tuning.train`: the plain (non-Ray) reference training command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heimdall.module import LocalizationModule
from tuning.data.cli import main as data_main
from tuning.train import main as train_main


def test_train_reports_model_oracle_and_centre(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data-dir", str(tmp_path)]
    assert data_main(["generate", "--dataset", "tiny", "--recordings", "120", "--shard-size", "60", *common]) == 0
    out = tmp_path / "run"
    assert train_main(["--dataset", "tiny", "--epochs", "2", "--batch-size", "32", "--threads", "1",
                       "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    for row in ("model", "oracle", "centre"):
        assert report[row]["n"] == report["model"]["n"] > 0
    assert report["oracle_ratio"] == pytest.approx(report["model"]["median_km"] / report["oracle"]["median_km"])
    assert "oracle" in capsys.readouterr().out
    module = LocalizationModule.from_checkpoint(report["checkpoint"])
    assert float(module.covariance_scale) == pytest.approx(report["covariance_scale"])
    # Everything the command wrote is plain data: Lightning's checkpoints and calibrated.ckpt.
    written = [Path(report["checkpoint"]), *sorted((out / "checkpoints").glob("*.ckpt"))]
    assert len(written) >= 2
    for path in written:
        assert "state_dict" in torch.load(path, map_location="cpu", weights_only=True)


def test_unknown_dataset_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--dataset", "nope", "--data-dir", str(tmp_path)]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees CUDA: --accelerator gpu would train")
def test_gpu_without_cuda_is_one_clear_error_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The dataset does not exist: the accelerator is refused before it is looked up.
    assert train_main(["--dataset", "nope", "--accelerator", "gpu", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "cannot see it" in err and "CUDA build of torch" in err
    assert "--accelerator cpu" in err and "nope" not in err


def test_float16_on_cpu_is_refused_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--dataset", "nope", "--accelerator", "cpu", "--precision", "16-mixed",
                       "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "16-mixed needs a GPU" in err and "fix: bf16-mixed" in err and "nope" not in err


def test_bf16_mixed_trains_on_cpu(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    assert data_main(["generate", "--dataset", "tiny", "--recordings", "120", "--shard-size", "60", *common]) == 0
    out = tmp_path / "run"
    assert train_main(["--dataset", "tiny", "--epochs", "1", "--batch-size", "32", "--threads", "1",
                       "--accelerator", "cpu", "--precision", "bf16-mixed", "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "bf16-mixed" and report["epochs_run"] == 1
    assert report["model"]["n"] > 0 and report["model"]["median_km"] > 0
