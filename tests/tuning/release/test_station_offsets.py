"""Station offsets travel with a model: checkpoint, ONNX metadata, and `tuning.predict`'s features."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heimdall.features import FeatureConfig, spectrogram_numpy
from heimdall.module import LocalizationModule
from heimdall.receivers import STATION_IDS
from tests.tuning.mlflow_fixtures import tiny_module
from tuning.release.onnx import ModelMetadata, build_metadata, export_onnx, onnx_session
from tuning.release.predict import main as predict_main

OFFSETS = (4.0, -3.0, 0.5, 9.0, -7.5, 2.0, -1.0)
HEARD = ("giaveno", "torino", "coazze", "genova")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny module whose features were computed with non-zero station offsets, saved and exported."""
    folder = tmp_path_factory.mktemp("offsets-export")
    module = tiny_module(seed=3)
    module = LocalizationModule(module.model, module.loss_config, module.optimizer_config, module.target_scaling,
                                FeatureConfig(station_offsets_db=OFFSETS))
    module.calibrate(1.7)
    checkpoint = module.eval().write_checkpoint(folder / "offsets.ckpt")
    return checkpoint, export_onnx(module, folder / "model.onnx", build_metadata(module))


def _session(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    folder = root / "sessions" / "s1"
    folder.mkdir(parents=True)
    iq = np.zeros((len(STATION_IDS), 4096), np.complex64)
    heard = np.zeros(len(STATION_IDS), bool)
    for i, sid in enumerate(HEARD):
        x = ((rng.normal(size=4096) + 1j * rng.normal(size=4096)) * 10 ** (-(i + 1) / 2)).astype(np.complex64)
        np.save(folder / f"websdr_{sid}.npy", x)
        iq[STATION_IDS.index(sid)], heard[STATION_IDS.index(sid)] = x, True
    (folder / "metadata.json").write_text(json.dumps({"sample_rate_hz": 12_000.0, "frequency_hz": 145.5e6}))
    return folder, iq, heard


def test_checkpoint_and_onnx_metadata_carry_the_offsets(exported: tuple[Path, Path]) -> None:
    checkpoint, onnx_path = exported
    assert LocalizationModule.from_checkpoint(checkpoint).feature_config.station_offsets_db == OFFSETS
    meta = ModelMetadata.from_file(onnx_path)
    assert meta.feature_config == FeatureConfig(station_offsets_db=OFFSETS)
    assert meta.feature_config.station_offsets_db == OFFSETS


def test_predict_computes_features_with_the_models_offsets(exported: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, onnx_path = exported
    folder, iq, heard = _session(tmp_path)
    assert predict_main(["--model", str(onnx_path), str(folder)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    session = onnx_session(onnx_path)

    def position(config: FeatureConfig) -> np.ndarray:
        feats = spectrogram_numpy(iq[None], config, heard[None])
        return session.run(["position"], {"features": feats, "mask": heard[None]})[0][0]

    with_offsets, without = position(FeatureConfig(station_offsets_db=OFFSETS)), position(FeatureConfig())
    assert (row["lat"], row["lon"]) == pytest.approx(tuple(map(float, with_offsets)), abs=1e-9)
    assert not np.allclose(with_offsets, without, atol=1e-6)  # the offsets do reach the network
