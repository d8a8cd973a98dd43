"""Hostile and broken checkpoint files: a checkpoint is data, never code.

The crafted files are real pickles whose ``__reduce__`` would touch a marker
file; the control test proves they do when loaded the unsafe way, so the
refusals below are not vacuous.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from heimdall.errors import DataError, HeimdallError
from heimdall.losses import LossConfig
from heimdall.models import ResNetConfig, build_model
from heimdall.module import CheckpointError, LocalizationModule, OptimizerConfig, plain_checkpoint, read_checkpoint

TINY = ResNetConfig(stage_depths=(1,), width=4, stem_channels=1, head_hidden=8, dropout=0.0)


class _ShellTouch:
    """Unpickling this runs ``touch MARKER`` through the shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _PathTouch:
    """Unpickling this calls ``pathlib.Path(MARKER).touch()``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _module() -> LocalizationModule:
    torch.manual_seed(0)
    return LocalizationModule(build_model("resnet", TINY), LossConfig(mse_warmup_epochs=0))


def _hostile(tmp_path: Path, payload: type, name: str = "evil.ckpt") -> tuple[Path, Path]:
    """A checkpoint that looks like ours (real hyperparameters and weights) plus a payload."""
    marker = tmp_path / f"MARKER-{payload.__name__}"
    module = _module()
    hparams = {**dict(module.hparams), "note": payload(marker)}
    path = tmp_path / name
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    return path, marker


def _assert_one_line(err: HeimdallError) -> None:
    text = str(err)
    assert "\n" not in text and "fix:" in text, text


@pytest.mark.parametrize("payload", [_ShellTouch, _PathTouch])
def test_the_crafted_checkpoint_runs_code_when_loaded_unsafely(tmp_path: Path, payload: type) -> None:
    path, marker = _hostile(tmp_path, payload)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert marker.exists(), "the control payload did not run: the refusal tests below would prove nothing"


@pytest.mark.parametrize("payload", [_ShellTouch, _PathTouch])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, payload: type) -> None:
    path, marker = _hostile(tmp_path, payload)
    for load in (read_checkpoint, LocalizationModule.from_checkpoint):
        with pytest.raises(CheckpointError, match=r"holds Python objects .*refused.*older Heimdall version") as err:
            load(path)
        _assert_one_line(err.value)
        assert not marker.exists()
    assert isinstance(err.value, DataError)


def test_a_raw_pickle_with_a_payload_is_not_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "raw.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _ShellTouch(marker)}))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        LocalizationModule.from_checkpoint(path)
    _assert_one_line(err.value)
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_with_the_fix(tmp_path: Path) -> None:
    # What a checkpoint holding config objects instead of dicts looks like: it needs weights_only=False.
    module = _module()
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {**dict(module.hparams), "optimizer_config": OptimizerConfig()},
                "state_dict": module.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"\(heimdall\.optimizer\.OptimizerConfig\).*older Heimdall version.*"
                                              r"fix: re-train it \(python -m tuning\.train\) or re-run the study"):
        LocalizationModule.from_checkpoint(path)


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("epoch,val/loss\n0,1.5\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("report.json", "{}")
    elif kind == "truncated":
        _module().write_checkpoint(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("text", "not a PyTorch checkpoint"),
    ("random", "not a PyTorch checkpoint"),
    ("empty", "not a PyTorch checkpoint"),
    ("zip", "not a readable PyTorch checkpoint"),
    ("truncated", "not a PyTorch checkpoint"),
    ("list", "holds a list, not a checkpoint dict"),
    ("foreign", "holds no LocalizationModule hyperparameters"),
])
def test_files_that_are_not_our_checkpoints_are_one_clear_error(tmp_path: Path, kind: str, message: str) -> None:
    path = _write(tmp_path, kind)
    with pytest.raises(CheckpointError, match=message) as err:
        LocalizationModule.from_checkpoint(path)
    _assert_one_line(err.value)


def test_hyperparameters_that_no_longer_build_a_model_are_one_clear_error(tmp_path: Path) -> None:
    module = _module()
    hparams = {**dict(module.hparams), "optimizer_config": {**module.hparams["optimizer_config"], "momentum": 0.9}}
    path = tmp_path / "renamed.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    with pytest.raises(CheckpointError, match="do not build a model in this version.*unknown key 'momentum'") as err:
        LocalizationModule.from_checkpoint(path)
    _assert_one_line(err.value)


@dataclass
class _Opaque:
    value: float = 1.0


class _StatefulCallback(pl.Callback):
    def __init__(self, state: object) -> None:
        self.state = state

    def state_dict(self) -> dict[str, object]:
        return {"state": self.state}


def _batches(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    rows = [{"features": torch.randn(7, 128, 32, generator=g), "mask": torch.ones(7, dtype=torch.bool),
             "target": torch.rand(2, generator=g) - 0.5} for _ in range(n)]
    return DataLoader(rows, batch_size=16)


def _trainer(callbacks: list[pl.Callback], **kw: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kw)


def _fit(schedule: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    opt = OptimizerConfig(lr=1e-2, batch_size=16, max_epochs=2, warmup=0.5, schedule=schedule)
    module = LocalizationModule(build_model("resnet", TINY), LossConfig(mse_warmup_epochs=0), opt)
    trainer = _trainer(callbacks)
    trainer.fit(module, _batches(64, 0), _batches(16, 1))
    return trainer


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_lightning_checkpoints_of_our_training_load_as_plain_data(tmp_path: Path, schedule: str) -> None:
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/nll_km", mode="min", save_last=True)
    # numpy values and paths in callback state are what a metrics callback easily leaves behind.
    extra = _StatefulCallback({"score": np.float32(1.5), "where": tmp_path, "arr": np.arange(3)})
    trainer = _fit(schedule, [best, extra])
    for path in (Path(best.best_model_path), Path(best.last_model_path)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "hyper_parameters", "loops", "callbacks", "optimizer_states", "lr_schedulers",
                "pytorch-lightning_version"} <= set(ckpt)
        state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("_StatefulCallback"))["state"]
        assert state["score"] == 1.5 and state["where"] == str(tmp_path) and torch.equal(state["arr"], torch.arange(3))
        restored = LocalizationModule.from_checkpoint(path)
        assert restored.hparams["optimizer_config"]["schedule"] == schedule
    # Resuming from the final checkpoint (what a retried Ray trial does) restores loops, optimizer and
    # schedule from the file read as data.
    resumed = _trainer([], enable_checkpointing=False)
    module = LocalizationModule.from_hparams(dict(trainer.lightning_module.hparams))
    resumed.fit(module, _batches(64, 0), _batches(16, 1), ckpt_path=best.last_model_path, weights_only=True)
    assert resumed.global_step == trainer.global_step == 8


def test_a_checkpoint_that_would_need_unpickling_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\].*\['state'\] holds a .*_Opaque.*weights_only=True"):
        _fit("cosine", [pl.callbacks.ModelCheckpoint(dirpath=tmp_path), _StatefulCallback(_Opaque())])
    assert not list(tmp_path.glob("*.ckpt"))


def test_write_checkpoint_round_trips_under_weights_only(tmp_path: Path) -> None:
    module = _module()
    module.calibrate(1.3)
    path = module.write_checkpoint(tmp_path / "calibrated.ckpt")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"hyper_parameters", "state_dict"}
    restored = LocalizationModule.from_checkpoint(path).eval()
    x = torch.randn(2, 7, 128, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module.eval()(x))
    assert float(restored.covariance_scale) == pytest.approx(1.3)


def test_plain_checkpoint_converts_numpy_and_paths_and_names_the_rest() -> None:
    data = {"a": [np.int64(3), (np.float64(0.5), Path("/x"))], "t": torch.ones(1), "s": torch.Size([2])}
    plain = plain_checkpoint(data)
    assert plain is data and data["a"] == [3, (0.5, "/x")] and type(data["a"][0]) is int
    assert type(data["s"]) is torch.Size
    with pytest.raises(TypeError, match=r"checkpoint\['b'\]\[1\] holds a .*_Opaque"):
        plain_checkpoint({"b": [1, _Opaque()]})
    with pytest.raises(TypeError, match="key of type"):
        plain_checkpoint({object(): 1})
