"""A real multi-node Ray cluster on one machine: a head and worker nodes as separate ``ray start`` processes.

For trying the cluster path (``ray job submit``, shared storage, a node lost)
without a second machine, and for the tests and benchmarks that do the same.
Every node is its own ``ray start --block`` process group with its own CPUs
and a custom resource naming it (``heimdall_head``, ``heimdall_worker_1``...),
listening on free loopback ports; token authentication is on with a token of
this cluster's own (never ``~/.ray/auth_token``). Nodes are stopped by their
process group id, never with ``ray stop`` (which kills every Ray on the machine).

Commands to copy::

    python -m tuning.localcluster up --workers 1 --cpus 2      # head + 1 worker node, prints the env to use
    source .heimdall/cluster/env.sh                            # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, token
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m tuning.run --smoke-test
    python -m tuning.localcluster status
    python -m tuning.localcluster down

Nodes inherit this process's environment (S3 keys, ``PGPASSWORD``): a job's
driver and workers read their credentials from their node, as on a real
cluster, so nothing secret travels in the job's runtime environment.

Caveat: the nodes share this machine's cores; a "two-node" cluster of 2 + 2
logical CPUs on 2 cores shows that the distributed path works, not that it is
faster.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from heimdall.errors import ConfigError, ServiceUnavailableError
from tuning.ops.services import ProcessIdentity, free_ports, pid_alive, signal_process

__all__ = ["RayNode", "LocalCluster", "HEAD_RESOURCE", "worker_resource", "main"]

HEAD_RESOURCE = "heimdall_head"
#: A node's object store (bytes): small, this machine hosts every node.
OBJECT_STORE_BYTES = 400 * 1024**2
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0


def worker_resource(index: int) -> str:
    """The custom resource that names worker node ``index`` (from 1)."""
    return f"heimdall_worker_{index}"


@dataclass
class RayNode:
    """One ``ray start --block`` process group.

    Attributes:
        name: ``head`` or ``worker-N``.
        resource: the custom resource naming the node.
        cpus: logical CPUs it offers.
        pid: the ``ray start`` process, also the group id of the node's processes.
        log: its output.
        process: the ``ray start`` process's identity, recorded at start (None: unknown,
            e.g. a ``cluster.json`` from an older version); nothing is signalled without it.
    """

    name: str
    resource: str
    cpus: int
    pid: int
    log: Path
    process: ProcessIdentity | None = None

    def alive(self) -> bool:
        """Whether the node's ``ray start`` process (the one we started) still runs."""
        return self.process is not None and pid_alive(self.process)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's whole process group (raylet, its workers, the agents), only while its
        leader is still the process we started."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, then SIGKILL its processes that are left after ``grace_s``."""
        if not self.alive():
            return
        # Identities of the group now, while its leader is verified ours: the leftovers are
        # killed by identity, never by a group id that may be free for reuse once the leader is gone.
        members = _group_members(self.pid)
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        for member in members:
            signal_process(member, signal.SIGKILL)
        try:
            os.waitpid(self.pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass


def _group_members(pgid: int) -> list[ProcessIdentity]:
    """Identities of the processes in group ``pgid`` (its leader first, if alive)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5: the process group
                members.append(ProcessIdentity.of(int(proc.name), ""))
        except (OSError, IndexError, ValueError, ServiceUnavailableError):
            continue  # gone meanwhile
    return sorted(members, key=lambda m: m.pid != pgid)


@dataclass
class LocalCluster:
    """A head node plus worker nodes on this machine.

    Attributes:
        root: working directory (logs, env.sh, each node's Ray temp dir ``ray-head``, ``ray-wN``).
        gcs_port: the head's GCS port (``RAY_ADDRESS`` is ``127.0.0.1:PORT``).
        dashboard_port: the dashboard and job API port.
        token: the cluster's authentication token.
        env: the environment the nodes were started with (credentials included).
        head: the head node.
        workers: the worker nodes, in start order.
    """

    root: Path
    gcs_port: int
    dashboard_port: int
    token: str
    env: dict[str, str]
    head: RayNode | None = None
    workers: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The GCS address, for ``ray start --address`` and ``RAY_ADDRESS``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job submission URL."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Variables a client (``ray job submit``, ``ray list``, a driver) needs besides ``os.environ``."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @classmethod
    def start(cls, root: Path, *, workers: int = 1, head_cpus: int = 2, worker_cpus: int = 2,
              env: Mapping[str, str] | None = None, head_gpus: int = 0, worker_gpus: int = 0) -> LocalCluster:
        """Start the head and ``workers`` worker nodes and wait until all have joined.

        Args:
            root: a directory for logs and Ray's session files (keep the path short: Ray's
                sockets live under it and Unix socket paths are limited to 107 bytes).
            workers: worker nodes.
            head_cpus, worker_cpus: logical CPUs of the head and of each worker node.
            env: the nodes' environment (default: this process's).
            head_gpus, worker_gpus: GPUs each declares (``ray start --num-gpus``): Ray schedules them
                whether or not the machine has any, which is how the GPU plan is tested on CPUs.

        Raises:
            ConfigError: ``ray`` is not on PATH or a count is invalid.
            ServiceUnavailableError: a node did not come up (its log's tail is in the message).
        """
        if shutil.which("ray") is None:
            raise ConfigError("local cluster", ["the `ray` command is not on PATH; fix: pip install -e . "
                                                "(ray[default]) in this environment"])
        if workers < 0 or head_cpus < 0 or worker_cpus < 1 or head_gpus < 0 or worker_gpus < 0:
            raise ConfigError("local cluster", [f"need workers >= 0, head_cpus >= 0, worker_cpus >= 1, GPUs >= 0; got "
                                                f"{workers}, {head_cpus}, {worker_cpus}, {head_gpus}, {worker_gpus}"])
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        gcs, dash = free_ports(2)
        base = dict(os.environ if env is None else env)
        token = secrets.token_hex(32)
        # Token mode for the nodes and everything they start; the token never touches ~/.ray.
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
        base.pop("RAY_ADDRESS", None)
        cluster = cls(root, gcs, dash, token, base)
        try:
            cluster._start_head(head_cpus, head_gpus)
            for _ in range(workers):
                cluster.add_worker(worker_cpus, worker_gpus)
        except BaseException:
            cluster.stop()
            raise
        cluster._write_env()
        return cluster

    def _start_head(self, cpus: int, gpus: int = 0, attempts: int = 2) -> None:
        """Start the head; once more on fresh ports if it dies while starting (its GCS can miss
        ``ray start``'s deadline on a loaded machine)."""
        for attempt in range(1, attempts + 1):
            self.head = self._start_node("head", HEAD_RESOURCE, cpus, [
                f"--num-gpus={gpus}", "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_ports(1)[0]}"])
            try:
                self._wait_nodes(1)
                return
            except ServiceUnavailableError:
                self.head.stop()
                if attempt == attempts:
                    raise
                self.gcs_port, self.dashboard_port = free_ports(2)

    def add_worker(self, cpus: int = 2, gpus: int = 0) -> RayNode:
        """Start one more worker node (``gpus`` declared GPUs) and wait until it has joined."""
        index = len(self.workers) + 1
        node = self._start_node(f"worker-{index}", worker_resource(index), cpus,
                                [f"--num-gpus={gpus}", f"--address={self.address}"], temp_dir=f"ray-w{index}")
        self.workers.append(node)
        self._wait_nodes(1 + sum(w.alive() for w in self.workers))
        return node

    def _start_node(self, name: str, resource: str, cpus: int, extra: Sequence[str], temp_dir: str = "ray-head"
                    ) -> RayNode:
        # Each node its own Ray temp dir, as on separate machines: with a shared one, the nodes'
        # runtime-env agents share (and garbage-collect) one copy of a job's working dir.
        log = self.root / f"{name}.log"
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               f"--resources={json.dumps({resource: 1})}", f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--dashboard-agent-listen-port={free_ports(1)[0]}", "--min-worker-port=0", "--max-worker-port=0",
               f"--temp-dir={self.root / temp_dir}", *extra]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        try:
            identity = ProcessIdentity.of(proc.pid, str(self.root))
        except ServiceUnavailableError:
            identity = None  # exited at once: _wait_nodes reports it with the log
        return RayNode(name, resource, cpus, proc.pid, log, identity)

    def nodes(self) -> list[dict]:
        """``ray list nodes`` as dicts (node_id, state, resources_total...), through the dashboard API.

        Raises:
            ServiceUnavailableError: the dashboard does not answer.
        """
        return self.state("nodes")

    def state(self, kind: str, *filters: str, detail: bool = False) -> list[dict]:
        """``ray list KIND`` (``nodes``, ``actors``...) with ``--filter`` expressions, as dicts."""
        cmd = ["ray", "list", kind, "--address", self.dashboard_url, "--format", "json", "--limit", "10000"]
        cmd += [a for f in filters for a in ("--filter", f)] + (["--detail"] if detail else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **self.client_env()})
        if done.returncode != 0:
            raise ServiceUnavailableError(f"`{shlex.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout)

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            dead = [node for node in [self.head, *self.workers] if node is not None and not node.alive()]
            if dead:
                raise ServiceUnavailableError(f"Ray node {dead[0].name} exited while starting; its log ends:\n"
                                              f"{_tail(dead[0].log)}")
            try:
                alive = [x for x in self.nodes() if x.get("state") == "ALIVE"]
                if len(alive) >= n:
                    return
                last = f"{len(alive)} of {n} nodes alive"
            except (ServiceUnavailableError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            time.sleep(1.0)
        logs = "\n".join(f"--- {x.name}\n{_tail(x.log)}" for x in [self.head, *self.workers] if x)
        raise ServiceUnavailableError(f"the local Ray cluster did not reach {n} node(s) in {START_TIMEOUT_S:.0f} s "
                                      f"({last}); logs:\n{logs}")

    def stop(self) -> None:
        """Stop every node by its process group (workers first)."""
        for node in [*reversed(self.workers), self.head]:
            if node is not None:
                node.stop()

    def _write_env(self) -> None:
        path = self.root / "env.sh"
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()]
        path.write_text("# source me: the local Ray cluster's address and token\n" + "\n".join(lines) + "\n")
        path.chmod(0o600)
        state = {"root": str(self.root), "gcs_port": self.gcs_port, "dashboard_port": self.dashboard_port,
                 "nodes": [{"name": x.name, "pid": x.pid, "cpus": x.cpus, "resource": x.resource,
                           "process": x.process.to_dict() if x.process else None}
                          for x in [self.head, *self.workers] if x]}
        (self.root / "cluster.json").write_text(json.dumps(state, indent=2) + "\n")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``tuning.localcluster`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m tuning.localcluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "status", "down"])
    p.add_argument("--dir", type=Path, default=Path(".heimdall/cluster"), help="logs, env.sh, Ray's session files")
    p.add_argument("--workers", type=int, default=1, help="worker nodes [1]")
    p.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head [2]")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of each worker node [2]")
    p.add_argument("--head-gpus", type=int, default=0, help="GPUs the head declares (scheduled even without "
                   "a GPU: for trying the GPU plan) [0]")
    p.add_argument("--gpus", type=int, default=0, help="GPUs each worker node declares [0]")
    return p


def _load(root: Path) -> list[dict]:
    path = root / "cluster.json"
    if not path.is_file():
        raise ConfigError("local cluster", [f"no cluster in {root} ({path} is missing); fix: "
                                            f"python -m tuning.localcluster up --dir {root}"])
    return json.loads(path.read_text())["nodes"]


def _node(entry: dict, root: Path) -> RayNode:
    """A node of ``cluster.json``, with the identity recorded at ``up`` (None when missing)."""
    return RayNode(entry["name"], entry["resource"], entry["cpus"], entry["pid"], root / f"{entry['name']}.log",
                   ProcessIdentity.from_dict(entry.get("process")))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 done, 1 an error (one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    root = args.dir.resolve()
    try:
        if args.command == "up":
            if (root / "cluster.json").is_file() and any(_node(n, root).alive() for n in _load(root)):
                raise ConfigError("local cluster", [f"a cluster already runs from {root}; fix: "
                                                    f"python -m tuning.localcluster down --dir {args.dir}"])
            # A short private path for Ray's sockets; the logs and env.sh stay in --dir.
            cluster = LocalCluster.start(root, workers=args.workers, head_cpus=args.head_cpus, worker_cpus=args.cpus,
                                         head_gpus=args.head_gpus, worker_gpus=args.gpus)
            print(f"cluster:   head + {len(cluster.workers)} worker node(s) at {cluster.address}")
            print(f"dashboard: {cluster.dashboard_url} (token in {root / 'env.sh'})")
            print(f"use it:    source {root / 'env.sh'}")
        elif args.command == "status":
            for n in _load(root):
                print(f"{n['name']:10s} pid {n['pid']:>7d} {n['cpus']} CPU  "
                      f"{'running' if _node(n, root).alive() else 'stopped'}")
        else:
            for n in reversed(_load(root)):
                node = _node(n, root)
                if node.alive():
                    node.stop()
                else:
                    print(f"{node.name}: pid {node.pid} is not the node `up` started; not ours, left alone")
            print(f"stopped the cluster in {root}")
    except (ConfigError, ServiceUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
