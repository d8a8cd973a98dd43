"""The release stage: export the best checkpoint, gate it, publish it and register it in MLflow.

The chain reads top to bottom: load the checkpoint (refused if it does not
match its config) → calibrate and evaluate → export ONNX → parity gate
(onnxruntime versus PyTorch on the held-out recordings; a failure refuses
everything after it) → model card → **everything is now on disk** in the
export directory → publish ``localization-v{version}.onnx`` + card to the
models store → MLflow: one run per trial, artefacts on the best run, a version
of ``heimdall-localization``, and the ``champion`` alias moved only when the
new version beats the current champion on the same **validation** recordings.

Which split chooses the champion. The champion is a selection among models,
so it is decided on the selection set the study already uses: the ``val``
split (the study picks its best trial and calibrates the ellipses there).
The ``test`` split chooses nothing: the parity gate runs on it (onnxruntime
against PyTorch, a pass/fail on agreement, not on accuracy) and its metrics
are reported in the model card (``metrics.held_out_onnxruntime``, marked
report-only) and in MLflow under ``report_only`` names, so no release ever
tunes to it. A separate selection split was not chosen: it would take
recordings from training and redraw every existing dataset's splits, to
remove a bias all candidates of a study share (each was picked on ``val``;
the test report stays the unbiased number). Compare models trained on the
same dataset: a champion from another dataset may have trained on this
dataset's validation recordings.

When S3 or MLflow is down the export directory keeps everything, and
``python -m tuning.register --from DIR`` finishes the job (idempotent: the same
file is never released or registered twice). The command is :mod:`tuning.register`.
"""
from __future__ import annotations

import json
import numbers
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heimdall.errors import DataError, ServiceUnavailableError
from tuning.release.onnx import (
    GateFailed,
    HeldOut,
    ModelMetadata,
    ParityReport,
    ParityTolerances,
    build_metadata,
    build_model_card,
    content_sha256,
    export_onnx,
    file_sha256,
    load_checkpoint,
    onnx_session,
    report_from_outputs,
    run_onnx,
    save_heldout_plot,
    verify_parity,
)
from tuning.release.publish import Publication, publish
from tuning.release.registry import TAG, Registry, StudyRecord, TrialRecord, VersionInfo
from tuning.settings import RegistrySettings  # resolved there, with every other setting

if TYPE_CHECKING:
    from heimdall.data import HeimdallDataset
    from heimdall.features import FeatureConfig
    from tuning.study.spaces import SearchSpace, TrialConfigs

__all__ = ["ExportRequest", "RegistrySettings", "RegistrationResult", "GatedExport", "export_and_register",
           "prepare_export", "register_export", "retry_command", "trial_records"]

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"
PARITY_FILE = "parity.json"
HELDOUT_FILE = "heldout.npz"
SELECTION_FILE = "selection.npz"
REQUEST_FILE = "registration.json"
STATUS_FILE = "status.json"
SPACE_FILE = "search_space.json"
PLOTS_DIR = "plots"
#: The champion is compared on this metric (lower is better) ...
CHAMPION_METRIC = "median_km"
#: ... on this split's recordings; the test split is only reported.
SELECTION_SPLIT = "val"
#: Prefix of the MLflow tags and metrics that report the test split and choose nothing.
REPORT_ONLY = "report_only"


@dataclass(frozen=True)
class RegistrationResult:
    """What a registration did.

    Attributes:
        export_dir: the export directory.
        publication: the release in the models store.
        mlflow_version: the registered version number.
        champion: whether that version is the champion now.
        comparison: how the champion decision was made (also a version tag).
        experiment_id: the study's experiment.
        run_ids: ``{trial_id: run_id}``; ``release_run_id`` holds the artefacts.
    """

    export_dir: Path
    publication: Publication
    mlflow_version: str
    champion: bool
    comparison: Mapping[str, Any]
    experiment_id: str
    release_run_id: str
    run_ids: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = asdict(self)
        d["export_dir"], d["publication"] = str(self.export_dir), self.publication.to_dict()
        return d


