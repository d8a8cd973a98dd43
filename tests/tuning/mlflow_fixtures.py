"""Helpers of the export, registry and predictor tests.

* ``mlflow_server``: a real ``mlflow server`` with a PostgreSQL backend store
  and an S3 artefact store.
* :func:`tiny_module` / :func:`tiny_export`: a small untrained network, saved as a
  checkpoint and exported once per test session (the export is cached on disk,
  so every test module that asks reuses it).

Import what you need: ``from tests.tuning.mlflow_fixtures import mlflow_server``.
The server fixture starts one server per test session on top of the session's ``postgres_url``
(in a database of its own, so it collides with no other test) and ``s3_settings``
(bucket ``heimdall-mlflow``), waits for ``/health`` and stops it by its process
group id at the end. Clients need no S3 keys: the server proxies artefacts.

Set ``HEIMDALL_TEST_MLFLOW_URI`` to reuse a running server instead.
"""
from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.ops.services import free_ports

__all__ = ["MlflowServer", "mlflow_server", "ARTIFACT_BUCKET", "TinyExport", "tiny_module", "save_checkpoint",
           "tiny_export"]

ARTIFACT_BUCKET = "heimdall-mlflow"
# First start migrates an empty PostgreSQL schema (~40 revisions): slow on a loaded 2-core machine.
START_TIMEOUT_S = 180.0


@dataclass
class MlflowServer:
    """A running ``mlflow server`` started by this process.

    Attributes:
        uri: ``http://127.0.0.1:PORT``, the tracking URI.
        pid: the server's pid, also its process group id (workers included).
        log: the server's combined output.
        backend_uri: the PostgreSQL URL of its backend store.
        artifacts: the ``s3://`` artefact destination.
    """

    uri: str
    pid: int
    log: Path
    backend_uri: str
    artifacts: str
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, postgres_url: str, s3: S3Settings, workdir: Path) -> MlflowServer:
        """Create a database, the artefact bucket, start the server and wait for ``/health``."""
        backend = _create_database(postgres_url, f"mlflow_{uuid.uuid4().hex[:8]}")
        S3Store(s3, ARTIFACT_BUCKET).ensure_bucket()
        artifacts = f"s3://{ARTIFACT_BUCKET}/{uuid.uuid4().hex[:8]}"
        port = free_ports(1)[0]
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "MLFLOW_DISABLE_TELEMETRY": "true",
               # Else the server forks seven job-queue consumers we never use.
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        log = workdir / "mlflow-server.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(f"http://127.0.0.1:{port}", process.pid, log, backend, artifacts, process)
        try:
            server._wait_healthy(START_TIMEOUT_S)
        except BaseException:
            server.stop()
            raise
        return server

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200."""
        parts = urlsplit(self.uri)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group (we started it in its own session), wait, then
        SIGKILL whatever of that group is left."""
        if self.pid <= 0:  # a reused external server is not ours to stop
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            if self.process is not None and sig == signal.SIGTERM:
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            exited = self.process is not None and self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"exited with {self.process.returncode}" if exited else f"no /health within {timeout_s:.0f} s"
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"mlflow server on {self.uri}: {why}; last lines of {self.log}:\n{tail}")
            time.sleep(0.25)


def _create_database(postgres_url: str, name: str) -> str:
    """``CREATE DATABASE name`` on the server of ``postgres_url``; returns its SQLAlchemy URL."""
    import psycopg2

    conn = psycopg2.connect(postgres_url)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    parts = urlsplit(postgres_url)
    return parts._replace(scheme="postgresql+psycopg2", path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def mlflow_server(postgres_url: str, s3_settings: S3Settings) -> Iterator[MlflowServer]:
    """One ``mlflow server`` (PostgreSQL + S3 artefacts) for the whole test session."""
    reuse = os.environ.get("HEIMDALL_TEST_MLFLOW_URI")
    if reuse:
        yield MlflowServer(reuse, -1, Path(os.devnull), "(external)", "(external)")
        return
    workdir = Path(tempfile.mkdtemp(prefix="heimdall-test-mlflow-"))
    started = time.monotonic()
    try:
        server = MlflowServer.start(postgres_url, s3_settings, workdir)
    except RuntimeError as err:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"the MLflow test server could not start: {err}", pytrace=False)
    print(f"MLflow server on {server.uri} (pid {server.pid}), started in {time.monotonic() - started:.1f} s")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- a tiny exported model ------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyExport:
    """A saved checkpoint of :func:`tiny_module` and its ONNX export."""

    checkpoint: Path
    onnx: Path


def tiny_module(seed: int = 0, head: str = "full", covariance_scale: float = 1.7) -> Any:
    """A small untrained ResNet module (one stage, width 4), calibrated with ``covariance_scale``."""
    import torch

    from heimdall.losses import LossConfig
    from heimdall.models import ResNetConfig, build_model
    from heimdall.module import LocalizationModule

    torch.manual_seed(seed)
    config = ResNetConfig(stage_depths=(1,), width=4, stem_channels=1, head_hidden=8, head=head)
    module = LocalizationModule(build_model("resnet", config), LossConfig(family="full_nll" if head == "full" else "gaussian_nll"))
    module.calibrate(covariance_scale)
    return module.eval()


def save_checkpoint(module: Any, path: Path) -> Path:
    """Save as ``tuning.train`` saves ``calibrated.ckpt``."""
    return module.write_checkpoint(path)


def tiny_export(base: Path) -> TinyExport:
    """Export :func:`tiny_module` into ``base/tiny-export`` once; later calls reuse the files."""
    from tuning.release.onnx import build_metadata, export_onnx

    folder = base / "tiny-export"
    done = TinyExport(folder / "tiny.ckpt", folder / "model.onnx")
    if not done.onnx.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        module = tiny_module()
        save_checkpoint(module, done.checkpoint)
        export_onnx(module, done.onnx, build_metadata(module))
    return done
