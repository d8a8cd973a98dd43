"""Import a Heimdall installation's recordings into a dataset: incremental, resumable, read-only upstream.

One run: read the database snapshot, pick the sessions not imported yet
(status ``completed``, not ``rejected``), group their measurements into
recordings, check the sample rate, give each transmitter its split group,
then write shards. The dataset's config records the imported session ids and
the group ids, so a rerun imports only new sessions into new shards, and an
interrupted run (the dataset stays ``pending`` with its plan in
``config["pending"]``) resumes with the same sessions, recording ids and
shards. Nothing is ever written to Heimdall's database or bucket.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heimdall.calibration import StationOffsets
from heimdall.catalog import Catalog, DatasetInfo
from heimdall.datasets import SplitConfig, split_assignment, write_shard
from heimdall.errors import AlreadyExistsError, ConfigError, DataError, NotFoundError
from heimdall.groups import allocate_groups
from heimdall.realdata import ImportConfig
from heimdall.receivers import STATION_IDS
from heimdall.shards import ShardData
from heimdall.store import BlobStore
from heimdall.upstream.objects import RawIqBucket
from heimdall.upstream.offsets import dataset_station_offsets
from heimdall.upstream.recordings import Plan, PlannedRecording, load_recording, plan_recordings
from heimdall.upstream.source import Session, UpstreamSource

__all__ = ["HeimdallImportConfig", "ImportReport", "import_from_heimdall", "resolve_sample_rate"]

SOURCE_KIND = "heimdall"
GROUPING = "known_source/session"
_SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class HeimdallImportConfig:
    """How to read a Heimdall installation.

    Attributes:
        raw_iq_bucket: the bucket holding the ``.npy`` objects.
        iq_sample_rate_hz: the true IQ rate when ``measurements.iq_sample_rate`` is wrong
            (upstream records 12500 for 12 kHz captures); None: trust the recorded rate.
        shard_size: recordings per shard.
        split: the split the group allocation balances.
        network: sample rate, length, SNR threshold and IQ scale of the network's recordings.
    """

    raw_iq_bucket: str = "heimdall-raw-iq"
    iq_sample_rate_hz: float | None = None
    shard_size: int = 250
    split: SplitConfig = SplitConfig()
    network: ImportConfig = ImportConfig()

    def __post_init__(self) -> None:
        p = []
        if self.iq_sample_rate_hz is not None and not (math.isfinite(self.iq_sample_rate_hz) and self.iq_sample_rate_hz > 0):
            p.append(f"iq_sample_rate_hz must be a number > 0 (Hz), got {self.iq_sample_rate_hz}")
        if not 1 <= self.shard_size <= 5000:
            p.append(f"shard_size must lie in [1, 5000], got {self.shard_size}")
        if p:
            raise ConfigError("Heimdall import", p)


@dataclass
class ImportReport:
    """What one import run did, for the final report."""

    dataset: str
    source: str
    bucket: str
    sessions_imported: int = 0
    sessions_unlabelled: int = 0
    sessions_before: int = 0
    sessions_waiting: Counter[str] = field(default_factory=Counter)
    recordings: int = 0
    labelled: int = 0
    heard: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATION_IDS, 0))
    rejects: Counter[str] = field(default_factory=Counter)
    sample_rate: str = ""
    one_based_chunk_folders: int = 0
    groups_by_split: dict[str, int] = field(default_factory=dict)
    new_groups_by_split: dict[str, int] = field(default_factory=dict)
    resumed_shards: int = 0
    dataset_recordings: int = 0
    station_offsets: StationOffsets | None = None

    @property
    def nothing_new(self) -> bool:
        return self.sessions_imported == 0

    def text(self) -> str:
        """The report, a few lines of plain text."""
        if self.nothing_new:
            lines = [f"nothing new in {self.source}: {self.sessions_before} session(s) already imported into "
                     f"dataset {self.dataset!r}; nothing was added"]
        else:
            share = self.labelled / self.recordings if self.recordings else 0.0
            lines = [
                f"imported from {self.source} and s3://{self.bucket} into dataset {self.dataset!r}",
                f"sessions:   {self.sessions_imported} new ({self.sessions_unlabelled} without a located known source: "
                f"unlabelled, never trained on), {self.sessions_before} imported before",
                f"recordings: {self.recordings} new, {self.labelled} labelled ({share:.0%}); dataset now holds "
                f"{self.dataset_recordings}" + (f" ({self.resumed_shards} shard(s) from the interrupted run kept)"
                                                if self.resumed_shards else ""),
                "receivers heard: " + ", ".join(f"{k} {v}" for k, v in self.heard.items()),
                f"sample rate: {self.sample_rate}",
            ]
            if self.one_based_chunk_folders:
                lines.append(f"chunk keys: {self.one_based_chunk_folders} session folder(s) number chunk objects from 1 "
                             f"while iq_data_location counts from 0 (read by the existing key)")
            lines.append("split groups (transmitters, or sessions without one): "
                         + ", ".join(f"{k} {v}" for k, v in self.groups_by_split.items())
                         + f"; new this run: {sum(self.new_groups_by_split.values())}"
                         + "".join(f", {k} {v}" for k, v in self.new_groups_by_split.items() if v)
                         + " (groups seen before keep their split)")
            if self.station_offsets is not None:
                lines.append("station offsets (stored as station_offsets_db):\n" + self.station_offsets.summary())
        if self.rejects:
            lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejects.items())))
        if self.sessions_waiting:
            lines.append("sessions left for a later run: " + ", ".join(
                f"{v} {k}" for k, v in sorted(self.sessions_waiting.items())))
        return "\n".join(lines)


def resolve_sample_rate(recorded: set[int | None], flag: float | None, network_hz: float) -> tuple[float, str]:
    """The IQ sample rate to read the captures at, and the report's line about it.

    Raises:
        ConfigError: the rate differs from the network's (import does not resample), or the
            recorded rate is not the network's and ``--iq-sample-rate-hz`` does not state the true one.
    """
    shown = ", ".join("unknown" if r is None else f"{r} Hz" for r in sorted(recorded, key=lambda r: (r is None, r or 0)))
    if flag is None:
        if recorded == {network_hz}:
            return network_hz, f"{network_hz:.0f} Hz as recorded"
        raise ConfigError("IQ sample rate", [
            f"measurements record iq_sample_rate {shown} but the network's recordings are {network_hz:.0f} Hz; "
            f"upstream records its task default (12500) although WebSDRs deliver 12 kHz, so the recorded rate is "
            f"not trusted; fix: pass --iq-sample-rate-hz with the true rate (e.g. --iq-sample-rate-hz 12000)"])
    if flag != network_hz:
        raise ConfigError("IQ sample rate", [
            f"--iq-sample-rate-hz {flag:g} differs from the network's {network_hz:.0f} Hz and import does not "
            f"resample; fix: resample upstream, or state the true rate if it is {network_hz:.0f} Hz"])
    if recorded == {network_hz}:
        return network_hz, f"{network_hz:.0f} Hz (recorded and stated)"
    return network_hz, f"recorded {shown}, read as {flag:.0f} Hz as --iq-sample-rate-hz states"


@dataclass
class _State:
    """What earlier runs recorded in the dataset config."""

    info: DatasetInfo | None
    imported: list[str]
    groups: dict[str, int]
    sizes: dict[str, int]
    pending: dict[str, Any] | None


def _state(catalog: Catalog, name: str, source: UpstreamSource, cfg: HeimdallImportConfig) -> _State:
    try:
        info = catalog.get_dataset(name)
    except NotFoundError:
        return _State(None, [], {}, {}, None)
    c = info.config
    if info.kind != "imported" or c.get("source") != SOURCE_KIND:
        raise AlreadyExistsError(
            f"dataset {name!r} exists ({info.kind}, {c.get('source', 'not from a Heimdall database')}) and is not a "
            f"Heimdall import; fix: choose another --dataset name or `python -m tuning.data delete {name}`")
    if c.get("raw_iq_bucket") != cfg.raw_iq_bucket:
        raise AlreadyExistsError(
            f"dataset {name!r} was imported from bucket {c.get('raw_iq_bucket')!r}, not {cfg.raw_iq_bucket!r}; "
            f"fix: pass --raw-iq-bucket {c.get('raw_iq_bucket')} or import into another --dataset")
    if info.status != "complete" and "pending" not in c:
        raise DataError(f"dataset {name!r} is pending without an import plan; fix: `python -m tuning.data delete {name}`")
    split = c.get("split", {})
    return _State(info, list(c.get("sessions", [])), dict(split.get("groups", {})), dict(split.get("sizes", {})),
                  c.get("pending") if info.status != "complete" else None)


def _select(sessions: list[Session], state: _State, report: ImportReport) -> list[Session]:
    if state.pending is not None:
        wanted = set(state.pending["sessions"])
        return [s for s in sessions if s.id in wanted]
    done = set(state.imported)
    out = []
    for s in sessions:
        if s.id in done:
            continue
        if s.status != "completed":
            report.sessions_waiting[f"not completed ({s.status})"] += 1
        elif (s.approval_status or "").lower() == "rejected":
            report.sessions_waiting["rejected by approval"] += 1
        else:
            out.append(s)
    return out


def _rate(plan: Plan, cfg: HeimdallImportConfig) -> tuple[float, str, list[int | None]]:
    recorded = {c.measurement.sample_rate_hz for r in plan.recordings for c in r.captures}
    rate, note = resolve_sample_rate(recorded, cfg.iq_sample_rate_hz, cfg.network.sample_rate_hz)
    return rate, note, sorted(recorded, key=lambda r: (r is None, r or 0))


def _config(source: UpstreamSource, cfg: HeimdallImportConfig, state: _State, rate_info: dict[str, Any],
            groups: dict[str, int], sizes: dict[str, int], pending: dict[str, Any] | None,
            extra: dict[str, Any]) -> dict[str, Any]:
    out = {"source": SOURCE_KIND, "database": source.describe(), "raw_iq_bucket": cfg.raw_iq_bucket,
           "import": dict(cfg.network.__dict__), "iq_sample_rate": rate_info, "sessions": state.imported,
           "split": {"by": GROUPING, "groups": groups, "sizes": sizes}, **extra}
    if pending is not None:
        out["pending"] = pending
    return out


def import_from_heimdall(
    catalog: Catalog, store: BlobStore, name: str, source: UpstreamSource, bucket: RawIqBucket, *,
    config: HeimdallImportConfig = HeimdallImportConfig(), progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import the sessions of a Heimdall installation not yet in dataset ``name``.

    Args:
        catalog, store: where the dataset's shards and rows go.
        name: the dataset (created by the first run, extended by later ones).
        source: Heimdall's database, read-only.
        bucket: Heimdall's raw-IQ bucket, read-only.
        config: bucket name, true sample rate, shard size, split.
        progress: called with the number of planned recordings handled since the last call.
        on_plan: called once with the number of planned recordings (to size a progress bar).

    Returns:
        The run's report (``nothing_new`` when there was nothing to import).

    Raises:
        AlreadyExistsError: ``name`` is another kind of dataset or from another bucket.
        ConfigError: the sample rate is not the network's, or not stated where the recorded one is wrong.
        NotFoundError: the raw-IQ bucket does not exist.
        DataError: there is nothing to import into a new dataset.
    """
    catalog.initialize()
    state = _state(catalog, name, source, config)
    report = ImportReport(dataset=name, source=source.describe(), bucket=config.raw_iq_bucket,
                          sessions_before=len(state.imported))
    if not bucket.exists():
        raise NotFoundError(f"raw-IQ bucket {bucket.describe()} does not exist; fix: pass --raw-iq-bucket with the "
                            f"bucket Heimdall writes IQ to (MINIO_BUCKET_RAW_IQ, default heimdall-raw-iq)")
    snapshot = source.snapshot(lambda rows: _select(rows, state, report))
    sessions = snapshot.selected
    plan = plan_recordings(snapshot, sessions, config.raw_iq_bucket, bucket.list)
    report.rejects.update(plan.rejects)
    if not plan.recordings:
        if state.info is None:
            raise DataError(f"{source.describe()} holds no recording to import ({len(snapshot.sessions)} session(s), "
                            f"{len(sessions)} completed and new with {len(snapshot.measurements)} measurement(s)); "
                            f"fix: record a session in Heimdall first, or check the database URL")
        return report
    rate, note, recorded = _rate(plan, config)
    report.sample_rate, report.one_based_chunk_folders = note, plan.one_based_chunk_folders
    sizes = dict(state.sizes)
    for key, n in Counter(r.group for r in plan.recordings).items():
        sizes[key] = sizes.get(key, 0) + n if state.pending is None else sizes.get(key, n)
    groups = allocate_groups(sizes, state.groups, config.split)
    first_shard, first_id = _open(catalog, store, name, source, config, state, plan, sessions,
                                  {"recorded": recorded, "read_as": rate}, groups, sizes)
    if on_plan:
        on_plan(len(plan.recordings))
    _write(catalog, store, name, plan, bucket.get, groups, (first_shard, first_id), config, report, progress)
    report.station_offsets = dataset_station_offsets(catalog, store, name)
    new_groups = set(state.pending.get("new_groups", ())) if state.pending is not None else set(groups) - set(state.groups)
    _finish(catalog, name, source, config, sessions, plan, report, groups, new_groups, sizes,
            {"recorded": recorded, "read_as": rate})
    return report


