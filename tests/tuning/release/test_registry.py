"""Publication and MLflow registration: versions, idempotence, the champion rule, a server that is down,
and the whole chain against a real ``mlflow server`` (PostgreSQL + S3) and the real S3 server."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from heimdall.data import HeimdallDataset
from heimdall.errors import AlreadyExistsError, ConfigError, DataError, ServiceUnavailableError
from heimdall.store import LocalStore, S3Settings
from heimdall.store.s3 import S3Store
from tests.tuning.mlflow_fixtures import MlflowServer, mlflow_server, save_checkpoint, tiny_export  # noqa: F401
from tuning.ops.services import free_ports
from tuning.register import main as register_main
from tuning.release.onnx import GateFailed, ModelMetadata, ParityReport, ParityTolerances, file_sha256, load_checkpoint
from tuning.release.publish import (
    FIRST_VERSION,
    MODELS_BUCKET,
    _put_once,
    next_version,
    parse_version,
    publish,
    released_versions,
)
from tuning.release.registry import CHAMPION_ALIAS, REGISTERED_MODEL, Registry, StudyRecord, TrialRecord
from tuning.release.stage import ExportRequest, RegistrySettings, export_and_register, register_export

# -- versions and settings ------------------------------------------------------------------------------


def test_versions_start_at_0_1_0_and_bump_the_patch() -> None:
    assert next_version([]) == FIRST_VERSION == "0.1.0"
    assert next_version(["0.1.0", "0.1.9", "0.1.10"]) == "0.1.11"
    assert next_version(["0.2.0", "0.1.7"]) == "0.2.1"
    assert next_version(["0.1.7"], contract=(1, 0)) == "1.0.0"  # a new serving contract starts at .0
    assert parse_version("1.2.3") == (1, 2, 3)
    with pytest.raises(ConfigError, match="MAJOR.MINOR.PATCH"):
        parse_version("v1.2")


def test_defaults_are_embedded_and_overridable(tmp_path: Path) -> None:
    def resolved(mlflow_uri: str | None = None, models_store: str | None = None, **env: str) -> RegistrySettings:
        return RegistrySettings.resolve(tmp_path, mlflow_uri, models_store, environ=env)

    d = tmp_path.resolve()
    assert resolved().mlflow_uri == f"sqlite:///{d / 'mlflow.db'}"
    assert resolved(MLFLOW_TRACKING_URI="http://h:5000").mlflow_uri == "http://h:5000"
    assert resolved("http://flag:1", MLFLOW_TRACKING_URI="http://h:5000").mlflow_uri == "http://flag:1"
    assert resolved().models_store == str(d / "models")
    assert resolved(HEIMDALL_S3_ENDPOINT="http://s3:8333").models_store == f"s3://{MODELS_BUCKET}"
    assert resolved(models_store="s3://other", HEIMDALL_S3_ENDPOINT="x").models_store == "s3://other"


def test_an_unreachable_server_fails_fast_with_the_fix() -> None:
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="unreachable") as err:
        Registry(uri)
    assert time.monotonic() - started < 10.0
    assert uri in str(err.value) and "--mlflow-uri" in str(err.value)


# -- publication --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_publishing_is_idempotent_and_never_overwrites(backend: str, request: pytest.FixtureRequest,
                                                       tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import onnx

    store = request.getfixturevalue("local_store" if backend == "local" else "s3_store")
    exported = tiny_export(tmp_path_factory.getbasetemp())
    first = publish(store, exported.onnx, {"metrics": {"median_km": 1.0}}, tmp_path)
    assert (first.version, first.reused) == ("0.1.0", False)
    assert store.get(first.model_key) == Path(first.local_path).read_bytes()
    card = json.loads(store.get(first.card_key))
    assert card["model_version"] == "0.1.0" and card["sha256"] == first.sha256 == file_sha256(first.local_path)
    assert ModelMetadata.from_file(first.local_path).model_version == "0.1.0"

    again = publish(store, exported.onnx, {"metrics": {"median_km": 2.0}}, tmp_path)
    assert (again.version, again.reused, again.sha256) == ("0.1.0", True, first.sha256)
    assert json.loads(store.get(first.card_key))["metrics"]["median_km"] == 1.0  # the card is not rewritten

    other = onnx.load(str(exported.onnx))
    next(p for p in other.metadata_props if p.key == "covariance_scale").value = "2.5"
    other_path = tmp_path / "other.onnx"
    onnx.save(other, str(other_path))
    second = publish(store, other_path, {}, tmp_path)
    assert (second.version, second.reused) == ("0.1.1", False)
    assert set(released_versions(store)) == {"0.1.0", "0.1.1"}
    with pytest.raises(AlreadyExistsError, match="never overwritten"):
        _put_once(store, second.model_key, b"other bytes")


# -- registration with the embedded SQLite store ------------------------------------------------------------


def _crafted_splits(module, n: int = 24) -> dict[str, HeimdallDataset]:
    """Random features whose truths lie 2 km from ``module``'s predictions: that module is near perfect."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for i, split in enumerate(("train", "val", "test")):
        x = torch.randn(n, 7, 128, 32, generator=gen) * 1.5
        mask = torch.rand(n, 7, generator=gen) > 0.2
        with torch.no_grad():
            mean_km, _ = module.predict_gaussian(x.to(torch.float16).float(), mask)
        target = (mean_km.float() + 2.0 * torch.randn(n, 2, generator=gen)) / module.target_scaling.target_scale_km
        out[split] = HeimdallDataset(x, mask, target, np.arange(i * 1000, i * 1000 + n))
    return out


