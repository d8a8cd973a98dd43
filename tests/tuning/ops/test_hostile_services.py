"""`tuning.services down` and `tuning.localcluster down` signal only the processes they started.

A decoy is a live process of this test that is not a server: a stale or edited
state file points at it. Its command line even says ``postgres`` and ``weed``,
which is all the old check looked for. It must survive ``down``. The positive
controls show the same ``down`` does stop a process whose recorded identity matches.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuning.ops import localcluster
from tuning.ops.localcluster import RayNode
from tuning.ops.services import ProcessIdentity, main, pid_alive, services_dir, stop_pid

SLEEPER = "import time; time.sleep(60)"


@pytest.fixture
def spawn() -> Iterator:
    """Start ``python -c SLEEPER *argv`` processes; each is killed (by its Popen) at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, session: bool = False) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *argv], start_new_session=session)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _write_pids(directory: Path, postgres: dict, seaweedfs: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {"postgres": {"port": 1, "url": "postgresql://x", **postgres},
             "seaweedfs": {"port": 2, "url": "http://x", "ports": [2], **seaweedfs}}
    (directory / "pids.json").write_text(json.dumps(state))


def _down(directory: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["down", "--dir", str(directory)]) == 0
    return capsys.readouterr().out


def test_a_stale_pids_file_without_identities_stops_nothing(tmp_path: Path, spawn, capsys) -> None:
    decoy = spawn("postgres", "weed")
    _write_pids(tmp_path, {"pid": decoy.pid}, {"pid": decoy.pid})
    out = _down(tmp_path, capsys)
    assert out.count("not ours, left alone") == 2 and "records no process identity" in out
    assert decoy.poll() is None and pid_alive(decoy.pid, "postgres")
    assert not (tmp_path / "pids.json").exists()  # the stale file is cleaned


@pytest.mark.parametrize(("field", "value", "why"), [
    ("start_time", 1, "was reused"),
    ("exe", "/usr/lib/postgresql/15/bin/postgres", "runs "),
    ("marker", "/srv/heimdall/services/postgres", "does not hold"),
])
def test_a_process_that_matches_all_but_one_fact_is_left_alone(tmp_path, spawn, capsys, field, value, why) -> None:
    decoy = spawn("postgres", "weed", str(tmp_path))
    recorded = dataclasses.replace(ProcessIdentity.of(decoy.pid, str(tmp_path)), **{field: value})
    _write_pids(tmp_path, recorded.to_dict(), recorded.to_dict())
    out = _down(tmp_path, capsys)
    assert out.count("not ours, left alone") == 2 and why in out
    assert decoy.poll() is None


def test_the_process_whose_identity_matches_is_stopped(tmp_path: Path, spawn, capsys) -> None:
    ours, decoy = spawn(str(tmp_path / "postgres")), spawn("postgres", "weed")
    _write_pids(tmp_path, ProcessIdentity.of(ours.pid, str(tmp_path / "postgres")).to_dict(), {"pid": decoy.pid})
    out = _down(tmp_path, capsys)
    assert f"stopped PostgreSQL (pid {ours.pid})" in out and "SeaweedFS: pid" in out
    assert ours.wait(timeout=10) != 0  # SIGINT, PostgreSQL's fast shutdown
    assert decoy.poll() is None


def test_status_and_up_see_a_stale_file_as_not_running(spawn, capsys) -> None:
    # Not tmp_path: `up --dry-run` checks that PostgreSQL's user can reach the directory (root runs it as postgres).
    tmp_path = Path(tempfile.mkdtemp(prefix="heimdall-test-stale-"))
    tmp_path.chmod(0o755)
    decoy = spawn("postgres", "weed")
    _write_pids(tmp_path, {"pid": decoy.pid}, {"pid": decoy.pid})
    assert main(["status", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("STOPPED") == 2
    assert main(["up", "--dir", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")  # not "already running"
    assert decoy.poll() is None
    shutil.rmtree(tmp_path)


def test_an_unreadable_pids_file_is_trusted_for_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "pids.json").write_bytes(b"\xff{not json")
    out = _down(tmp_path, capsys)
    assert out.count("not ours, left alone") == 2 and not (tmp_path / "pids.json").exists()


def test_stop_pid_leaves_a_mismatched_process_alone(spawn) -> None:
    decoy = spawn("postgres")
    recorded = ProcessIdentity.of(decoy.pid, "postgres")
    stop_pid(dataclasses.replace(recorded, start_time=recorded.start_time + 1), timeout_s=1)
    assert decoy.poll() is None and pid_alive(recorded)
    stop_pid(recorded, timeout_s=10)
    assert decoy.wait(timeout=10) == -signal.SIGTERM and not pid_alive(recorded)


def test_the_services_directory_follows_heimdall_data_dir(tmp_path: Path, spawn, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    assert services_dir() == tmp_path / "data" / "services"
    assert services_dir(tmp_path / "flag") == tmp_path / "flag"
    decoy = spawn("postgres", "weed")
    _write_pids(tmp_path / "data" / "services", {"pid": decoy.pid}, {"pid": decoy.pid})
    assert main(["down"]) == 0
    assert "not ours, left alone" in capsys.readouterr().out
    assert not (tmp_path / "data" / "services" / "pids.json").exists() and decoy.poll() is None
    assert main(["status"]) == 1
    assert f"no {tmp_path / 'data' / 'services' / 'pids.json'}" in capsys.readouterr().out


# -- tuning.localcluster ----------------------------------------------------------------------------
def _node(proc: subprocess.Popen[bytes], process: ProcessIdentity | None, log: Path) -> RayNode:
    return RayNode("worker-1", "heimdall_worker_1", 1, proc.pid, log, process)


def test_a_ray_node_is_signalled_only_while_it_is_the_process_started(tmp_path: Path, spawn) -> None:
    decoy = spawn("ray", str(tmp_path), session=True)
    recorded = ProcessIdentity.of(decoy.pid, str(tmp_path))
    for stale in (None, dataclasses.replace(recorded, start_time=recorded.start_time + 1)):
        node = _node(decoy, stale, tmp_path / "log")
        assert not node.alive()
        node.kill(signal.SIGKILL)
        node.stop(grace_s=0.5)
        assert decoy.poll() is None
    ours = _node(decoy, recorded, tmp_path / "log")
    assert ours.alive()
    ours.stop(grace_s=5)
    decoy.wait(timeout=10)  # stop() reaped its own child already; this only must not time out
    assert not pid_alive(recorded)


def test_localcluster_down_leaves_a_stale_cluster_file_alone(tmp_path: Path, spawn, capsys) -> None:
    decoy = spawn("ray", "start", "--block", session=True)
    nodes = [{"name": "head", "pid": decoy.pid, "cpus": 1, "resource": "heimdall_head"},
             {"name": "worker-1", "pid": decoy.pid, "cpus": 1, "resource": "heimdall_worker_1",
              "process": dataclasses.replace(ProcessIdentity.of(decoy.pid, ""), marker=str(tmp_path)).to_dict()}]
    (tmp_path / "cluster.json").write_text(json.dumps({"nodes": nodes}))
    assert localcluster.main(["down", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("not ours, left alone") == 2
    assert decoy.poll() is None
    assert localcluster.main(["status", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("stopped") == 2