def _open(catalog: Catalog, store: BlobStore, name: str, source: UpstreamSource, cfg: HeimdallImportConfig,
          state: _State, plan: Plan, sessions: list[Session], rate_info: dict[str, Any], groups: dict[str, int],
          sizes: dict[str, int]) -> tuple[int, int]:
    """Create or reopen the dataset with this run's plan; returns its first shard index and recording id."""
    if state.pending is not None:
        return int(state.pending["first_shard"]), int(state.pending["first_recording_id"])
    if state.info is None:
        first_shard, first_id = 0, 0
    else:
        shards = catalog.shards(name)
        first_shard = max((s.index for s in shards), default=-1) + 1
        ids = catalog.recordings(name)["recording_id"]
        first_id = int(ids.max()) + 1 if ids.size else 0
    pending = {"sessions": [s.id for s in sessions], "first_shard": first_shard, "first_recording_id": first_id,
               "new_groups": sorted(set(groups) - set(state.groups))}
    conf = _config(source, cfg, state, rate_info, groups, sizes, pending, {})
    planned = (state.info.n_recordings if state.info else 0) + len(plan.recordings)
    if state.info is None:
        catalog.create_dataset(name, kind="imported", config=conf, seed=None, planned_recordings=planned,
                               shard_size=cfg.shard_size, store=store.describe())
    else:
        catalog.reopen_dataset(name, config=conf, planned_recordings=planned)
    return first_shard, first_id


