"""From Heimdall's rows and objects to recordings: one recording per simultaneous capture.

The receivers' captures of one chunk of a session (``chunk_k`` of every
``websdr_n``), or of one single acquisition (every ``websdr_n`` of a task
folder), form one recording across the network. A measurement's station is
the ``websdr_stations.name`` of its ``websdr_station_id``, matched to
:data:`heimdall.receivers.STATIONS` by name. Its session is
``measurements.recording_session_id`` where upstream records it (``develop``),
else the session whose id or ``celery_task_id`` is the object's folder
(``main`` has no link column).

Labels come from the session's known source: its position and power; the
frequency is what the receivers were tuned to. A session without a known
source, or whose source has no position (upstream's "Unknown" placeholder),
gives unlabelled recordings (NaN position), which training leaves out.

Everything that cannot be used is counted by reason, never guessed.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from heimdall.errors import NotFoundError
from heimdall.geometry import default_frame
from heimdall.receivers import STATIONS
from heimdall.scene import GeneratorConfig, region_of
from heimdall.upstream.objects import IqProblem, ObjectRef, chunk_key_base, decode_iq, object_key, parse_location
from heimdall.upstream.source import Measurement, Session, Snapshot

__all__ = ["Capture", "PlannedRecording", "Plan", "plan_recordings", "load_recording", "group_key"]

_STATION_BY_NAME = {s.name: i for i, s in enumerate(STATIONS)}


@dataclass(frozen=True)
class Capture:
    """One receiver's part of a recording: its station index, row and object key."""

    station: int
    measurement: Measurement
    key: str


@dataclass
class PlannedRecording:
    """One simultaneous capture across receivers, before its objects are read.

    Attributes:
        session: the session it belongs to.
        group: its split group key (the known source's id, or ``session:<id>``).
        folder, chunk: where its objects are (chunk None: a single acquisition).
        captures: one per receiver, in station order.
        tx_lat, tx_lon, tx_power_dbm: the known source's values (NaN: unknown / unlabelled).
        frequency_hz: the tuned frequency.
    """

    session: Session
    group: str
    folder: str
    chunk: int | None
    captures: list[Capture]
    tx_lat: float
    tx_lon: float
    tx_power_dbm: float
    frequency_hz: float

    @property
    def labelled(self) -> bool:
        return math.isfinite(self.tx_lat) and math.isfinite(self.tx_lon)


@dataclass
class Plan:
    """The recordings of the selected sessions, with every row left out counted by reason."""

    recordings: list[PlannedRecording] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)
    keys: set[str] = field(default_factory=set)
    one_based_chunk_folders: int = 0


def group_key(session: Session, located_source: bool) -> str:
    """The split group of a session: its known source, or the session itself when it has no located source."""
    return session.known_source_id if located_source and session.known_source_id else f"session:{session.id}"


def _session_of(snapshot: Snapshot) -> Callable[[Measurement, ObjectRef], str | None]:
    ids = {s.id for s in snapshot.sessions}
    by_folder = {s.celery_task_id: s.id for s in snapshot.sessions if s.celery_task_id}
    by_folder.update({s.id: s.id for s in snapshot.sessions})

    def session_of(m: Measurement, ref: ObjectRef) -> str | None:
        if m.session_id is not None:
            return m.session_id if m.session_id in ids else None
        return by_folder.get(ref.folder)

    return session_of


def _station_of(snapshot: Snapshot, m: Measurement) -> int | None:
    row = snapshot.stations.get(m.station_id or "")
    return None if row is None else _STATION_BY_NAME.get(row.name)


def _labels(session: Session, snapshot: Snapshot) -> tuple[float, float, float, bool]:
    src = snapshot.sources.get(session.known_source_id or "")
    if src is None or not src.located:
        return math.nan, math.nan, math.nan, False
    return float(src.lat), float(src.lon), math.nan if src.power_dbm is None else float(src.power_dbm), True


