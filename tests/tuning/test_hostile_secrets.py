"""No secret reaches a log, a pickle or the run storage.

A real study runs in its own process (its own local Ray, whose temp directory
the test owns) with the S3 secret in its environment, as a user's shell or a
cluster node has it, a catalogue URL that carries a PostgreSQL password and
the Optuna storage given its password through ``PGPASSWORD``. Afterwards every
file of Ray's temp directory (logs, runtime-env records, spilled objects),
every object the study left in S3 (``tuner.pkl``, searcher state, checkpoints)
and every file under the data directory is read as bytes: neither the S3
secret nor the password may appear. The fast tests pickle what travels to Ray
workers or into Tune's state and grep the bytes the same way.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from heimdall.errors import ConfigError
from heimdall.store import S3Settings, open_store
from heimdall.store.s3 import S3Store
from tuning.study.tune import describe_url, open_optuna_storage, open_run_storage

REPO = Path(__file__).resolve().parents[2]
#: Small and fast; every point valid for a one-epoch run (no MSE warm-up).
SPACE = """\
arch: resnet
fixed:
  loss.mse_warmup_epochs: 0
parameters:
  optimizer.lr: {loguniform: [3.0e-4, 3.0e-3]}
"""


def _leaks(data: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in data]


def _files_holding(root: Path, secrets: dict[str, str]) -> list[str]:
    """``path: secret name`` for every regular file under ``root`` that contains a secret."""
    found = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue  # session_latest links to the session itself; sockets are not files
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {name}" for name in _leaks(data, secrets)]
    return found


@pytest.fixture
def s3_env(s3_settings: S3Settings, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The S3 endpoint and keys in this process's environment, where the commands read them."""
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT", s3_settings.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    return s3_store


@pytest.fixture
def pg_role(postgres_url: str) -> Iterator[tuple[str, str]]:
    """``(URL with a password, the password)``: a role with a password owning a database of its own.

    The test server trusts local connections, so the password is not checked, but
    whatever carries it around would still record it.
    """
    import psycopg2

    name = f"hostile_{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {name} OWNER {name}")
        parts = urlsplit(postgres_url)
        url = parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port}", path=f"/{name}").geturl()
        yield url, password
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"DROP ROLE IF EXISTS {name}")
    finally:
        admin.close()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()


# -- what gets pickled ----------------------------------------------------------------------------


@pytest.mark.s3
def test_run_storage_filesystem_pickles_without_the_secret_and_works_unpickled(s3_env: S3Store) -> None:
    secret = s3_env.settings.secret_key
    runs = open_run_storage(f"s3://{s3_env.bucket}/{s3_env.prefix}/runs")
    data = pickle.dumps(runs.filesystem)
    assert secret.encode() not in data
    pickle.loads(data).create_dir(f"{runs.path}/probe")  # signs with the keys of this environment
    with pickle.loads(data).open_output_stream(f"{runs.path}/probe/x") as out:
        out.write(b"written by an unpickled filesystem")
    assert s3_env.get("runs/probe/x") == b"written by an unpickled filesystem"


@pytest.mark.s3
def test_s3_store_pickles_as_settings_without_the_secret(s3_env: S3Store) -> None:
    store = open_store(f"s3://{s3_env.bucket}/{s3_env.prefix}")
    store.put("k", b"v")
    data = pickle.dumps(store)
    assert s3_env.settings.secret_key.encode() not in data
    assert s3_env.settings.secret_key.encode() not in pickle.dumps(store.settings)
    assert pickle.loads(data).get("k") == b"v"