@dataclass(frozen=True)
class ExportRequest:
    """One release: the checkpoint, the recordings that calibrate and gate it, and where it goes.

    Attributes:
        checkpoint: the best trial's checkpoint (Lightning or ``calibrated.ckpt``).
        splits: ``val`` (calibration, champion selection) and ``test`` (parity gate, report only) from
            :func:`heimdall.data.load_feature_splits`.
        out_dir: the export directory (created; a previous export there is replaced).
        study: the study and its trials (logged to MLflow).
        settings: the models store and MLflow.
        space: the search space, recorded in metadata and card.
        lineage: :func:`tuning.release.onnx.data_lineage` of the dataset.
        expected: the trial's configs; the checkpoint must match them.
        feature_config: the features ``splits`` were computed with; the checkpoint's must be the same.
        generator_config: the synthetic dataset's generator config (centre baseline in the card).
        tolerances: the parity gate's tolerances.
        force_champion: move the champion alias even if the new version is not better.
    """

    checkpoint: Path
    splits: Mapping[str, HeimdallDataset]
    out_dir: Path
    study: StudyRecord
    settings: RegistrySettings
    space: SearchSpace | None = None
    lineage: Mapping[str, Any] | None = None
    expected: TrialConfigs | None = None
    feature_config: FeatureConfig | None = None
    generator_config: Mapping[str, Any] | None = None
    tolerances: ParityTolerances = ParityTolerances()
    force_champion: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "out_dir", Path(self.out_dir))


def export_and_register(request: ExportRequest) -> RegistrationResult:
    """The release stage: :func:`prepare_export` (all on disk) then :func:`register_export`.

    Raises:
        ConfigError, ExportError, GateFailed: from the export stage (nothing published).
        ServiceUnavailableError: S3 or MLflow down; the export stays in ``request.out_dir``,
            and ``python -m tuning.register --from OUT_DIR`` finishes the job.
    """
    prepare_export(request)
    return register_export(request.out_dir, request.settings, force_champion=request.force_champion)


# -- stage 1: export, gate, card (everything lands on disk) ---------------------------------------------


def prepare_export(request: ExportRequest) -> Path:
    """Export ``request.checkpoint`` into ``request.out_dir`` and gate it; nothing leaves the machine.

    Load (refused if it does not match its config) → calibrate on val and
    evaluate → ONNX → parity gate on test → score the file on val (the
    champion is chosen on that later) → plots, card and ``registration.json``.

    Returns:
        ``request.out_dir``.

    Raises:
        DataError: the test or the validation split is empty.
        CheckpointError: the checkpoint is not a plain-data checkpoint of this module (a DataError).
        ConfigError: the checkpoint does not match its config.
        ExportError: the exporter failed.
        GateFailed: onnxruntime disagrees with PyTorch (``parity.json`` holds the report).
    """
    from heimdall.evaluation import evaluate_split

    r, out = request, request.out_dir
    dataset = str((r.lineage or {}).get("dataset", ""))
    _require_split(r.splits, "test", dataset, "to gate the export on")
    _require_split(r.splits, SELECTION_SPLIT, dataset, "to choose the champion on")
    module = load_checkpoint(r.checkpoint, r.expected, r.feature_config)
    evaluation = evaluate_split(module, dict(r.splits), generator_config=dict(r.generator_config) if r.generator_config else None)
    held = HeldOut.from_split(r.splits["test"], module, dataset=dataset)
    selection = HeldOut.from_split(r.splits[SELECTION_SPLIT], module, dataset=dataset, split=SELECTION_SPLIT)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (REQUEST_FILE, STATUS_FILE, CARD_FILE, SELECTION_FILE):
        (out / stale).unlink(missing_ok=True)
    metadata = build_metadata(module, space=r.space)
    model_path = export_onnx(module, out / MODEL_FILE, metadata)
    parity = verify_parity(module, model_path, held, r.tolerances)
    _write_json(out / PARITY_FILE, parity.to_dict())
    if not parity.passed:
        raise GateFailed(parity, str(out / PARITY_FILE))
    digest = content_sha256(model_path)
    space_doc = _space_document(r.space)
    study = r.study
    study_doc = {"name": study.name, "best_trial_id": study.best_trial_id, "objective": study.objective,
                 "n_trials": len(study.trials)}
    selected = _selection_record(selection, model_path, module)
    card = build_model_card(module=module, metadata=metadata, evaluation=evaluation, parity=parity, held=held,
                            lineage=r.lineage, space=space_doc, study=study_doc, seeds=study.seeds, content_digest=digest)
    card["selection"] = selected
    card["held_out"]["use"] = "report only: the test split chooses nothing (the champion is chosen on 'selection')"
    held.save(out / HELDOUT_FILE)
    selection.save(out / SELECTION_FILE)
    plots = _collect_plots(out, study.plots, model_path, held, module)
    if space_doc:
        _write_json(out / SPACE_FILE, space_doc)
    _write_json(out / CARD_FILE, card)
    _write_json(out / REQUEST_FILE, {
        "format": 2, "study": replace(study, plots=tuple(plots)).to_dict(), "lineage": dict(r.lineage) if r.lineage else None,
        "selection": selected,
        "model_sha256": file_sha256(model_path), "content_sha256": digest, "checkpoint": str(r.checkpoint)})
    return out


