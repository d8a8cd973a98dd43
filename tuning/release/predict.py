"""Locate a transmitter from per-receiver IQ recordings with an exported model.

Commands to copy::

    python -m tuning.predict --model models:/heimdall-localization@champion sessions/0001
    python -m tuning.predict --model .heimdall/models/localization-v0.1.0.onnx sessions/0001 sessions/0002
    python -m tuning.predict --model model.onnx websdr_torino.npy websdr_milano.npy websdr_genova.npy
    python -m tuning.predict --model models:/heimdall-localization/3 --confidence 95 sessions/0001

A RECORDING is a session folder as Heimdall's recorder writes it
(``websdr_<station>.npy`` per receiver that recorded, complex64, plus
``metadata.json`` with ``sample_rate_hz`` and optional per-receiver ``snr_db``;
see :mod:`heimdall.realdata`), or, when every argument is a ``.npy`` file,
those files together form one recording (sample rate: ``--sample-rate-hz``,
default the model's). Receivers without a file count as not heard.

The model is a local ``.onnx`` file or a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``) resolved through MLflow (``--mlflow-uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///{data-dir}/mlflow.db``). Everything
needed to run it (feature parameters, receiver order) is read from the file's
metadata; a recording whose receivers, sample rate or length do not fit is
refused with the reason.

Output: one JSON object per recording and line: ``lat``, ``lon``, ``ellipse``
(``semi_major_m``, ``semi_minor_m``, ``rotation_deg`` = bearing of the major
axis clockwise from north, ``confidence``, ``k``), ``sigma_m``, ``rho``,
``receivers_heard``, ``model_version``, ``inference_ms`` (onnxruntime) and
``features_ms``. Exit status: 0 done, 1 a Heimdall error, 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from heimdall.errors import DataError, HeimdallError
from tuning.release.onnx import CONFIDENCE_1SIGMA, K_95, ModelMetadata, onnx_session
from tuning.settings import resolve_data_dir

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["LoadedModel", "Recording", "load_model", "read_recording", "predict", "main", "build_parser"]

CONFIDENCES = {"1sigma": (1.0, CONFIDENCE_1SIGMA), "95": (K_95, 0.95)}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its session, self-description and where it came from."""

    path: Path
    session: onnxruntime.InferenceSession
    metadata: ModelMetadata
    source: str


@dataclass(frozen=True)
class Recording:
    """One recording in the model's receiver order.

    Attributes:
        name: what the user passed.
        iq: (R, T) complex64.
        heard: (R,) bool.
    """

    name: str
    iq: np.ndarray
    heard: np.ndarray


def load_model(ref: str, *, mlflow_uri: str | None = None, data_dir: Path | None = None,
               download_dir: Path | None = None, threads: int | None = None) -> LoadedModel:
    """Open a local ``.onnx`` file or download a registry version.

    Args:
        ref: a path, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        mlflow_uri: the tracking URI for ``models:/`` (see :class:`tuning.settings.RegistrySettings`).
        data_dir: the local data directory (the default SQLite registry lives there).
        download_dir: where a registry version is downloaded (a temporary folder when omitted).
        threads: onnxruntime intra-op threads.

    Returns:
        The loaded model.

    Raises:
        NotFoundError: no such file, model, alias or version.
        DataError: not a Heimdall export.
        ServiceUnavailableError: MLflow unreachable.
    """
    from heimdall.errors import NotFoundError

    if ref.startswith("models:/"):
        from tuning.settings import RegistrySettings

        registry = RegistrySettings.resolve(data_dir or resolve_data_dir(), mlflow_uri).registry()
        info = registry.resolve(ref)
        path = registry.download_onnx(info, download_dir or Path(tempfile.mkdtemp(prefix="heimdall-model-")))
        source = f"{ref} (version {info.version})"
    else:
        path = Path(ref)
        if not path.is_file():
            raise NotFoundError(f"model file {path} does not exist; pass a .onnx file or models:/heimdall-localization@champion")
        source = str(path)
    return LoadedModel(path, *_open_onnx(path, threads), source)


