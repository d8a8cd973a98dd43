"""A trained checkpoint → one self-describing ONNX file, a parity gate, a model card.

:func:`load_checkpoint` reads a checkpoint as data and refuses one that does not
match its config; :func:`export_onnx` writes the network plus the geographic
head (position, sigma, rho, 1σ ellipse) with :class:`ModelMetadata` in
``metadata_props``, so the file alone suffices to run it; the parity gate
(:func:`verify_parity`) runs onnxruntime and PyTorch on the same held-out
recordings against :class:`ParityTolerances`; :func:`build_model_card` writes
what was released and how well it does. The graph's inputs and outputs, and
why its input is features rather than IQ: docs/architecture.md, "The released file".
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from heimdall.errors import DataError, HeimdallError, collect_problems
from heimdall.features import FeatureConfig
from heimdall.geometry import LocalFrame, haversine_km
from heimdall.metrics import LocalizationReport, localization_report
from heimdall.receivers import STATION_IDS

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from heimdall.catalog import Catalog
    from heimdall.data import HeimdallDataset
    from heimdall.module import LocalizationModule
    from tuning.study.spaces import SearchSpace, TrialConfigs

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "CONFIDENCE_1SIGMA",
    "K_95",
    "ExportError",
    "GateFailed",
    "ExportedLocalizer",
    "ellipse_torch",
    "load_checkpoint",
    "HeldOut",
    "ModelMetadata",
    "build_metadata",
    "export_onnx",
    "with_model_version",
    "content_sha256",
    "file_sha256",
    "onnx_session",
    "run_onnx",
    "report_from_outputs",
    "ParityTolerances",
    "ParityReport",
    "verify_parity",
    "data_lineage",
    "library_versions",
    "git_revision",
    "build_model_card",
    "save_heldout_plot",
]

INPUT_NAMES = ("features", "mask")
OUTPUT_NAMES = ("position", "sigma", "rho", "ellipse")
#: Probability mass inside the 1σ ellipse of a 2-D Gaussian: 1 - exp(-1/2).
CONFIDENCE_1SIGMA = 1.0 - math.exp(-0.5)
#: Scale of the 95% ellipse of a 2-D Gaussian: sqrt(chi2(2).ppf(0.95)).
K_95 = math.sqrt(-2.0 * math.log(0.05))
ONNX_OPSET = 20
# Keys that name a file's release, not its content: left out of the content digest.
_VOLATILE_KEYS = ("model_version", "created")
_REQUIRED_KEYS = ("feature_config", "receivers", "frame_origin", "target_scaling", "covariance_scale",
                  "model_version", "ellipse_confidence")
_MAX_BATCH = 65536


class ExportError(HeimdallError):
    """The model could not be exported to ONNX (the message carries the exporter's reason)."""


class GateFailed(HeimdallError):
    """The ONNX file does not reproduce PyTorch on the held-out recordings; registration refused.

    Attributes:
        report: the :class:`ParityReport` (``report.text()`` is readable).
    """

    def __init__(self, report: ParityReport, where: str = "") -> None:
        self.report = report
        suffix = f"; full report: {where}" if where else ""
        super().__init__(f"parity gate failed, registration refused{suffix}\n{report.text()}")


# -- the exported graph ---------------------------------------------------------------------------


def ellipse_torch(sigma_east: torch.Tensor, sigma_north: torch.Tensor, rho: torch.Tensor,
                  k: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k``-sigma ellipse of each Gaussian, as :func:`heimdall.metrics.ellipse_from_covariance`.

    A closed-form 2×2 eigen-decomposition (``torch.linalg.eigh`` does not export):
    sigmas are first divided by the larger of the two so that nothing overflows
    in float32, and the minor eigenvalue is ``det / major`` rather than a
    difference, which keeps it accurate for thin ellipses.

    Args:
        sigma_east, sigma_north: (B,) standard deviations, any length unit.
        rho: (B,) correlation in (-1, 1).
        k: the ellipse's scale in sigmas.

    Returns:
        ``(semi_major, semi_minor, rotation_deg)``, each (B,): axes in the unit of
        the sigmas, rotation the bearing of the major axis clockwise from north in [0, 180).
    """
    s = torch.maximum(sigma_east, sigma_north).clamp_min(torch.finfo(sigma_east.dtype).tiny)
    u, v = sigma_east / s, sigma_north / s
    a, d, b = u * u, v * v, rho * u * v
    half_gap = torch.sqrt(((a - d) * 0.5).square() + b * b)
    major = (a + d) * 0.5 + half_gap
    minor = (u * v).square() * (1.0 - rho * rho).clamp_min(0.0) / major
    east_wider = a >= d
    # The major eigenvector is (ve, vn); both branches avoid cancelling differences.
    ve = torch.where(east_wider, (a - d) * 0.5 + half_gap, b)
    vn = torch.where(east_wider, b, (d - a) * 0.5 + half_gap)
    rotation = torch.remainder(torch.atan2(ve, vn) * (180.0 / math.pi), 180.0)
    rotation = torch.where((half_gap == 0) | (rotation > 180.0 - 1.8e-3), torch.zeros_like(rotation), rotation)
    return k * s * torch.sqrt(major), k * s * torch.sqrt(minor), rotation


class ExportedLocalizer(nn.Module):
    """A trained module's geographic output, split into the named outputs of the contract.

    Args:
        module: a trained (and calibrated) :class:`LocalizationModule`.
    """

    def __init__(self, module: LocalizationModule) -> None:
        super().__init__()
        self.geographic = module.geographic_model()
        self.full_head = module.model.config.head == "full"

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``position`` (B, 2) deg, ``sigma`` (B, 2) m, ``rho`` (B,), ``ellipse`` (B, 3)."""
        out = self.geographic(features, mask)
        sigma = out[:, 2:4]
        rho = out[:, 4] if self.full_head else torch.zeros_like(out[:, 0])
        ellipse = torch.stack(ellipse_torch(sigma[:, 0], sigma[:, 1], rho), dim=1)
        return out[:, 0:2], sigma, rho, ellipse


# -- loading a checkpoint ---------------------------------------------------------------------------


def load_checkpoint(path: str | Path, expected: TrialConfigs | None = None,
                    feature_config: FeatureConfig | None = None) -> LocalizationModule:
    """Rebuild a trained module, refusing a checkpoint that does not match its config.

    The file is read as data (``torch.load(weights_only=True)``, see
    :func:`heimdall.module.read_checkpoint`): a checkpoint planted in the run
    storage cannot run code here.

    Args:
        path: a Lightning checkpoint of :class:`LocalizationModule` (or ``calibrated.ckpt``), or a
            directory holding exactly one ``.ckpt`` file (a Ray Train checkpoint directory).
        expected: the trial's configs; arch, model and loss config must equal the checkpoint's.
        feature_config: the features the held-out data was computed with; must equal the checkpoint's.

    Returns:
        The module in eval mode.

    Raises:
        CheckpointError: a missing file, a file that is not a plain-data checkpoint of this module,
            or weights that do not fit the architecture of its saved hyperparameters.
        ConfigError: configs that differ from ``expected``/``feature_config`` (every difference listed).
    """
    from heimdall.module import LocalizationModule  # Lightning: imported only by those who load checkpoints

    path = _checkpoint_file(Path(path))
    module = LocalizationModule.from_checkpoint(path)
    collect_problems(f"checkpoint {path}", _config_differences(module, expected, feature_config))
    return module.eval()


def _checkpoint_file(path: Path) -> Path:
    from heimdall.module import CheckpointError

    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(f"checkpoint directory {path} holds {len(found)} .ckpt files "
                              f"({', '.join(p.name for p in found) or 'none'}); fix: pass the file itself")
    return path  # a missing file is named by read_checkpoint


def _config_differences(module: LocalizationModule, expected: TrialConfigs | None,
                        feature_config: FeatureConfig | None) -> list[str]:
    h = module.hparams
    pairs: list[tuple[str, Any, Any]] = []
    if expected is not None:
        pairs += [("arch", h["arch"], expected.arch), ("model config", h["model_config"], expected.model.to_dict()),
                  ("loss config", h["loss_config"], expected.loss.to_dict())]
    if feature_config is not None:
        pairs.append(("feature config", h["feature_config"], feature_config.to_dict()))
    problems = []
    for what, saved, wanted in pairs:
        saved_j, wanted_j = json.loads(json.dumps(saved)), json.loads(json.dumps(wanted))
        if saved_j != wanted_j:
            keys = sorted(k for k in set(saved_j) | set(wanted_j) if saved_j.get(k) != wanted_j.get(k)) \
                if isinstance(saved_j, dict) and isinstance(wanted_j, dict) else []
            detail = ", ".join(f"{k}: saved {saved_j.get(k)!r} vs expected {wanted_j.get(k)!r}" for k in keys) \
                or f"saved {saved_j!r} vs expected {wanted_j!r}"
            problems.append(f"{what} differs from the trial's ({detail}); fix: pass the checkpoint of this trial")
    if module.model.n_receivers != len(STATION_IDS):
        problems.append(f"the model has {module.model.n_receivers} receivers but the network has {len(STATION_IDS)} "
                        f"({', '.join(STATION_IDS)}); only models of this network can be exported")
    return problems


# -- held-out recordings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The held-out recordings every comparison runs on (parity gate, champion).

    Truths are kept as latitude/longitude, so models with different frame
    origins are scored on the same ground.

    Attributes:
        recording_id: (N,) ids.
        features: (N, R, F, T) float16 features, as computed for training.
        mask: (N, R) bool.
        truth_lat, truth_lon: (N,) degrees.
        feature_config: how the features were computed.
        dataset: the dataset's name.
        split: its split (``"test"``).
    """

    recording_id: np.ndarray
    features: np.ndarray
    mask: np.ndarray
    truth_lat: np.ndarray
    truth_lon: np.ndarray
    feature_config: FeatureConfig
    dataset: str = ""
    split: str = "test"

    def __post_init__(self) -> None:
        n = len(self.recording_id)
        if n == 0:
            raise DataError(f"the held-out split {self.split!r} of dataset {self.dataset!r} is empty; "
                            "fix: use a dataset with more recordings or a larger test fraction")
        if not (self.features.shape[0] == self.mask.shape[0] == len(self.truth_lat) == len(self.truth_lon) == n):
            raise DataError(f"held-out arrays disagree on length: ids {n}, features {self.features.shape[0]}, "
                            f"mask {self.mask.shape[0]}, truths {len(self.truth_lat)}")

    @classmethod
    def from_split(cls, ds: HeimdallDataset, module: LocalizationModule, *, dataset: str = "",
                   split: str = "test") -> HeldOut:
        """Take a split of :func:`heimdall.data.load_feature_splits` (targets in the module's frame)."""
        s = module.target_scaling
        truth_km = ds.target.double().numpy() * s.target_scale_km
        lat, lon = LocalFrame(s.origin_lat, s.origin_lon).to_geographic(truth_km[:, 0], truth_km[:, 1])
        return cls(np.asarray(ds.recording_id, dtype=np.int64), ds.features.to(torch.float16).numpy(),
                   ds.mask.numpy().astype(bool), lat, lon, module.feature_config, dataset, split)

    def __len__(self) -> int:
        return len(self.recording_id)

    def digest(self) -> str:
        """sha256 of dataset, split and recording ids: equal digests mean the same recordings."""
        h = hashlib.sha256(f"{self.dataset}\0{self.split}\0".encode())
        h.update(np.ascontiguousarray(np.sort(self.recording_id).astype("<i8")).tobytes())
        return h.hexdigest()

    def truth_km(self, origin_lat: float, origin_lon: float) -> np.ndarray:
        """(N, 2) truths east/north km in the frame at ``origin``."""
        east, north = LocalFrame(origin_lat, origin_lon).to_local(self.truth_lat, self.truth_lon)
        return np.stack([east, north], axis=-1)

    def save(self, path: Path) -> None:
        """Write an ``.npz`` (read back by :meth:`load`)."""
        meta = json.dumps({"feature_config": self.feature_config.to_dict(), "dataset": self.dataset,
                           "split": self.split})
        with open(path, "wb") as f:
            np.savez(f, recording_id=self.recording_id, features=self.features, mask=self.mask,
                     truth_lat=self.truth_lat, truth_lon=self.truth_lon, meta=np.array(meta))

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        """Read :meth:`save`'s file.

        Raises:
            DataError: the file is missing or not a held-out file.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return cls(z["recording_id"], z["features"], z["mask"], z["truth_lat"], z["truth_lon"],
                           FeatureConfig.from_dict(meta["feature_config"]), meta["dataset"], meta["split"])
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a held-out file written by HeldOut.save ({exc}); "
                            "fix: export again from the checkpoint") from None


# -- metadata and the file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported file says about itself (``metadata_props``, parsed).

    Attributes:
        feature_config: how to compute the ``features`` input from IQ.
        receivers: receiver ids in input order.
        frame_origin: (lat, lon) of the tangent frame the network was trained in.
        covariance_scale: the calibration already applied to ``sigma``/``ellipse``.
        model_version: ``MAJOR.MINOR.PATCH``, or ``""`` before publication.
        ellipse_confidence: probability mass of the ``ellipse`` output (1σ: 0.393).
        values: every key, JSON-decoded.
    """

    feature_config: FeatureConfig
    receivers: tuple[str, ...]
    frame_origin: tuple[float, float]
    covariance_scale: float
    model_version: str
    ellipse_confidence: float
    values: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, source: str = "the model") -> ModelMetadata:
        """Parse a model's metadata.

        Raises:
            DataError: keys missing or not JSON: not a file written by :func:`export_onnx`.
        """
        raw = {p.key: p.value for p in model.metadata_props}
        missing = [k for k in _REQUIRED_KEYS if k not in raw]
        if missing:
            raise DataError(f"{source} lacks the Heimdall metadata {', '.join(missing)}; "
                            "it was not written by tuning.release.onnx (export the checkpoint again)")
        try:
            values = {k: json.loads(v) for k, v in raw.items()}
            origin = values["frame_origin"]
            return cls(FeatureConfig.from_dict(values["feature_config"]), tuple(values["receivers"]),
                       (float(origin["lat"]), float(origin["lon"])), float(values["covariance_scale"]),
                       str(values["model_version"]), float(values["ellipse_confidence"]), values)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{source} has unreadable Heimdall metadata ({exc}); export the checkpoint again") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelMetadata:
        """Parse the metadata of an ``.onnx`` file."""
        import onnx

        return cls.from_model(onnx.load(str(path), load_external_data=False), str(path))


def build_metadata(module: LocalizationModule, *, space: SearchSpace | None = None, model_version: str = "",
                   created: str | None = None) -> dict[str, Any]:
    """The metadata of an export of ``module`` (values JSON-able)."""
    s = module.target_scaling
    h = module.hparams
    return {
        "feature_config": module.feature_config.to_dict(),
        "receivers": list(STATION_IDS),
        "frame_origin": {"lat": s.origin_lat, "lon": s.origin_lon},
        "target_scaling": s.to_dict(),
        "covariance_scale": float(module.covariance_scale),
        "ellipse_confidence": CONFIDENCE_1SIGMA,
        "search_space": {"name": space.name if space else None, "sha256": space.sha256 if space else None},
        "model_version": model_version,
        "arch": h["arch"],
        "model_config": h["model_config"],
        "loss_config": h["loss_config"],
        "outputs": {"position": "lat, lon degrees", "sigma": "east, north meters (1 sigma, calibrated)",
                    "rho": "east/north correlation", "ellipse": "semi-major m, semi-minor m, rotation deg "
                    "(major axis bearing clockwise from north) at ellipse_confidence"},
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "heimdall_version": _version("heimdall-tune"),
    }


def export_onnx(module: LocalizationModule, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Export ``module`` (its calibrated geographic output) to one ``.onnx`` file.

    Uses the dynamo exporter (opset 20) with a dynamic batch axis and the weights
    inside the file (``external_data=False``).

    Args:
        module: trained and calibrated.
        path: the file to write (replaced atomically).
        metadata: :func:`build_metadata`'s dict.

    Returns:
        ``path``.

    Raises:
        ExportError: the exporter failed (its reason in the message).
    """
    import onnx

    path = Path(path)
    wrapper = ExportedLocalizer(module).eval()
    fc = module.feature_config
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, module.model.n_receivers, fc.n_fft, fc.n_frames, generator=gen),
               torch.ones(2, module.model.n_receivers, dtype=torch.bool))
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    try:
        with warnings.catch_warnings(), _quiet_logger("torch.onnx._internal.exporter._registration"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, example, input_names=list(INPUT_NAMES),
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch}, {0: batch}),
                                        opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False)
        model = program.model_proto
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for arch {module.hparams['arch']!r}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    _strip_trace_info(model)
    _decompose_logsumexp(model)
    _set_metadata(model, metadata)
    model.producer_name, model.doc_string = "heimdall-tune", __doc__.split("\n\n")[0]
    onnx.checker.check_model(model)
    _save_atomic(model, path)
    return path


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a logger for a while (the exporter warns about torchvision ops we never use)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _strip_trace_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debugging metadata: stack traces with absolute source
    paths would make the file (and its content digest) depend on where it was exported."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _decompose_logsumexp(model: onnx.ModelProto) -> None:
    """Rewrite ``ReduceLogSumExp`` as ``max + log(sum(exp(x - max)))``.

    onnxruntime's ReduceLogSumExp kernel took a fifth of the default ResNet's
    time at batch 64 (the level summary reduces 4,096 values per receiver);
    Max/Exp/Sum are vectorised and ~6x faster together, and this is the
    numerically stable form. The parity gate checks the result like any other.
    """
    from onnx import helper

    nodes = []
    for n in model.graph.node:
        if n.op_type != "ReduceLogSumExp" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            nodes.append(n)
            continue
        x, axes, p = n.input[0], n.input[1], n.name or n.output[0]
        keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
        summed = n.output[0] if keep else f"{p}/lse"
        nodes += [helper.make_node("ReduceMax", [x, axes], [f"{p}/max"], keepdims=1, name=f"{p}/max"),
                  helper.make_node("Sub", [x, f"{p}/max"], [f"{p}/shifted"], name=f"{p}/shifted"),
                  helper.make_node("Exp", [f"{p}/shifted"], [f"{p}/exp"], name=f"{p}/exp"),
                  helper.make_node("ReduceSum", [f"{p}/exp", axes], [f"{p}/sum"], keepdims=1, name=f"{p}/sum"),
                  helper.make_node("Log", [f"{p}/sum"], [f"{p}/log"], name=f"{p}/log"),
                  helper.make_node("Add", [f"{p}/log", f"{p}/max"], [summed], name=f"{p}/add")]
        if not keep:
            nodes.append(helper.make_node("Squeeze", [summed, axes], [n.output[0]], name=f"{p}/squeeze"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    del model.metadata_props[:]
    for key in sorted(metadata):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(metadata[key], sort_keys=True)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString(deterministic=True))
    tmp.replace(path)


def with_model_version(src: str | Path, dst: str | Path, version: str) -> Path:
    """Copy an export with ``model_version`` set: the published file (content digest unchanged)."""
    import onnx

    model = onnx.load(str(src))
    values = {p.key: json.loads(p.value) for p in model.metadata_props}
    values["model_version"] = version
    _set_metadata(model, values)
    _save_atomic(model, Path(dst))
    return Path(dst)


def content_sha256(path_or_model: str | Path | onnx.ModelProto) -> str:
    """sha256 of graph, weights and metadata except ``model_version`` and ``created``.

    Two files with the same content digest compute the same thing with the same
    self-description: they are one release.
    """
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    model = copy.deepcopy(model)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in _VOLATILE_KEYS]
    del model.metadata_props[:]
    for key, value in sorted(kept):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- running the file ------------------------------------------------------------------------------


def onnx_session(path: str | Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session (``threads``: intra-op threads; None lets onnxruntime choose)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: onnxruntime.InferenceSession, features: np.ndarray, mask: np.ndarray,
             batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run the model over (N, R, F, T) features in batches; returns each output, concatenated."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(features), batch_size):
        feed = {"features": np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32),
                "mask": np.ascontiguousarray(mask[start:start + batch_size], dtype=bool)}
        for name, value in zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feed)):
            parts[name].append(value)
    return {name: np.concatenate(v) for name, v in parts.items()}


@torch.no_grad()
def _run_torch(module: LocalizationModule, held: HeldOut, batch_size: int = 256) -> tuple[dict[str, np.ndarray], ...]:
    """The exported wrapper's outputs and the module's own Gaussian (km) on the held-out set."""
    wrapper = ExportedLocalizer(module).eval()
    outs: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    gauss: dict[str, list[np.ndarray]] = {"mean": [], "cov": []}
    for start in range(0, len(held), batch_size):
        x = torch.from_numpy(held.features[start:start + batch_size].astype(np.float32))
        m = torch.from_numpy(held.mask[start:start + batch_size])
        for name, value in zip(OUTPUT_NAMES, wrapper(x, m)):
            outs[name].append(value.numpy())
        mean, cov = module.predict_gaussian(x, m)
        gauss["mean"].append(mean.double().numpy())
        gauss["cov"].append(cov.double().numpy())
    return ({k: np.concatenate(v) for k, v in outs.items()}, {k: np.concatenate(v) for k, v in gauss.items()})


def report_from_outputs(outputs: Mapping[str, np.ndarray], held: HeldOut,
                        origin: tuple[float, float]) -> LocalizationReport:
    """Score a model's outputs (lat/lon, sigma m, rho) on the held-out truths, in the frame at ``origin``."""
    frame = LocalFrame(*origin)
    east, north = frame.to_local(outputs["position"][:, 0], outputs["position"][:, 1])
    s = outputs["sigma"].astype(np.float64) / 1000.0
    rho = outputs["rho"].astype(np.float64)
    off = rho * s[:, 0] * s[:, 1]
    cov = np.stack([np.stack([s[:, 0] ** 2, off], -1), np.stack([off, s[:, 1] ** 2], -1)], -2)
    return localization_report(np.stack([east, north], -1), cov, held.truth_km(*origin))


# -- the parity gate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityTolerances:
    """What onnxruntime and PyTorch must agree on, per recording and on the metrics.

    Attributes:
        position_m: great-circle distance between the two positions. Positions
            are float32 degrees: one latitude step is 0.42 m at 45° N, and the
            float32 asin of the tangent-plane transform differs between the two
            runtimes by up to 4 steps (1.5 m measured on 1,000 recordings), so
            2 m; the model's own errors are kilometres.
        sigma_m, sigma_rel: each sigma and ellipse axis within ``sigma_m`` meters
            *or* ``sigma_rel`` of its value, whichever is larger.
        rho: absolute difference of the correlation.
        rotation_deg: ellipse rotation (mod 180), checked where the ellipse is not
            nearly circular (axes differing by > 0.1%), as the angle of a circle is arbitrary.
        metric_km, metric_rel: km metrics (median, p90, rmse, mean, NLL,
            sharpness) within ``metric_km`` or ``metric_rel`` of the value.
        coverage_recordings: coverages may differ by this many recordings (a
            truth exactly on an ellipse's edge may fall either way).
    """

    position_m: float = 2.0
    sigma_m: float = 1.0
    sigma_rel: float = 1e-4
    rho: float = 1e-4
    rotation_deg: float = 0.1
    metric_km: float = 1e-3
    metric_rel: float = 5e-3
    coverage_recordings: int = 1

    def __post_init__(self) -> None:
        collect_problems("ParityTolerances", [
            f"{f.name} must be >= 0, got {getattr(self, f.name)}" for f in dataclasses.fields(self)
            if not getattr(self, f.name) >= 0])

    def to_dict(self) -> dict[str, float]:
        """Plain dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityReport:
    """The outcome of the gate.

    Attributes:
        passed: every check within tolerance.
        n: held-out recordings compared.
        max_diff: largest difference per check (``position_m``, ``sigma_m``, ...).
        metrics_torch, metrics_onnx: held-out reports, PyTorch and onnxruntime.
        failures: one line per check that failed.
        tolerances: the tolerances used.
        heldout_sha256: which recordings (:meth:`HeldOut.digest`).
    """

    passed: bool
    n: int
    max_diff: dict[str, float]
    metrics_torch: dict[str, float]
    metrics_onnx: dict[str, float]
    failures: list[str]
    tolerances: dict[str, float]
    heldout_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParityReport:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def text(self) -> str:
        """A readable report: verdict, each difference, each metric side by side."""
        lines = [f"parity gate: {'PASSED' if self.passed else 'FAILED'} on {self.n} held-out recordings"]
        lines += [f"  FAIL {f}" for f in self.failures]
        lines += [f"  max |diff| {k:<14} {v:.6g}" for k, v in self.max_diff.items()]
        lines.append(f"  {'metric':<16} {'torch':>12} {'onnxruntime':>12}")
        lines += [f"  {k:<16} {self.metrics_torch[k]:>12.6g} {self.metrics_onnx.get(k, float('nan')):>12.6g}"
                  for k in self.metrics_torch]
        return "\n".join(lines)


def verify_parity(module: LocalizationModule, onnx_path: str | Path, held: HeldOut,
                  tolerances: ParityTolerances = ParityTolerances()) -> ParityReport:
    """Run PyTorch and onnxruntime on the held-out recordings and compare (never raises on a mismatch).

    Per recording: position (m), sigmas, rho and ellipse of the file versus the
    module's exported wrapper in eager PyTorch. Metrics: the module's own
    Gaussian (km, :meth:`LocalizationModule.predict_gaussian`, what the
    evaluation reports) versus the file's outputs converted back to km.

    Args:
        module: the module that was exported.
        onnx_path: the file.
        held: the recordings.
        tolerances: what must agree.

    Returns:
        The report; ``passed`` is False with ``failures`` listing what differed.
    """
    torch_out, gauss = _run_torch(module, held)
    ort_out = run_onnx(onnx_session(onnx_path), held.features, held.mask)
    diffs, failures = _output_differences(torch_out, ort_out, tolerances)
    s = module.target_scaling
    rep_t = localization_report(gauss["mean"], gauss["cov"], held.truth_km(s.origin_lat, s.origin_lon)).to_dict()
    rep_o = report_from_outputs(ort_out, held, (s.origin_lat, s.origin_lon)).to_dict()
    failures += _metric_differences(rep_t, rep_o, tolerances, len(held))
    return ParityReport(not failures, len(held), diffs, rep_t, rep_o, failures, tolerances.to_dict(), held.digest())


def _output_differences(t: Mapping[str, np.ndarray], o: Mapping[str, np.ndarray],
                        tol: ParityTolerances) -> tuple[dict[str, float], list[str]]:
    failures: list[str] = []
    finite = all(np.isfinite(o[k]).all() for k in OUTPUT_NAMES)
    if not finite:
        failures.append("onnxruntime produced NaN or inf outputs")
    pos_m = haversine_km(t["position"][:, 0], t["position"][:, 1], o["position"][:, 0], o["position"][:, 1]) * 1000.0
    scaled = {"sigma_m": (t["sigma"], o["sigma"]), "ellipse_axis_m": (t["ellipse"][:, :2], o["ellipse"][:, :2])}
    diffs = {"position_m": _max(pos_m)}
    if diffs["position_m"] > tol.position_m or not np.isfinite(pos_m).all():
        failures.append(f"position differs by up to {diffs['position_m']:.3g} m > {tol.position_m} m")
    for name, (a, b) in scaled.items():
        d = np.abs(a.astype(np.float64) - b)
        allowed = np.maximum(tol.sigma_m, tol.sigma_rel * np.abs(a))
        diffs[name] = _max(d)
        diffs[name.replace("_m", "_rel")] = _max(d / np.maximum(np.abs(a), 1e-12))
        if not (d <= allowed).all():
            failures.append(f"{name} differs by up to {diffs[name]:.3g} m (relative {diffs[name.replace('_m', '_rel')]:.3g}) "
                            f"> {tol.sigma_m} m or {tol.sigma_rel:g} relative")
    diffs["rho"] = _max(np.abs(t["rho"].astype(np.float64) - o["rho"]))
    if diffs["rho"] > tol.rho:
        failures.append(f"rho differs by up to {diffs['rho']:.3g} > {tol.rho}")
    major, minor = t["ellipse"][:, 0].astype(np.float64), t["ellipse"][:, 1]
    defined = (major - minor) > 1e-3 * major
    turn = np.abs(t["ellipse"][:, 2].astype(np.float64) - o["ellipse"][:, 2]) % 180.0
    turn = np.minimum(turn, 180.0 - turn)[defined]
    diffs["rotation_deg"] = _max(turn)
    if diffs["rotation_deg"] > tol.rotation_deg:
        failures.append(f"ellipse rotation differs by up to {diffs['rotation_deg']:.3g} deg > {tol.rotation_deg} deg")
    return diffs, failures


def _max(x: np.ndarray) -> float:
    return float(np.max(x)) if np.size(x) else 0.0


def _metric_differences(t: Mapping[str, float], o: Mapping[str, float], tol: ParityTolerances, n: int) -> list[str]:
    failures = []
    for key, a in t.items():
        b = o[key]
        if key == "n":
            continue
        if key.startswith("coverage"):
            allowed = tol.coverage_recordings / n + 1e-12
        else:
            allowed = max(tol.metric_km, tol.metric_rel * abs(a))
        if not abs(a - b) <= allowed:
            failures.append(f"metric {key}: torch {a:.6g} vs onnxruntime {b:.6g} (|diff| {abs(a - b):.3g} > {allowed:.3g})")
    return failures


# -- model card ------------------------------------------------------------------------------------


def data_lineage(catalog: Catalog, dataset: str, split_config: Any | None = None) -> dict[str, Any]:
    """Where the training data came from: the dataset's catalogue entry and its shard manifest.

    Args:
        catalog: the catalogue holding ``dataset``.
        dataset: its name.
        split_config: the :class:`heimdall.datasets.SplitConfig` used (default: the default split).

    Returns:
        JSON-able dict: name, kind, seed, counts, store, config digest, split, shards
        (index, key, sha256, n_rows, n_bytes).
    """
    from heimdall.datasets import SplitConfig

    info = catalog.get_dataset(dataset)
    shards = [{"index": s.index, "key": s.key, "sha256": s.sha256, "n_rows": s.n_rows, "n_bytes": s.n_bytes}
              for s in catalog.shards(dataset)]
    config_json = json.dumps(info.config, sort_keys=True, default=str)
    return {
        "dataset": info.name, "kind": info.kind, "seed": info.seed, "status": info.status,
        "n_recordings": info.n_recordings, "n_shards": info.n_shards, "store": info.store,
        "created_at": info.created_at.isoformat() if info.created_at else None,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(), "config": info.config,
        "split": dataclasses.asdict(split_config or SplitConfig()),
        "shards": shards,
    }


def library_versions() -> dict[str, str]:
    """Versions of what produced and runs the file."""
    names = ("torch", "lightning", "onnx", "onnxruntime", "onnxscript", "mlflow", "numpy", "heimdall-tune")
    return {"python": platform.python_version(), **{n: _version(n) for n in names}}


def _version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    """``git rev-parse HEAD`` of the source tree (``+dirty`` with local changes), or ``"unknown"``."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def build_model_card(*, module: LocalizationModule, metadata: Mapping[str, Any], evaluation: Mapping[str, Any],
                     parity: ParityReport, held: HeldOut, lineage: Mapping[str, Any] | None,
                     space: Mapping[str, Any] | None, study: Mapping[str, Any], seeds: Mapping[str, Any],
                     content_digest: str) -> dict[str, Any]:
    """The JSON model card published next to the file.

    Args:
        module: the exported module (its hyperparameters are recorded).
        metadata: the file's metadata.
        evaluation: :func:`heimdall.evaluation.evaluate_split`'s dict (PyTorch; test split).
        parity: the gate's report (its onnxruntime metrics are the card's headline metrics).
        held: the held-out recordings.
        lineage: :func:`data_lineage`'s dict (None when unknown).
        space: the search space (name, sha256, arch, content) or None.
        study: study name, best trial, objective, trial count.
        seeds: every seed that shaped the model.
        content_digest: :func:`content_sha256` of the file.

    Returns:
        The card; ``model_version``, ``file`` and ``sha256`` are filled in at publication.
    """
    onnx_metrics = parity.metrics_onnx
    oracle = evaluation.get("oracle")
    return {
        "name": "heimdall-localization",
        "model_version": metadata.get("model_version", ""),
        "file": None, "sha256": None, "content_sha256": content_digest,
        "created": metadata["created"],
        "inputs": {"features": "float32 (B, R, F, T), heimdall.features units", "mask": "bool (B, R) receiver heard",
                   "receivers": metadata["receivers"], "feature_config": metadata["feature_config"]},
        "outputs": metadata["outputs"],
        "ellipse_confidence": CONFIDENCE_1SIGMA,
        "metrics": {"held_out_onnxruntime": onnx_metrics, "held_out_torch": parity.metrics_torch,
                    "oracle": oracle, "centre": evaluation.get("centre"),
                    "model_uncalibrated": evaluation.get("model_uncalibrated")},
        "oracle_ratio": (onnx_metrics["median_km"] / oracle["median_km"]) if oracle and oracle["median_km"] > 0 else None,
        "coverage": {k: onnx_metrics[k] for k in ("coverage_1sigma", "coverage_2sigma", "coverage_95", "coverage_mad")}
        | {"profile": evaluation.get("test_coverage_profile")},
        "covariance_scale": float(module.covariance_scale),
        "held_out": {"dataset": held.dataset, "split": held.split, "n": len(held), "recordings_sha256": held.digest()},
        "parity": parity.to_dict(),
        "data_lineage": dict(lineage) if lineage else None,
        "search_space": dict(space) if space else None,
        "study": dict(study),
        "hyperparameters": json.loads(json.dumps(dict(module.hparams), default=str)),
        "seeds": dict(seeds),
        "library_versions": library_versions(),
        "git_revision": metadata["git_revision"],
        "heimdall_version": metadata["heimdall_version"],
        "python": sys.version.split()[0],
    }


def save_heldout_plot(outputs: Mapping[str, np.ndarray], held: HeldOut, origin: tuple[float, float],
                      path: str | Path, title: str = "") -> Path:
    """A PNG of the held-out error distribution (CDF, km) and the coverage of the k-sigma ellipses.

    Args:
        outputs: the file's outputs on ``held`` (:func:`run_onnx`).
        held: the recordings.
        origin: the frame to measure errors in (the model's).
        path: the PNG to write.
        title: a line above both panels.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    frame = LocalFrame(*origin)
    east, north = frame.to_local(outputs["position"][:, 0], outputs["position"][:, 1])
    truth = held.truth_km(*origin)
    err = np.sort(np.hypot(east - truth[:, 0], north - truth[:, 1]))
    s = outputs["sigma"].astype(np.float64) / 1000.0
    off = outputs["rho"] * s[:, 0] * s[:, 1]
    cov = np.stack([np.stack([s[:, 0] ** 2, off], -1), np.stack([off, s[:, 1] ** 2], -1)], -2)
    d = truth - np.stack([east, north], -1)
    m2 = np.einsum("ni,nij,nj->n", d, np.linalg.inv(cov), d)
    ks = np.linspace(0.25, 3.0, 12)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(err, np.arange(1, len(err) + 1) / len(err))
    ax1.set(xlabel="error km", ylabel="fraction of recordings", title=f"held-out error CDF (n={len(err)})")
    ax2.plot(ks, [(m2 <= k * k).mean() for k in ks], "o-", label="model")
    ax2.plot(ks, 1.0 - np.exp(-0.5 * ks**2), "k--", label="nominal")
    ax2.set(xlabel="ellipse scale k (sigmas)", ylabel="coverage", title="ellipse coverage")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
