"""The blob-store interface: a flat namespace of byte objects under string keys.

Shards of IQ recordings, exported models and anything else too large for the
catalogue live in a blob store. Two implementations honour the same contract
(``tests/heimdall/store/test_contract.py``): :class:`heimdall.store.LocalStore`
(a directory, the embedded default) and :class:`heimdall.store.s3.S3Store`
(any S3-compatible server).

Keys look like relative POSIX paths (``datasets/train/shard-00001.npz``): they
are non-empty, never start or end with ``/``, and have no empty, ``.`` or
``..`` segments, so the same key means the same object on every backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from heimdall.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow.fs

__all__ = ["BlobStore", "validate_key", "validate_prefix", "missing_object_error"]


@runtime_checkable
class BlobStore(Protocol):
    """Where large immutable objects are written and read back by key."""

    def describe(self) -> str:
        """Say where objects live, e.g. ``s3://bucket/prefix at http://host:port``.

        Never contains credentials, so it is safe in logs and error messages.
        """
        ...

    def root_exists(self) -> bool:
        """Whether the store's directory or bucket exists; only reads (a first write creates it).

        Raises:
            ServiceUnavailableError: the backend cannot be reached.
        """
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key``, replacing any existing object atomically.

        Raises:
            ConfigError: ``key`` is not a valid key.
            ServiceUnavailableError: the backend cannot be reached.
        """
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Write the contents of the local file ``path`` under ``key``.

        Raises:
            ConfigError: ``key`` is not a valid key.
            FileNotFoundError: ``path`` does not exist.
            ServiceUnavailableError: the backend cannot be reached.
        """
        ...

    def get(self, key: str) -> bytes:
        """Read the whole object stored under ``key``.

        Raises:
            NotFoundError: no object has this key (the message names key, store and fix).
            ServiceUnavailableError: the backend cannot be reached.
        """
        ...

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""
        ...

    def size(self, key: str) -> int:
        """Return the size in bytes of the object under ``key``.

        Raises:
            NotFoundError: no object has this key.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix`` (a plain string prefix).

        Folder-marker entries some S3 servers keep (keys ending in ``/``) are
        never returned.
        """
        ...

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """Return a pyarrow filesystem and the base path under which keys live.

        ``fs.open_input_file(base + "/" + key)`` opens the object ``key``, which
        is what Ray Data readers need (``filesystem=fs``, paths under ``base``).
        """
        ...


def validate_key(key: str, *, what: str = "blob key") -> str:
    """Check that ``key`` is a valid relative object key and return it.

    Args:
        key: the candidate key.
        what: how to name the key in the error (e.g. ``"list prefix"``).

    Returns:
        ``key`` unchanged.

    Raises:
        ConfigError: listing every rule the key breaks.
    """
    if not isinstance(key, str):
        raise ConfigError(what, [f"a key must be a str, got {type(key).__name__} {key!r}"])
    problems: list[str] = []
    if not key:
        problems.append("a key must not be empty; use e.g. 'datasets/train/shard-00000.npz'")
    if key.startswith("/"):
        problems.append(f"a key must be relative, got {key!r}; drop the leading '/'")
    if key.endswith("/"):
        problems.append(f"a key must name an object, not a folder, got {key!r}; drop the trailing '/'")
    if "\\" in key or "\x00" in key:
        problems.append(f"a key must not contain backslashes or NUL bytes, got {key!r}; use '/' between segments")
    inner = key.strip("/").split("/") if key.strip("/") else []
    if any(part in ("", ".", "..") for part in inner):
        problems.append(f"a key must not have empty, '.' or '..' segments, got {key!r}; write the plain path")
    if problems:
        raise ConfigError(what, problems)
    return key


def validate_prefix(prefix: str) -> str:
    """Check a listing prefix: empty, or a key-like string that may end in ``/``.

    Args:
        prefix: the candidate prefix.

    Returns:
        ``prefix`` unchanged.

    Raises:
        ConfigError: the prefix would escape the store (``..``, leading ``/``).
    """
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or prefix, what="list prefix")
    return prefix


def missing_object_error(key: str, store: str) -> NotFoundError:
    """Build the error every store raises for a key it does not hold.

    Args:
        key: the missing key.
        store: the store's :meth:`BlobStore.describe` text.

    Returns:
        A :class:`NotFoundError` naming the key, the store and the fix.
    """
    return NotFoundError(
        f"no object with key {key!r} in {store}; check the key (list the store with "
        f"store.list(prefix)) and that the store settings point where the object was written"
    )
