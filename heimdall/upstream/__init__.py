"""Read a Heimdall installation's own recordings (its PostgreSQL and raw-IQ bucket), read-only.

Modules: :mod:`~heimdall.upstream.source` (the database, one read-only
transaction), :mod:`~heimdall.upstream.objects` (object keys and IQ decoding),
:mod:`~heimdall.upstream.recordings` (grouping captures into recordings),
:mod:`~heimdall.upstream.offsets` (station level offsets) and
:mod:`~heimdall.upstream.ingest` (the incremental, resumable import).
"""
from __future__ import annotations

from heimdall.upstream.ingest import HeimdallImportConfig, ImportReport, import_from_heimdall
from heimdall.upstream.objects import RawIqBucket
from heimdall.upstream.source import PostgresSource, UpstreamSource

__all__ = ["HeimdallImportConfig", "ImportReport", "import_from_heimdall", "RawIqBucket", "PostgresSource",
           "UpstreamSource"]
