"""Run mesh components (`mbc router`, `mbc bot`) as child processes: used by the demo and tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbc.runtime.channels import open_channel
from mbc.runtime.config import TlsConfig


class ComponentProcess:
    """One `python -m mbc ...` child (or another `module` taking the same --port and --port-file)
    that binds `port` (0: a free one) and reports it through a file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        port: int = 0,
        module: str = "mbc",
    ) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.port_file = self.workdir / f"{name}.port"
        self.log_path = self.workdir / f"{name}.log"
        self.metrics_port_file = self.workdir / f"{name}.metrics-port"
        self.port_file.unlink(missing_ok=True)
        self.metrics_port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it until terminate() closes it
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port", str(port), "--port-file", str(self.port_file)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        """host:port of the component's Prometheus /metrics endpoint (written before its port file)."""
        return f"127.0.0.1:{int(self.metrics_port_file.read_text())}"

    def wait_port(self, timeout: float = 240.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                self.port = int(self.port_file.read_text())
                return self.port
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not bind a port within {timeout:.0f}s:\n{self.log_tail()}")

    async def wait_serving(self, service: str = "", timeout: float = 240.0, tls: TlsConfig = TlsConfig()) -> None:
        """Wait for the port, then for grpc.health.v1 to report SERVING (asked over mTLS with `tls`)."""
        deadline = time.monotonic() + timeout
        await asyncio.to_thread(self.wait_port, timeout)
        async with open_channel(self.address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not SERVING within {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a graceful exit, SIGKILL if it does not come; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait()
        self._log.close()


def new_workdir(prefix: str = "mbc-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