def _require_split(splits: Mapping[str, HeimdallDataset], split: str, dataset: str, purpose: str) -> None:
    """The gate and the card need test recordings, the champion decision validation ones: refuse before exporting."""
    from heimdall.datasets import SplitConfig

    if split not in splits or len(splits[split]) == 0:
        counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        share = SplitConfig().test_fraction if split == "test" else SplitConfig().val_fraction
        raise DataError(f"dataset {dataset or '(unnamed)'!r} has no recordings in its {split} split ({counts}): nothing "
                        f"{purpose}; fix: use a dataset with more labelled recordings (about "
                        f"{share:.0%} land in {split}), e.g. "
                        "python -m tuning.data generate --dataset NAME --recordings 1000")


def _selection_record(selection: HeldOut, model_path: Path, module: Any) -> dict[str, Any]:
    """The exported file scored with onnxruntime on the selection split: what the champion decision compares."""
    s = module.target_scaling
    outputs = run_onnx(onnx_session(model_path), selection.features, selection.mask)
    metrics = report_from_outputs(outputs, selection, (s.origin_lat, s.origin_lon)).to_dict()
    return {"split": selection.split, "n": len(selection), "recordings_sha256": selection.digest(),
            "metric": CHAMPION_METRIC, "metrics_onnxruntime": metrics}


def _collect_plots(out: Path, given: Sequence[str], model_path: Path, held: HeldOut, module: Any) -> list[str]:
    plots_dir = out / PLOTS_DIR
    shutil.rmtree(plots_dir, ignore_errors=True)
    plots_dir.mkdir()
    s = module.target_scaling
    outputs = run_onnx(onnx_session(model_path), held.features, held.mask)
    names = [save_heldout_plot(outputs, held, (s.origin_lat, s.origin_lon), plots_dir / "heldout_errors.png",
                               title=f"onnxruntime on {held.dataset or 'held-out'} {held.split}").name]
    for p in map(Path, given):
        if p.is_file():
            shutil.copy2(p, plots_dir / p.name)
            names.append(p.name)
    return [f"{PLOTS_DIR}/{n}" for n in names]


def _space_document(space: SearchSpace | None) -> dict[str, Any] | None:
    if space is None:
        return None
    return json.loads(json.dumps({"name": space.name, "sha256": space.sha256, "arch": space.arch,
                                  "source": str(space.source) if space.source else None,
                                  "content": dict(space.content), "overrides": dict(space.overrides)}, default=str))


# -- stage 2: publish and register (retryable) ------------------------------------------------------------


