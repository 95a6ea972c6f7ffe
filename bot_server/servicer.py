"""mbc.v1.Bot over gRPC: translates protobuf to `BotEngine` calls and errors to status codes."""

from __future__ import annotations

from contextlib import asynccontextmanager

import grpc

from bot_server.engine import BotEngine, Conflict, InvalidInput, Message, Refused, TurnResult
from mbc.runtime.logs import bind_context
from mbc.runtime.metrics import BOT_TURNS
from mbc.runtime.security import Authorizer
from mbc.runtime.serving import remaining_seconds
from mbc.runtime.status import abort
from mbc.v1 import bot_pb2, bot_pb2_grpc


class BotServicer(bot_pb2_grpc.BotServicer):
    def __init__(self, engine: BotEngine, authorizer: Authorizer | None = None) -> None:
        self.engine = engine
        self.authorizer = authorizer or Authorizer(False)

    async def Respond(self, request: bot_pb2.RespondRequest, context: grpc.aio.ServicerContext) -> bot_pb2.RespondResponse:
        with bind_context(conversation_id=request.conversation_id, bot_id=self.engine.bot.bot_id):
            message = Message(request.conversation_id, request.consumer_id, request.text, dict(request.channel_metadata))
            budget = remaining_seconds(context, self.engine.config.call_timeout_seconds)
            async with _status(context):
                result = await self.engine.respond(message, budget)
            BOT_TURNS.labels("Respond", _outcome(result)).inc()
            return bot_pb2.RespondResponse(**_fields(result), transfer_id=result.transfer_id, options=result.options)

    async def Transfer(self, request: bot_pb2.TransferRequest, context: grpc.aio.ServicerContext) -> bot_pb2.TransferResponse:
        with bind_context(
            conversation_id=request.conversation_id,
            bot_id=self.engine.bot.bot_id,
            transfer_id=request.transfer_id,
            from_bot=request.sender.bot_id,
        ):
            await self.authorizer.bot_of_group(
                context, self.engine.bot.definition.group, request.sender.bot_id, "call Transfer on this bot"
            )
            budget = remaining_seconds(context, self.engine.config.call_timeout_seconds)
            async with _status(context):
                result = await self.engine.accept_transfer(request, budget)
            BOT_TURNS.labels("Transfer", _outcome(result)).inc()
            return bot_pb2.TransferResponse(**_fields(result))


@asynccontextmanager
async def _status(context: grpc.aio.ServicerContext):
    """Map the engine's refusals, and a store that cannot be reached, to status codes."""
    try:
        yield
    except InvalidInput as e:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Refused as e:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Conflict as e:
        await abort(context, grpc.StatusCode.ABORTED, str(e))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            # The store checks the ids this request carries (e.g. conversation_id's length).
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"the Context Session Store refused this request: {e.details()}"
            )
        transient = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        code = grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.INTERNAL
        await abort(context, code, f"the Context Session Store failed: {e.code().name}: {e.details()}")


def _outcome(result: TurnResult) -> str:
    return bot_pb2.Outcome.Name(result.outcome).removeprefix("OUTCOME_")


def _fields(result: TurnResult) -> dict:
    return {"replies": result.replies, "owner": result.owner, "outcome": result.outcome, "match": result.match}
