"""Heimdall's raw-IQ objects: where they are, how to read them, read-only.

Two layouts share the bucket (``heimdall-raw-iq`` by default)::

    sessions/{celery_task_id}/websdr_{n}.npy              single acquisition (+ websdr_{n}_metadata.json)
    sessions/{session_id}/chunk_{k:03d}_websdr_{n}.npy    one-second chunks of a recording session

``measurements.iq_data_location`` names the object as ``s3://BUCKET/sessions/...``,
but for chunks upstream writes the location with the 0-based chunk index and the
object key with the 1-based one. :func:`chunk_key_base` decides, per session
folder, from the keys that actually exist. ``n`` is upstream's receiver number;
it is never used to tell stations apart (the measurement row's station is).

Arrays are 1-D complex; upstream writes complex128 (``np.array(iq.tolist())``),
:func:`decode_iq` returns complex64.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from heimdall.store.s3 import S3Settings, S3Store

__all__ = ["ObjectRef", "parse_location", "chunk_key_base", "object_key", "IqProblem", "decode_iq", "RawIqBucket"]

_LOCATION_RE = re.compile(r"^(?:s3://(?P<bucket>[^/]+)/)?(?P<key>sessions/(?P<folder>[^/]+)/"
                          r"(?:chunk_(?P<chunk>\d+)_)?websdr_(?P<n>\d+)\.npy)$")


@dataclass(frozen=True)
class ObjectRef:
    """A measurement's object as its stored location names it.

    Attributes:
        bucket: the bucket in the location, or None when it names none.
        folder: the session or acquisition folder under ``sessions/``.
        chunk: the chunk index as the location records it (0-based), None for a single acquisition.
        n: upstream's receiver number in the key (not a station identity).
    """

    bucket: str | None
    folder: str
    chunk: int | None
    n: int


def parse_location(location: str | None) -> ObjectRef | None:
    """Parse ``measurements.iq_data_location``; None when it matches neither layout."""
    m = _LOCATION_RE.match(location or "")
    if m is None or m["folder"] in (".", ".."):
        return None
    chunk = m["chunk"]
    return ObjectRef(m["bucket"], m["folder"], None if chunk is None else int(chunk), int(m["n"]))


def chunk_key_base(keys: list[str], folder: str) -> int:
    """How far object keys' chunk numbers run ahead of the locations' in ``folder``: 1 as upstream
    writes them (keys from ``chunk_001``), 0 when a ``chunk_000`` object exists (locations name keys)."""
    return 0 if any(k.startswith(f"sessions/{folder}/chunk_000_") for k in keys) else 1


def object_key(ref: ObjectRef, key_base: int) -> str:
    """The key of the object that holds ``ref``'s samples."""
    if ref.chunk is None:
        return f"sessions/{ref.folder}/websdr_{ref.n}.npy"
    return f"sessions/{ref.folder}/chunk_{ref.chunk + key_base:03d}_websdr_{ref.n}.npy"


class IqProblem(Exception):
    """Why one object's samples cannot be used; ``reason`` is the report's category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_iq(data: bytes, *, n_samples: int, expected_count: int | None) -> np.ndarray:
    """The first ``n_samples`` complex64 samples of one ``.npy`` object.

    Args:
        data: the object's bytes.
        n_samples: samples the network takes per receiver.
        expected_count: ``measurements.iq_samples_count`` (None: not recorded).

    Raises:
        IqProblem: ``not npy``, ``wrong dtype``, ``wrong length`` (not the recorded count, or too
            short) or ``non-finite`` (NaN/inf, also after narrowing complex128 to complex64).
    """
    try:
        iq = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IqProblem("not npy", str(exc)) from None
    if iq.ndim != 1 or iq.dtype.kind != "c":
        raise IqProblem("wrong dtype", f"needs a 1-D complex array, got {iq.dtype} {iq.shape}")
    if expected_count is not None and iq.shape[0] != expected_count:
        raise IqProblem("wrong length", f"{iq.shape[0]} samples, the measurement records {expected_count}")
    if iq.shape[0] < n_samples:
        raise IqProblem("wrong length", f"{iq.shape[0]} samples, the network needs {n_samples}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = iq[:n_samples].astype(np.complex64)
    if not np.isfinite(out.view(np.float32)).all():
        raise IqProblem("non-finite", "NaN or inf samples (or values beyond float32)")
    return out


class RawIqBucket:
    """Heimdall's raw-IQ bucket, for reading only: this class can list and get, nothing else.

    Args:
        settings: the S3 server (endpoint and keys, as for our own stores).
        bucket: the bucket name, ``heimdall-raw-iq`` in a default installation.
    """

    def __init__(self, settings: S3Settings, bucket: str) -> None:
        self._store = S3Store(settings, bucket)
        self.bucket = bucket

    def describe(self) -> str:
        """``s3://bucket at http://host:port`` (no credentials)."""
        return f"s3://{self.bucket} at {self._store.settings.url}"

    def exists(self) -> bool:
        """Whether the bucket exists (a HEAD request)."""
        return self._store.root_exists()

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix``, sorted."""
        return sorted(self._store.list(prefix))

    def get(self, key: str) -> bytes:
        """One object's bytes.

        Raises:
            NotFoundError: no such object.
        """
        return self._store.get(key)