@dataclass(frozen=True)
class GatedExport:
    """A gated export directory, read back.

    Attributes:
        held: the test recordings (parity gate and report only).
        selection: the validation recordings the champion is chosen on.
    """

    root: Path
    request: Mapping[str, Any]
    card: Mapping[str, Any]
    parity: ParityReport
    held: HeldOut
    selection: HeldOut

    @classmethod
    def load(cls, root: Path) -> GatedExport:
        root = Path(root)
        parity_path, request_path = root / PARITY_FILE, root / REQUEST_FILE
        if parity_path.is_file() and not request_path.is_file():
            parity = ParityReport.from_dict(json.loads(parity_path.read_text()))
            if not parity.passed:
                raise GateFailed(parity, str(parity_path))
        for name in (MODEL_FILE, REQUEST_FILE, CARD_FILE, PARITY_FILE, HELDOUT_FILE, SELECTION_FILE):
            if not (root / name).is_file():
                raise DataError(f"{root} is not a complete export: {name} is missing; fix: export again "
                                f"(python -m tuning.register --checkpoint CKPT --dataset NAME --out {root})")
        export = cls(root, json.loads((root / REQUEST_FILE).read_text()), json.loads((root / CARD_FILE).read_text()),
                     ParityReport.from_dict(json.loads(parity_path.read_text())), HeldOut.load(root / HELDOUT_FILE),
                     HeldOut.load(root / SELECTION_FILE))
        export.check_gate()
        return export

    def check_gate(self) -> None:
        """Refuse a failed gate, or a file changed since it passed."""
        if not self.parity.passed:
            raise GateFailed(self.parity, str(self.root / PARITY_FILE))
        sha = file_sha256(self.root / MODEL_FILE)
        if sha != self.request["model_sha256"]:
            raise DataError(f"{self.root / MODEL_FILE} changed after it passed the parity gate (sha256 {sha[:12]}… "
                            f"vs {self.request['model_sha256'][:12]}…); registration refused. Fix: export again")

    @property
    def study(self) -> StudyRecord:
        return StudyRecord.from_dict(self.request["study"])

    @property
    def selection_metrics(self) -> Mapping[str, float]:
        """onnxruntime's metrics on :attr:`selection` (computed at export)."""
        return self.request["selection"]["metrics_onnxruntime"]


def register_export(export_dir: str | Path, settings: RegistrySettings, *, force_champion: bool = False) -> RegistrationResult:
    """Publish a gated export and register it in MLflow; safe to run again (the retry command).

    Args:
        export_dir: a directory written by :func:`prepare_export`.
        settings: models store and MLflow.
        force_champion: move the champion alias even if the new version is not better.

    Returns:
        What was published and registered.

    Raises:
        GateFailed: the export failed its parity gate.
        DataError: the directory is incomplete or its model changed after the gate.
        ServiceUnavailableError: the models store or MLflow is down (the message names the retry command).
    """
    from heimdall.store import open_store

    export = GatedExport.load(Path(export_dir))
    try:
        publication = publish(open_store(settings.models_store), export.root / MODEL_FILE, export.card, export.root)
        _update_status(export.root, published=publication.to_dict())
        result = _register_in_mlflow(export, publication, settings, force_champion)
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(
            f"{exc}\nNothing is lost: the export and its card are in {export.root}. Once the service is up, finish with:"
            f"\n    {retry_command(export.root, settings)}") from None
    _update_status(export.root, mlflow=result.to_dict())
    return result


def retry_command(export_dir: Path, settings: RegistrySettings) -> str:
    """The one command that finishes (or repeats) a registration, with the same services."""
    from urllib.parse import urlsplit

    uri = settings.mlflow_uri
    parts = urlsplit(uri)
    if parts.username or parts.password:  # never print credentials; MLflow reads them from its own env vars
        uri = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    return (f"python -m tuning.register --from {Path(export_dir).resolve()} --mlflow-uri {uri} "
            f"--models-store {settings.models_store}")


