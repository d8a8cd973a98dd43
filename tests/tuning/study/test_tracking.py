"""Live MLflow tracking (:mod:`tuning.study.tracking`): a parent run per study and a child run per trial,
written while the study runs, completed (not duplicated) by the export stage, with the registered version
linked to the trial's run; against the embedded SQLite store and a real ``mlflow server`` (PostgreSQL + S3).

The studies are small real ones (local Ray, 64 recordings, 2 trials of up to 2 epochs, one at a time);
what MLflow holds mid-study is read by a Tune callback passed to ``tuning.run.main`` when the second trial
starts, after the first has trained both its epochs.
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.experiment import Trial

from tests.tuning.mlflow_fixtures import MlflowServer, mlflow_server  # noqa: F401 (fixture)
from tuning.ops.services import free_ports
from tuning.release.registry import REGISTERED_MODEL, Registry, StudyRecord, TrialRecord
from tuning.run import main
from tuning.settings import RegistrySettings
from tuning.study.tracking import LiveTracking

TAG_STUDY_RUN, TAG_TRIAL = "heimdall.study_run", "heimdall.trial_id"


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client: Any, study: str) -> tuple[Any, dict[str, Any]]:
    """The study's parent run and ``{trial id: child run}`` (None, {} before the experiment exists)."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None, {}
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_STUDY_RUN) == "true"]
    assert len(parents) <= 1, [r.info.run_name for r in parents]
    children = {r.data.tags[TAG_TRIAL]: r for r in runs if TAG_TRIAL in r.data.tags}
    assert len(children) == len(runs) - len(parents), "a run that is neither the parent nor a trial's"
    return (parents[0] if parents else None), children


class MidStudy(tune.Callback):
    """Reads MLflow when the second trial starts, while the study is still running."""

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        self.seen: dict[str, Any] | None = None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if len(trials) != 2 or self.seen is not None:
            return
        client = _client(self.uri)
        parent, children = _runs(client, self.study)
        self.seen = {
            "parent": parent and (parent.info.run_id, parent.info.status),
            "children": {t: (r.info.run_id, r.info.status, r.data.tags.get("mlflow.parentRunId"),
                             r.data.tags.get("heimdall.optuna_number"), dict(r.data.params))
                         for t, r in children.items()},
            "history": {t: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val/nll_km")]
                        for t, r in children.items()},
            "started": [t.trial_id for t in trials if t.status != "PENDING"] + [trial.trial_id],
        }


def _study(tmp_path: Path, name: str, extra: list[str]) -> tuple[int, MidStudy, dict]:
    import json

    uri = next((extra[i + 1] for i, a in enumerate(extra) if a == "--mlflow-uri"), f"sqlite:///{tmp_path / 'mlflow.db'}")
    probe = MidStudy(uri, name)
    # One trial at a time (2 CPUs would run both at once): trial 0 has its 2 epochs when trial 1 starts.
    code = main(["--smoke-test", "--recordings", "64", "--dataset", "tiny", "--trials", "2", "--max-epochs", "2",
                 "--max-concurrent", "1", "--name", name, "--data-dir", str(tmp_path), *extra], callbacks=[probe])
    summary_path = tmp_path / "studies" / name / "summary.json"
    return code, probe, json.loads(summary_path.read_text()) if summary_path.is_file() else {}