def _shifted(module, east_units: float):
    bias = module.model.head[-1].bias
    with torch.no_grad():
        bias[0] += east_units
    return module


def _study(name: str) -> StudyRecord:
    history = lambda base: tuple({"epoch": e, "val/median_km": base / e, "val/nll_km": 9.0 - e} for e in (1, 2, 3))  # noqa: E731
    return StudyRecord(name, (TrialRecord("t0", {"model.width": 4, "optimizer.lr": 3e-3}, history(30.0), "complete", 7.0, 0),
                              TrialRecord("t1", {"model.width": 8, "optimizer.lr": 1e-3}, history(40.0), "stopped", 8.0, 1)),
                       best_trial_id="t0", objective="val/nll_km", seeds={"sampler": 0, "train": 0})


def test_sqlite_registration_moves_the_champion_only_for_a_better_model(tmp_path: Path,
                                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow import MlflowClient

    good_ckpt = tiny_export(tmp_path_factory.getbasetemp()).checkpoint
    good = load_checkpoint(good_ckpt)
    splits = _crafted_splits(good)
    bad_ckpt = save_checkpoint(_shifted(load_checkpoint(good_ckpt), 0.3), tmp_path / "bad.ckpt")
    settings = RegistrySettings.resolve(tmp_path, models_store=str(tmp_path / "models"))
    assert settings.mlflow_uri.startswith("sqlite:///")

    bad = export_and_register(ExportRequest(bad_ckpt, splits, tmp_path / "bad", _study("study-bad"), settings))
    assert (bad.publication.version, bad.mlflow_version, bad.champion) == ("0.1.0", "1", True)
    assert bad.comparison["reason"] == "no champion yet"

    better = export_and_register(ExportRequest(good_ckpt, splits, tmp_path / "good", _study("study-good"), settings))
    assert (better.publication.version, better.mlflow_version, better.champion) == ("0.1.1", "2", True)
    assert better.comparison["decision"] == "promoted"
    assert better.comparison["new"]["value"] < better.comparison["champion"]["value"]
    assert better.comparison["champion"]["how"] == "recomputed with onnxruntime"

    again = register_export(tmp_path / "bad", settings)  # idempotent: same release, same version, champion kept
    assert (again.publication.version, again.publication.reused, again.mlflow_version) == ("0.1.0", True, "1")
    assert (again.champion, again.comparison["decision"]) == (False, "kept")

    client = MlflowClient(settings.mlflow_uri, registry_uri=settings.mlflow_uri)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version) == "2"
    tags = client.get_model_version(REGISTERED_MODEL, "1").tags
    assert json.loads(tags["heimdall.champion_comparison"])["decision"] == "kept"
    exp = client.get_experiment_by_name("study-good")
    assert Path(exp.artifact_location.removeprefix("file://")).is_relative_to(tmp_path / "mlruns")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"study-good", "t0", "t1"} and runs["t1"].info.status == "KILLED"
    parent = runs["study-good"]  # the study's parent run, the trials' runs its children
    assert parent.data.tags["heimdall.study_run"] == "true" and parent.info.status == "FINISHED"
    assert {runs[t].data.tags["mlflow.parentRunId"] for t in ("t0", "t1")} == {parent.info.run_id}
    assert client.get_model_version(REGISTERED_MODEL, "2").run_id == runs["t0"].info.run_id
    assert [m.value for m in client.get_metric_history(runs["t0"].info.run_id, "val/median_km")] == [30.0, 15.0, 10.0]
    assert runs["t0"].data.params["model.width"] == "4"
    artefacts = {a.path for a in client.list_artifacts(runs["t0"].info.run_id)}
    assert {"model", "plots", "parity.json", "localization-v0.1.1.json"} <= artefacts