def _register_in_mlflow(export: GatedExport, publication: Publication, settings: RegistrySettings,
                        force_champion: bool) -> RegistrationResult:
    registry = settings.registry()
    study = export.study
    experiment_id = registry.experiment(study.name)
    run_ids = registry.log_trials(experiment_id, study)
    release_run = registry.release_run(experiment_id, study.name, study.best_trial_id, run_ids)
    tags = {f"{TAG}content_sha256": publication.content_sha256, f"{TAG}sha256": publication.sha256,
            f"{TAG}model_version": publication.version, f"{TAG}models_store": publication.store,
            f"{TAG}model_key": publication.model_key, f"{TAG}study": study.name,
            **_selection_tags(export), **_report_only_tags(export)}
    files = [export.root / n for n in (publication.card_key, PARITY_FILE, SPACE_FILE) if (export.root / n).is_file()]
    plots = [export.root / p for p in study.plots if (export.root / p).is_file()]
    registry.log_release(release_run, onnx_path=Path(publication.local_path), files=files, plots=plots,
                         manifest=export.request.get("lineage"), tags=tags, metrics=_release_metrics(export))
    version = registry.register(release_run, tags)
    comparison = _champion_decision(registry, version, export.selection, export.selection_metrics[CHAMPION_METRIC],
                                    _origin(export.card), export.root, force_champion)
    registry.set_version_tags(version.version, {f"{TAG}champion_comparison": json.dumps(comparison, sort_keys=True)})
    if comparison["decision"] == "promoted":
        registry.set_champion(version.version)
    champion = registry.champion()
    return RegistrationResult(export.root, publication, version.version,
                              champion is not None and champion.version == version.version, comparison,
                              experiment_id, release_run, run_ids)


def _selection_tags(export: GatedExport) -> dict[str, str]:
    """Model-version tags: which recordings chose the champion, and the new version's score on them."""
    metrics, selection = export.selection_metrics, export.selection
    return {f"{TAG}selection_split": selection.split, f"{TAG}selection_sha256": selection.digest(),
            f"{TAG}selection_n": str(len(selection)), f"{TAG}selection_median_km": repr(metrics["median_km"]),
            f"{TAG}selection_nll_km": repr(metrics["nll_km"])}


def _report_only_tags(export: GatedExport) -> dict[str, str]:
    """Model-version tags of the test split: reported for people, never read by a decision."""
    metrics, prefix = export.parity.metrics_onnx, f"{TAG}{REPORT_ONLY}.test_"
    return {f"{prefix}sha256": export.parity.heldout_sha256, f"{prefix}n": str(export.parity.n),
            f"{prefix}median_km": repr(metrics["median_km"]), f"{prefix}nll_km": repr(metrics["nll_km"])}


def _release_metrics(export: GatedExport) -> dict[str, float]:
    """Release-run metrics: onnxruntime on the selection split, and on the test split under ``report_only/``."""
    selection = {f"selection/{SELECTION_SPLIT}_{k}": v for k, v in export.selection_metrics.items()}
    test = {f"{REPORT_ONLY}/test_{k}": v for k, v in export.parity.metrics_onnx.items()}
    return {k: float(v) for k, v in {**selection, **test}.items() if isinstance(v, numbers.Real)}


