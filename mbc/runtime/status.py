"""Refusing a call: the one place a servicer or an interceptor aborts an RPC, so every refusal is logged."""

from __future__ import annotations

import grpc

from mbc.runtime.logs import get_logger

log = get_logger(__name__)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    log.info("rpc_rejected", code=code.name, reason=message)
    await context.abort(code, message)