@pytest.mark.s3
def test_unpickling_an_s3_store_without_keys_in_the_environment_says_so(
    s3_env: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pickle.dumps(open_store(f"s3://{s3_env.bucket}/{s3_env.prefix}"))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY is not set") as info:
        pickle.loads(data)
    assert "fix:" in str(info.value)


def test_a_store_whose_keys_are_not_in_the_environment_has_no_pyarrow_filesystem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    store = S3Store(S3Settings("http://127.0.0.1:9", "AKIDHOSTILE", "hostile-secret-value"), "heimdall-x")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as info:
        store.pyarrow_filesystem()
    assert "hostile-secret-value" not in str(info.value)


@pytest.mark.postgres
def test_optuna_storage_refuses_a_password_in_its_url_without_showing_it(pg_role: tuple[str, str]) -> None:
    url, password = pg_role
    for given in (url, _without_password(url) + f"?password={password}"):
        with pytest.raises(ConfigError, match="PGPASSWORD") as info:
            open_optuna_storage(given)
        assert password not in str(info.value) and "fix:" in str(info.value)


@pytest.mark.postgres
def test_optuna_storage_with_pgpassword_pickles_without_it(
    pg_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = pg_role
    monkeypatch.setenv("PGPASSWORD", password)
    storage = open_optuna_storage(_without_password(url))
    assert password.encode() not in pickle.dumps(storage)
    assert pickle.loads(pickle.dumps(storage)).get_all_studies() == []


def test_describe_url_hides_every_form_of_password() -> None:
    for url in ("postgresql://u:s3cr%40t@h:5432/db", "postgresql://u@h/db?password=s3cr%40t&sslmode=require",
                "postgresql://u:s3cr@t@h/db"):
        shown = describe_url(url)
        assert "s3cr" not in shown and "u@h" in shown, shown
    for url in ("sqlite:////abs/optuna.db", "sqlite:///rel/optuna.db", "/data/runs", "s3://bucket/prefix"):
        assert describe_url(url) == url  # nothing to hide: unchanged, absolute SQLite paths included


# -- a real study ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_optuna_password_in_the_url_is_refused_before_anything_runs(
    pg_role: tuple[str, str], tmp_path: Path
) -> None:
    url, password = pg_role
    ray_tmp = tmp_path / "ray-tmp"
    done = subprocess.run(
        [sys.executable, "-m", "tuning.run", "--smoke-test", "--no-export", "--data-dir", str(tmp_path),
         "--optuna-storage", url], capture_output=True, text=True, timeout=240, cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PGPASSWORD" in done.stderr and password not in done.stdout + done.stderr
    assert not ray_tmp.exists(), "Ray was started"


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.postgres
def test_a_study_leaves_no_secret_in_ray_logs_run_storage_or_files(
    pg_role: tuple[str, str], s3_env: S3Store, tmp_path: Path
) -> None:
    url, password = pg_role
    secrets = {"AWS_SECRET_ACCESS_KEY": s3_env.settings.secret_key, "PostgreSQL password": password}
    ray_tmp = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))  # short: Ray's socket paths live below it
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    base = f"s3://{s3_env.bucket}/{s3_env.prefix}"
    data_dir = tmp_path / "data"
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tuning.run", "--smoke-test", "--no-export", "--space", str(space),
             "--dataset", name, "--name", name,
             "--data-dir", str(data_dir), "--catalog", url, "--store", f"{base}/store",
             "--optuna-storage", _without_password(url), "--storage-path", f"{base}/runs"],
            capture_output=True, timeout=900, cwd=REPO,
            env={**os.environ, "PGPASSWORD": password, "RAY_TMPDIR": str(ray_tmp)})
        output = done.stdout + done.stderr
        assert done.returncode == 0, output.decode(errors="replace")[-6000:]
        keys = s3_env.list()
        assert f"runs/{name}/tuner.pkl" in keys and any("searcher-state" in k for k in keys), keys
        sessions = list(ray_tmp.rglob("session_2*"))
        assert sessions and any(ray_tmp.rglob("runtime_env_agent.log")), "the study did not use this Ray temp dir"

        leaks = [f"output: {n}" for n in _leaks(output, secrets)]
        leaks += _files_holding(ray_tmp, secrets)
        leaks += [f"s3 {key}: {n}" for key in keys for n in _leaks(s3_env.get(key), secrets)]
        leaks += _files_holding(data_dir, secrets)
        assert leaks == [], leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