# -- the whole chain against the real services --------------------------------------------------------------


def _sessions(store, catalog, dataset: str, recording_ids: np.ndarray, root: Path) -> list[Path]:
    """Write recordings as the recorder does: sessions/<id>/websdr_<station>.npy + metadata.json."""
    from heimdall.datasets import read_shard
    from heimdall.receivers import STATION_IDS

    folders = []
    for shard_info in catalog.shards(dataset):
        shard = read_shard(store, shard_info)
        for row in np.flatnonzero(np.isin(shard.recording_id, recording_ids)):
            folder = root / "sessions" / f"{int(shard.recording_id[row]):05d}"
            folder.mkdir(parents=True)
            for i, sid in enumerate(STATION_IDS):
                if shard.labels["heard"][row, i]:
                    np.save(folder / f"websdr_{sid}.npy", shard.iq[row, i].astype(np.complex64))
            (folder / "metadata.json").write_text(json.dumps({
                "sample_rate_hz": shard.sample_rate_hz, "frequency_hz": float(shard.labels["frequency_hz"][row])}))
            folders.append(folder)
    return folders


def _predict(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    from tuning.release.predict import main as predict_main

    assert predict_main(args) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.postgres
@pytest.mark.s3
def test_the_whole_chain_against_mlflow_server_and_s3(tmp_path: Path, mlflow_server: MlflowServer,  # noqa: F811 (fixture)
                                                      s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    from heimdall.data import load_feature_splits
    from tuning.data.cli import main as data_main
    from tuning.release.onnx import data_lineage
    from tuning.settings import DataSettings
    from tuning.study.spaces import load_space
    from tuning.train import main as train_main

    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tmp_path / "data"
    common = ["--data-dir", str(d)]
    local = ["--store", str(d.resolve() / "store")]  # shards stay local although an S3 endpoint is set
    assert data_main(["generate", "--dataset", "tiny", "--recordings", "120", "--shard-size", "60", *common, *local]) == 0
    assert train_main(["--dataset", "tiny", "--epochs", "2", "--batch-size", "32", "--threads", "1",
                       "--out", str(tmp_path / "run"), *common, *local]) == 0
    ckpt = tmp_path / "run" / "calibrated.ckpt"
    data = DataSettings(d.resolve(), f"sqlite:///{d.resolve() / 'catalog.db'}", str(d.resolve() / "store"))
    with data.open_catalog() as catalog:
        info = catalog.get_dataset("tiny")
        lineage = data_lineage(catalog, "tiny")
        splits = load_feature_splits(catalog, data.open_store(), "tiny")
        folders = _sessions(data.open_store(), catalog, "tiny", splits["test"].recording_id[:3], tmp_path)
    models = S3Store(s3_settings, MODELS_BUCKET)
    expected = next_version(released_versions(models))  # 0.1.0 on a fresh server
    export_dir = tmp_path / "export"

    # MLflow down: the study's results are kept on disk, published, and one command finishes the job.
    dead = RegistrySettings(d, f"http://127.0.0.1:{free_ports(1)[0]}", f"s3://{MODELS_BUCKET}")
    with pytest.raises(ServiceUnavailableError, match=r"python -m tuning\.register --from") as err:
        export_and_register(ExportRequest(ckpt, splits, export_dir, _study("acceptance"), dead, space=load_space("resnet"),
                                          lineage=lineage, generator_config=info.config))
    assert "unreachable" in str(err.value)
    assert {"model.onnx", "model_card.json", "parity.json", "registration.json"} <= {p.name for p in export_dir.iterdir()}
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        register_export(export_dir, dead)
    assert time.monotonic() - started < 20.0

    live = ["--mlflow-uri", mlflow_server.uri, "--models-store", f"s3://{MODELS_BUCKET}", *common]
    assert register_main(["--from", str(export_dir), *live]) == 0
    assert f"release:   v{expected}" in capsys.readouterr().out

    # The release in the bucket, as `aws s3 ls s3://heimdall-models/localization-v0.1.0.onnx` lists it.
    key = f"localization-v{expected}.onnx"
    assert models.exists(key) and models.exists(f"localization-v{expected}.json")
    card = json.loads(models.get(f"localization-v{expected}.json"))
    assert card["sha256"] == file_sha256(export_dir / key) and card["model_version"] == expected
    for field_ in ("metrics", "oracle_ratio", "coverage", "data_lineage", "search_space", "seeds",
                   "library_versions", "git_revision", "parity"):
        assert card[field_] is not None, field_
    assert card["data_lineage"]["shards"] and card["search_space"]["name"] == "resnet"
    assert card["oracle_ratio"] == pytest.approx(card["metrics"]["held_out_onnxruntime"]["median_km"]
                                                 / card["metrics"]["oracle"]["median_km"])

    # MLflow: one run per trial, artefacts and the shard manifest on the best, a champion version.
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("acceptance")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"acceptance", "t0", "t1"}  # the study's parent run and one child per trial
    best = client.get_run(runs["t0"].info.run_id)
    assert {"model", "plots", "parity.json", "search_space.json"} <= {a.path for a in client.list_artifacts(best.info.run_id)}
    assert best.inputs.dataset_inputs[0].dataset.name == "tiny"
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    assert champion.tags["heimdall.model_version"] == expected

    # The registered model predicts what the uploaded file predicts.
    uploaded = tmp_path / "uploaded.onnx"
    uploaded.write_bytes(models.get(key))
    from_registry = _predict(["--model", f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}", "--mlflow-uri",
                              mlflow_server.uri, *map(str, folders)], capsys)
    from_file = _predict(["--model", str(uploaded), *map(str, folders)], capsys)
    assert len(from_registry) == len(folders) == 3
    for a, b in zip(from_registry, from_file):
        assert (a["lat"], a["lon"], a["ellipse"], a["model_version"]) == (b["lat"], b["lon"], b["ellipse"], expected)

    # Registering again changes nothing.
    assert register_main(["--from", str(export_dir), *live]) == 0
    assert "already released" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == 1
    assert len(client.search_runs([exp.experiment_id])) == 3

    # A file changed after the gate is refused.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for p in export_dir.iterdir():
        if p.is_file():
            (tampered / p.name).write_bytes(p.read_bytes())
    raw = bytearray((tampered / "model.onnx").read_bytes())
    raw[-100] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(raw))
    assert register_main(["--from", str(tampered), *live]) == 1
    assert "changed after it passed the parity gate" in capsys.readouterr().err

    # A worse model is released and registered, but the champion stays.
    worse = save_checkpoint(_shifted(load_checkpoint(ckpt), 1.0), tmp_path / "worse.ckpt")
    result = export_and_register(ExportRequest(worse, splits, tmp_path / "worse", _study("acceptance-worse"),
                                               RegistrySettings(d, mlflow_server.uri, f"s3://{MODELS_BUCKET}"),
                                               lineage=lineage))
    assert result.publication.version == next_version([expected]) and result.mlflow_version == "2"
    assert (result.champion, result.comparison["decision"]) == (False, "kept")
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version == champion.version


