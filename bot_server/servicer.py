"""mbc.v1.Bot over gRPC: translates protobuf to `BotEngine` calls and errors to status codes."""

from __future__ import annotations

from collections.abc import Sequence
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
    """The Bot service of one address, for every bot hosted there: a call names its bot
    (`RespondRequest.bot_id`, `TransferRequest.receiver_bot_id`); an address with a single bot
    also answers a Respond that names none."""

    def __init__(self, engines: BotEngine | Sequence[BotEngine], authorizer: Authorizer | None = None) -> None:
        self.engines = {e.bot.bot_id: e for e in ([engines] if isinstance(engines, BotEngine) else engines)}
        self.authorizer = authorizer or Authorizer(False)

    async def _engine(self, bot_id: str, field: str, context: grpc.aio.ServicerContext) -> BotEngine:
        """The hosted bot `bot_id` ("" names the only one), else INVALID_ARGUMENT or NOT_FOUND."""
        engine = self.engines.get(bot_id)
        if engine is not None:
            return engine
        if not bot_id and len(self.engines) == 1:
            return next(iter(self.engines.values()))
        if not bot_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required: this address hosts {self._hosted()}")
        await abort(
            context, grpc.StatusCode.NOT_FOUND, f"bot {bot_id!r} is not hosted at this address, which hosts {self._hosted()}"
        )
        raise AssertionError("unreachable: abort raises")

    def _hosted(self, shown: int = 20) -> str:
        names = sorted(self.engines)
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        return f"{len(names)} bot{'s' if len(names) != 1 else ''}: {listed}"

    async def Respond(self, request: bot_pb2.RespondRequest, context: grpc.aio.ServicerContext) -> bot_pb2.RespondResponse:
        engine = await self._engine(request.bot_id, "bot_id", context)
        with bind_context(conversation_id=request.conversation_id, bot_id=engine.bot.bot_id):
            message = Message(request.conversation_id, request.consumer_id, request.text, dict(request.channel_metadata))
            budget = remaining_seconds(context, engine.config.call_timeout_seconds)
            async with _status(context):
                result = await engine.respond(message, budget)
            BOT_TURNS.labels("Respond", _outcome(result)).inc()
            return bot_pb2.RespondResponse(**_fields(result), transfer_id=result.transfer_id, options=result.options)

    async def Transfer(self, request: bot_pb2.TransferRequest, context: grpc.aio.ServicerContext) -> bot_pb2.TransferResponse:
        # A single bot checks receiver_bot_id itself (FAILED_PRECONDITION, as before hosts had several).
        engine = (
            next(iter(self.engines.values()))
            if len(self.engines) == 1
            else await self._engine(request.receiver_bot_id, "receiver_bot_id", context)
        )
        with bind_context(
            conversation_id=request.conversation_id,
            bot_id=engine.bot.bot_id,
            transfer_id=request.transfer_id,
            from_bot=request.sender.bot_id,
        ):
            await self.authorizer.bot_of_group(
                context, engine.bot.definition.group, request.sender.bot_id, "call Transfer on this bot"
            )
            budget = remaining_seconds(context, engine.config.call_timeout_seconds)
            async with _status(context):
                result = await engine.accept_transfer(request, budget)
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