def _check_live_study(uri: str, name: str, code: int, probe: MidStudy, summary: dict, out: str) -> None:
    assert code == 0, out
    assert "live MLflow tracking" not in out, out

    # Mid-study: the parent RUNNING, a run for each started trial, a 2-step history for trial 0.
    seen = probe.seen
    assert seen is not None, "the second trial never started"
    parent_id, parent_status = seen["parent"]
    assert parent_status == "RUNNING"
    assert set(seen["children"]) == set(seen["started"]) and len(seen["children"]) == 2, seen
    for trial_id, (_, _status, parent_of, number, params) in seen["children"].items():
        assert parent_of == parent_id and number is not None and "optimizer.lr" in params, (trial_id, params)
    two_epochs = [t for t, h in seen["history"].items() if len(h) >= 2]
    assert two_epochs and all([s for s, _ in seen["history"][t]][:2] == [1, 2] for t in two_epochs), seen["history"]
    first = min(seen["children"], key=lambda t: int(seen["children"][t][3]))
    assert seen["children"][first][1] == "FINISHED"  # trained both epochs before the second trial started
    assert [s for s, _ in seen["history"][first]] == [1, 2]

    # After the study (and the export's log_trials): the same runs, completed, with final statuses.
    client = _client(uri)
    parent, children = _runs(client, name)
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert set(children) == set(trials) and len(trials) == 2
    for trial_id, run in children.items():
        assert run.info.run_id == seen["children"][trial_id][0], "log_trials wrote a second run"
        row = trials[trial_id]
        want = {"complete": "FINISHED", "stopped": "KILLED", "error": "FAILED"}[row["status"]]
        assert (run.info.status, run.data.tags["heimdall.status"]) == (want, row["status"]), (trial_id, row)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/nll_km")]
        assert steps == list(range(1, row["epochs"] + 1)), (trial_id, steps, row)
        for key, value in {**run.data.params, **run.data.tags}.items():  # no URL with a user:password@
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value) and "password" not in value.lower(), (key, value)
    assert any(t["epochs"] >= 2 for t in trials.values())

    # The registered version links to the best trial's live run.
    export = summary["export"]
    version = client.get_model_version(REGISTERED_MODEL, export["mlflow_version"])
    assert version.run_id == seen["children"][summary["best"]["trial_id"]][0] == export["release_run_id"]


