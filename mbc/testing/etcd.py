"""Real etcd processes on 127.0.0.1, for tests and `mbc demo`: one node (`LocalEtcd`, optionally
serving TLS with client certificates) or a cluster of members (`LocalEtcdCluster`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mbc.runtime.logs import get_logger

log = get_logger(__name__)

# The health check goes straight to 127.0.0.1 whatever the proxy environment variables say.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_FALLBACK_PATHS = ("/usr/bin/etcd", "/usr/sbin/etcd")
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


class EtcdNotFound(RuntimeError):
    pass


def find_etcd() -> str:
    """Path of the etcd binary: on PATH, else /usr/bin/etcd or /usr/sbin/etcd."""
    found = shutil.which("etcd")
    if found:
        return found
    for path in _FALLBACK_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise EtcdNotFound("etcd was not found on PATH nor in /usr/bin or /usr/sbin: install it with `apt-get install etcd-server`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class ServerTls:
    """PEM files for etcd's client port: its certificate and key, and the CA its clients' certificates
    must be signed by (with `client_cert_auth`, a client without such a certificate is refused)."""

    cert: Path
    key: Path
    ca: Path
    client_cert_auth: bool = True


@dataclass(frozen=True)
class EtcdServerLimits:
    """History and size limits of every etcd the project starts (tests, demo, benchmarks). Without
    them nothing compacts: the store's writes grow the database until etcd's NOSPACE alarm stops the
    whole mesh. Production values and why: docs/operators.md, "etcd in production"."""

    compaction_mode: str = "periodic"
    """--auto-compaction-mode: "periodic" (keep a window of time) or "revision" (keep N revisions)."""
    compaction_retention: str = "5m"
    """--auto-compaction-retention: a duration ("5m", "1h") in periodic mode, a count in revision mode."""
    quota_backend_bytes: int = 1024**3
    """--quota-backend-bytes: past it etcd raises the NOSPACE alarm and refuses writes."""
    max_request_bytes: int = 2 * 1024**2
    """--max-request-bytes: the largest request (a bot definition is at most 1 MiB)."""

    def flags(self) -> list[str]:
        return [
            "--auto-compaction-mode",
            self.compaction_mode,
            "--auto-compaction-retention",
            self.compaction_retention,
            "--quota-backend-bytes",
            str(self.quota_backend_bytes),
            "--max-request-bytes",
            str(self.max_request_bytes),
        ]


class LocalEtcd:
    """Runs etcd bound to 127.0.0.1 only, on free ports unless given, with its data in `data_dir`
    (a temporary directory, removed on exit of the context manager, when none is given).

    The data lives in data_dir/data and etcd's output goes to data_dir/etcd.log. With `tls` the
    client port serves TLS only; the health check and /metrics use a plaintext metrics port. As a
    member of a cluster it takes its `name` and the `initial_cluster` (name=peer URL, ...).
    `auth_token_ttl` (seconds) is etcd's --auth-token-ttl for simple auth tokens (default 300).
    `limits` sets auto-compaction and the size limits.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        client_port: int = 0,
        peer_port: int = 0,
        binary: str | None = None,
        start_timeout: float = 15.0,
        *,
        tls: ServerTls | None = None,
        name: str = "mbc-local",
        initial_cluster: str = "",
        auth_token_ttl: int = 0,
        metrics_port: int = 0,
        limits: EtcdServerLimits = EtcdServerLimits(),
    ) -> None:
        self._binary = binary or find_etcd()
        if not os.access(self._binary, os.X_OK):
            raise EtcdNotFound(f"etcd binary {self._binary} is not executable: install etcd with `apt-get install etcd-server`")
        self._owns_dir = data_dir is None
        self._dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="mbc-etcd-"))
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.metrics_port = metrics_port or free_port()
        while self.metrics_port in (self.client_port, self.peer_port):
            self.metrics_port = free_port()
        self._start_timeout = start_timeout
        self._tls = tls
        self.name = name
        self._initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self._auth_token_ttl = auth_token_ttl
        self.limits = limits
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port of the client port (TLS when started with `tls`)."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        command = [
            self._binary,
            "--name",
            self.name,
            "--data-dir",
            str(self._dir / "data"),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self._initial_cluster,
            "--listen-metrics-urls",
            f"http://127.0.0.1:{self.metrics_port}",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            *self.limits.flags(),
        ]
        if self._tls:
            command += [
                "--cert-file",
                str(self._tls.cert),
                "--key-file",
                str(self._tls.key),
                "--trusted-ca-file",
                str(self._tls.ca),
            ]
            if self._tls.client_cert_auth:
                command.append("--client-cert-auth")
        if self._auth_token_ttl:
            command += ["--auth-token-ttl", str(self._auth_token_ttl)]
        return command

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        arch = _GOARCH.get(platform.machine().lower())
        if arch not in (None, "amd64") and "ETCD_UNSUPPORTED_ARCH" not in env:
            env["ETCD_UNSUPPORTED_ARCH"] = arch
        return env

    def start(self) -> None:
        """Start etcd and wait (bounded) until it reports healthy."""
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        """Start the process without waiting (the members of a new cluster must start together)."""
        if self.running:
            return
        for port in (self.client_port, self.peer_port, self.metrics_port):
            # Otherwise another etcd on the port could answer the health check for this one.
            if not _port_free(port):
                raise RuntimeError(f"cannot start etcd: port {port} on 127.0.0.1 is already in use")
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / "data").mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as out:
            # A session of its own, so that Ctrl-C on a terminal leaves shutting etcd down to us.
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )

    def wait_healthy(self) -> None:
        """Wait (bounded by `start_timeout`) until the launched etcd reports healthy."""
        if self._proc is None:
            raise RuntimeError("etcd was not launched")
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"etcd exited with code {code} while starting; its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            if self._healthy():
                log.info("local_etcd_started", endpoint=self.endpoint, pid=self._proc.pid, data_dir=str(self._dir))
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"etcd did not become healthy on {self.endpoint} within "
                    f"{self._start_timeout:g}s; its log ({self.log_path}) ends with:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _metrics_get(self, path: str) -> bytes:
        with _NO_PROXY.open(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=0.5) as response:
            return response.read()

    def _healthy(self) -> bool:
        try:
            return json.loads(self._metrics_get("/health")).get("health") == "true"
        except (OSError, ValueError):
            return False

    def metric(self, name: str, label: str = "") -> float:
        """The sum of the samples of metric `name` on etcd's /metrics whose labels hold `label`
        (for example 'grpc_method="LeaseKeepAlive"')."""
        total = 0.0
        for line in self._metrics_get("/metrics").decode().splitlines():
            sample, _, value = line.rpartition(" ")
            if (sample == name or sample.startswith(name + "{")) and label in sample:
                total += float(value)
        return total

    def is_leader(self) -> bool:
        """Whether this member is the raft leader now (from its etcd_server_is_leader metric)."""
        try:
            return b"\netcd_server_is_leader 1" in self._metrics_get("/metrics")
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
        except OSError as e:
            return f"(cannot read it: {e})"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited within `timeout` seconds. Keeps the data."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("local_etcd_stopped", endpoint=self.endpoint)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open but nothing answers."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start again, on the same ports with the same data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop etcd and remove the data directory if it was created here."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