def _write(catalog: Catalog, store: BlobStore, name: str, plan: Plan, get: Callable[[str], bytes],
           groups: dict[str, int], first: tuple[int, int], cfg: HeimdallImportConfig, report: ImportReport,
           progress: Callable[[int], None] | None) -> None:
    first_shard, first_id = first
    done = {s.index for s in catalog.shards(name)}
    size = cfg.shard_size
    for i in range(math.ceil(len(plan.recordings) / size)):
        chunk = plan.recordings[i * size:(i + 1) * size]
        if first_shard + i in done:
            report.resumed_shards += 1
        else:
            shard = _load_shard(chunk, first_id + i * size, groups, plan, get, cfg, report)
            if shard is not None:
                write_shard(catalog, store, name, first_shard + i, shard)
        if progress:
            progress(len(chunk))


def _load_shard(chunk: list[PlannedRecording], first_id: int, groups: dict[str, int], plan: Plan,
                get: Callable[[str], bytes], cfg: HeimdallImportConfig, report: ImportReport) -> ShardData | None:
    ids, iqs, rows = [], [], []
    for j, rec in enumerate(chunk):
        loaded = load_recording(rec, get, plan.keys, n_samples=cfg.network.n_samples,
                                snr_threshold_db=cfg.network.snr_threshold_db, rejects=report.rejects)
        if loaded is None:
            continue
        iq, labels = loaded
        labels["split_group"] = groups[rec.group]
        ids.append(first_id + j)  # ids follow the plan, so a resumed run gives every recording the same id
        iqs.append(iq)
        rows.append(labels)
        report.recordings += 1
        report.labelled += int(rec.labelled)
        for k, h in zip(STATION_IDS, labels["heard"], strict=True):  # type: ignore[call-overload]
            report.heard[k] += int(h)
    if not rows:
        return None
    labels = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    labels["split_group"] = labels["split_group"].astype(np.int64)
    return ShardData(recording_id=np.asarray(ids, dtype=np.int64), iq=np.stack(iqs), labels=labels,
                     sample_rate_hz=cfg.network.sample_rate_hz, iq_reference_dbm=cfg.network.iq_reference_dbm)