@pytest.mark.ray
def test_a_study_is_tracked_live_in_the_embedded_sqlite_store(ray_session: object, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    name = f"live-{uuid.uuid4().hex[:6]}"
    code, probe, summary = _study(tmp_path, name, [])
    out = "".join(capsys.readouterr())
    _check_live_study(f"sqlite:///{tmp_path / 'mlflow.db'}", name, code, probe, summary, out)


@pytest.mark.ray
@pytest.mark.postgres
@pytest.mark.s3
def test_a_study_is_tracked_live_on_an_mlflow_server(ray_session: object, mlflow_server: MlflowServer,  # noqa: F811
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("HEIMDALL_S3_ENDPOINT", "MLFLOW_TRACKING_URI"):  # data and models stay in tmp_path
        monkeypatch.delenv(var, raising=False)
    name = f"live-{uuid.uuid4().hex[:6]}"
    code, probe, summary = _study(tmp_path, name, ["--mlflow-uri", mlflow_server.uri])
    out = "".join(capsys.readouterr())
    _check_live_study(mlflow_server.uri, name, code, probe, summary, out)


# -- resume and a server that goes away, on Tune's real Trial objects without a study ------------------------


def _trial(trial_id: str, number: int) -> Trial:
    return Trial("trainable", config={"_optuna_number": number, "model.width": 8}, trial_id=trial_id, stub=True)


def _epoch(tracker: LiveTracking, trial: Trial, epoch: int) -> None:
    """An epoch's result as Tune hands it on: recorded on the trial, then passed to the callbacks."""
    result = {"epochs": epoch, "val/nll_km": 9.0 - epoch, "time_total_s": 1.0, "train/loss": float("nan")}
    trial.update_last_result(result)
    tracker.on_trial_result(0, [trial], trial, result)


def test_a_pickled_tracker_finds_its_runs_again_and_log_trials_completes_them(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = RegistrySettings(tmp_path, uri, str(tmp_path / "models"))
    tracker = LiveTracking("resumed", settings, {"trials": 2, "max_epochs": 3}, max_epochs=3)
    a, b = _trial("a_00000", 0), _trial("a_00001", 1)
    tracker.setup()
    tracker.on_trial_start(0, [a], a)
    _epoch(tracker, a, 1)
    tracker.on_trial_start(0, [a, b], b)
    _epoch(tracker, b, 1)

    # --resume: Tune unpickles the callback from its saved state; it holds no client and no run id.
    state = pickle.dumps(tracker)
    resumed = pickle.loads(state)
    assert resumed._registry is None and resumed._runs == {}
    resumed.setup()
    resumed.on_trial_start(0, [a, b], a)
    _epoch(resumed, a, 2)
    _epoch(resumed, a, 3)
    resumed.on_trial_complete(0, [a, b], a)
    resumed.on_trial_start(0, [a, b], b)
    resumed.on_experiment_end([a, b])  # b was still running: cut short, KILLED

    client = _client(uri)
    parent, children = _runs(client, "resumed")
    assert set(children) == {"a_00000", "a_00001"}
    assert parent.data.params == {"trials": "2", "max_epochs": "3"}
    assert [m.step for m in client.get_metric_history(children["a_00000"].info.run_id, "val/nll_km")] == [1, 2, 3]
    assert "train/loss" not in children["a_00000"].data.metrics and "time_total_s" not in children["a_00000"].data.metrics
    assert (children["a_00000"].info.status, children["a_00001"].info.status) == ("FINISHED", "KILLED")
    assert children["a_00001"].data.tags["heimdall.status"] == "stopped"

    # The export stage reuses both runs and adds only the epochs they lack.
    registry = Registry(uri, artifact_root=tmp_path / "mlruns")
    history = tuple({"epoch": e, "val/nll_km": 9.0 - e} for e in (1, 2, 3))
    study = StudyRecord("resumed", (TrialRecord("a_00000", {"model.width": 8}, history, "complete", 6.0, 0),
                                    TrialRecord("a_00001", {"model.width": 8}, history[:2], "stopped", 7.0, 1)))
    # b's second epoch never reached MLflow live (say, the server was down then): log_trials adds it.
    ids = registry.log_trials(registry.experiment("resumed"), study)
    assert ids == {t: r.info.run_id for t, r in children.items()}
    assert registry.log_trials(registry.experiment("resumed"), study) == ids  # idempotent
    parent, children = _runs(client, "resumed")
    assert [m.step for m in client.get_metric_history(ids["a_00000"], "val/nll_km")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(ids["a_00001"], "val/nll_km")] == [1, 2]
    assert {r.data.tags["heimdall.logged"] for r in children.values()} == {"complete"}
    assert parent.info.status == "FINISHED"


def _sqlite_mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artefacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = MlflowServer(f"http://127.0.0.1:{port}", process.pid, Path("/dev/null"), "", "", process)
    server._wait_healthy(180.0)
    return process, server.uri


def test_a_server_that_goes_away_mid_study_costs_one_warning_and_nothing_else(tmp_path: Path) -> None:
    process, uri = _sqlite_mlflow_server(tmp_path)
    server = MlflowServer(uri, process.pid, Path("/dev/null"), "", "", process)
    warnings: list[str] = []
    try:
        tracker = LiveTracking("goes-away", RegistrySettings(tmp_path, uri, str(tmp_path / "models")), {}, 2,
                               warn=warnings.append)
        a, b = _trial("g_00000", 0), _trial("g_00001", 1)
        tracker.setup()
        tracker.on_trial_start(0, [a], a)
        _epoch(tracker, a, 1)
        assert warnings == []
        parent, children = _runs(_client(uri), "goes-away")
        assert parent is not None and set(children) == {"g_00000"}
    finally:
        server.stop()
    started = time.monotonic()
    _epoch(tracker, a, 2)
    tracker.on_trial_start(0, [a, b], b)
    _epoch(tracker, b, 1)
    tracker.on_trial_complete(0, [a, b], a)
    tracker.on_experiment_end([a, b])
    assert len(warnings) == 1 and "live MLflow tracking" in warnings[0] and uri in warnings[0], warnings
    assert time.monotonic() - started < 60.0
