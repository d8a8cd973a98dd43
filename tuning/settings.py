"""Connection settings for every command: flags first, then environment, then
the embedded defaults (a local data directory, SQLite catalogue, local store).

=====================  ==========================  ==========================================
flag                   environment variable        embedded default
=====================  ==========================  ==========================================
``--data-dir``         ``HEIMDALL_DATA_DIR``       ``./.heimdall``
``--catalog``          ``HEIMDALL_CATALOG``        ``sqlite:///{data-dir}/catalog.db``
``--store``            ``HEIMDALL_STORE``          ``{data-dir}/store``
(S3 endpoint)          ``HEIMDALL_S3_ENDPOINT``    — (needed when ``--store s3://...``)
(S3 keys)              ``AWS_ACCESS_KEY_ID``,       — (read from the environment only, never
                       ``AWS_SECRET_ACCESS_KEY``    from flags, never printed)
=====================  ==========================  ==========================================

PostgreSQL catalogue: ``--catalog postgresql://user@host:5432/db`` (a password, if
any, is better given through ``PGPASSWORD``). S3/MinIO store: ``--store
s3://heimdall-raw-iq``. ``python -m tuning.services up`` starts a local
PostgreSQL and S3 server and writes these variables to a file to ``source``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from heimdall.catalog import Catalog, open_catalog
from heimdall.store import BlobStore, open_store

__all__ = ["DataSettings", "add_data_args", "data_settings", "resolve_data_dir"]

DEFAULT_DATA_DIR = ".heimdall"


@dataclass(frozen=True)
class DataSettings:
    """Where the catalogue and the blob store live (URLs carry no secrets)."""

    data_dir: Path
    catalog_url: str
    store_url: str

    def open_catalog(self, *, read_only: bool = False) -> Catalog:
        """Connect to the catalogue.

        Args:
            read_only: for commands that only read (list, describe, verify, a dry run):
                nothing is created, neither a file nor a schema nor tables; a missing
                catalogue is a :class:`~heimdall.catalog.CatalogMissingError` (a ``NotFoundError``)
                naming how to create one.

        Raises:
            ServiceUnavailableError: the catalogue cannot be reached.
            CatalogMissingError: ``read_only`` and there is no SQLite file at the URL (an absent
                PostgreSQL schema is raised by the first read or ``check()``).
        """
        return open_catalog(self.catalog_url, read_only=read_only)

    def open_store(self) -> BlobStore:
        """Open the blob store (S3 keys come from the environment)."""
        return open_store(self.store_url)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, ``--catalog`` and ``--store`` to ``parser``."""
    g = parser.add_argument_group("data location (flags override environment variables)")
    g.add_argument("--data-dir", type=Path, default=None, help="local data directory [HEIMDALL_DATA_DIR, ./.heimdall]")
    g.add_argument("--catalog", default=None, help="catalogue URL: sqlite:///path.db or postgresql://... [HEIMDALL_CATALOG]")
    g.add_argument("--store", default=None, help="blob store: a directory or s3://bucket[/prefix] [HEIMDALL_STORE]")


def resolve_data_dir(flag: Path | str | None = None) -> Path:
    """The local data directory: ``flag``, else ``HEIMDALL_DATA_DIR``, else ``./.heimdall`` (absolute;
    the environment is read here, at call time)."""
    return Path(flag or os.environ.get("HEIMDALL_DATA_DIR") or DEFAULT_DATA_DIR).resolve()


def data_settings(args: argparse.Namespace) -> DataSettings:
    """Resolve flags, then environment, then defaults (environment read here, at call time)."""
    data_dir = resolve_data_dir(args.data_dir)
    catalog = args.catalog or os.environ.get("HEIMDALL_CATALOG") or f"sqlite:///{data_dir / 'catalog.db'}"
    store = args.store or os.environ.get("HEIMDALL_STORE") or str(data_dir / "store")
    return DataSettings(data_dir=data_dir, catalog_url=catalog, store_url=store)
