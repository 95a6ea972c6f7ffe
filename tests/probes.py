"""What the load, fuzz and shutdown tests ask of a running component process: its health, how
many RPCs it started (from its /metrics), its resident memory."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbc.runtime.metrics import sample_value, scrape_text
from mbc.testing.processes import ComponentProcess


async def health(address: str, service: str = "") -> str:
    """SERVING / NOT_SERVING / ..., or the status code of a Check the server did not answer."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as e:
        return e.code().name


async def rpcs_started(component: ComponentProcess, method: str) -> float:
    """How many calls of `method` the component has begun to handle (grpc_server_started_total)."""
    text = await asyncio.to_thread(scrape_text, component.metrics_address)
    return sample_value(text, "grpc_server_started_total", {"grpc_method": method})


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, KiB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
