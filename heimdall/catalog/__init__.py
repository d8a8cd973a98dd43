"""The data catalogue: datasets, shards and recording labels.

Open one by URL::

    from heimdall.catalog import open_catalog
    with open_catalog("sqlite:///.heimdall/catalog.db") as catalog:
        print([d.name for d in catalog.list_datasets()])

Accepted URLs (SQLAlchemy's conventions, like MLflow's):

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: the embedded
  default (:class:`SQLiteCatalog`); a plain path ending in ``.db``, ``.sqlite``
  or ``.sqlite3`` means the same.
* ``postgresql://user@host:5432/db`` (also ``postgres://``,
  ``postgresql+psycopg2://``): :class:`PostgresCatalog`, schema ``heimdall_tune`` (it can share
  a Heimdall database: upstream's schema ``heimdall`` is left alone).

Commands that only read open it with ``read_only=True``: then nothing is
created (no file, no directory, no schema, no table) and a missing catalogue is
a :class:`CatalogMissingError` (a :class:`~heimdall.errors.NotFoundError`)
saying how to create one. Writers
create the tables on first use, but never inside a database that holds other
tables and is not a Heimdall Tune catalogue.
"""
from __future__ import annotations

from pathlib import Path

from heimdall.catalog.base import (
    DATASET_KINDS,
    DATASET_STATUSES,
    RECORDING_COLUMNS,
    Catalog,
    CatalogMissingError,
    DatasetInfo,
    RecordingColumn,
    ShardInfo,
    check_recordings,
)
from heimdall.catalog.postgres import PostgresCatalog
from heimdall.catalog.sql import redact_url
from heimdall.catalog.sqlite import SQLiteCatalog
from heimdall.errors import ConfigError

__all__ = [
    "DATASET_KINDS",
    "DATASET_STATUSES",
    "RECORDING_COLUMNS",
    "Catalog",
    "CatalogMissingError",
    "DatasetInfo",
    "PostgresCatalog",
    "RecordingColumn",
    "SQLiteCatalog",
    "ShardInfo",
    "check_recordings",
    "open_catalog",
]

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg2://")
_ACCEPTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, a plain path ending in "
    f"{'/'.join(_SQLITE_SUFFIXES)}, or postgresql://user@host:5432/db (postgres:// also works)"
)


def open_catalog(url: str, *, read_only: bool = False) -> Catalog:
    """Open the catalogue at ``url`` (unless ``read_only``, its tables are created on first use).

    Args:
        url: see the module docstring for the accepted forms.
        read_only: only read: create nothing, refuse every write.

    Returns:
        A :class:`SQLiteCatalog` or a :class:`PostgresCatalog`.

    Raises:
        ConfigError: an unsupported or in-memory URL (the message lists the accepted forms).
        CatalogMissingError: ``read_only`` and the SQLite file does not exist (a missing
            PostgreSQL schema is found by the first read, or by ``check()``).
        ServiceUnavailableError: the database cannot be opened or reached.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("catalogue URL", [f"expected {_ACCEPTED}; got {url!r}"])
    url = url.strip()
    if url.startswith(_POSTGRES_SCHEMES):
        return PostgresCatalog(url, read_only=read_only)
    return SQLiteCatalog(_sqlite_path(url), read_only=read_only)


def _sqlite_path(url: str) -> Path:
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if rest in ("", ":memory:") or "mode=memory" in rest:
            raise ConfigError("catalogue URL", [
                f"an in-memory SQLite catalogue ({url!r}) is not shared between processes, so datasets "
                f"written to it vanish; use a file, e.g. sqlite:///.heimdall/catalog.db"
            ])
        return Path(rest)
    if "://" not in url and url.lower().endswith(_SQLITE_SUFFIXES):
        return Path(url)
    raise ConfigError("catalogue URL", [f"unsupported catalogue {redact_url(url)!r}; expected {_ACCEPTED}"])
