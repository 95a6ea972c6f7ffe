"""The bot tango, as run by one bot instance.

Workflow 1: the bot's own intent rated GOOD or better answers. Otherwise the router is asked for
participating bots rated GOOD or better, and the conversation is handed to the first that takes it.
Workflow 2: nobody qualifies (or every transfer failed): the bot's own fallback answers.

A bot judges its own intents locally (it holds its own small catalog), so it keeps answering its
intents when the router is down, and only messages outside its scope cost a router call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping

import grpc

from bot_server.bot import Bot, Turn
from bot_server.ledger import ConversationLedger, TransferLedger
from mbc.channels import ChannelPool
from mbc.config import BotConfig
from mbc.encoder import Encoder
from mbc.logs import get_logger
from mbc.matching import IntentCatalog, IntentPhrases, ScoredIntent
from mbc.v1 import bot_pb2, common_pb2, router_pb2

log = get_logger(__name__)

GOOD = common_pb2.RATING_GOOD
# Time kept back from each transfer attempt so that a fallback can still be sent in time.
FALLBACK_RESERVE_SECONDS = 0.25


class InvalidInput(ValueError):
    """The request is malformed (INVALID_ARGUMENT)."""


class Refused(Exception):
    """The request is well-formed but cannot be applied here (FAILED_PRECONDITION)."""


@dataclass
class TurnResult:
    replies: list[common_pb2.Reply]
    owner: common_pb2.BotRef
    outcome: int
    match: bot_pb2.MatchInfo
    transfer_id: str = ""


@dataclass
class Message:
    conversation_id: str
    consumer_id: str
    text: str
    channel_metadata: Mapping[str, str] = field(default_factory=dict)


class BotEngine:
    def __init__(self, bot: Bot, config: BotConfig, encoder: Encoder, identity: common_pb2.BotRef, channels: ChannelPool) -> None:
        self.bot = bot
        self.definition = bot.definition
        self.config = config
        self.encoder = encoder
        self.identity = identity
        self.channels = channels
        self.conversations = ConversationLedger()
        self.transfers: TransferLedger[TurnResult] = TransferLedger()
        self._catalog: IntentCatalog | None = None

    async def prepare(self) -> None:
        """Embed the bot's own training phrases."""
        intents = [IntentPhrases(self.bot.bot_id, i.name, i.phrases) for i in self.definition.intents]
        vectors = await self.encoder.aencode_phrases(IntentCatalog.phrases_of(intents))
        self._catalog = IntentCatalog(intents, vectors, self.encoder.dim)

    def _check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidInput("text is empty")
        if len(text) > self.config.max_text_chars:
            raise InvalidInput(f"text has {len(text)} characters; the maximum is {self.config.max_text_chars}")

    async def _match_own(self, text: str) -> ScoredIntent | None:
        query = (await self.encoder.aencode([text]))[0]
        ranked = self._catalog.rank(query, self.config.ratings, self.config.neighbours, limit=1)
        return ranked[0] if ranked else None

    def _reply(self, text: str) -> common_pb2.Reply:
        return common_pb2.Reply(bot_id=self.bot.bot_id, text=text)

    def _match_info(self, match: ScoredIntent | None, intent: str = "") -> bot_pb2.MatchInfo:
        if match is None:
            return bot_pb2.MatchInfo(bot_id=self.bot.bot_id, intent=intent)
        return bot_pb2.MatchInfo(bot_id=match.bot_id, intent=intent, score=match.score, rating=match.rating)

    async def _answer(self, message: Message, match: ScoredIntent | None, intent: str, transferred_from: str = "") -> TurnResult:
        """Run the dialog of `intent`, or the fallback when `intent` is empty."""
        self.conversations.taken(message.conversation_id)
        if not intent:
            return TurnResult([self._reply(self.definition.fallback)], self.identity, bot_pb2.OUTCOME_FALLBACK, self._match_info(match))
        turn = Turn(
            conversation_id=message.conversation_id,
            consumer_id=message.consumer_id,
            text=message.text,
            intent=intent,
            score=match.score if match else 0.0,
            channel_metadata=dict(message.channel_metadata),
            transferred_from=transferred_from,
        )
        try:
            texts = await self.bot.run_dialog(turn)
        except Exception:
            log.exception("dialog_failed", intent=intent)
            return TurnResult([self._reply(self.definition.fallback)], self.identity, bot_pb2.OUTCOME_FALLBACK, self._match_info(match, intent))
        log.info("answered", intent=intent, score=turn.score, transferred_from=transferred_from)
        return TurnResult([self._reply(t) for t in texts], self.identity, bot_pb2.OUTCOME_ANSWERED, self._match_info(match, intent))

    async def respond(self, message: Message, budget_seconds: float) -> TurnResult:
        """Answer a consumer message: own dialog, transfer, or fallback."""
        deadline = time.monotonic() + budget_seconds
        if not message.conversation_id.strip():
            raise InvalidInput("conversation_id is required")
        self._check_text(message.text)
        owner = self.conversations.owner_elsewhere(message.conversation_id)
        if owner is not None:
            raise Refused(
                f"conversation {message.conversation_id!r} was handed over to bot {owner.bot_id!r} at {owner.address}; "
                "send its messages there"
            )
        own = await self._match_own(message.text)
        if own is not None and own.rating >= GOOD:
            return await self._answer(message, own, own.intent)
        if self.definition.collaboration and self.config.router_address:
            for candidate in await self._candidates(message.text, deadline):
                result = await self._try_transfer(message, candidate, deadline)
                if result is not None:
                    return result
        log.info("fallback", best_own_score=own.score if own else None)
        return await self._answer(message, own, "")

    async def _candidates(self, text: str, deadline: float) -> list[router_pb2.Candidate]:
        request = router_pb2.MatchRequest(
            text=text,
            bot_id=self.bot.bot_id,
            group=self.definition.group,
            max_candidates=self.config.max_candidates,
            min_rating=GOOD,
        )
        timeout = max(0.05, deadline - time.monotonic() - FALLBACK_RESERVE_SECONDS)
        try:
            response = await self.channels.router(self.config.router_address).Match(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            log.warning("router_unavailable", code=e.code().name, detail=e.details())
            return []
        return [c for c in response.candidates if c.bot_id != self.bot.bot_id]

    async def _try_transfer(self, message: Message, candidate: router_pb2.Candidate, deadline: float) -> TurnResult | None:
        transfer_id = uuid.uuid4().hex
        request = bot_pb2.TransferRequest(
            transfer_id=transfer_id,
            conversation_id=message.conversation_id,
            consumer_id=message.consumer_id,
            text=message.text,
            intent=candidate.intent,
            sender=self.identity,
            receiver_bot_id=candidate.bot_id,
            channel_metadata=message.channel_metadata,
            visited_bot_ids=[self.bot.bot_id],
            hop_count=0,
        )
        timeout = deadline - time.monotonic() - FALLBACK_RESERVE_SECONDS
        if timeout <= 0:
            return None
        log.info("transfer_sent", to_bot=candidate.bot_id, intent=candidate.intent, score=candidate.score, transfer_id=transfer_id)
        try:
            response = await self.channels.bot(candidate.address).Transfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            log.warning("transfer_failed", to_bot=candidate.bot_id, code=e.code().name, detail=e.details(), transfer_id=transfer_id)
            return None
        self.conversations.handed_over(message.conversation_id, response.owner)
        replies = []
        if self.definition.transfer_message:
            replies.append(self._reply(self.definition.transfer_message.replace("{to_bot}", candidate.display_name or candidate.bot_id)))
        replies.extend(response.replies)
        match = bot_pb2.MatchInfo(bot_id=candidate.bot_id, intent=candidate.intent, score=candidate.score, rating=candidate.rating)
        return TurnResult(replies, response.owner, bot_pb2.OUTCOME_TRANSFERRED, match, transfer_id)

    async def accept_transfer(self, request: bot_pb2.TransferRequest) -> TurnResult:
        """Take a conversation handed over by another bot of the group."""
        for name in ("transfer_id", "conversation_id"):
            if not getattr(request, name).strip():
                raise InvalidInput(f"{name} is required")
        if not request.sender.bot_id:
            raise InvalidInput("sender.bot_id is required")
        self._check_text(request.text)
        if request.receiver_bot_id != self.bot.bot_id:
            raise Refused(f"this is bot {self.bot.bot_id!r}, not {request.receiver_bot_id!r}")
        if not self.definition.collaboration:
            raise Refused(f"bot {self.bot.bot_id!r} does not take part in collaboration")
        return await self.transfers.run_once(request.transfer_id, lambda: self._take(request))

    async def _take(self, request: bot_pb2.TransferRequest) -> TurnResult:
        message = Message(request.conversation_id, request.consumer_id, request.text, dict(request.channel_metadata))
        known = {i.name for i in self.definition.intents}
        sender = request.sender.bot_id
        if request.intent in known:
            match = ScoredIntent(self.bot.bot_id, request.intent, 0.0, GOOD, "")
            return await self._answer(message, match, request.intent, transferred_from=sender)
        if request.intent:
            log.warning("transfer_intent_unknown", intent=request.intent, from_bot=sender)
        own = await self._match_own(request.text)
        intent = own.intent if own is not None and own.rating >= GOOD else ""
        return await self._answer(message, own, intent, transferred_from=sender)

