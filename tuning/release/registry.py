"""Every MLflow call of Heimdall Tune: one experiment per study, a parent run per study
with a child run per trial, the registered model ``heimdall-localization`` and its
``champion`` alias.

Trial runs are written live while the study runs (:mod:`tuning.study.tracking`:
:meth:`Registry.study_run`, :meth:`Registry.trial_run`, :meth:`Registry.log_epoch`,
:meth:`Registry.end_run`) and completed after it by :meth:`Registry.log_trials`, which
reuses a live run (adding only the epochs it lacks) rather than writing a second one.

Tracking URI: ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
``sqlite:///{data-dir}/mlflow.db`` with artefacts in ``{data-dir}/mlruns``. A
real server works the same way (``mlflow server --backend-store-uri
postgresql+psycopg2://... --artifacts-destination s3://...``): it proxies the
artefacts, so clients need no S3 keys.

An unreachable server is reported within seconds as
:class:`~heimdall.errors.ServiceUnavailableError` naming the URI and the fix:
``/health`` is probed with a short timeout first, and MLflow's own HTTP retries
(7 retries with exponential backoff and a 120 s timeout by default, i.e.
minutes) are bounded by setting ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``..._BACKOFF_FACTOR`` and ``..._TIMEOUT`` during each call, unless the
environment sets them already. Telemetry is off (``MLFLOW_DISABLE_TELEMETRY``).

Everything is idempotent: runs are found again by their ``heimdall.*`` tags,
model versions by the content digest of their ONNX file.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from heimdall.errors import ConfigError, DataError, HeimdallError, NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "REGISTERED_MODEL",
    "CHAMPION_ALIAS",
    "RegistryError",
    "TrialRecord",
    "StudyRecord",
    "VersionInfo",
    "TAG",
    "EPOCHS_LOGGED",
    "Registry",
]

REGISTERED_MODEL = "heimdall-localization"
CHAMPION_ALIAS = "champion"
#: Prefix of every tag Heimdall sets on runs and model versions.
TAG = "heimdall."
# Set during each call unless the environment sets them: bounded HTTP retries, no progress bars.
_CALL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
_PROBE_TIMEOUT_S = 5.0
_RUN_STATUS = {"complete": "FINISHED", "stopped": "KILLED", "error": "FAILED", "interrupted": "KILLED"}
# heimdall.logged on a trial run: "live" while the study writes it, "complete" once log_trials has;
# "writing" while log_trials creates it (a run left so was cut off and is written again).
_LIVE, _COMPLETE, _WRITING = "live", "complete", "writing"
#: Tag of a live run: the last epoch whose metrics it holds.
EPOCHS_LOGGED = f"{TAG}epochs_logged"
_MAX_PARAM_CHARS = 6000


class RegistryError(HeimdallError):
    """MLflow refused a request (not a connection problem): the message carries its reason."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial as MLflow records it.

    Attributes:
        trial_id: unique within the study (Tune's trial id); the run's name.
        params: the sampled parameters (``{"model.width": 32, ...}``).
        history: one dict of metrics per epoch, in order; an ``epoch`` key, if
            present, is the step (else the position, from 1).
        status: ``"complete"``, ``"stopped"`` or ``"error"``.
        value: the objective at the best epoch, if any.
        number: the Optuna trial number, if any.
    """

    trial_id: str
    params: Mapping[str, Any] = field(default_factory=dict)
    history: Sequence[Mapping[str, float]] = ()
    status: str = "complete"
    value: float | None = None
    number: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["params"], d["history"] = dict(self.params), [dict(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "history": tuple(data.get("history", ()))})


@dataclass(frozen=True)
class StudyRecord:
    """A study as MLflow records it: one experiment, one run per trial.

    Attributes:
        name: the study name; the experiment is named after it.
        trials: every trial.
        best_trial_id: the trial whose checkpoint was exported (its run gets the artefacts).
        objective: the metric the study minimised or maximised, e.g. ``val/nll_km``.
        seeds: every seed of the study (sampler, training, data).
        plots: image/HTML files to attach to the best run.
    """

    name: str
    trials: Sequence[TrialRecord] = ()
    best_trial_id: str | None = None
    objective: str | None = None
    seeds: Mapping[str, Any] = field(default_factory=dict)
    plots: Sequence[str] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"name": self.name, "trials": [t.to_dict() for t in self.trials], "best_trial_id": self.best_trial_id,
                "objective": self.objective, "seeds": dict(self.seeds), "plots": list(self.plots)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(data["name"], tuple(TrialRecord.from_dict(t) for t in data.get("trials", ())),
                   data.get("best_trial_id"), data.get("objective"), dict(data.get("seeds", {})),
                   tuple(data.get("plots", ())))


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version: its number, tags and the URI its files download from."""

    version: str
    tags: Mapping[str, str]
    source: str
    run_id: str | None


class Registry:
    """An MLflow tracking server and model registry (the only place that talks to MLflow).

    Args:
        uri: tracking (and registry) URI: ``http(s)://...``, ``sqlite:///...`` or a database URL.
        artifact_root: where new experiments keep artefacts when the URI is a
            database (default ``mlruns`` next to a SQLite file); ignored for servers,
            which choose their own.

    Raises:
        ServiceUnavailableError: the server does not answer ``/health`` (within seconds).
    """

    def __init__(self, uri: str, artifact_root: Path | None = None) -> None:
        if not uri:
            raise ConfigError("MLflow tracking URI", ["the URI must not be empty; use http://host:5000 or sqlite:///path.db"])
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.uri = uri
        self.is_server = urlsplit(uri).scheme in ("http", "https")
        self._artifact_root = None if self.is_server else artifact_root or _default_artifact_root(uri)
        if self.is_server:
            self._probe()
        from mlflow import MlflowClient

        self.client: MlflowClient = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def describe(self) -> str:
        """The URI, without credentials."""
        parts = urlsplit(self.uri)
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl() if parts.netloc else self.uri

    # -- experiments and runs ---------------------------------------------------------------------

    def experiment(self, study: str) -> str:
        """The id of the study's experiment (created, or restored if deleted)."""
        with self._call(f"open the experiment of study {study!r}"):
            exp = self.client.get_experiment_by_name(study)
            if exp is None:
                location = (self._artifact_root / study).as_uri() if self._artifact_root else None
                return self.client.create_experiment(study, artifact_location=location, tags={f"{TAG}study": study})
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id

    def log_trials(self, experiment_id: str, study: StudyRecord) -> dict[str, str]:
        """One finished child run per trial under the study's parent run (parameters, metric curves by
        epoch). Complete runs are kept; a live run (:meth:`trial_run`) is completed in place with the
        epochs it lacks, so a study tracked live, resumed or not, gets no second run per trial.

        Returns:
            ``{trial_id: run_id}``.
        """
        with self._call(f"log the trials of study {study.name!r}"):
            parent = self._study_run(experiment_id, study.name, live=False)
            existing = self._runs_by_trial(experiment_id, study.name)
            ids: dict[str, str] = {}
            for trial in study.trials:
                run = existing.get(trial.trial_id)
                logged = run.data.tags.get(f"{TAG}logged") if run is not None else None
                if logged == _COMPLETE:
                    ids[trial.trial_id] = run.info.run_id
                    continue
                if run is not None and logged == _LIVE:
                    self._complete_trial_run(run.info.run_id, trial, int(run.data.tags.get(EPOCHS_LOGGED, "0")),
                                             set(run.data.params))
                    ids[trial.trial_id] = run.info.run_id
                    continue
                if run is not None:  # a run cut off while logging: log it again from scratch
                    self.client.delete_run(run.info.run_id)
                run_id = self._create_trial_run(experiment_id, study.name, parent, trial.trial_id, trial.number,
                                                trial.params, _WRITING)
                ids[trial.trial_id] = self._complete_trial_run(run_id, trial, 0, set(trial.params))
            return ids

    # -- live tracking: written while the study runs (tuning.study.tracking) -----------------------

    def study_run(self, experiment_id: str, study: str, params: Mapping[str, Any] | None = None) -> str:
        """The study's parent run, found by its tags (a resumed study: set RUNNING again) or
        created RUNNING with ``params``. Returns its id."""
        with self._call(f"open the parent run of study {study!r}"):
            return self._study_run(experiment_id, study, live=True, params=params)

    def trial_run(self, experiment_id: str, study: str, parent_run_id: str, trial_id: str, number: int | None,
                  params: Mapping[str, Any]) -> str:
        """A trial's live child run: found by its ``heimdall.trial_id`` tag (a resumed or restarted
        trial: set RUNNING again), else created RUNNING with its parameters. Returns its id."""
        with self._call(f"open the run of trial {trial_id}"):
            found = self.client.search_runs([experiment_id], f"tags.`{TAG}study` = '{_q(study)}' and "
                                            f"tags.`{TAG}trial_id` = '{_q(trial_id)}'", max_results=1)
            if found:
                if found[0].info.status != "RUNNING":
                    self.client.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id
            return self._create_trial_run(experiment_id, study, parent_run_id, trial_id, number, params, _LIVE)

    def log_epoch(self, run_id: str, metrics: Mapping[str, float], epoch: int) -> None:
        """One epoch's metrics at step ``epoch`` (non-finite values skipped), and the epoch as
        :data:`EPOCHS_LOGGED`, in one request."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        with self._call(f"log epoch {epoch} to run {run_id}"):
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(epoch)) for k, v in
                                                    sorted(metrics.items()) if _finite(v)],
                                  tags=[RunTag(EPOCHS_LOGGED, str(int(epoch)))])

    def end_run(self, run_id: str, status: str) -> None:
        """End a run: ``complete``, ``stopped`` or ``interrupted`` (KILLED), ``error`` (FAILED);
        the word is kept as the ``heimdall.status`` tag."""
        with self._call(f"end run {run_id}"):
            self.client.set_tag(run_id, f"{TAG}status", status)
            self.client.set_terminated(run_id, _RUN_STATUS.get(status, "FINISHED"))

    def log_study_file(self, study: str, path: Path) -> str:
        """Attach a file (the study page, ``report.html``) to the study's parent run, created FINISHED
        if the study was not tracked live. Returns the run id."""
        experiment_id = self.experiment(study)
        with self._call(f"log {Path(path).name} to the parent run of study {study!r}"):
            run_id = self._study_run(experiment_id, study, live=False)
            self.client.log_artifact(run_id, str(path))
            return run_id

    def release_run(self, experiment_id: str, study: str, trial_id: str | None, run_ids: Mapping[str, str]) -> str:
        """The run that carries the release's artefacts: the best trial's, else a run named ``release``."""
        if trial_id and trial_id in run_ids:
            return run_ids[trial_id]
        with self._call("create the release run"):
            found = self.client.search_runs([experiment_id], f"tags.`{TAG}study` = '{_q(study)}' and "
                                            f"tags.`{TAG}release_run` = 'true'", max_results=1)
            if found:
                return found[0].info.run_id
            run = self.client.create_run(experiment_id, run_name="release",
                                         tags={f"{TAG}study": study, f"{TAG}release_run": "true"})
            self.client.set_terminated(run.info.run_id, "FINISHED")
            return run.info.run_id

    def log_release(self, run_id: str, *, onnx_path: Path, files: Sequence[Path], plots: Sequence[Path],
                    manifest: Mapping[str, Any] | None, tags: Mapping[str, str],
                    metrics: Mapping[str, float] | None = None) -> None:
        """Attach the release to a run: the ONNX model (MLflow ``onnx`` flavor, under ``model/``),
        files (card, parity report, search space), plots (under ``plots/``), the shard
        manifest as a logged input, metrics (step 0; NaN kept, MLflow stores it) and tags.
        Skipped when the run already carries this release.
        """
        with self._call(f"log the release artefacts to run {run_id}"):
            run = self.client.get_run(run_id)
            if run.data.tags.get(f"{TAG}content_sha256") == tags.get(f"{TAG}content_sha256") and \
                    run.data.tags.get(f"{TAG}release_logged") == "true":
                return
            self._log_onnx_model(run_id, onnx_path)
            for f in files:
                self.client.log_artifact(run_id, str(f))
            for p in plots:
                self.client.log_artifact(run_id, str(p), "plots")
            if manifest:
                self._log_manifest(run_id, manifest)
            if metrics:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])
            for key, value in {**tags, f"{TAG}best": "true", f"{TAG}release_logged": "true"}.items():
                self.client.set_tag(run_id, key, value)

    # -- registered model -------------------------------------------------------------------------

    def find_version(self, content_sha256: str) -> VersionInfo | None:
        """The registered version whose ONNX has this content digest, if any (the oldest one)."""
        with self._call("search the registered model's versions"):
            found = [v for v in self.client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
                     if v.tags.get(f"{TAG}content_sha256") == content_sha256]
            found.sort(key=lambda v: int(v.version))
            return _info(found[0]) if found else None

    def register(self, run_id: str, tags: Mapping[str, str]) -> VersionInfo:
        """A new version of :data:`REGISTERED_MODEL` from the run's ``model/`` artefact, unless
        a version with the same ``heimdall.content_sha256`` tag exists (then that one)."""
        existing = self.find_version(tags[f"{TAG}content_sha256"])
        if existing is not None:
            return existing
        with self._call(f"register a version of {REGISTERED_MODEL}"):
            self._ensure_registered_model()
            source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
            mv = self.client.create_model_version(REGISTERED_MODEL, source, run_id=run_id, tags=dict(tags),
                                                  await_creation_for=60)
            return _info(mv)

    def champion(self) -> VersionInfo | None:
        """The version the ``champion`` alias points at, or None."""
        with self._call("read the champion alias"):
            mv = self._missing_as_none(lambda: self.client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS))
            return _info(mv) if mv is not None else None

    def set_champion(self, version: str) -> None:
        """Point the ``champion`` alias at ``version``."""
        with self._call(f"move the champion alias to version {version}"):
            self.client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS, version)

    def set_version_tags(self, version: str, tags: Mapping[str, str]) -> None:
        """Set tags on a model version."""
        with self._call(f"tag version {version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(REGISTERED_MODEL, version, key, value)

    def resolve(self, model_uri: str) -> VersionInfo:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → the version.

        Raises:
            ConfigError: another URI form. NotFoundError: no such model, alias or version.
        """
        name, sep, ref = model_uri.removeprefix("models:/").partition("@")
        with self._call(f"resolve {model_uri}"):
            if sep:
                mv = self._missing_as_none(lambda: self.client.get_model_version_by_alias(name, ref))
            else:
                name, _, version = name.partition("/")
                if not (model_uri.startswith("models:/") and version.isdigit()):
                    raise ConfigError("model URI", [f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}"])
                mv = self._missing_as_none(lambda: self.client.get_model_version(name, version))
        if mv is None:
            raise NotFoundError(f"{model_uri} does not exist in the registry at {self.describe()}; "
                                f"fix: register a model first (python -m tuning.register) or check the alias")
        return _info(mv)

    def download_onnx(self, info: VersionInfo, dst: Path) -> Path:
        """Download a version's files into ``dst`` and return its ``.onnx`` file.

        Raises:
            DataError: the version holds no ``.onnx`` file.
        """
        import mlflow

        with self._call(f"download version {info.version}"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(dst),
                                                             tracking_uri=self.uri))
        found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not found or found[0].suffix != ".onnx":
            raise DataError(f"version {info.version} ({info.source}) holds no .onnx file; was it registered by tuning.register?")
        return found[0]

    # -- internals ------------------------------------------------------------------------------------

    def _probe(self) -> None:
        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as response:
                ok = response.status == 200
        except (urllib.error.URLError, OSError) as exc:
            raise self._unavailable(f"{getattr(exc, 'reason', exc)}") from None
        if not ok:
            raise self._unavailable(f"/health answered {response.status}")

    def _unavailable(self, why: str) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"the MLflow tracking server at {self.describe()} is unreachable ({why}); fix: start it "
            f"(mlflow server --backend-store-uri ... --artifacts-destination ...), or point --mlflow-uri / "
            f"MLFLOW_TRACKING_URI at a running one (sqlite:///path/mlflow.db needs no server)")

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Bound MLflow's HTTP retries and translate its errors into Heimdall's."""
        from mlflow.exceptions import MlflowException

        saved = {k: os.environ.get(k) for k in _CALL_ENV}
        for key, value in _CALL_ENV.items():
            os.environ.setdefault(key, value)
        try:
            yield
        except MlflowException as exc:
            text = str(exc)
            if any(s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish",
                                       "Read timed out", "failed with exception")):
                raise self._unavailable(f"while trying to {what}: {text.splitlines()[0][:300]}") from None
            raise RegistryError(f"MLflow at {self.describe()} refused to {what}: {text.splitlines()[0][:500]}") from None
        except OSError as exc:
            raise self._unavailable(f"while trying to {what}: {exc}") from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @staticmethod
    def _missing_as_none(fetch: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fetch()
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower():
                return None
            raise

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(REGISTERED_MODEL, description=(
                "Heimdall transmitter localization: per-receiver spectrogram features + mask -> "
                "lat/lon, sigmas and the 1-sigma ellipse (ONNX)."))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _runs_by_trial(self, experiment_id: str, study: str) -> dict[str, Run]:
        runs = self.client.search_runs([experiment_id], f"tags.`{TAG}study` = '{_q(study)}'", max_results=5000)
        return {r.data.tags[f"{TAG}trial_id"]: r for r in runs if f"{TAG}trial_id" in r.data.tags}

    def _study_run(self, experiment_id: str, study: str, *, live: bool,
                   params: Mapping[str, Any] | None = None) -> str:
        """Find the parent run (``heimdall.study_run``); ``live``: set it RUNNING, else create it FINISHED."""
        found = self.client.search_runs([experiment_id], f"tags.`{TAG}study` = '{_q(study)}' and "
                                        f"tags.`{TAG}study_run` = 'true'", max_results=1)
        if found:
            if live and found[0].info.status != "RUNNING":
                self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run_id = self.client.create_run(experiment_id, run_name=study,
                                        tags={f"{TAG}study": study, f"{TAG}study_run": "true"}).info.run_id
        self._log_params(run_id, params or {}, set())
        if not live:
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _create_trial_run(self, experiment_id: str, study: str, parent_run_id: str, trial_id: str,
                          number: int | None, params: Mapping[str, Any], logged: str) -> str:
        tags = {f"{TAG}study": study, f"{TAG}trial_id": trial_id, f"{TAG}logged": logged,
                "mlflow.parentRunId": parent_run_id}
        if number is not None:
            tags[f"{TAG}optuna_number"] = str(number)
        run_id = self.client.create_run(experiment_id, run_name=trial_id, tags=tags).info.run_id
        self._log_params(run_id, params, set())
        return run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any], present: set[str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(params.items()) if k not in present]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])

    def _complete_trial_run(self, run_id: str, trial: TrialRecord, epochs_logged: int, params_present: set[str]) -> str:
        """Add what the run lacks (parameters, epochs after ``epochs_logged``, the objective), end it
        with the trial's status and mark it complete."""
        from mlflow.entities import Metric

        self._log_params(run_id, trial.params, params_present)
        now = int(time.time() * 1000)
        steps = [int(row.get("epoch", i + 1)) for i, row in enumerate(trial.history)]
        metrics = [Metric(k, float(v), now, step) for step, row in zip(steps, trial.history) if step > epochs_logged
                   for k, v in row.items() if k != "epoch" and _finite(v)]
        if trial.value is not None and math.isfinite(trial.value):
            metrics.append(Metric("objective", float(trial.value), now, 0))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        self.client.set_tag(run_id, f"{TAG}status", trial.status)
        self.client.set_terminated(run_id, _RUN_STATUS.get(trial.status, "FINISHED"))
        self.client.set_tag(run_id, f"{TAG}logged", _COMPLETE)
        return run_id

    def _log_onnx_model(self, run_id: str, onnx_path: Path) -> None:
        import mlflow.onnx
        import numpy as np
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        model = onnx.load(str(onnx_path))
        dims = {i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), tuple(dims["features"]), "features"),
                           TensorSpec(np.dtype("bool"), tuple(dims["mask"]), "mask")]))
        with tempfile.TemporaryDirectory() as tmp:
            # One file, byte-identical to the published one (MLflow would split out the weights by default).
            mlflow.onnx.save_model(model, Path(tmp) / "model", signature=signature, save_as_external_data=False,
                                   pip_requirements=[f"onnxruntime=={_dist_version('onnxruntime')}",
                                                     f"onnx=={_dist_version('onnx')}"])
            self.client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")

    def _log_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        shards = pd.DataFrame(manifest.get("shards") or [], columns=["index", "key", "sha256", "n_rows", "n_bytes"])
        tags = [InputTag("mlflow.data.context", "training"),
                InputTag(f"{TAG}n_recordings", str(manifest.get("n_recordings"))),
                InputTag(f"{TAG}config_sha256", str(manifest.get("config_sha256")))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow hints about integer columns and pandas deprecations
            dataset = mlflow.data.from_pandas(shards, source=_dataset_source(manifest),
                                              name=str(manifest.get("dataset") or "dataset"))
            entity = dataset._to_mlflow_entity()
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])


def _default_artifact_root(uri: str) -> Path:
    # sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute.
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns"
    return Path("mlruns").resolve()


def _dataset_source(manifest: Mapping[str, Any]) -> str:
    store = str(manifest.get("store") or "")
    # A store's describe() is "s3://bucket/prefix at http://host:port" or a directory.
    first = store.split(" at ")[0].strip()
    return first if first.startswith("s3://") else Path(first or ".").resolve().as_uri()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _info(mv: ModelVersion) -> VersionInfo:
    return VersionInfo(str(mv.version), dict(mv.tags or {}), mv.source, mv.run_id)


def _q(value: str) -> str:
    return value.replace("'", "\\'")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)