def _open_onnx(path: Path, threads: int | None) -> tuple[onnxruntime.InferenceSession, ModelMetadata]:
    """The session and metadata of an exported model; a file that is not one is a DataError, not a traceback."""
    from google.protobuf.message import DecodeError

    hint = "fix: pass the model.onnx of an export (python -m tuning.register) or models:/heimdall-localization@champion"
    if path.stat().st_size == 0:
        raise DataError(f"model file {path} is empty, not an ONNX model; {hint}")
    try:
        metadata = ModelMetadata.from_file(path)
    except DecodeError:
        raise DataError(f"model file {path} is not an ONNX model (it does not parse as one); {hint}") from None
    try:
        session = onnx_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own exception types, one per status code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"model file {path} does not load in onnxruntime ({first}); {hint}") from None
    return session, metadata


def read_recording(paths: Sequence[Path], metadata: ModelMetadata, sample_rate_hz: float | None = None) -> Recording:
    """Read one recording: a session folder, or a list of ``websdr_<station>.npy`` files.

    Args:
        paths: one folder, or the recording's ``.npy`` files.
        metadata: the model's metadata (receivers, sample rate, length).
        sample_rate_hz: the files' sample rate when no ``metadata.json`` says it.

    Returns:
        IQ and heard flags in the model's receiver order.

    Raises:
        DataError: unknown or duplicate receivers, wrong sample rate, too few samples,
            wrong dtype, non-finite samples, or no receiver at all.
    """
    fc = metadata.feature_config
    if len(paths) == 1 and paths[0].is_dir() and (paths[0] / "metadata.json").is_file():
        return _read_session(paths[0], metadata)
    files = sorted(paths[0].glob("websdr_*.npy")) if len(paths) == 1 and paths[0].is_dir() else list(paths)
    name = str(paths[0]) if len(paths) == 1 else ", ".join(str(p) for p in paths)
    rate = fc.sample_rate_hz if sample_rate_hz is None else sample_rate_hz
    if rate != fc.sample_rate_hz:
        raise DataError(f"{name}: sample rate {rate:.0f} Hz, but the model needs {fc.sample_rate_hz:.0f} Hz; "
                        f"fix: resample the captures to {fc.sample_rate_hz:.0f} Hz")
    iq = np.zeros((len(metadata.receivers), fc.n_samples), dtype=np.complex64)
    heard = np.zeros(len(metadata.receivers), dtype=bool)
    for path in files:
        i = _receiver_index(path, metadata)
        if heard[i]:
            raise DataError(f"{path}: receiver {metadata.receivers[i]!r} is given twice in one recording")
        iq[i], heard[i] = _read_iq(path, fc.n_samples, fc.sample_rate_hz), True
    if not heard.any():
        raise DataError(f"{name}: no receiver file; expected websdr_<id>.npy with id in {', '.join(metadata.receivers)}")
    return Recording(name, iq, heard)


def _read_session(folder: Path, metadata: ModelMetadata) -> Recording:
    from heimdall.realdata import ImportConfig, load_session
    from heimdall.receivers import STATION_IDS

    fc = metadata.feature_config
    for path in folder.glob("websdr_*.npy"):
        _receiver_index(path, metadata)
    iq, labels = load_session(folder, ImportConfig(sample_rate_hz=fc.sample_rate_hz, n_samples=fc.n_samples))
    order = [STATION_IDS.index(r) for r in metadata.receivers]
    return Recording(str(folder), iq[order], np.asarray(labels["heard"], dtype=bool)[order])


def _receiver_index(path: Path, metadata: ModelMetadata) -> int:
    sid = path.stem.removeprefix("websdr_")
    if not path.name.startswith("websdr_") or path.suffix != ".npy" or sid not in metadata.receivers:
        raise DataError(f"{path}: not a receiver of this model; files must be websdr_<id>.npy with id in "
                        f"{', '.join(metadata.receivers)} (the model's receiver set)")
    return metadata.receivers.index(sid)


def _read_iq(path: Path, n_samples: int, rate: float) -> np.ndarray:
    try:
        iq = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if iq.dtype != np.complex64 or iq.ndim != 1:
        raise DataError(f"{path}: IQ must be 1-D complex64, got {iq.dtype} shape {iq.shape}; "
                        f"fix: np.save(path, iq.astype(np.complex64))")
    if iq.shape[0] < n_samples:
        raise DataError(f"{path}: the model needs {n_samples} samples ({n_samples / rate:.3f} s at {rate:.0f} Hz), "
                        f"got {iq.shape[0]}")
    iq = iq[:n_samples]
    if not np.isfinite(iq.view(np.float32)).all():
        raise DataError(f"{path}: IQ holds NaN/inf samples")
    return iq


