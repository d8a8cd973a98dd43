"""Build a Heimdall installation for tests: upstream's schema and rows in a fresh database, its objects in a bucket.

Tables and columns are upstream's (``db/01-init.sql`` of fulgidus/heimdall,
branch ``develop``: ``measurements.recording_session_id`` exists; ``main`` lacks
it, ``session_links=False`` builds that shape), in schema ``heimdall``, with
upstream's own ``training_datasets``/``models`` tables beside them. No
TimescaleDB here: ``measurements`` is a plain table with the same columns.

The IQ is physically consistent (heimdall.scene/heimdall.synthetic) for
transmitters at the known sources' positions, written the way upstream writes
it: complex128 arrays, chunked sessions keyed ``chunk_{k+1:03d}`` while the
rows say ``chunk_{k:03d}``, single acquisitions keyed by their task id with a
metadata json beside them, receiver numbers ``n`` in an order that is not ours,
``iq_sample_rate`` 12500 for 12 kHz samples. A few rows are broken on purpose;
:class:`Expected` says what a correct import reports.
"""
from __future__ import annotations

import io
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from heimdall.geometry import default_frame
from heimdall.receivers import STATIONS
from heimdall.scene import GeneratorConfig, Scene, mean_rx_power_dbm, region_of, station_params
from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from heimdall.synthetic import synthesize_iq

RECORDED_RATE = 12500  # upstream's task default, although the WebSDRs deliver 12 kHz

DDL = """
CREATE SCHEMA heimdall;
SET search_path TO heimdall, public;
CREATE TABLE websdr_stations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name VARCHAR(255) NOT NULL UNIQUE, url VARCHAR(512) NOT NULL,
    country VARCHAR(100), latitude FLOAT NOT NULL, longitude FLOAT NOT NULL, frequency_min_hz BIGINT,
    frequency_max_hz BIGINT, is_active BOOLEAN DEFAULT TRUE, api_type VARCHAR(50) DEFAULT 'http',
    rate_limit_ms INTEGER DEFAULT 1000, timeout_seconds INTEGER DEFAULT 30, retry_count INTEGER DEFAULT 3,
    admin_email VARCHAR(255), location_description TEXT, altitude_asl INTEGER, notes TEXT,
    created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW());
CREATE TABLE known_sources (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name VARCHAR(255) NOT NULL UNIQUE, description TEXT,
    frequency_hz BIGINT, latitude FLOAT, longitude FLOAT, power_dbm FLOAT, source_type VARCHAR(100),
    is_validated BOOLEAN DEFAULT FALSE, error_margin_meters FLOAT, created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW());
CREATE TABLE recording_sessions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), known_source_id UUID REFERENCES known_sources(id) ON DELETE CASCADE,
    session_name VARCHAR(255) NOT NULL, session_start TIMESTAMPTZ NOT NULL, session_end TIMESTAMPTZ,
    duration_seconds FLOAT, celery_task_id VARCHAR(255), status VARCHAR(50) DEFAULT 'pending',
    approval_status VARCHAR(50) DEFAULT 'pending', uncertainty_meters FLOAT, notes TEXT,
    created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW());
CREATE TABLE measurements (
    timestamp TIMESTAMPTZ NOT NULL, id UUID NOT NULL DEFAULT gen_random_uuid(),
    websdr_station_id UUID REFERENCES websdr_stations(id) ON DELETE CASCADE,
    {session_column}
    frequency_hz BIGINT NOT NULL, signal_strength_db FLOAT, snr_db FLOAT, frequency_offset_hz INT,
    iq_data_location VARCHAR(512), iq_data_format VARCHAR(50), iq_sample_rate INT, iq_samples_count INT,
    duration_seconds FLOAT, notes TEXT, created_at TIMESTAMPTZ DEFAULT NOW(), PRIMARY KEY (timestamp, id));
CREATE INDEX idx_measurements_websdr_station ON measurements(websdr_station_id, timestamp DESC);
CREATE TABLE training_datasets (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name VARCHAR(255) NOT NULL UNIQUE, description TEXT,
    measurement_count INT DEFAULT 0, frequency_range_min_hz BIGINT, frequency_range_max_hz BIGINT,
    is_active BOOLEAN DEFAULT TRUE, created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW());
CREATE TABLE dataset_measurements (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    dataset_id UUID NOT NULL REFERENCES training_datasets(id) ON DELETE CASCADE, measurement_id UUID NOT NULL,
    created_at TIMESTAMPTZ DEFAULT NOW(), UNIQUE(dataset_id, measurement_id));
CREATE TABLE models (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), model_name VARCHAR(255) NOT NULL UNIQUE, model_type VARCHAR(100),
    training_dataset_id UUID REFERENCES training_datasets(id) ON DELETE SET NULL, mlflow_run_id VARCHAR(255),
    mlflow_experiment_id INT, onnx_model_location VARCHAR(512), pytorch_model_location VARCHAR(512),
    accuracy_meters FLOAT, accuracy_sigma_meters FLOAT, loss_value FLOAT, epoch INT,
    is_active BOOLEAN DEFAULT FALSE, is_production BOOLEAN DEFAULT FALSE,
    created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW());
CREATE TABLE training_jobs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), job_name VARCHAR(255) NOT NULL, celery_task_id VARCHAR(255) UNIQUE,
    status VARCHAR(50) DEFAULT 'pending', config JSONB NOT NULL, total_epochs INTEGER NOT NULL,
    created_at TIMESTAMPTZ DEFAULT NOW());
INSERT INTO training_datasets (name, description) VALUES ('upstream-own', 'a dataset of Heimdall''s own trainer');
INSERT INTO models (model_name, model_type) VALUES ('localization_model', 'upstream');
"""

