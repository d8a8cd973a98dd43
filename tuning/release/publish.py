"""Publish an exported model to the models store, one immutable release per content.

A release is two objects at the top of the models store::

    localization-v0.1.0.onnx     the model, ``model_version`` metadata set to 0.1.0
    localization-v0.1.0.json     its model card (metrics, lineage, versions, sha256)

The models store is the S3 bucket ``heimdall-models`` when an S3 endpoint is
configured (``HEIMDALL_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL_S3``, keys from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), else ``{data-dir}/models``;
``--models-store`` / ``HEIMDALL_MODELS_STORE`` override both (resolved by
:class:`tuning.settings.RegistrySettings`). Check a release with::

    aws s3 ls s3://heimdall-models/localization-v0.1.0.onnx --endpoint-url $HEIMDALL_S3_ENDPOINT

Versions: ``MAJOR.MINOR`` is the serving contract the file follows
(:data:`CONTRACT_VERSION`, docs/onnx-contract.md), the patch counts releases
under it: each new content bumps the patch of the highest version present, and
the first release under a new contract is ``MAJOR.MINOR.0`` (0.1.0 today).
Publishing content that is already released (same
:func:`tuning.release.onnx.content_sha256`) returns that release instead of a new one,
so publication is idempotent; an existing object is never overwritten.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heimdall.errors import AlreadyExistsError, ConfigError, NotFoundError
from heimdall.store import BlobStore
from tuning.release.onnx import content_sha256, file_sha256, with_model_version
from tuning.settings import MODELS_BUCKET

__all__ = ["MODELS_BUCKET", "CONTRACT_VERSION", "FIRST_VERSION", "Publication", "model_key", "card_key",
           "parse_version", "next_version", "released_versions", "find_release", "publish"]

#: The serving contract (docs/onnx-contract.md, "Versioning"): MINOR for additions a reader may ignore,
#: MAJOR for anything a reader of the previous contract would misread.
CONTRACT_VERSION = (0, 1)
FIRST_VERSION = f"{CONTRACT_VERSION[0]}.{CONTRACT_VERSION[1]}.0"
_KEY_RE = re.compile(r"^localization-v(\d+)\.(\d+)\.(\d+)\.(onnx|json)$")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Publication:
    """Where a release lives.

    Attributes:
        version: ``MAJOR.MINOR.PATCH``.
        model_key, card_key: object keys in the models store.
        store: the store's ``describe()`` (no credentials).
        sha256: of the published ``.onnx`` bytes.
        content_sha256: :func:`tuning.release.onnx.content_sha256` of it.
        reused: True when this content was already released (nothing uploaded).
        local_path: the published file's copy in the export directory.
    """

    version: str
    model_key: str
    card_key: str
    store: str
    sha256: str
    content_sha256: str
    reused: bool
    local_path: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Publication:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def model_key(version: str) -> str:
    """``localization-v{version}.onnx``."""
    parse_version(version)
    return f"localization-v{version}.onnx"


def card_key(version: str) -> str:
    """``localization-v{version}.json``."""
    parse_version(version)
    return f"localization-v{version}.json"


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.1.2"`` → ``(0, 1, 2)``.

    Raises:
        ConfigError: not ``MAJOR.MINOR.PATCH`` of non-negative integers.
    """
    m = _VERSION_RE.fullmatch(str(version))
    if not m:
        raise ConfigError("model version", [f"a model version must be MAJOR.MINOR.PATCH, e.g. 0.1.0; got {version!r}"])
    return int(m[1]), int(m[2]), int(m[3])


def next_version(existing: Iterable[str], contract: tuple[int, int] = CONTRACT_VERSION) -> str:
    """The version after the highest of ``existing`` (patch + 1), or ``contract``'s first (``MAJOR.MINOR.0``)
    when nothing was released under that contract yet."""
    versions = sorted(parse_version(v) for v in existing)
    if not versions or versions[-1][:2] < tuple(contract):
        return f"{contract[0]}.{contract[1]}.0"
    major, minor, patch = versions[-1]
    return f"{major}.{minor}.{patch + 1}"


def released_versions(store: BlobStore) -> dict[str, set[str]]:
    """Every version in the store and which of its objects exist (``{"onnx", "json"}``)."""
    found: dict[str, set[str]] = {}
    for key in store.list("localization-v"):
        m = _KEY_RE.fullmatch(key)
        if m:
            found.setdefault(f"{m[1]}.{m[2]}.{m[3]}", set()).add(m[4])
    return found


def find_release(store: BlobStore, digest: str, workdir: Path) -> str | None:
    """The version whose model has content digest ``digest``, or None.

    Cards carry the digest; a model without a card (a publication interrupted
    between the two uploads) is downloaded and hashed.
    """
    for version, kinds in sorted(released_versions(store).items(), key=lambda kv: parse_version(kv[0])):
        if "json" in kinds:
            try:
                card = json.loads(store.get(card_key(version)))
            except (ValueError, NotFoundError):
                card = {}
            if card.get("content_sha256") == digest:
                return version
            if card.get("content_sha256"):
                continue
        if "onnx" in kinds:
            probe = workdir / f".probe-{version}.onnx"
            probe.write_bytes(store.get(model_key(version)))
            try:
                if content_sha256(probe) == digest:
                    return version
            except Exception:  # noqa: BLE001 - an unreadable object is simply not this release
                pass
            finally:
                probe.unlink(missing_ok=True)
    return None


def publish(store: BlobStore, export_path: Path, card: Mapping[str, Any], workdir: Path) -> Publication:
    """Release an exported file (unless its content is released already) with its card.

    Args:
        store: the models store.
        export_path: the gated export (``model_version`` not yet set).
        card: the model card; ``model_version``, ``file`` and ``sha256`` are filled in.
        workdir: the export directory; the versioned file and card are written there too.

    Returns:
        The release (``reused`` when the content was already there).

    Raises:
        AlreadyExistsError: an object under the chosen key holds other bytes (another
            publication took that version meanwhile); run again.
        ServiceUnavailableError: the store cannot be reached.
    """
    digest = content_sha256(export_path)
    existing = find_release(store, digest, workdir)
    version = existing or next_version(released_versions(store))
    local = workdir / model_key(version)
    if existing and store.exists(model_key(version)):
        # Same content released before: the stored bytes are the release, keep them.
        local.write_bytes(store.get(model_key(version)))
    else:
        with_model_version(export_path, local, version)
    sha = file_sha256(local)
    full_card = {**card, "model_version": version, "file": model_key(version), "sha256": sha}
    card_bytes = (json.dumps(full_card, indent=2, sort_keys=True, default=str) + "\n").encode()
    _put_once(store, model_key(version), local.read_bytes())
    if not store.exists(card_key(version)):
        store.put(card_key(version), card_bytes)
    (workdir / card_key(version)).write_bytes(store.get(card_key(version)))
    return Publication(version, model_key(version), card_key(version), store.describe(), sha, digest,
                       existing is not None, str(local))


def _put_once(store: BlobStore, key: str, data: bytes) -> None:
    """Write ``key`` unless it exists; an existing object must hold the same bytes."""
    if store.exists(key):
        if store.get(key) != data:
            raise AlreadyExistsError(
                f"{key} already exists in {store.describe()} with other content; releases are never overwritten. "
                f"Fix: run the registration again (it picks the next free version)")
        return
    store.put(key, data)

