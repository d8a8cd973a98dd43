"""The champion is chosen on the validation split; the test split is only reported.

Two candidates whose ranking flips between validation and test: the decision follows validation, both ways.
The same decision with the test split's labels replaced by NaN: unchanged, while the report shows the NaN.
Real MLflow (the embedded SQLite store), real onnxruntime.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from heimdall.data import HeimdallDataset
from tests.tuning.mlflow_fixtures import save_checkpoint, tiny_export
from tuning.release.onnx import HeldOut, load_checkpoint
from tuning.release.registry import CHAMPION_ALIAS, REGISTERED_MODEL, StudyRecord, TrialRecord
from tuning.release.stage import (
    SELECTION_SPLIT,
    ExportRequest,
    RegistrySettings,
    export_and_register,
    register_export,
)


def _splits(val_favours, test_favours, n: int = 24) -> dict[str, HeimdallDataset]:
    """Random features; val truths lie 2 km from ``val_favours``'s predictions, test truths from ``test_favours``'s."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    for i, (split, module) in enumerate((("train", val_favours), ("val", val_favours), ("test", test_favours))):
        x = torch.randn(n, 7, 128, 32, generator=gen) * 1.5
        mask = torch.rand(n, 7, generator=gen) > 0.2
        with torch.no_grad():
            mean_km, _ = module.predict_gaussian(x.to(torch.float16).float(), mask)
        target = (mean_km.float() + 2.0 * torch.randn(n, 2, generator=gen)) / module.target_scaling.target_scale_km
        out[split] = HeimdallDataset(x, mask, target, np.arange(i * 1000, i * 1000 + n))
    return out


def _shifted(module, east_units: float):
    with torch.no_grad():
        module.model.head[-1].bias[0] += east_units
    return module


def _study(name: str) -> StudyRecord:
    return StudyRecord(name, (TrialRecord("t0", {"model.width": 4}, ({"epoch": 1, "val/nll_km": 5.0},)),),
                       best_trial_id="t0", objective="val/nll_km")


def _card(export_dir: Path) -> dict:
    return json.loads((export_dir / "model_card.json").read_text())


def _blind_copy(export_dir: Path, dst: Path) -> Path:
    """The export with NaN test labels and NaN test metrics (the model file, hence the gate, unchanged)."""
    shutil.copytree(export_dir, dst)
    held = HeldOut.load(dst / "heldout.npz")
    nan = np.full(len(held), np.nan)
    dataclasses.replace(held, truth_lat=nan, truth_lon=nan).save(dst / "heldout.npz")
    parity = json.loads((dst / "parity.json").read_text())
    parity["metrics_onnx"] = {k: math.nan for k in parity["metrics_onnx"]}
    (dst / "parity.json").write_text(json.dumps(parity))
    return dst


def test_the_champion_follows_validation_and_never_reads_the_test_split(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow import MlflowClient

    a_ckpt = tiny_export(tmp_path_factory.getbasetemp()).checkpoint
    a = load_checkpoint(a_ckpt)
    b = _shifted(load_checkpoint(a_ckpt), 0.3)
    b_ckpt = save_checkpoint(b, tmp_path / "b.ckpt")
    splits = _splits(val_favours=a, test_favours=b)
    settings = RegistrySettings.resolve(tmp_path / "one", models_store=str(tmp_path / "one" / "models"))

    first = export_and_register(ExportRequest(b_ckpt, splits, tmp_path / "b", _study("b"), settings))
    assert (first.champion, first.comparison["reason"]) == (True, "no champion yet")
    second = export_and_register(ExportRequest(a_ckpt, splits, tmp_path / "a", _study("a"), settings))

    card_a, card_b = _card(tmp_path / "a"), _card(tmp_path / "b")
    test_a, test_b = (c["metrics"]["held_out_onnxruntime"]["median_km"] for c in (card_a, card_b))
    val_a, val_b = (c["selection"]["metrics_onnxruntime"]["median_km"] for c in (card_a, card_b))
    assert test_b < test_a / 3 and val_a < val_b / 3  # the two splits disagree, clearly
    assert card_a["selection"]["split"] == SELECTION_SPLIT == "val"
    assert card_a["held_out"]["split"] == "test" and card_a["held_out"]["use"].startswith("report only")

    c = second.comparison
    assert (second.champion, c["decision"], c["split"]) == (True, "promoted", "val")
    assert c["selection_sha256"] == card_a["selection"]["recordings_sha256"] and c["n"] == len(splits["val"])
    assert c["new"]["value"] == pytest.approx(val_a) and c["champion"]["value"] == pytest.approx(val_b, rel=1e-4)
    assert c["champion"]["how"] == "recomputed with onnxruntime"

    again = register_export(tmp_path / "b", settings)  # B wins on test, loses on validation: kept
    assert (again.champion, again.comparison["decision"]) == (False, "kept")
    assert "val recordings" in again.comparison["reason"]

    client = MlflowClient(settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version) == second.mlflow_version
    tags = client.get_model_version(REGISTERED_MODEL, second.mlflow_version).tags
    assert tags["heimdall.selection_split"] == "val"
    assert float(tags["heimdall.selection_median_km"]) == pytest.approx(val_a)
    assert float(tags["heimdall.report_only.test_median_km"]) == pytest.approx(test_a)
    assert not [k for k in tags if "test" in k and "report_only" not in k]
    contract = (Path(__file__).resolve().parents[3] / "docs" / "onnx-contract.md").read_text(encoding="utf-8")
    assert [k for k in tags if f"`{k}`" not in contract] == []  # the serving contract lists every version tag
    metrics = client.get_run(second.release_run_id).data.metrics
    assert metrics["selection/val_median_km"] == pytest.approx(val_a)
    assert metrics["report_only/test_median_km"] == pytest.approx(test_a)

    # The same two releases in a fresh registry, the test split's labels now NaN: the same decision.
    other = RegistrySettings.resolve(tmp_path / "two", models_store=str(tmp_path / "two" / "models"))
    register_export(tmp_path / "b", other)
    blind = register_export(_blind_copy(tmp_path / "a", tmp_path / "a-nan-test"), other)
    assert (blind.champion, blind.mlflow_version) == (True, second.mlflow_version)
    assert blind.comparison == second.comparison
    client = MlflowClient(other.mlflow_uri, registry_uri=other.mlflow_uri)
    tags = client.get_model_version(REGISTERED_MODEL, blind.mlflow_version).tags
    assert tags["heimdall.report_only.test_median_km"] == "nan"  # the report shows what the test split holds
    assert float(tags["heimdall.selection_median_km"]) == pytest.approx(val_a)
    assert math.isnan(client.get_run(blind.release_run_id).data.metrics["report_only/test_median_km"])
