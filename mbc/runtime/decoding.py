"""Requests that do not parse (corrupt wire format, a string field holding invalid UTF-8) get
INVALID_ARGUMENT naming the message type, rather than grpc's UNKNOWN "Unexpected DecodeError"."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from mbc.runtime.logs import get_logger

log = get_logger(__name__)


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Takes each unary request's bytes and parses them inside the call, where the status is ours.

    Installed last (innermost) by `GrpcServer`, so the outer interceptors count the rejection."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_unary
        method = handler_call_details.method

        async def decoded(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                request = parse(raw)
            except DecodeError as e:
                log.info("rpc_rejected", code="INVALID_ARGUMENT", reason=f"undecodable request: {e}", method=method)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request of {method} cannot be decoded: {e}")
            return await behavior(request, context)

        return handler._replace(unary_unary=decoded, request_deserializer=None)
