"""Hostile and broken files given to the commands: one ``error:`` line, exit 1, nothing run.

``tuning.train --evaluate CKPT`` and ``tuning.register --checkpoint CKPT`` read
the checkpoint as data before touching the dataset; ``tuning.predict --model``
refuses a file that is not an ONNX model; registering on a dataset whose test
split is empty names the split and the fix.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tuning.mlflow_fixtures import tiny_module
from tuning.data.cli import main as data_main
from tuning.register import main as register_main
from tuning.release.predict import main as predict_main
from tuning.train import main as train_main


class _ShellTouch:
    """Unpickling this runs ``touch MARKER`` (tests/heimdall/test_hostile_checkpoints.py proves it does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _error_line(err: str, *, progress: bool = False) -> str:
    """The one ``error:`` line of a failed command (tqdm bars dropped when ``progress``)."""
    lines = [line for line in err.splitlines() if line.strip() and not (progress and ("rec/s" in line or "rec]" in line))]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fix:" in lines[0], err
    return lines[0]


def _bad_file(tmp_path: Path, kind: str, suffix: str = ".ckpt") -> Path:
    path = tmp_path / f"{kind}{suffix}"
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    return path


def _commands(ckpt: Path, data_dir: Path) -> dict[str, list[str]]:
    common = ["--data-dir", str(data_dir)]
    return {"train": ["--evaluate", str(ckpt), "--dataset", "tiny", "--out", str(data_dir / "out"), *common],
            "register": ["--checkpoint", str(ckpt), "--dataset", "tiny", "--out", str(data_dir / "export"), *common]}


MAINS = {"train": train_main, "register": register_main}


@pytest.mark.parametrize("command", ["train", "register"])
def test_a_crafted_checkpoint_is_refused_by_the_commands_and_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    marker = tmp_path / "MARKER"
    module = tiny_module()
    ckpt = tmp_path / "calibrated.ckpt"
    torch.save({"hyper_parameters": {**dict(module.hparams), "x": _ShellTouch(marker)},
                "state_dict": module.state_dict()}, ckpt)
    assert MAINS[command](_commands(ckpt, tmp_path)[command]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "holds Python objects (posix.system)" in line and "older Heimdall version" in line
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("command", ["train", "register"])
@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("text", "not a PyTorch checkpoint"),
                                           ("random", "not a PyTorch checkpoint"), ("empty", "not a PyTorch checkpoint"),
                                           ("zip", "not a readable PyTorch checkpoint")])
def test_a_missing_or_non_checkpoint_file_is_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str, message: str) -> None:
    ckpt = _bad_file(tmp_path, kind)
    assert MAINS[command](_commands(ckpt, tmp_path)[command]) == 1
    line = _error_line(capsys.readouterr().err)
    assert message in line and str(ckpt) in line


@pytest.mark.parametrize("kind", ["text", "random", "empty", "zip"])
def test_a_non_onnx_model_file_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    model = _bad_file(tmp_path, kind, ".onnx")
    assert predict_main(["--model", str(model), "--data-dir", str(tmp_path), str(tmp_path)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert str(model) in line and "ONNX" in line


def test_an_empty_test_split_is_named_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data-dir", str(tmp_path)]
    # 20 recordings: none of their ids falls into the 10% test share of the default split.
    assert data_main(["generate", "--dataset", "few", "--recordings", "20", "--shard-size", "20", *common]) == 0
    capsys.readouterr()
    ckpt = tiny_module().write_checkpoint(tmp_path / "calibrated.ckpt")
    assert register_main(["--checkpoint", str(ckpt), "--dataset", "few", "--out", str(tmp_path / "export"), *common]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "dataset 'few' has no recordings in its test split" in line and "test 0" in line
    assert "python -m tuning.data generate" in line
    assert not (tmp_path / "export" / "model.onnx").exists()
    assert train_main(["--evaluate", str(ckpt), "--dataset", "few", "--out", str(tmp_path / "out"), *common]) == 1
    line = _error_line(capsys.readouterr().err, progress=True)
    assert "dataset 'few' has no recordings in its test split" in line
