"""Session fixtures: a real PostgreSQL 15 and a real S3 server (SeaweedFS), no mocks.

Fixtures:
    postgres_url (session): ``postgresql://postgres@127.0.0.1:PORT/heimdall``, a
        private cluster in a temporary directory (trust auth, fsync off).
    s3_settings (session): :class:`heimdall.store.S3Settings` of a private
        ``weed mini`` with one random access key (real key checking); its keys are
        also ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in the environment.
    s3_store (function): an ``S3Store`` on a unique prefix of the shared bucket
        ``heimdall-test``; its objects are deleted afterwards.
    local_store (function): ``LocalStore(tmp_path / "store")``.

Each server starts on first use, stops by pid when the session ends, and is
listed in the "heimdall test services" section at the end of the run. A
server that cannot start makes the tests using it fail with the reason; they
are never skipped.

To reuse running servers instead (e.g. after ``python -m tuning.services up``)::

    export HEIMDALL_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/heimdall
    export HEIMDALL_TEST_S3_ENDPOINT=http://127.0.0.1:8333   # with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    python -m pytest -m "not slow"
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from heimdall.errors import ConfigError
from heimdall.store import LocalStore, S3Settings
from heimdall.store.s3 import S3Store
from tuning.ops.services import PostgresServer, SeaweedServer, ServiceError, pg_version

TEST_BUCKET = "heimdall-test"
_SERVICE_LINES = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SERVICE_LINES] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Show which real services this run used, so CI logs prove they ran."""
    lines = config.stash.get(_SERVICE_LINES, [])
    if lines:
        terminalreporter.section("heimdall test services")
        for line in lines:
            terminalreporter.write_line(line)


def _record(config: pytest.Config, line: str) -> None:
    config.stash[_SERVICE_LINES].append(line)
    print(line)  # visible at once with -s


@contextmanager
def _service_dir(kind: str) -> Iterator[Path]:
    # Not tmp_path_factory: its root is mode 0700 and PostgreSQL runs as user postgres when we are root.
    path = Path(tempfile.mkdtemp(prefix=f"heimdall-test-{kind}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


@pytest.fixture(scope="session")
def postgres_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """URL of a real PostgreSQL 15 database ``heimdall`` for the whole session."""
    override = os.environ.get("HEIMDALL_TEST_POSTGRES_URL")
    if override:
        _record(pytestconfig, f"PostgreSQL: reusing HEIMDALL_TEST_POSTGRES_URL={_without_password(override)}")
        yield override
        return
    with _service_dir("pg") as base:
        started = time.monotonic()
        try:
            server = PostgresServer.start(base / "pg", durable=False)
        except ServiceError as err:
            pytest.fail(f"the PostgreSQL test server could not start: {err}", pytrace=False)
        _record(pytestconfig, f"PostgreSQL {pg_version()} on 127.0.0.1:{server.port} (pid {server.pid}), "
                              f"started in {time.monotonic() - started:.1f} s")
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_settings(pytestconfig: pytest.Config) -> Iterator[S3Settings]:
    """Settings of a real S3 server (SeaweedFS ``weed mini``) for the whole session."""
    endpoint = os.environ.get("HEIMDALL_TEST_S3_ENDPOINT")
    if endpoint:
        settings = _settings_from_test_env(endpoint)
        _record(pytestconfig, f"S3: reusing HEIMDALL_TEST_S3_ENDPOINT={endpoint}")
        yield settings
        return
    with _service_dir("s3") as base:
        started = time.monotonic()
        try:
            server = SeaweedServer.start(base / "s3")
        except ServiceError as err:
            pytest.fail(f"the SeaweedFS S3 test server could not start: {err}", pytrace=False)
        _record(pytestconfig, f"SeaweedFS S3 on {server.endpoint} (pid {server.pid}), "
                              f"started in {time.monotonic() - started:.1f} s")
        try:
            settings = S3Settings(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key)
            with _keys_in_environment(settings):
                yield settings
        finally:
            server.stop()


@contextmanager
def _keys_in_environment(settings: S3Settings) -> Iterator[None]:
    """The server's keys in this process's environment for the session, where a user's shell or a
    cluster node has them: the pyarrow filesystems handed to Ray carry no keys, and every process
    that uses one (this one, Ray workers started after this) reads them there."""
    keys = {"AWS_ACCESS_KEY_ID": settings.access_key, "AWS_SECRET_ACCESS_KEY": settings.secret_key}
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings_from_test_env(endpoint: str) -> S3Settings:
    env = {**os.environ, "HEIMDALL_S3_ENDPOINT": endpoint}
    try:
        return S3Settings.from_env(env)
    except ConfigError as err:
        pytest.fail(f"HEIMDALL_TEST_S3_ENDPOINT is set but the S3 settings are incomplete: {err}", pytrace=False)


@pytest.fixture
def s3_store(s3_settings: S3Settings, request: pytest.FixtureRequest) -> Iterator[S3Store]:
    """An S3Store on a prefix of ``heimdall-test`` that no other test uses."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    store = S3Store(s3_settings, TEST_BUCKET, prefix=f"{name}-{uuid.uuid4().hex[:8]}")
    yield store
    for key in store.list():
        store.delete(key)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A LocalStore in this test's temporary directory."""
    return LocalStore(tmp_path / "store")