def plan_recordings(snapshot: Snapshot, sessions: list[Session], bucket: str,
                    list_keys: Callable[[str], list[str]]) -> Plan:
    """Group the measurements of ``sessions`` into recordings.

    Args:
        snapshot: the database rows (its ``unattributed`` count becomes the ``no session`` reject).
        sessions: the sessions to import (others' measurements are ignored).
        bucket: the raw-IQ bucket. Objects are read there whatever bucket a location names: upstream
            writes ``s3://heimdall-raw-iq/`` into every location, even when its bucket has another name.
        list_keys: lists the bucket's keys under a prefix (decides each folder's chunk numbering).

    Returns:
        The recordings, in session order then chunk order, and the rejected rows by reason:
        ``no location``, ``no session``, ``unknown station``, ``duplicate receiver``.
    """
    wanted = {s.id: s for s in sessions}
    session_of = _session_of(snapshot)
    plan = Plan()
    if snapshot.unattributed:
        plan.rejects["no session"] = snapshot.unattributed
    grouped: dict[tuple[str, str, int | None], dict[int, tuple[Measurement, ObjectRef]]] = {}
    for m in snapshot.measurements:
        ref = parse_location(m.location)
        sid = session_of(m, ref) if ref is not None else m.session_id
        if sid not in wanted:
            continue
        if ref is None:
            plan.rejects["no location"] += 1
        elif (station := _station_of(snapshot, m)) is None:
            plan.rejects["unknown station"] += 1
        elif station in (members := grouped.setdefault((sid, ref.folder, ref.chunk), {})):
            plan.rejects["duplicate receiver"] += 1
        else:
            members[station] = (m, ref)
    bases: dict[str, int] = {}
    order = {s.id: i for i, s in enumerate(sessions)}
    for (sid, folder, chunk), members in sorted(grouped.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2] or 0)):
        if folder not in bases:
            listed = list_keys(f"sessions/{folder}/")
            plan.keys.update(listed)
            bases[folder] = chunk_key_base(listed, folder) if chunk is not None else 0
            plan.one_based_chunk_folders += bases[folder]
        session = wanted[sid]
        lat, lon, power, located = _labels(session, snapshot)
        captures = [Capture(i, m, object_key(ref, bases.get(folder, 0))) for i, (m, ref) in sorted(members.items())]
        freq = float(np.median([c.measurement.frequency_hz for c in captures]))
        plan.recordings.append(PlannedRecording(session, group_key(session, located), folder, chunk, captures,
                                                lat, lon, power, freq))
    return plan


def _inside_hull(lat: float, lon: float) -> bool:
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return False
    east, north = default_frame().to_local(lat, lon)
    return bool(region_of(GeneratorConfig(), np.array([[float(east), float(north)]]))[0] == 0)


def load_recording(rec: PlannedRecording, get: Callable[[str], bytes], keys: set[str], *, n_samples: int,
                   snr_threshold_db: float, rejects: Counter[str]) -> tuple[np.ndarray, dict[str, object]] | None:
    """Read one recording's objects into IQ (R, n_samples) complex64 and its labels.

    A receiver whose object is missing or unusable is left out (not heard, zero IQ) and
    counted in ``rejects`` by reason; a receiver is heard when its object is usable and
    its recorded SNR, if any, reaches ``snr_threshold_db``.

    Returns:
        ``(iq, labels)``, or None when no receiver heard it (counted as ``recording: ...``).
    """
    r = len(STATIONS)
    iq = np.zeros((r, n_samples), dtype=np.complex64)
    heard = np.zeros(r, dtype=bool)
    power = np.full(r, np.nan, dtype=np.float32)
    snr = np.full(r, np.nan, dtype=np.float32)
    usable = 0
    for c in rec.captures:
        if c.key not in keys:
            rejects["missing object"] += 1
            continue
        try:
            iq[c.station] = decode_iq(get(c.key), n_samples=n_samples, expected_count=c.measurement.samples_count)
        except NotFoundError:
            rejects["missing object"] += 1
            continue
        except IqProblem as problem:
            rejects[problem.reason] += 1
            continue
        usable += 1
        m = c.measurement
        power[c.station] = np.nan if m.signal_strength_db is None else m.signal_strength_db
        snr[c.station] = np.nan if m.snr_db is None else m.snr_db
        heard[c.station] = not (np.isfinite(snr[c.station]) and snr[c.station] < snr_threshold_db)
    if not heard.any():
        rejects["recording: no usable object" if usable == 0 else "recording: no receiver heard"] += 1
        return None
    labels: dict[str, object] = {
        "tx_lat": rec.tx_lat, "tx_lon": rec.tx_lon, "tx_power_dbm": rec.tx_power_dbm, "frequency_hz": rec.frequency_hz,
        "inside_hull": _inside_hull(rec.tx_lat, rec.tx_lon), "rx_power_dbm": power, "snr_db": snr, "heard": heard,
    }
    return iq, labels