class LocalEtcdCluster:
    """`size` etcd members on 127.0.0.1 forming one cluster, each with its data in a subdirectory
    of `data_dir` (temporary when none is given). Members can be stopped and started one by one."""

    def __init__(
        self,
        size: int = 3,
        data_dir: Path | None = None,
        start_timeout: float = 30.0,
        limits: EtcdServerLimits = EtcdServerLimits(),
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one member, got {size}")
        self._owns_dir = data_dir is None
        self._dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="mbc-etcd-cluster-"))
        ports: list[int] = []
        while len(ports) < 3 * size:  # free_port() may give a port twice: keep them distinct
            port = free_port()
            if port not in ports:
                ports.append(port)
        names = [f"member{i}" for i in range(size)]
        initial = ",".join(f"{name}=http://127.0.0.1:{ports[3 * i + 1]}" for i, name in enumerate(names))
        self.members = [
            LocalEtcd(
                self._dir / name,
                client_port=ports[3 * i],
                peer_port=ports[3 * i + 1],
                metrics_port=ports[3 * i + 2],
                start_timeout=start_timeout,
                name=name,
                initial_cluster=initial,
                limits=limits,
            )
            for i, name in enumerate(names)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        """Start every member (together: none is healthy before a quorum is up) and wait for all."""
        for member in self.members:
            member.launch()
        for member in self.members:
            member.wait_healthy()
        log.info("local_etcd_cluster_started", endpoints=self.endpoints)

    def leader(self, timeout: float = 15.0) -> LocalEtcd:
        """The running member that is the leader now; waits (bounded) through an election."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = [m for m in self.members if m.running and m.is_leader()]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no single leader among the running members within {timeout:g}s")
            time.sleep(0.1)

    def followers(self) -> list[LocalEtcd]:
        leader = self.leader()
        return [m for m in self.members if m.running and m is not leader]

    def cleanup(self) -> None:
        for member in self.members:
            member.stop()
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcdCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()
