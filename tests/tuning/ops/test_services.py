"""The private PostgreSQL and SeaweedFS servers: they start, answer, and stop by pid."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest

from heimdall.store import S3Settings
from heimdall.store.s3 import S3Store
from tuning.ops.services import (
    PostgresServer,
    ProcessIdentity,
    SeaweedServer,
    ServiceError,
    check_pg_dir_reachable,
    main,
    pid_alive,
    port_accepts,
)


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory the ``postgres`` user can reach (pytest's tmp_path root is mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="heimdall-test-svc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _query(url: str, sql: str) -> object:
    with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute(sql)
        value = cur.fetchone()[0]
    conn.close()
    return value


@pytest.mark.postgres
def test_postgres_fixture_is_a_real_postgresql_15(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:") and postgres_url.endswith("/heimdall")
    version = _query(postgres_url, "SELECT version()")
    assert str(version).startswith("PostgreSQL 15."), version
    assert _query(postgres_url, "SELECT current_database()") == "heimdall"


@pytest.mark.postgres
def test_second_postgres_starts_beside_the_fixture_and_stops_by_pid(postgres_url: str, service_dir: Path) -> None:
    server = PostgresServer.start(service_dir / "pg", durable=False)
    assert server.url != postgres_url and server.is_running()
    assert _query(server.url, "SELECT 1") == 1
    server.stop()
    assert not pid_alive(server.pid, "postgres")  # gone, or a zombie awaiting its reaper
    assert not port_accepts(server.port)


@pytest.mark.s3
def test_second_seaweed_starts_beside_the_fixture_and_stops_by_pid(s3_settings: S3Settings, service_dir: Path) -> None:
    with SeaweedServer.start(service_dir / "s3") as server:
        assert server.endpoint != s3_settings.endpoint and server.is_running()
        assert server.secret_key not in repr(server)
        store = S3Store(S3Settings(server.endpoint, server.access_key, server.secret_key), "second")
        store.put("k", b"v")
        assert store.get("k") == b"v"
        assert (service_dir / "s3" / "identities.json").stat().st_mode & 0o077 == 0
    assert not pid_alive(server.pid, "weed") and not port_accepts(server.port)
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{server.port}.sock"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuning.services", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _sourced(env_sh: Path) -> dict[str, str]:
    names = ("HEIMDALL_CATALOG", "HEIMDALL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    script = f"source {shlex.quote(str(env_sh))} && " + " && ".join(f'printf "%s\\n" "${n}"' for n in names)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@contextmanager
def _cli_up(directory: Path) -> Iterator[str]:
    """Run `up`, yield its stdout, and always run `down` afterwards."""
    try:
        up = _cli("up", "--dir", str(directory))
        assert up.returncode == 0, up.stderr
        yield up.stdout + up.stderr
    finally:
        down = _cli("down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.s3
def test_cli_up_status_down_round_trip_keeps_data(service_dir: Path) -> None:
    env_sh = service_dir / "env.sh"
    with _cli_up(service_dir) as output:
        env = _sourced(env_sh)
        assert stat.S_IMODE(env_sh.stat().st_mode) == 0o600
        assert env["AWS_SECRET_ACCESS_KEY"] not in output and f"source {env_sh}" in output
        assert _cli("status", "--dir", str(service_dir)).returncode == 0  # outlived the `up` process
        assert str(_query(env["HEIMDALL_CATALOG"], "SELECT version()")).startswith("PostgreSQL 15.")
        S3Store(S3Settings.from_env(env), "cli-bucket").put("kept", b"across restarts")
        assert _cli("up", "--dir", str(service_dir)).stdout.startswith("already running")
        pids = json.loads((service_dir / "pids.json").read_text())
        ours = [ProcessIdentity.from_dict(pids[key]) for key in ("postgres", "seaweedfs")]
        assert all(p is not None and p.alive() and str(service_dir) in p.marker for p in ours), pids
    status = _cli("status", "--dir", str(service_dir))
    assert status.returncode == 1 and "not running" in status.stdout
    assert not pid_alive(pids["postgres"]["pid"], "postgres") and not pid_alive(pids["seaweedfs"]["pid"], "weed")
    assert not any(p.alive() for p in ours)
    with _cli_up(service_dir):
        assert S3Store(S3Settings.from_env(_sourced(env_sh)), "cli-bucket").get("kept") == b"across restarts"


def test_cli_up_dry_run_checks_without_starting(service_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--dir", str(service_dir / "svc"), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("ok: PostgreSQL 15.")
    assert not (service_dir / "svc").exists()


def test_cli_usage_error_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["status", "--dir", str(not_a_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err


def test_cli_status_without_services_says_how_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--dir", str(tmp_path)]) == 1
    assert "tuning.services up" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to the postgres user")
def test_unreachable_postgres_dir_is_refused_with_the_fix(service_dir: Path) -> None:
    private = service_dir / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ServiceError, match="cannot enter .*private.*chmod o\\+x"):
        check_pg_dir_reachable(private / "pg")
