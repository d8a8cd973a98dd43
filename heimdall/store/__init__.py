"""Blob stores: where shards and models live, behind one small interface.

``open_store`` turns a store URL into a store::

    open_store("data/store")                  # LocalStore (a plain path)
    open_store("file:///srv/heimdall/store")  # LocalStore
    open_store("s3://heimdall-datasets/v1")    # S3Store, settings from the environment

The S3 backend and its SDK are imported only when an ``s3://`` URL is opened.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from heimdall.errors import ConfigError
from heimdall.store.base import BlobStore
from heimdall.store.local import LocalStore
from heimdall.store.s3 import S3Settings

__all__ = ["BlobStore", "LocalStore", "S3Settings", "open_store"]

_ACCEPTED = "a directory path, file:///absolute/path, or s3://bucket[/prefix]"


def open_store(url: str, s3: S3Settings | None = None) -> BlobStore:
    """Open the blob store a URL names.

    Args:
        url: a plain directory path or ``file:///abs/path`` (a :class:`LocalStore`),
            or ``s3://bucket/prefix`` (an ``S3Store``).
        s3: server settings for ``s3://`` URLs; read by :meth:`S3Settings.from_env`
            when omitted.

    Returns:
        The store. Opening does no I/O; an S3 bucket is created on the first write.

    Raises:
        ConfigError: the URL has another form, or S3 settings are missing or invalid.
    """
    if not url or not url.strip():
        raise ConfigError("store URL", [f"the store URL must not be empty; use {_ACCEPTED}"])
    if "://" not in url:
        return LocalStore(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return LocalStore(Path(parts.path))
    if parts.scheme == "s3" and parts.netloc and not parts.query:
        from heimdall.store.s3 import S3Store  # pulls in the minio SDK

        return S3Store(s3 or S3Settings.from_env(), parts.netloc, parts.path.strip("/"))
    raise ConfigError("store URL", [f"unsupported store URL {url!r}; use {_ACCEPTED}"])
