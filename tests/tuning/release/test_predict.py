"""`python -m tuning.predict`: recordings in, JSON out; the model from a file or the registry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heimdall.features import spectrogram_numpy
from heimdall.receivers import STATION_IDS
from tests.tuning.mlflow_fixtures import TinyExport, tiny_export
from tuning.release.onnx import K_95, ModelMetadata, onnx_session
from tuning.release.predict import main as predict_main

HEARD = ("torino", "milano", "genova", "giaveno")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory.getbasetemp())


def _session(root: Path, name: str, seed: int, stations: tuple[str, ...] = HEARD, rate: float = 12_000.0,
             n: int = 4096, snr: dict[str, float] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "sessions" / name
    folder.mkdir(parents=True)
    for i, sid in enumerate(stations):
        iq = (rng.normal(size=n) + 1j * rng.normal(size=n)) * 10 ** (-(i + 1) / 2)
        np.save(folder / f"websdr_{sid}.npy", iq.astype(np.complex64))
    measurements = {sid: {"snr_db": v} for sid, v in (snr or {}).items()}
    (folder / "metadata.json").write_text(json.dumps({"sample_rate_hz": rate, "frequency_hz": 145.5e6,
                                                      "measurements": measurements}))
    return folder


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict], str]:
    code = predict_main(args)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _expected(model: Path, folder: Path, stations: tuple[str, ...]) -> list[np.ndarray]:
    """What the file computes for the session, done by hand."""
    meta = ModelMetadata.from_file(model)
    iq = np.zeros((7, 4096), np.complex64)
    heard = np.zeros(7, bool)
    for sid in stations:
        iq[STATION_IDS.index(sid)] = np.load(folder / f"websdr_{sid}.npy")
        heard[STATION_IDS.index(sid)] = True
    feats = spectrogram_numpy(iq[None], meta.feature_config, heard[None])
    return onnx_session(model).run(None, {"features": feats, "mask": heard[None]})


def test_prints_one_json_line_per_recording(exported: TinyExport, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _session(tmp_path, "a", 1), _session(tmp_path, "b", 2, stations=("montanaro", "giovi"))
    code, rows, err = _run(["--model", str(exported.onnx), str(a), str(b)], capsys)
    assert code == 0, err
    assert [r["recording"] for r in rows] == [str(a), str(b)]
    position, sigma, rho, ellipse = _expected(exported.onnx, a, HEARD)
    row = rows[0]
    assert (row["lat"], row["lon"]) == pytest.approx((float(position[0, 0]), float(position[0, 1])), abs=1e-9)
    assert row["ellipse"]["semi_major_m"] == pytest.approx(float(ellipse[0, 0]))
    assert row["ellipse"]["rotation_deg"] == pytest.approx(float(ellipse[0, 2]))
    assert row["ellipse"]["confidence"] == pytest.approx(0.3935, abs=1e-4) and row["ellipse"]["k"] == 1.0
    assert row["sigma_m"]["east"] == pytest.approx(float(sigma[0, 0])) and row["rho"] == pytest.approx(float(rho[0]))
    assert row["receivers_heard"] == [s for s in STATION_IDS if s in HEARD]
    assert row["model_version"] == "unreleased" and row["inference_ms"] > 0
    assert rows[1]["receivers_heard"] == ["montanaro", "giovi"]


def test_the_95_percent_ellipse_is_the_1_sigma_one_scaled(exported: TinyExport, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = _session(tmp_path, "a", 1)
    _, (one,), _ = _run(["--model", str(exported.onnx), str(folder)], capsys)
    _, (ninety_five,), _ = _run(["--model", str(exported.onnx), "--confidence", "95", str(folder)], capsys)
    assert ninety_five["ellipse"]["semi_major_m"] == pytest.approx(one["ellipse"]["semi_major_m"] * K_95)
    assert ninety_five["ellipse"]["confidence"] == 0.95
    assert (ninety_five["lat"], ninety_five["ellipse"]["rotation_deg"]) == (one["lat"], one["ellipse"]["rotation_deg"])


def test_npy_files_form_one_recording(exported: TinyExport, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _session(tmp_path, "a", 1)
    files = [str(folder / f"websdr_{sid}.npy") for sid in HEARD]
    _, (from_folder,), _ = _run(["--model", str(exported.onnx), str(folder)], capsys)
    code, (from_files,), err = _run(["--model", str(exported.onnx), *files], capsys)
    assert code == 0, err
    assert (from_files["lat"], from_files["lon"]) == (from_folder["lat"], from_folder["lon"])


def test_a_receiver_below_the_snr_threshold_is_not_heard(exported: TinyExport, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = _session(tmp_path, "a", 1, snr={"torino": -20.0})
    _, (row,), _ = _run(["--model", str(exported.onnx), str(folder)], capsys)
    assert "torino" not in row["receivers_heard"] and "milano" in row["receivers_heard"]


@pytest.mark.parametrize(("case", "message"), [
    ("unknown receiver", "not a receiver of this model"),
    ("sample rate", "sample rate must be 12000 Hz, got 48000"),
    ("too short", "needs at least 4096 samples"),
    ("npy sample rate", "the model needs 12000 Hz"),
    ("twice", "is given twice"),
])
def test_bad_recordings_are_refused_with_the_reason(case: str, message: str, exported: TinyExport, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", str(exported.onnx)]
    if case == "unknown receiver":
        args.append(str(_session(tmp_path, "x", 1, stations=("torino", "bologna"))))
    elif case == "sample rate":
        args.append(str(_session(tmp_path, "x", 1, rate=48_000.0)))
    elif case == "too short":
        args.append(str(_session(tmp_path, "x", 1, n=2000)))
    elif case == "npy sample rate":
        args += ["--sample-rate-hz", "48000", str(_session(tmp_path, "x", 1) / "websdr_torino.npy")]
    else:
        folder = _session(tmp_path, "x", 1)
        args += [str(folder / "websdr_torino.npy"), str(folder / "websdr_torino.npy")]
    code, rows, err = _run(args, capsys)
    assert (code, rows) == (1, [])
    assert err.startswith("error: ") and message in err


def test_a_missing_model_or_recording_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _session(tmp_path, "a", 1)
    code, _, err = _run(["--model", str(tmp_path / "nope.onnx"), str(folder)], capsys)
    assert code == 1 and "does not exist" in err
    with pytest.raises(SystemExit) as exit_:
        predict_main(["--model", str(tmp_path / "nope.onnx"), str(tmp_path / "missing")])
    assert exit_.value.code == 2


def test_a_registry_uri_loads_the_registered_file(exported: TinyExport, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``models:/NAME@ALIAS`` through the embedded SQLite registry gives what the file gives."""
    from tuning.release.registry import REGISTERED_MODEL, TAG, Registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(uri, artifact_root=tmp_path / "mlruns")
    run = registry.release_run(registry.experiment("unit"), "unit", None, {})
    registry.log_release(run, onnx_path=exported.onnx, files=[], plots=[], manifest=None,
                         tags={f"{TAG}content_sha256": "unit"})
    version = registry.register(run, {f"{TAG}content_sha256": "unit"})
    registry.set_champion(version.version)
    folder = _session(tmp_path, "a", 1)
    _, (local,), _ = _run(["--model", str(exported.onnx), str(folder)], capsys)
    code, (remote,), err = _run(["--model", f"models:/{REGISTERED_MODEL}@champion", "--mlflow-uri", uri, str(folder)], capsys)
    assert code == 0, err
    assert (remote["lat"], remote["lon"], remote["ellipse"]) == (local["lat"], local["lon"], local["ellipse"])
    assert remote["model"] == f"models:/{REGISTERED_MODEL}@champion (version {version.version})"
    code, _, err = _run(["--model", f"models:/{REGISTERED_MODEL}@nope", "--mlflow-uri", uri, str(folder)], capsys)
    assert code == 1 and "does not exist in the registry" in err