def _champion_decision(registry: Registry, new: VersionInfo, selection: HeldOut, new_value: float,
                       origin: tuple[float, float], workdir: Path, force: bool) -> dict[str, Any]:
    """Compare the new version with the champion on the selection (validation) recordings.

    The test split is deliberately not an argument: nothing here can read it.

    Args:
        new: the version just registered.
        selection: the validation recordings of the new version's dataset.
        new_value: the new file's :data:`CHAMPION_METRIC` on ``selection`` (onnxruntime, its own frame).
        origin: the new model's frame origin (the champion is scored in the same frame).
        workdir: where the champion's file is downloaded (a temporary folder inside it).
        force: promote whatever the comparison says.
    """
    base = {"metric": CHAMPION_METRIC, "split": selection.split, "selection_sha256": selection.digest(),
            "n": len(selection), "new": {"version": new.version, "value": new_value}}
    current = registry.champion()
    if current is None:
        return {**base, "champion": None, "decision": "promoted", "reason": "no champion yet"}
    if current.version == new.version:
        return {**base, "champion": {"version": current.version, "value": new_value}, "decision": "promoted",
                "reason": "already the champion"}
    value, how = _champion_value(registry, current, selection, origin, workdir)
    base["champion"] = {"version": current.version, "value": value, "how": how}
    if force:
        return {**base, "decision": "promoted", "reason": "forced (--force-champion)"}
    if value is None:
        return {**base, "decision": "kept", "reason": f"not comparable: {how}; use --force-champion to promote anyway"}
    better = new_value < value
    return {**base, "decision": "promoted" if better else "kept",
            "reason": f"{CHAMPION_METRIC} {new_value:.4g} {'<' if better else '>='} champion's {value:.4g} "
                      f"on the same {len(selection)} {selection.split} recordings"}


def _champion_value(registry: Registry, champion: VersionInfo, held: HeldOut, origin: tuple[float, float],
                    workdir: Path) -> tuple[float | None, str]:
    """The champion's metric on the selection recordings ``held``: recomputed from its file, or its tag if it
    was scored on the same recordings."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = registry.download_onnx(champion, Path(tmp))
        meta = ModelMetadata.from_file(path)
        if meta.feature_config == held.feature_config and list(meta.receivers) == list(_receivers()):
            outputs = run_onnx(onnx_session(path), held.features, held.mask)
            return report_from_outputs(outputs, held, origin).to_dict()[CHAMPION_METRIC], "recomputed with onnxruntime"
    if champion.tags.get(f"{TAG}selection_sha256") == held.digest() and champion.tags.get(f"{TAG}selection_median_km"):
        return float(champion.tags[f"{TAG}selection_median_km"]), "its tag (scored on the same recordings)"
    return None, "the champion uses other features or receivers and was scored on other recordings"


def _origin(card: Mapping[str, Any]) -> tuple[float, float]:
    scaling = card["hyperparameters"]["target_scaling"]
    return float(scaling["origin_lat"]), float(scaling["origin_lon"])


def _receivers() -> tuple[str, ...]:
    from heimdall.receivers import STATION_IDS

    return STATION_IDS


def trial_records(results: Iterable[Any], statuses: Mapping[str, str] | None = None) -> list[TrialRecord]:
    """Per-trial records from a Ray Tune ``ResultGrid`` (each ``Result``'s config and metrics dataframe).

    Args:
        results: the ``Result`` objects.
        statuses: optional ``{trial_id: status}`` (e.g. from :func:`tuning.study.report.trial_rows`).

    Returns:
        One record per result; history rows keep ``val/*`` and ``train/*`` metrics and the epoch.
    """
    from tuning.study.trial import EPOCHS_METRIC, OPTUNA_NUMBER_KEY, trial_params

    records = []
    for result in results:
        config = dict(result.config or {})
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        df = result.metrics_dataframe
        history = [] if df is None else [
            {("epoch" if k == EPOCHS_METRIC else k): float(v) for k, v in row.items()
             if (k == EPOCHS_METRIC or k.startswith(("val/", "train/"))) and isinstance(v, numbers.Real)}
            for row in df.to_dict("records")]
        status = (statuses or {}).get(trial_id) or ("error" if result.error else "complete")
        number = config.get(OPTUNA_NUMBER_KEY)
        records.append(TrialRecord(trial_id, trial_params(config), tuple(history), status,
                                   None, int(number) if number is not None else None))
    return records


def _update_status(root: Path, **parts: Any) -> None:
    path = root / STATUS_FILE
    status = json.loads(path.read_text()) if path.is_file() else {}
    status.update(parts)
    _write_json(path, status)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