def _finish(catalog: Catalog, name: str, source: UpstreamSource, cfg: HeimdallImportConfig, sessions: list[Session],
            plan: Plan, report: ImportReport, groups: dict[str, int], new_groups: set[str], sizes: dict[str, int],
            rate_info: dict[str, Any]) -> None:
    """Record the run in the dataset config and mark the dataset complete."""
    state_sessions = [*catalog.get_dataset(name).config.get("sessions", []), *(s.id for s in sessions)]
    report.sessions_imported = len(sessions)
    report.sessions_unlabelled = len({r.session.id for r in plan.recordings if not r.labelled})
    codes = split_assignment(np.asarray(list(groups.values()), dtype=np.int64), cfg.split)
    new = np.asarray([k in new_groups for k in groups], dtype=bool)
    report.groups_by_split = {n: int((codes == i).sum()) for i, n in enumerate(_SPLIT_NAMES)}
    report.new_groups_by_split = {n: int(((codes == i) & new).sum()) for i, n in enumerate(_SPLIT_NAMES)}
    extra = {"station_offsets_db": report.station_offsets.as_list()}
    state = _State(None, state_sessions, groups, sizes, None)
    conf = _config(source, cfg, state, rate_info, groups, sizes, None, extra)
    report.dataset_recordings = catalog.get_dataset(name).n_recordings
    catalog.reopen_dataset(name, config=conf, planned_recordings=report.dataset_recordings)
    catalog.mark_complete(name)
