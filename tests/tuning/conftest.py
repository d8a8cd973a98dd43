"""Fixtures for tuning tests: one local Ray for the whole test session.

``ray_session`` starts Ray once (~5 s) and every Ray Data, Train and Tune test
shares it. Rules for tests that use it:

* never call ``ray.shutdown()`` or ``ray stop`` (the latter kills every Ray on
  the machine, other developers' included);
* leave the dashboard on: with ``include_dashboard=False`` a Train run nested in
  a Tune trial never released its CPU (docs/architecture.md, "Ray facts we rely on");
* the cluster has 2 CPUs: size trials and Data tasks to fit (see
  :mod:`tuning.data.pipeline`).

Several developers run Ray on the same machine. Ray's state API, which Train
V2's placement-group cleaner calls from inside the cluster, then cannot guess
which instance is ours ("Found multiple active Ray instances"): the fixture
pins the dashboard to a free port and hands its URL to every worker (and to
this process) as ``RAY_API_SERVER_ADDRESS``.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

RAY_CPUS = 2
OBJECT_STORE_BYTES = 768 * 1024**2


@dataclass(frozen=True)
class RaySession:
    """What a test may want to know about the shared Ray.

    Attributes:
        address: the GCS address (``ray.init(address=...)`` from a subprocess).
        dashboard_url: where the dashboard answers, e.g. ``127.0.0.1:8265``.
        num_cpus: CPUs the session was started with.
        started_here: False when Ray was already initialised in this process.
    """

    address: str
    dashboard_url: str
    num_cpus: int
    started_here: bool


@pytest.fixture(scope="session")
def ray_session(s3_settings: object) -> Iterator[RaySession]:
    """A local Ray shared by the whole session: 2 CPUs, 768 MiB object store, dashboard on.

    Started after ``s3_settings``, so its workers inherit the S3 keys from the
    environment, as on a real node (nothing ships them a key).

    Idempotent: if Ray is already initialised in this process (another fixture
    or plugin started it) that instance is reused and left running.
    """
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        yield RaySession(ctx.gcs_address, "", int(ray.cluster_resources().get("CPU", 0)), started_here=False)
        return
    port = _free_port()
    api_server = f"http://127.0.0.1:{port}"
    env = {
        "RAY_API_SERVER_ADDRESS": api_server,
        # Workers import functions defined in test modules by reference: give them
        # the same import path as this process (pytest prepends test folders).
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
    }
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = api_server
    try:
        info = ray.init(
            # "local" starts a private instance even if RAY_ADDRESS or a `ray start`
            # cluster of another developer exists on this machine.
            address="local",
            num_cpus=RAY_CPUS,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
        _quiet_data_progress()
        yield RaySession(info.address_info["gcs_address"], info.dashboard_url or "", RAY_CPUS, started_here=True)
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quiet_data_progress() -> None:
    from ray.data import DataContext

    # Progress bars of every Dataset execution would drown pytest's output.
    DataContext.get_current().enable_progress_bars = False
