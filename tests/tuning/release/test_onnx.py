"""ONNX export: the in-graph ellipse, the self-describing file, the parity gate, refused checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from heimdall.errors import ConfigError, DataError
from heimdall.features import FeatureConfig
from heimdall.metrics import covariance_from_sigmas, ellipse_from_covariance
from heimdall.module import CheckpointError
from heimdall.receivers import STATION_IDS
from tests.tuning.mlflow_fixtures import TinyExport, save_checkpoint, tiny_export, tiny_module
from tuning.release.onnx import (
    CONFIDENCE_1SIGMA,
    OUTPUT_NAMES,
    ExportedLocalizer,
    GateFailed,
    HeldOut,
    ModelMetadata,
    ParityTolerances,
    content_sha256,
    ellipse_torch,
    file_sha256,
    load_checkpoint,
    onnx_session,
    run_onnx,
    verify_parity,
    with_model_version,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def held() -> HeldOut:
    rng = np.random.default_rng(1)
    n = 24
    return HeldOut(np.arange(100, 100 + n), rng.normal(0.0, 1.5, (n, 7, 128, 32)).astype(np.float16),
                   rng.random((n, 7)) > 0.3, 45.0 + rng.normal(0, 0.3, n), 8.2 + rng.normal(0, 0.5, n),
                   FeatureConfig(), dataset="unit", split="test")


def _circular_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 180.0
    return np.minimum(d, 180.0 - d)


def test_ellipse_in_torch_equals_the_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    se, sn = np.exp(rng.uniform(-4, 4, n)), np.exp(rng.uniform(-4, 4, n))
    rho = rng.uniform(-0.95, 0.95, n)
    se[:100] = sn[:100]  # circles and equal-sigma correlated ellipses
    rho[:50] = 0.0
    rho[200:300] = 0.0  # axis-aligned
    rho[300:320] = 0.95
    major, minor, rot = ellipse_from_covariance(covariance_from_sigmas(se, sn, rho), k=2.0)
    t = [torch.tensor(x, dtype=torch.float32) for x in (se, sn, rho)]
    tmaj, tmin, trot = (x.double().numpy() for x in ellipse_torch(*t, k=2.0))
    np.testing.assert_allclose(tmaj, major, rtol=2e-6)
    np.testing.assert_allclose(tmin, minor, rtol=2e-6)
    defined = major - minor > 1e-3 * major
    assert _circular_diff(trot, rot)[defined].max() < 1e-3
    assert (trot[:50] == 0).all() and ((trot >= 0) & (trot < 180)).all()
    # North-south elongated: rotation 0; east-west: 90 (the bearing convention).
    r = ellipse_torch(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), torch.zeros(2))[2]
    assert r.tolist() == [0.0, 90.0]


def test_diagonal_head_exports_zero_rho() -> None:
    module = tiny_module(head="diag")
    x, m = torch.randn(3, 7, 128, 32), torch.ones(3, 7, dtype=torch.bool)
    with torch.no_grad():
        position, sigma, rho, ellipse = ExportedLocalizer(module)(x, m)
    assert rho.tolist() == [0.0, 0.0, 0.0]
    expected = np.where(sigma[:, 0] >= sigma[:, 1], 90.0, 0.0)
    np.testing.assert_allclose(ellipse[:, 2].numpy(), expected)
    np.testing.assert_allclose(ellipse[:, 0].numpy(), sigma.max(dim=1).values.numpy(), rtol=1e-6)


def test_the_file_describes_itself(exported: TinyExport) -> None:
    model = onnx.load(str(exported.onnx))
    meta = ModelMetadata.from_model(model)
    module = load_checkpoint(exported.checkpoint)
    assert meta.feature_config == module.feature_config
    assert meta.receivers == STATION_IDS
    assert meta.frame_origin == (module.target_scaling.origin_lat, module.target_scaling.origin_lon)
    assert meta.covariance_scale == pytest.approx(1.7)
    assert meta.model_version == "" and meta.ellipse_confidence == pytest.approx(CONFIDENCE_1SIGMA)
    for key in ("target_scaling", "search_space", "arch", "model_config", "loss_config", "created",
                "git_revision", "heimdall_version"):
        assert key in meta.values
    assert [i.name for i in model.graph.input] == ["features", "mask"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    batch_dims = [i.type.tensor_type.shape.dim[0] for i in model.graph.input]
    assert all(d.dim_param and not d.dim_value for d in batch_dims)  # dynamic batch
    assert not list(exported.onnx.parent.glob("*.data"))  # weights inside the one file
    ops = {n.op_type for n in model.graph.node}
    assert "ReduceLogSumExp" not in ops and {"ReduceMax", "Exp", "ReduceSum"} <= ops  # the faster, stable form
    assert b"tuning/release/onnx.py" not in exported.onnx.read_bytes()  # no stack traces with local paths


def test_onnx_equals_torch_at_any_batch_size(exported: TinyExport, held: HeldOut) -> None:
    module = load_checkpoint(exported.checkpoint)
    session = onnx_session(exported.onnx)
    for batch in (1, 7):
        x = held.features[:batch].astype(np.float32)
        outputs = run_onnx(session, x, held.mask[:batch])
        with torch.no_grad():
            reference = ExportedLocalizer(module)(torch.from_numpy(x), torch.from_numpy(held.mask[:batch]))
        for name, ref in zip(OUTPUT_NAMES, reference):
            assert outputs[name].shape == tuple(ref.shape)
        np.testing.assert_allclose(outputs["sigma"], reference[1].numpy(), rtol=1e-4)
    s, rho = outputs["sigma"].astype(np.float64), outputs["rho"].astype(np.float64)
    major, minor, rot = ellipse_from_covariance(covariance_from_sigmas(s[:, 0], s[:, 1], rho))
    np.testing.assert_allclose(outputs["ellipse"][:, 0], major, rtol=1e-5)
    np.testing.assert_allclose(outputs["ellipse"][:, 1], minor, rtol=1e-5)
    assert _circular_diff(outputs["ellipse"][:, 2], rot).max() < 1e-2


def test_parity_gate_passes_for_a_faithful_export(exported: TinyExport, held: HeldOut) -> None:
    report = verify_parity(load_checkpoint(exported.checkpoint), exported.onnx, held)
    assert report.passed, report.text()
    assert report.n == len(held) and report.failures == []
    assert report.max_diff["position_m"] <= ParityTolerances().position_m
    assert report.metrics_onnx["median_km"] == pytest.approx(report.metrics_torch["median_km"], abs=1e-3)
    assert report.heldout_sha256 == held.digest()
    assert "PASSED" in report.text()


def test_a_perturbed_model_fails_the_gate(exported: TinyExport, held: HeldOut, tmp_path: Path) -> None:
    model = onnx.load(str(exported.onnx))
    # The last linear layer's bias: its first two entries are the mean east/north.
    bias = next(t for t in reversed(model.graph.initializer) if numpy_helper.to_array(t).shape == (5,))
    bad = numpy_helper.to_array(bias).copy()
    bad[:2] += 0.05  # 5 km: far beyond the tolerance, small enough to look plausible
    bias.CopyFrom(numpy_helper.from_array(bad, bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    report = verify_parity(load_checkpoint(exported.checkpoint), tampered, held)
    assert not report.passed
    assert any(f.startswith("position differs") for f in report.failures)
    assert any(f.startswith("metric ") for f in report.failures), report.failures
    with pytest.raises(GateFailed, match="registration refused") as err:
        raise GateFailed(report, "parity.json")
    assert "FAIL position" in str(err.value) and err.value.report is report


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path: Path) -> None:
    from tuning.study.spaces import TrialConfigs

    module = tiny_module()
    state = module.state_dict()
    wider = tiny_module()
    hparams = dict(wider.hparams)
    hparams["model_config"] = {**hparams["model_config"], "width": 8}
    bad = tmp_path / "bad.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": state}, bad)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(bad)
    good = save_checkpoint(module, tmp_path / "good.ckpt")
    other = TrialConfigs("resnet", module.model.config.__class__(stage_depths=(1,), width=8, stem_channels=1,
                                                                  head_hidden=8, head="full"),
                         module.loss_config, module.optimizer_config)
    with pytest.raises(ConfigError, match=r"model config differs .*width: saved 4 vs expected 8"):
        load_checkpoint(good, expected=other)
    with pytest.raises(ConfigError, match="feature config differs"):
        load_checkpoint(good, feature_config=FeatureConfig(db_scale=10.0))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "ray").mkdir()
    save_checkpoint(module, tmp_path / "ray" / "checkpoint.ckpt")
    assert load_checkpoint(tmp_path / "ray").hparams["arch"] == "resnet"  # a Train checkpoint directory
    with pytest.raises(CheckpointError, match="holds 2 .ckpt files"):
        load_checkpoint(tmp_path)


def test_model_version_changes_the_file_not_its_content(exported: TinyExport, tmp_path: Path) -> None:
    versioned = with_model_version(exported.onnx, tmp_path / "localization-v0.1.0.onnx", "0.1.0")
    assert ModelMetadata.from_file(versioned).model_version == "0.1.0"
    assert file_sha256(versioned) != file_sha256(exported.onnx)
    assert content_sha256(versioned) == content_sha256(exported.onnx)


def test_a_foreign_onnx_file_is_named_as_such(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(DataError, match="lacks the Heimdall metadata"):
        ModelMetadata.from_file(path)


def test_heldout_round_trips_and_names_its_recordings(held: HeldOut, tmp_path: Path) -> None:
    held.save(tmp_path / "heldout.npz")
    back = HeldOut.load(tmp_path / "heldout.npz")
    assert back.digest() == held.digest()
    np.testing.assert_array_equal(back.features, held.features)
    assert back.feature_config == held.feature_config
    with pytest.raises(DataError, match="empty"):
        HeldOut(np.arange(0), held.features[:0], held.mask[:0], np.zeros(0), np.zeros(0), FeatureConfig())
    with pytest.raises(DataError, match="not a held-out file"):
        (tmp_path / "x.npz").write_bytes(b"nope")
        HeldOut.load(tmp_path / "x.npz")
    assert json.loads(json.dumps(ParityTolerances().to_dict()))["position_m"] == 2.0