def predict(model: LoadedModel, recordings: Sequence[Recording], confidence: str = "1sigma") -> list[dict[str, Any]]:
    """Run the model on each recording (one at a time: the latency is per recording).

    Args:
        model: from :func:`load_model`.
        recordings: from :func:`read_recording`.
        confidence: ``"1sigma"`` (39.3%) or ``"95"`` (the ellipse scaled by 2.448).

    Returns:
        One JSON-able dict per recording.
    """
    from heimdall.features import spectrogram_numpy

    k, level = CONFIDENCES[confidence]
    out = []
    for rec in recordings:
        t0 = time.perf_counter()
        features = spectrogram_numpy(rec.iq[None], model.metadata.feature_config, rec.heard[None])
        t1 = time.perf_counter()
        position, sigma, rho, ellipse = model.session.run(
            ["position", "sigma", "rho", "ellipse"], {"features": features, "mask": rec.heard[None]})
        t2 = time.perf_counter()
        out.append({
            "recording": rec.name, "lat": float(position[0, 0]), "lon": float(position[0, 1]),
            "ellipse": {"semi_major_m": float(ellipse[0, 0]) * k, "semi_minor_m": float(ellipse[0, 1]) * k,
                        "rotation_deg": float(ellipse[0, 2]), "confidence": round(level, 4), "k": round(k, 4)},
            "sigma_m": {"east": float(sigma[0, 0]), "north": float(sigma[0, 1])}, "rho": float(rho[0]),
            "receivers_heard": [r for r, h in zip(model.metadata.receivers, rec.heard) if h],
            "model_version": model.metadata.model_version or "unreleased", "model": model.source,
            "inference_ms": round((t2 - t1) * 1000.0, 3), "features_ms": round((t1 - t0) * 1000.0, 3),
        })
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.predict`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m tuning.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recordings", nargs="+", type=Path, metavar="RECORDING",
                   help="session folders, or the websdr_<id>.npy files of one recording")
    p.add_argument("--model", required=True, help="a .onnx file or models:/NAME@ALIAS | models:/NAME/VERSION")
    p.add_argument("--confidence", choices=tuple(CONFIDENCES), default="1sigma",
                   help="ellipse level: 1sigma (39.3%%) or 95 (k=2.448) [1sigma]")
    p.add_argument("--sample-rate-hz", type=float, default=None,
                   help="sample rate of bare .npy files (folders: metadata.json) [the model's]")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads [onnxruntime's choice]")
    p.add_argument("--mlflow-uri", default=None, help="MLflow for models:/ URIs [MLFLOW_TRACKING_URI, sqlite:///{data-dir}/mlflow.db]")
    p.add_argument("--data-dir", type=Path, default=None, help="local data directory [HEIMDALL_DATA_DIR, ./.heimdall]")
    return p


def _groups(paths: Sequence[Path]) -> list[list[Path]]:
    """All .npy files: one recording; otherwise one recording per argument."""
    if all(p.suffix == ".npy" and not p.is_dir() for p in paths):
        return [list(paths)]
    return [[p] for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print one JSON line per recording."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for p in args.recordings:
        if not p.exists():
            parser.error(f"recording {p} does not exist")
    if args.sample_rate_hz is not None and not (math.isfinite(args.sample_rate_hz) and args.sample_rate_hz > 0):
        parser.error(f"--sample-rate-hz must be a positive number, got {args.sample_rate_hz}")
    data_dir = resolve_data_dir(args.data_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="heimdall-model-") as tmp:
            model = load_model(args.model, mlflow_uri=args.mlflow_uri, data_dir=data_dir, download_dir=Path(tmp),
                               threads=args.threads)
            recordings = [read_recording(g, model.metadata, args.sample_rate_hz) for g in _groups(args.recordings)]
            for row in predict(model, recordings, args.confidence):
                print(json.dumps(row))
    except HeimdallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