#: Upstream's receiver numbers ``n`` in its object keys: deliberately not our station order.
UPSTREAM_NUMBER = {s.name: n for n, s in enumerate(sorted(STATIONS, key=lambda s: s.name, reverse=True), start=1)}


@dataclass
class Expected:
    """What a correct import of the whole installation reports."""

    sessions: int = 0
    unlabelled_sessions: int = 0
    waiting_sessions: int = 0
    recordings: int = 0
    labelled: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    known_sources: int = 0
    one_based_folders: int = 0


@dataclass
class HeimdallInstall:
    """A built installation: its database URL, bucket and what importing it should give."""

    url: str
    bucket: str
    expected: Expected
    db_name: str
    session_links: bool = True


def database_url(admin_url: str, db_name: str) -> str:
    """``admin_url`` pointed at database ``db_name``."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{db_name}"))


class _Builder:
    def __init__(self, cur, store: S3Store, rng: np.random.Generator, links: bool) -> None:
        self.cur, self.store, self.rng, self.links = cur, store, rng, links
        self.config = GeneratorConfig()
        self.sp = station_params(self.config)
        self.frame = default_frame()
        self.expected = Expected()
        self.t0 = datetime(2025, 10, 1, 8, 0, tzinfo=UTC)
        self.stations: dict[str, str] = {}

    def add_stations(self) -> None:
        order = list(STATIONS)
        self.rng.shuffle(order)  # inserted in no particular order: rows are matched by name
        for s in order:
            self.stations[s.name] = self._insert("websdr_stations", name=s.name, url=f"http://{s.id}.example:8073",
                                                 latitude=s.lat, longitude=s.lon, altitude_asl=int(s.alt_m))
        self.stations["Bologna"] = self._insert("websdr_stations", name="Bologna", url="http://bo.example",
                                                latitude=44.49, longitude=11.34)

    def _insert(self, table: str, **values) -> str:
        cols = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        self.cur.execute(f"INSERT INTO heimdall.{table} ({cols}) VALUES ({marks}) RETURNING id::text",
                         list(values.values()))
        return self.cur.fetchone()[0]

    def source(self, name: str, *, power: float | None, located: bool = True) -> tuple[str, dict]:
        if not located:
            return self._insert("known_sources", name=name, description="placeholder", is_validated=False,
                                error_margin_meters=1000.0), {}
        east, north = self.rng.uniform([-40, -40], [40, 40])
        while region_of(self.config, np.array([[east, north]]))[0] != 0:
            east, north = self.rng.uniform([-60, -60], [60, 60])
        lat, lon = self.frame.to_geographic(east, north)
        freq = float(self.rng.choice([145.5e6, 433.5e6]))
        row = dict(name=name, frequency_hz=int(freq), latitude=float(lat), longitude=float(lon), power_dbm=power,
                   source_type="repeater", is_validated=True, error_margin_meters=30.0)
        self.expected.known_sources += 1
        return self._insert("known_sources", **row), {"east": east, "north": north, "lat": float(lat),
                                                      "lon": float(lon), "power": power, "freq": freq}

    def scene(self, tx: dict, n: int) -> Scene:
        """``n`` captures of a transmitter, each heard by at least two receivers."""
        if not tx:  # no known position: somewhere in the network anyway
            tx = {"east": self.rng.uniform(-30, 30), "north": self.rng.uniform(-30, 30), "power": None, "freq": 145.6e6}
        stations = self.frame.stations_local()
        d = np.linalg.norm(np.array([tx["east"], tx["north"]])[None] - stations, axis=1)
        power = 40.0 if tx["power"] is None else tx["power"]
        prx, snr = np.empty((n, len(STATIONS))), np.empty((n, len(STATIONS)))
        for i in range(n):
            while True:
                p = mean_rx_power_dbm(self.config, power, d, tx["freq"]) + self.rng.normal(0, 6.0, len(STATIONS))
                s = p - self.sp.noise_floor_dbm
                if (s >= self.config.snr_threshold_db).sum() >= 3:
                    prx[i], snr[i] = p, s
                    break
        lat, lon = self.frame.to_geographic(np.full(n, tx["east"]), np.full(n, tx["north"]))
        self.snr = snr  # the rows record it
        return Scene(tx_east_km=np.full(n, tx["east"]), tx_north_km=np.full(n, tx["north"]), tx_lat=lat, tx_lon=lon,
                     tx_power_dbm=np.full(n, power), frequency_hz=np.full(n, tx["freq"]), inside_hull=np.ones(n, bool),
                     rx_power_dbm=prx, snr_db=snr, heard=snr >= self.config.snr_threshold_db)

    def session(self, name: str, source_id: str | None, tx: dict, *, chunks: int | None, status: str = "completed",
                breakage: dict[int, str] | None = None) -> None:
        """One recording session: ``chunks`` one-second chunks, or (None) one single acquisition."""
        start = self.t0 + timedelta(minutes=17 * self.expected.sessions + 3 * self.expected.waiting_sessions)
        task = str(uuid.uuid4())
        sid = self._insert("recording_sessions", known_source_id=source_id, session_name=name, session_start=start,
                           session_end=start + timedelta(seconds=chunks or 1), duration_seconds=float(chunks or 1),
                           celery_task_id=task, status=status,
                           approval_status="approved" if status == "completed" else "pending")
        if status != "completed":
            self.expected.waiting_sessions += 1
            return
        n = chunks or 1
        iq = synthesize_iq(self.config, self.scene(tx, n), self.rng)
        scene_snr = self.snr
        for k in range(n):
            self._capture(sid, task if chunks is None else sid, None if chunks is None else k, start + timedelta(seconds=k),
                          iq[k], scene_snr[k], tx, (breakage or {}).get(k))
        self.expected.sessions += 1
        self.expected.unlabelled_sessions += int(not tx)
        self.expected.recordings += n
        self.expected.labelled += n if tx else 0
        self.expected.one_based_folders += int(chunks is not None)

    def _capture(self, session_id: str, folder: str, chunk: int | None, when: datetime, iq: np.ndarray,
                 snr: np.ndarray, tx: dict, broken: str | None) -> None:
        freq = tx.get("freq", 145.6e6)
        strongest = int(np.argmax(snr))
        answering = [i for i in range(len(STATIONS)) if i == strongest or self.rng.random() >= 0.1]
        weakest = min(answering, key=lambda i: snr[i])  # faults break the weakest link: the recording survives
        object_fault = broken if broken != "unknown station" else None
        for i in answering:
            st = STATIONS[i]
            n = UPSTREAM_NUMBER[st.name]
            if chunk is None:
                location, key = f"sessions/{folder}/websdr_{n}.npy", f"sessions/{folder}/websdr_{n}.npy"
            else:
                location = f"sessions/{folder}/chunk_{chunk:03d}_websdr_{n}.npy"
                key = f"sessions/{folder}/chunk_{chunk + 1:03d}_websdr_{n}.npy"
            samples = iq[i].astype(np.complex128)  # what np.array(iq.tolist()) gives upstream
            fault = object_fault if i == weakest else None
            if fault == "wrong length":
                samples = samples[:3000]
            elif fault == "non-finite":
                samples = samples.copy()
                samples[100] = np.nan
            self._row(session_id, st.name, when, freq, float(snr[i] + self.sp.noise_floor_dbm[i]), float(snr[i]),
                      f"s3://heimdall-raw-iq/{location}", len(iq[i]))
            if fault:
                self.expected.rejects[fault] += 1
            if fault == "missing object":
                continue
            buf = io.BytesIO()
            if fault == "not npy":
                buf.write(b"this is not an npy file")
            else:
                np.save(buf, samples)
            self.store.put(key, buf.getvalue())
            if chunk is None:
                meta = {"websdr_id": n, "frequency_mhz": freq / 1e6, "sample_rate_khz": RECORDED_RATE / 1e3,
                        "samples_count": len(samples), "timestamp_utc": when.isoformat()}
                self.store.put(f"sessions/{folder}/websdr_{n}_metadata.json", json.dumps(meta).encode())
        if broken == "unknown station":
            self._row(session_id, "Bologna", when, freq, -90.0, 10.0,
                      f"s3://heimdall-raw-iq/sessions/{folder}/chunk_{chunk:03d}_websdr_8.npy", len(iq[0]))
            self.expected.rejects["unknown station"] += 1

    def _row(self, session_id: str, station: str, when: datetime, freq: float, power: float, snr: float,
             location: str, count: int) -> None:
        values = dict(timestamp=when, websdr_station_id=self.stations[station], frequency_hz=int(freq),
                      signal_strength_db=power, snr_db=snr, frequency_offset_hz=0, iq_data_location=location,
                      iq_data_format="npy", iq_sample_rate=RECORDED_RATE, iq_samples_count=count,
                      duration_seconds=1.0)
        if self.links and "/chunk_" in location:  # single acquisitions carry no session link upstream
            values["recording_session_id"] = session_id
        self._insert("measurements", **values)


def build_heimdall(admin_url: str, s3: S3Settings, *, db_name: str, bucket: str, seed: int = 7,
                   n_sources: int = 9, sessions_per_source: int = 2, chunks: int = 8,
                   session_links: bool = True) -> HeimdallInstall:
    """Create database ``db_name`` and bucket ``bucket`` holding a Heimdall installation (see module doc)."""
    import psycopg2

    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db_name}"')
    admin.close()
    url = database_url(admin_url, db_name)
    store = S3Store(s3, bucket)
    store.ensure_bucket()
    conn = psycopg2.connect(url)
    b = _Builder(conn.cursor(), store, np.random.default_rng(seed), session_links)
    with conn, conn.cursor() as cur:
        b.cur = cur
        column = "recording_session_id UUID REFERENCES recording_sessions(id) ON DELETE CASCADE," if session_links else ""
        cur.execute(DDL.replace("{session_column}", column))
        b.add_stations()
        faults = iter(["missing object", "wrong length", "non-finite", "not npy", "unknown station"])
        for j in range(n_sources):
            sid, tx = b.source(f"repeater-{j}", power=None if j % 4 == 3 else float(b.rng.uniform(35, 45)))
            for s in range(sessions_per_source):
                breakage = {} if (j + s) % 3 else {2: next(faults, None)}
                b.session(f"{j}-{s}", sid, tx, chunks=chunks, breakage={k: v for k, v in breakage.items() if v})
        b.session("single-a", sid, tx, chunks=None)
        b.session("single-b", sid, tx, chunks=None)
        unknown_id, _ = b.source("Unknown", power=None, located=False)
        b.session("no-source-1", None, {}, chunks=3)
        b.session("no-source-2", None, {}, chunks=3)
        b.session("unknown-source", unknown_id, {}, chunks=2)
        b.session("still-recording", sid, tx, chunks=4, status="in_progress")
    conn.close()
    return HeimdallInstall(url=url, bucket=bucket, expected=b.expected, db_name=db_name, session_links=session_links)


def add_sessions(install: HeimdallInstall, s3: S3Settings, *, seen_source: str, new_source: str, chunks: int = 3,
                 seed: int = 11) -> tuple[Expected, dict[str, str]]:
    """Record two more sessions in a built installation, later than every other: one of the known source named
    ``seen_source`` (already imported), one of a new located source ``new_source``.

    Returns:
        What importing just these sessions should give, and the two sources' ids by name.
    """
    import psycopg2

    conn = psycopg2.connect(install.url)
    b = _Builder(None, S3Store(s3, install.bucket), np.random.default_rng(seed), install.session_links)
    b.t0 = datetime(2025, 11, 1, 8, 0, tzinfo=UTC)
    with conn, conn.cursor() as cur:
        b.cur = cur
        cur.execute("SELECT name, id::text FROM heimdall.websdr_stations")
        b.stations = dict(cur.fetchall())
        cur.execute("SELECT id::text, latitude, longitude, power_dbm, frequency_hz FROM heimdall.known_sources "
                    "WHERE name = %s", (seen_source,))
        seen_id, lat, lon, power, freq = cur.fetchone()
        east, north = b.frame.to_local(lat, lon)
        seen = {"east": float(east), "north": float(north), "lat": lat, "lon": lon, "power": power, "freq": float(freq)}
        new_id, new = b.source(new_source, power=40.0)
        b.session(f"{seen_source}-again", seen_id, seen, chunks=chunks)
        b.session(f"{new_source}-first", new_id, new, chunks=chunks)
    conn.close()
    return b.expected, {seen_source: seen_id, new_source: new_id}


def drop_heimdall(admin_url: str, s3: S3Settings, install: HeimdallInstall) -> None:
    """Remove the installation's database and bucket."""
    import psycopg2

    store = S3Store(s3, install.bucket)
    for key in store.list():
        store.delete(key)
    store._client.remove_bucket(install.bucket)
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{install.db_name}" WITH (FORCE)')
    admin.close()


def bucket_state(s3: S3Settings, bucket: str) -> dict[str, str]:
    """Every key of ``bucket`` with its ETag (what must not change)."""
    store = S3Store(s3, bucket)
    return {o.object_name: o.etag for o in store._client.list_objects(bucket, recursive=True)}