def test_an_incomplete_or_failed_export_is_not_registered(tmp_path: Path) -> None:
    settings = RegistrySettings(tmp_path, "sqlite:///unused.db", str(tmp_path / "models"))
    with pytest.raises(DataError, match="not a complete export: model.onnx is missing"):
        register_export(tmp_path, settings)
    failed = ParityReport(False, 3, {"position_m": 812.0}, {"median_km": 10.0}, {"median_km": 10.8},
                          ["position differs by up to 812 m > 2.0 m"], ParityTolerances().to_dict(), "abc")
    (tmp_path / "parity.json").write_text(json.dumps(failed.to_dict()))
    with pytest.raises(GateFailed, match="registration refused") as err:
        register_export(tmp_path, settings)
    assert "position differs by up to 812 m" in str(err.value)
    assert not LocalStore(tmp_path / "models").list()


def test_trial_records_read_tune_results(tmp_path: Path) -> None:
    import pandas as pd

    from tuning.release.stage import trial_records

    df = pd.DataFrame({"epochs": [1, 2], "val/median_km": [np.float64(30.0), np.float64(20.0)],
                       "val/nll_km": [9.0, float("nan")], "trial_id": ["a", "a"], "checkpoint_path": ["x", "y"]})
    result = SimpleNamespace(config={"model.width": 8, "_optuna_number": 4}, metrics={"trial_id": "a"},
                             metrics_dataframe=df, path=str(tmp_path / "a"), error=None)
    (record,) = trial_records([result], {"a": "stopped"})
    assert (record.trial_id, record.params, record.status, record.number) == ("a", {"model.width": 8}, "stopped", 4)
    assert record.history[1]["epoch"] == 2 and record.history[1]["val/median_km"] == 20.0
    assert "checkpoint_path" not in record.history[0]
