"""docs/onnx-contract.md stays true: its tables against an exported file and the constants of the code."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from heimdall.features import FeatureConfig
from heimdall.receivers import STATIONS
from tests.tuning.mlflow_fixtures import TinyExport, tiny_export
from tuning.release.onnx import _REQUIRED_KEYS, CONFIDENCE_1SIGMA, INPUT_NAMES, K_95, OUTPUT_NAMES, ModelMetadata
from tuning.release.publish import CONTRACT_VERSION, MODELS_BUCKET, model_key
from tuning.release.registry import CHAMPION_ALIAS, REGISTERED_MODEL

DOC = Path(__file__).resolve().parents[2] / "docs" / "onnx-contract.md"
TEXT = DOC.read_text(encoding="utf-8")
TENSOR_ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| \(([^)]*)\) \|", re.M)
KEY_ROW = re.compile(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", re.M)


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start:end if end > 0 else None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("title", ["Inputs", "Outputs"])
def test_the_tensor_tables_are_the_exported_graphs(title: str, exported: TinyExport) -> None:
    import onnx

    model = onnx.load(str(exported.onnx))
    names, values = (INPUT_NAMES, model.graph.input) if title == "Inputs" else (OUTPUT_NAMES, model.graph.output)
    rows = TENSOR_ROW.findall(_section(title))
    assert [r[0] for r in rows] == list(names) == [v.name for v in values]
    for (name, dtype, shape), value in zip(rows, values):
        t = value.type.tensor_type
        assert dtype == onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, name
        dims = ["B" if d.dim_param else str(d.dim_value) for d in t.shape.dim]
        assert [s.strip() for s in shape.split(",") if s.strip()] == dims, name


def test_every_metadata_key_is_documented_and_the_required_ones_say_so(exported: TinyExport) -> None:
    written = ModelMetadata.from_file(exported.onnx).values
    rows = dict(KEY_ROW.findall(_section("Metadata")))
    assert set(rows) == set(written)
    assert {k for k, meaning in rows.items() if meaning.strip().startswith("required.")} == set(_REQUIRED_KEYS)
    for field in dataclasses.fields(FeatureConfig):
        assert f"`{field.name}`" in rows["feature_config"], field.name
    assert f"{CONFIDENCE_1SIGMA:.4f}" in rows["ellipse_confidence"]
    assert f"k = {K_95:.3f}" in _section("Outputs")


def test_names_in_the_registry_and_the_store_are_the_codes() -> None:
    import mlflow.onnx

    where = _section("Where the model is")
    assert f"`{REGISTERED_MODEL}`" in where and f"alias `{CHAMPION_ALIAS}`" in where
    assert f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}" in where
    assert f"`{mlflow.onnx._MODEL_DATA_SUBPATH}`" in where  # the file name inside a version's folder
    assert f"bucket `{MODELS_BUCKET}`" in where and model_key("1.2.3").replace("1.2.3", "{version}") in where


def test_contract_version_and_receivers_are_the_codes() -> None:
    major, minor = CONTRACT_VERSION
    assert TEXT.splitlines()[0].endswith(f"(contract {major}.{minor})")
    assert f"describes contract {major}.{minor}" in _section("Versioning")
    receivers = TEXT[TEXT.index("never by number):"):TEXT.index("\n## Versioning")]
    listed = re.findall(r"`(\w+)`\s+([^,`.]+?)(?:,|\.)", receivers)
    assert [(i, " ".join(n.split())) for i, n in listed] == [(s.id, s.name) for s in STATIONS]
