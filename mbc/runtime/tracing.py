"""One trace id per consumer message, across every hop of the mesh.

The id travels in gRPC metadata: `x-mbc-trace-id` (32 lowercase hex characters), and a W3C
`traceparent` carrying the same trace id, so that tools speaking W3C trace context join the same
trace. A server takes the id of an incoming call (`x-mbc-trace-id`, else the trace id of a
`traceparent`, else it generates one: the first hop), keeps it in a contextvar for the duration of
the call and adds it to every log line (`trace_id`). Outgoing calls made through
`mbc.runtime.channels.ChannelPool` (bot → router, bot → bot, bot → store) carry it on.

OpenTelemetry is optional (the `otel` extra): with `ServerConfig.otel` on, `enable_otel()` sets up
a tracer provider and the official gRPC instrumentation of grpc.aio servers and channels; the mesh
trace id is then the OpenTelemetry trace id of the first hop, so log lines and spans line up.
"""

from __future__ import annotations

import contextvars
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

TRACE_HEADER = "x-mbc-trace-id"
TRACEPARENT = "traceparent"

_trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("mbc_trace_id", default="")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_otel_enabled = False


def new_trace_id() -> str:
    return secrets.token_hex(16)


def current_trace_id() -> str:
    """The trace id of the call being handled in this task; empty outside of one."""
    return _trace_id.get()


def set_trace_id(trace_id: str) -> contextvars.Token:
    return _trace_id.set(trace_id)


def reset_trace_id(token: contextvars.Token) -> None:
    _trace_id.reset(token)


def trace_id_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """`x-mbc-trace-id` if valid, else the trace id of a valid `traceparent`, else empty."""
    ours = parent = ""
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        key = key.lower()
        value = value.strip().lower()
        if key == TRACE_HEADER and _TRACE_ID.fullmatch(value) and value != "0" * 32:
            ours = value
        elif key == TRACEPARENT:
            m = _TRACEPARENT.fullmatch(value)
            if m and m.group(1) != "0" * 32:
                parent = m.group(1)
    return ours or parent


def incoming_trace_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The trace id for a call being received: propagated, else the active OpenTelemetry span's, else new."""
    return trace_id_from_metadata(metadata) or _otel_trace_id() or new_trace_id()


def outgoing_metadata(metadata: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]] | None:
    """`metadata` plus the current trace id (unless there is none or the caller set one)."""
    trace_id = current_trace_id()
    items = list(metadata or ())
    if not trace_id or any(k.lower() == TRACE_HEADER for k, _ in items):
        return metadata if metadata is None else items
    items.append((TRACE_HEADER, trace_id))
    if not _otel_enabled and not any(k.lower() == TRACEPARENT for k, _ in items):
        # OpenTelemetry's own client instrumentation writes traceparent when it is on.
        items.append((TRACEPARENT, f"00-{trace_id}-{secrets.token_hex(8)}-01"))
    return items


def _with_metadata(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, outgoing_metadata(details.metadata), details.credentials, details.wait_for_ready
    )


class TraceClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the current trace id to the metadata of every outgoing call of a channel."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return [TraceClientInterceptor()]


# -- OpenTelemetry (optional) ---------------------------------------------------------------


class OtelUnavailable(RuntimeError):
    pass


def otel_enabled() -> bool:
    return _otel_enabled


def enable_otel(service_name: str, exporter: str = "otlp") -> None:
    """Turn on the OpenTelemetry gRPC instrumentation (servers and channels created from now on).

    `exporter`: "otlp" (OTLP/gRPC, endpoint from OTEL_EXPORTER_OTLP_ENDPOINT, default
    localhost:4317), "console" (spans printed to stderr) or "none" (spans made, not exported: the
    trace ids still come from OpenTelemetry). Idempotent.
    """
    global _otel_enabled
    if _otel_enabled:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as e:
        raise OtelUnavailable(f"OpenTelemetry is not installed ({e.name}); install the extra: pip install 'mbc[otel]'") from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name or os.environ.get("OTEL_SERVICE_NAME", "mbc")})
    )
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise OtelUnavailable("the OTLP exporter is not installed; pip install 'mbc[otel]'") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter != "none":
        raise ValueError(f"unknown OpenTelemetry exporter {exporter!r}: otlp, console or none")
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorClient().instrument()
    _otel_enabled = True


def otel_server_interceptors() -> list:
    """The OpenTelemetry grpc.aio server interceptor when enabled (it goes first: outermost)."""
    if not _otel_enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def _otel_trace_id() -> str:
    if not _otel_enabled:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
