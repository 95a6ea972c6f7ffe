"""mbc.v1.Router over gRPC: translates protobuf to `RouterCore` calls and errors to status codes."""

from __future__ import annotations

import grpc

from mbc.runtime import metrics
from mbc.runtime.logs import bind_context, get_logger
from mbc.runtime.names import validate_name
from mbc.runtime.status import abort
from mbc.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.core import AmbiguousBot, GroupMismatch, NotReady, RouterCore, UnknownBot
from router.directory import BotEntry

log = get_logger(__name__)

MAX_CANDIDATES = 100


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Match(self, request: router_pb2.MatchRequest, context: grpc.aio.ServicerContext) -> router_pb2.MatchResponse:
        with bind_context(asking_bot=request.bot_id, group=request.group):
            text = request.text.strip()
            if not text:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
            limit_chars = self.core.config.max_text_chars
            if len(request.text) > limit_chars:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"text has {len(request.text)} characters; the maximum is {limit_chars}",
                )
            if request.max_candidates > MAX_CANDIDATES:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_candidates is {request.max_candidates}; the maximum is {MAX_CANDIDATES}",
                )
            limit = request.max_candidates or self.core.config.default_candidates
            try:
                result = await self.core.match(
                    text, request.bot_id, request.group, limit, request.min_rating, request.include_asking_bot
                )
            except NotReady as e:
                await abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
            except UnknownBot as e:
                await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
            except (GroupMismatch, AmbiguousBot) as e:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            response = router_pb2.MatchResponse(
                index_revision=result.revision,
                decision=result.decision,
                none_reason=result.none_reason,
                unavailable_bot_id=result.unavailable_bot_id,
            )
            for c in result.candidates:
                response.candidates.add(
                    bot_id=c.match.bot_id,
                    intent=c.match.intent,
                    score=c.match.score,
                    rating=c.match.rating,
                    address=c.address,
                    instance_id=c.instance_id,
                    matched_phrase=c.match.matched_phrase,
                    display_name=c.display_name,
                    confidence=c.match.confidence,
                )
            decision = router_pb2.Decision.Name(result.decision).removeprefix("DECISION_")
            top = result.candidates[0].match if result.candidates else None
            rating = common_pb2.Rating.Name(top.rating).removeprefix("RATING_") if top else "NONE"
            reason = router_pb2.NoneReason.Name(result.none_reason).removeprefix("NONE_REASON_")
            metrics.ROUTER_MATCHES.labels(decision, rating, reason).inc()
            log.info(
                "matched",
                candidates=len(result.candidates),
                decision=decision,
                none_reason=reason,
                unavailable_bot_id=result.unavailable_bot_id,
                top=f"{top.bot_id}/{top.intent}" if top else "",
                rating=rating,
                score=round(top.score, 3) if top else 0.0,
            )
            return response

    async def Locate(self, request: router_pb2.LocateRequest, context: grpc.aio.ServicerContext) -> router_pb2.LocateResponse:
        with bind_context(bot_id=request.bot_id, group=request.group):
            bot = self._locate(request)
            if not isinstance(bot, BotEntry):
                await abort(context, *bot)
                return router_pb2.LocateResponse()  # not reached: abort raises
            instances = [
                common_pb2.BotRef(bot_id=bot.bot_id, instance_id=instance_id, address=address, group=bot.group)
                for instance_id, address in bot.instances_in_turn()
            ]
            log.info("located", instances=len(instances))
            return router_pb2.LocateResponse(instances=instances)

    def _locate(self, request: router_pb2.LocateRequest) -> BotEntry | tuple[grpc.StatusCode, str]:
        """The bot a Locate names, or the status and message that refuse it."""
        if not request.bot_id:
            return grpc.StatusCode.INVALID_ARGUMENT, "bot_id is required"
        try:
            validate_name("bot_id", request.bot_id)
            if request.group:
                validate_name("group", request.group)
        except ValueError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        directory = self.core.directory
        if directory is None:
            return grpc.StatusCode.UNAVAILABLE, "the router has not read the participants yet"
        try:
            bot = directory.locate(request.bot_id, request.group)
        except LookupError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        if bot is None:
            where = f" in group {request.group!r}" if request.group else ""
            return grpc.StatusCode.NOT_FOUND, f"no bot {request.bot_id!r} is known{where}"
        return bot
