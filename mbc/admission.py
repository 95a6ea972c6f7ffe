"""Admission control: at most `limit` mesh RPCs in flight, the excess refused at once with
RESOURCE_EXHAUSTED and a message that says so.

grpc's own `maximum_concurrent_rpcs` counts every call, health checks included, so a flooded
server would fail its liveness probe and be restarted by its supervisor just when it is busiest;
its message ("Concurrent RPC limit exceeded!") names no limit either. Here health and reflection
are never refused, and grpc's limit stays only as a backstop above ours (`backstop_limit`).
"""

from __future__ import annotations

import grpc

from mbc.logs import get_logger

log = get_logger(__name__)

ALWAYS_ADMITTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method prefixes never refused: probes and tooling must see a busy server as alive."""

BACKSTOP_HEADROOM = 64
"""Calls grpc admits beyond our limit (probes, and the instant between its count and ours)."""


def backstop_limit(limit: int) -> int:
    """grpc's own `maximum_concurrent_rpcs` for a server whose mesh RPCs are limited to `limit`."""
    return limit + BACKSTOP_HEADROOM


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a unary mesh RPC when `limit` are already in flight in this server."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(ALWAYS_ADMITTED):
            return handler
        behavior = handler.unary_unary

        async def admitted(request, context: grpc.aio.ServicerContext):
            if self.in_flight >= self.limit:
                message = (f"server busy: {self.in_flight} calls in flight, limit {self.limit} "
                           "(server.max_concurrent_rpcs); retry with backoff")
                log.debug("rpc_rejected", code="RESOURCE_EXHAUSTED", reason=message, method=method)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            self.in_flight += 1
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return handler._replace(unary_unary=admitted)
