"""The bot tango, as run by one bot instance.

Each message is judged by the router against the whole group, this bot included
(`include_asking_bot`), so one calibrated decision says who should answer:
- Workflow 1: the best intent qualifies (rated GOOD or better). It is this bot's → its dialog
  answers; another bot's → the conversation is handed over with the message and the intent.
- Two or three bots qualify about equally: the bot asks the consumer which one they meant.
- Workflow 2: nobody qualifies, or every transfer failed → the bot's own fallback.
When the router cannot be reached (or the bot has none), the bot matches the message against its
own intents (`OwnIntents`: by words by default, bot_server/lexical.py; or with the in-bot model).

Transfers lose nothing: the conversation's owner is a versioned record (in the Context Session
Store when configured). The receiver takes the conversation only if the record is still at the
version the sender read; a sender whose transfer failed claims the conversation back, which
fences out a receiver that answers too late. Every write into the conversation (variables, the
question awaited) is fenced on the owner version this bot holds, so a bot that lost the
conversation meanwhile (frozen past its lease, cut off) is refused, not applied. A conversation
whose owner instance is gone is taken over by the bot the message reaches, at once: the owner is
no longer registered (its lease ran out), or does not answer a health check within
`owner_check_timeout_seconds` (killed, frozen, cut off: no waiting out its lease), or the router
has just said its bot has no live instance; an owner that answers SERVING, however busy, keeps it.
A record naming another instance of this bot (restarted, or a sibling) is claimed for this one,
so the store always gives a live address. When the router says the best match belongs to a bot
with no live instance, the bot answers with its group's unavailable message. A retried transfer
id is applied once. Every
outgoing call gets the caller's remaining time. A message never visits a bot twice and goes
through at most `max_hops` transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bot_server.bot import Bot, Turn, dialog_texts, mentions_variables, render
from bot_server.definition import DialogDefinition
from bot_server.ledger import TransferLedger
from bot_server.state import Awaiting, ConversationState, Fenced, OwnershipConflict
from discovery.errors import EtcdError
from discovery.groups import GroupSettingsCache, unavailable_message
from mbc.runtime.channels import ChannelPool
from mbc.runtime.config import BotConfig
from mbc.runtime.logs import get_logger
from mbc.runtime.metrics import BOT_TRANSFERS
from mbc.v1 import bot_pb2, common_pb2, router_pb2

log = get_logger(__name__)

GOOD = common_pb2.RATING_GOOD
FAIR_PLUS = common_pb2.RATING_FAIR_PLUS
# Time kept back from each outgoing call so that a fallback can still be sent in time.
FALLBACK_RESERVE_SECONDS = 0.25
INSTANCE_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
"""How a Transfer fails when its instance is going: UNAVAILABLE (stopped, killed, unreachable) or
CANCELLED (a server that is stopping cancels the calls that reach it; seen in a test run: the
message fell back although the bot's other instance was live)."""
MAX_INSTANCE_RETRIES = 2
"""Other instances of the same bot tried after one that cannot be reached (see `_hand_over`)."""
INSTANCE_ASK_DELAYS = (0.0, 0.0, 0.025, 0.1)
"""Pauses (seconds) before each ask for another instance (`_other_instance`). The router names a
bot's instances in turn, and a concurrent Match may take the turn; an instance that has just left
stays in the router's view until its etcd watch catches up: milliseconds, more on a busy router."""
NONE_OF_THESE = "None of these"
RETURN_PREFIX = "return:"
"""The owner record's transfer_id when a conversation went back to its sender after transfer <id>."""
APPLIED_POLL_SECONDS = 0.05
"""How often a retried transfer that another instance is applying reads the owner record again."""
ROUTER_UNAVAILABLE_MEMORY_SECONDS = 3.0
"""How long the router's word that a bot has no live instance (NONE_REASON_BOT_UNAVAILABLE) is
enough to take a conversation over from that bot without a health check of its instance."""


class OwnIntents(Protocol):
    """How a bot matches a message against its own intents when no router answers: by words
    (bot_server/lexical.py, the default) or with the encoder model (bot_server/local_model.py)."""

    async def prepare(self) -> None: ...

    async def best(self, text: str) -> tuple[str, float, int]:
        """(intent, score, rating) of the best intent; intent "" when none is good enough to answer."""
        ...

    def close(self) -> None: ...


class InvalidInput(ValueError):
    """The request is malformed (INVALID_ARGUMENT)."""


class Refused(Exception):
    """The request is well-formed but cannot be applied here (FAILED_PRECONDITION)."""


class Conflict(Exception):
    """The conversation changed owner concurrently (ABORTED)."""


@dataclass
class TurnResult:
    replies: list[common_pb2.Reply]
    owner: common_pb2.BotRef
    outcome: int
    match: bot_pb2.MatchInfo
    transfer_id: str = ""
    options: list[bot_pb2.ClarifyOption] = field(default_factory=list)
    asked: bool = False
    """The dialog is waiting for the consumer's answer to a question."""

    def transfer_response(self) -> bot_pb2.TransferResponse:
        outcome = cast(bot_pb2.Outcome, self.outcome)  # a wire value, typed as the enum by the stubs
        return bot_pb2.TransferResponse(replies=self.replies, owner=self.owner, outcome=outcome, match=self.match)

    @classmethod
    def of_transfer(cls, response: bot_pb2.TransferResponse) -> TurnResult:
        """A transfer's result as recorded in the owner record (see `_applied_elsewhere`)."""
        return cls(list(response.replies), response.owner, response.outcome, response.match)


@dataclass
class Message:
    conversation_id: str
    consumer_id: str
    text: str
    channel_metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Route:
    """Where a message is going: its deadline, the bots it visited, the owner record version."""

    deadline: float
    owner_version: int
    visited: tuple[str, ...]
    hops: int
    stateless: bool = False
    """The store cannot be reached: no variables are read, nothing is recorded."""
    unavailable_bot_id: str = ""
    """Set by the last Match when its best match is a bot with no live instance."""

    def remaining(self, reserve: float = FALLBACK_RESERVE_SECONDS) -> float:
        return self.deadline - time.monotonic() - reserve


class BotEngine:
    def __init__(
        self,
        bot: Bot,
        config: BotConfig,
        own: OwnIntents,
        identity: common_pb2.BotRef,
        channels: ChannelPool,
        state: ConversationState,
        group_settings: GroupSettingsCache | None = None,
        is_registered: Callable[[common_pb2.BotRef], Awaitable[bool]] | None = None,
    ) -> None:
        self.bot = bot
        self.definition = bot.definition
        self.config = config
        self.own = own
        self.identity = identity
        # The owner record names the bot (group and bot_id), not only this instance: a gateway
        # whose instance is gone asks a router for a live one.
        self.identity.group = self.identity.group or self.definition.group
        self.channels = channels
        self.state = state
        self.group_settings = group_settings or GroupSettingsCache(None, self.definition.group)
        self.is_registered = is_registered
        """Whether a bot instance is registered in this bot's group (None: no registry, no takeover)."""
        self.transfers: TransferLedger[TurnResult] = TransferLedger()
        self._intents = {i.name for i in self.definition.intents}
        self._unavailable_bots: dict[str, float] = {}
        """Bots the router said have no live instance, and when (time.monotonic())."""
        self._display_names: dict[str, str] = {}
        """Display names of the group's bots, as the router's candidates gave them."""

    async def prepare(self) -> None:
        """Ready the bot's own intents for matching without the router."""
        await self.own.prepare()

    # -- consumer messages -------------------------------------------------------------------

    async def respond(self, message: Message, budget_seconds: float) -> TurnResult:
        """Answer a consumer message: own dialog, transfer, clarifying question or fallback."""
        route = Route(time.monotonic() + budget_seconds, 0, (self.bot.bot_id,), 0)
        if not message.conversation_id.strip():
            raise InvalidInput("conversation_id is required")
        self._check_text(message.text)
        with _fenced_refused():
            # The question awaited is read beside the ownership (a round trip less); it is used
            # only once this instance owns the conversation, and only this bot's owner writes it.
            # When no question is awaited, the router is asked while the conversation is claimed
            # (another round trip less): the decision does not depend on who owns it.
            awaiting_read = asyncio.ensure_future(self.state.awaiting(message.conversation_id, route.remaining(0)))
            deciding: asyncio.Future | None = asyncio.ensure_future(
                self._decide_unless_awaited(awaiting_read, message.text, route)
            )
            try:
                route.owner_version = await self._own_conversation(message.conversation_id, route)
            except grpc.aio.AioRpcError as e:
                _drop(awaiting_read)
                _drop(deciding)
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                return await self._answer_without_store(message, route, e)
            except BaseException:
                _drop(awaiting_read)
                _drop(deciding)
                raise
            try:
                awaiting = await awaiting_read
            except BaseException:
                _drop(deciding)
                raise
            if awaiting is not None:
                _drop(deciding)  # it asks nothing: it saw the question
                deciding = None
                await self.state.set_awaiting(message.conversation_id, None, route.owner_version, route.remaining(0))
                if awaiting.intent:
                    await self.state.set_variable(
                        message.conversation_id, awaiting.save_as, message.text, route.owner_version, route.remaining(0)
                    )
                    return await self._answer(message, awaiting.intent, None, route, start_step=awaiting.step + 1)
                chosen = _chosen_option(awaiting.options, message.text)
                if chosen is not None:
                    return await self._follow_choice(
                        Message(message.conversation_id, message.consumer_id, awaiting.text, message.channel_metadata),
                        chosen,
                        route,
                    )
            return await self._route(message, route, include_self=True, decided=deciding)

    async def _decide_unless_awaited(
        self, awaiting_read: asyncio.Future, text: str, route: Route
    ) -> tuple[int, list[router_pb2.Candidate], float] | None:
        """The router's decision for `text`, asked once the read of the question awaited says there
        is none; None when there is one (its answer is not routed) or the read failed (`respond`
        sees the failure)."""
        try:
            if await asyncio.shield(awaiting_read) is not None:
                return None
        except Exception:  # noqa: BLE001 - raised to `respond` by its own await of the read
            return None
        return await self._decide(text, route, include_self=True)

    async def _own_conversation(self, conversation_id: str, route: Route) -> int:
        """The owner record's version, after making sure this instance owns the conversation.

        Another bot's conversation is taken over (fenced on the version read) when its owner
        instance is gone (`_owner_unreachable`), else refused. A record naming this bot at another
        instance (a restarted one, a sibling) is claimed for this instance, so the store's owner
        is the instance that answers."""
        ownership = await self.state.owner(conversation_id, route.remaining(0))
        owner = ownership.owner
        if owner is not None and owner.bot_id != self.bot.bot_id:
            reason = await self._owner_unreachable(owner, route)
            if not reason:
                raise Refused(
                    f"conversation {conversation_id!r} belongs to bot {owner.bot_id!r} at "
                    f"{owner.address}; send its messages there"
                )
            log.warning(
                "conversation_taken_over",
                reason=reason,
                from_bot=owner.bot_id,
                from_instance=owner.instance_id,
                from_address=owner.address,
                version=ownership.version,
            )
            BOT_TRANSFERS.labels("taken_over").inc()
        elif owner is not None:
            if owner.instance_id == self.identity.instance_id and owner.address == self.identity.address:
                return ownership.version
            log.info(
                "conversation_reclaimed",
                from_instance=owner.instance_id,
                from_address=owner.address,
                version=ownership.version,
            )
        try:
            return await self.state.claim(conversation_id, self.identity, ownership.version, "", route.remaining(0))
        except OwnershipConflict:
            return await self._own_conversation(conversation_id, route)

    async def _owner_unreachable(self, owner: common_pb2.BotRef, route: Route) -> str:
        """Why the owner instance (another bot's) cannot have the conversation any more, "" when it
        can: it is no longer registered; the router has just said its bot has no live instance;
        or it does not answer a health check SERVING within `owner_check_timeout_seconds`."""
        if await self._owner_gone(owner):
            return "owner_unregistered"
        said = self._unavailable_bots.get(owner.bot_id)
        if said is not None and time.monotonic() - said < ROUTER_UNAVAILABLE_MEMORY_SECONDS:
            return "router_says_bot_unavailable"
        if not owner.address:
            return ""
        timeout = max(0.01, min(self.config.owner_check_timeout_seconds, route.remaining(0)))
        try:
            health = await health_pb2_grpc.HealthStub(self.channels.channel(owner.address, owner.instance_id)).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return "owner_unreachable"
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "owner_health_check_timed_out"
            # It answered, with something other than a health status: alive, for all we know.
            log.warning("owner_health_unknown", owner=owner.bot_id, code=e.code().name, detail=e.details())
            return ""
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            return "owner_not_serving"
        return ""

    async def _answer_without_store(self, message: Message, route: Route, error: grpc.aio.AioRpcError) -> TurnResult:
        """The store cannot be reached (etcd is down, say): answer from this bot's own intents,
        reading no variables and recording nothing; no transfer, since no claim could fence it."""
        log.warning("store_unavailable_answering_alone", code=error.code().name, detail=error.details())
        route.stateless = True
        decision, candidates, score = await self._decide(message.text, route, include_self=True)
        if (
            decision == router_pb2.DECISION_ACT
            and candidates
            and candidates[0].bot_id == self.bot.bot_id
            and candidates[0].rating >= GOOD
        ):
            return await self._answer(message, candidates[0].intent, candidates[0], route)
        BOT_TRANSFERS.labels("fallback").inc()
        return self._fallback(score)

    async def _owner_gone(self, owner: common_pb2.BotRef) -> bool:
        """Whether the owner instance is no longer registered (when etcd cannot tell, or there is no
        registry: no)."""
        if self.is_registered is None:
            return False
        try:
            return not await self.is_registered(owner)
        except EtcdError as e:
            log.warning("owner_presence_unknown", owner=owner.bot_id, error=str(e))
            return False

    async def _route(
        self,
        message: Message,
        route: Route,
        include_self: bool,
        decided: Awaitable[tuple[int, list[router_pb2.Candidate], float] | None] | None = None,
    ) -> TurnResult:
        """Act on the router's decision for the message (`decided`: asked already, for `include_self`)."""
        outcome = await decided if decided is not None else None
        decision, candidates, best_score = outcome or await self._decide(message.text, route, include_self)
        if decision == router_pb2.DECISION_NONE and route.unavailable_bot_id:
            return await self._unavailable(route.unavailable_bot_id, best_score)
        if decision == router_pb2.DECISION_DISAMBIGUATE:
            return await self._clarify(message, candidates, route)
        if decision == router_pb2.DECISION_ACT:
            for candidate in candidates:
                if candidate.rating < GOOD:
                    break
                if candidate.bot_id == self.bot.bot_id:
                    return await self._answer(message, candidate.intent, candidate, route)
                if candidate.bot_id in route.visited:
                    continue
                result = await self._hand_over(message, candidate, route)
                if result is not None:
                    return result
        log.info("fallback", best_score=best_score, visited=list(route.visited))
        BOT_TRANSFERS.labels("fallback").inc()
        return self._fallback(best_score)

    async def _decide(self, text: str, route: Route, include_self: bool) -> tuple[int, list[router_pb2.Candidate], float]:
        """The router's decision for `text`; with no router, a local match of this bot's intents.

        Sets `route.unavailable_bot_id` when the router says the best match is a bot with no live
        instance, and remembers that answer for `_owner_unreachable`."""
        route.unavailable_bot_id = ""
        router = self.channels.current_router() if self.definition.collaboration else None
        if router is not None:
            request = router_pb2.MatchRequest(
                text=text,
                bot_id=self.bot.bot_id,
                group=self.definition.group,
                max_candidates=self.config.max_candidates + len(route.visited),
                include_asking_bot=include_self,
            )
            try:
                r = await router.Match(request, timeout=max(0.05, route.remaining()))
                for c in r.candidates:
                    if c.display_name:
                        self._display_names[c.bot_id] = c.display_name
                gone = unavailable_bot(r)
                if gone and gone != self.bot.bot_id:
                    self._unavailable_bots[gone] = time.monotonic()
                    route.unavailable_bot_id = gone
                candidates = [c for c in r.candidates if include_self or c.bot_id != self.bot.bot_id]
                decision = r.decision
                if decision == router_pb2.DECISION_UNSPECIFIED:
                    decision = (
                        router_pb2.DECISION_ACT if candidates and candidates[0].rating >= GOOD else router_pb2.DECISION_NONE
                    )
                return decision, candidates, candidates[0].score if candidates else 0.0
            except grpc.aio.AioRpcError as e:
                log.warning("router_unavailable", code=e.code().name, detail=e.details())
        if not include_self:
            return router_pb2.DECISION_NONE, [], 0.0
        return await self._decide_locally(text)

    # -- answering -------------------------------------------------------------------------

    def _reply(self, text: str) -> common_pb2.Reply:
        return common_pb2.Reply(bot_id=self.bot.bot_id, text=text)

    def _fallback(self, score: float) -> TurnResult:
        return TurnResult(
            [self._reply(self.definition.fallback)],
            self.identity,
            bot_pb2.OUTCOME_FALLBACK,
            bot_pb2.MatchInfo(bot_id=self.bot.bot_id, score=score),
        )

    async def _unavailable(self, bot_id: str, score: float) -> TurnResult:
        """The group's unavailable message about `bot_id` (OUTCOME_FALLBACK, as before the router
        could say why nothing qualified)."""
        text = unavailable_message(await self.group_settings.get(), self._display_names.get(bot_id) or bot_id)
        log.info("bot_unavailable", unavailable_bot=bot_id, best_score=score)
        BOT_TRANSFERS.labels("unavailable").inc()
        return TurnResult(
            [self._reply(text)], self.identity, bot_pb2.OUTCOME_FALLBACK, bot_pb2.MatchInfo(bot_id=self.bot.bot_id, score=score)
        )

    async def _answer(
        self,
        message: Message,
        intent: str,
        candidate: router_pb2.Candidate | None,
        route: Route,
        start_step: int = 0,
        transferred_from: str = "",
        variables_read: asyncio.Future | None = None,
    ) -> TurnResult:
        """Run this bot's dialog for `intent` (from `start_step` when resuming after a question);
        `variables_read`: the conversation's variables, being read already."""
        conversation = message.conversation_id
        if variables_read is not None:
            variables = await variables_read
        else:
            variables = {} if route.stateless else await self.state.variables(conversation, route.remaining(0))
        handler = self.bot.handler_for(intent)
        match = bot_pb2.MatchInfo(
            bot_id=self.bot.bot_id,
            intent=intent,
            score=candidate.score if candidate else 0.0,
            rating=candidate.rating if candidate else common_pb2.RATING_UNSPECIFIED,
        )
        try:
            if handler is not None:

                async def remember(name: str, value) -> None:
                    if route.stateless:
                        raise RuntimeError("the Context Session Store cannot be reached: nothing can be remembered")
                    await self.state.set_variable(conversation, name, value, route.owner_version, route.remaining(0))

                turn = Turn(
                    conversation,
                    message.consumer_id,
                    message.text,
                    intent,
                    match.score,
                    dict(message.channel_metadata),
                    transferred_from,
                    variables,
                    remember,
                )
                texts = await Bot.call(handler, turn)
            else:
                asked = False
                dialog = self.definition.dialog_for(intent)
                if dialog is None:
                    raise LookupError(f"no dialog for intent {intent!r}")
                texts, asking = dialog_texts(dialog, start_step, variables)
                if asking is not None and not route.stateless:
                    await self.state.set_awaiting(
                        conversation,
                        Awaiting(intent, asking, dialog.steps[asking].save_as),
                        route.owner_version,
                        route.remaining(0),
                    )
                    asked = True
        except Fenced:
            raise
        except Exception:
            log.exception("dialog_failed", intent=intent)
            return self._fallback(match.score)
        log.info("answered", intent=intent, score=match.score, transferred_from=transferred_from)
        return TurnResult(
            [self._reply(t) for t in texts], self.identity, bot_pb2.OUTCOME_ANSWERED, match, asked=handler is None and asked
        )

    async def _clarify(self, message: Message, candidates: list[router_pb2.Candidate], route: Route) -> TurnResult:
        """Ask which of the closest bots the consumer meant (best intent of each, 2-3 of them)."""
        options: list[tuple[str, str, str]] = []
        for c in candidates:
            if c.rating >= FAIR_PLUS and c.bot_id not in {o[0] for o in options} and len(options) < 3:
                label = f"{c.display_name or c.bot_id}: {c.intent.replace('_', ' ')}"
                options.append((c.bot_id, c.intent, label))
        options.append(("", "", NONE_OF_THESE))
        await self.state.set_awaiting(
            message.conversation_id, Awaiting(options=tuple(options), text=message.text), route.owner_version, route.remaining(0)
        )
        listing = " ".join(f"{n}) {label}." for n, (_, _, label) in enumerate(options, 1))
        log.info("clarifying", options=[o[0] for o in options[:-1]])
        return TurnResult(
            [self._reply(f"Just to be sure I get you to the right place, did you mean: {listing}")],
            self.identity,
            bot_pb2.OUTCOME_CLARIFY,
            bot_pb2.MatchInfo(bot_id=self.bot.bot_id),
            options=[bot_pb2.ClarifyOption(label=label, bot_id=b, intent=i) for b, i, label in options],
        )

    async def _follow_choice(self, message: Message, chosen: tuple[str, str, str], route: Route) -> TurnResult:
        bot_id, intent, _ = chosen
        if not bot_id:
            return self._fallback(0.0)
        if bot_id == self.bot.bot_id:
            return await self._answer(message, intent, None, route)
        decision, candidates, _ = await self._decide(message.text, route, include_self=False)
        target = next((c for c in candidates if c.bot_id == bot_id and c.intent == intent), None) or next(
            (c for c in candidates if c.bot_id == bot_id), None
        )
        if target is not None:
            result = await self._hand_over(
                message,
                router_pb2.Candidate(
                    bot_id=target.bot_id,
                    intent=intent,
                    score=target.score,
                    rating=target.rating,
                    address=target.address,
                    instance_id=target.instance_id,
                    display_name=target.display_name,
                ),
                route,
            )
            if result is not None:
                return result
        return self._fallback(0.0)

    # -- transfers -------------------------------------------------------------------------

    async def _hand_over(
        self, message: Message, candidate: router_pb2.Candidate, route: Route, failed: tuple[str, ...] = ()
    ) -> TurnResult | None:
        """Transfer to `candidate`; None (the conversation stays here) when it did not take it.

        An instance that cannot be reached or is stopping (`INSTANCE_GONE`: stopped, draining, or
        killed and not yet out of the router's view) is not the bot: the router is asked again for
        another instance of it, `MAX_INSTANCE_RETRIES` times at most, skipping the `failed` addresses."""
        timeout = route.remaining()
        if timeout <= 0:
            return None
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
            visited_bot_ids=list(route.visited),
            hop_count=route.hops,
            owner_version=route.owner_version,
        )
        log.info(
            "transfer_sent", to_bot=candidate.bot_id, intent=candidate.intent, score=candidate.score, transfer_id=transfer_id
        )
        BOT_TRANSFERS.labels("sent").inc()
        try:
            response = await self.channels.bot(candidate.address, candidate.instance_id).Transfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            log.warning(
                "transfer_failed", to_bot=candidate.bot_id, code=e.code().name, detail=e.details(), transfer_id=transfer_id
            )
            BOT_TRANSFERS.labels("failed").inc()
            route.owner_version = await self._claim_back(message.conversation_id, route, transfer_id)
            failed += (candidate.address,)
            if e.code() in INSTANCE_GONE and len(failed) <= MAX_INSTANCE_RETRIES:
                other = await self._other_instance(message.text, candidate.bot_id, failed, route)
                if other is not None:
                    return await self._hand_over(message, other, route, failed)
            route.visited += (candidate.bot_id,)
            return None
        BOT_TRANSFERS.labels("taken").inc()
        replies = []
        if self.definition.transfer_message:
            replies.append(
                self._reply(
                    render(self.definition.transfer_message.replace("{to_bot}", candidate.display_name or candidate.bot_id), {})
                )
            )
        replies.extend(response.replies)
        match = bot_pb2.MatchInfo(
            bot_id=candidate.bot_id, intent=candidate.intent, score=candidate.score, rating=candidate.rating
        )
        return TurnResult(replies, response.owner, bot_pb2.OUTCOME_TRANSFERRED, match, transfer_id)

    async def _other_instance(self, text: str, bot_id: str, failed: tuple[str, ...], route: Route) -> router_pb2.Candidate | None:
        """The router's candidate for `bot_id` at an address not in `failed`, or None; asked again
        after the pauses of `INSTANCE_ASK_DELAYS`, within the route's time."""
        for delay in INSTANCE_ASK_DELAYS:
            if delay:
                await asyncio.sleep(min(delay, route.remaining()))
            if route.remaining() <= 0:
                return None
            _, candidates, _ = await self._decide(text, route, include_self=False)
            mine = [c for c in candidates if c.bot_id == bot_id]
            if not mine:
                return None
            other = next((c for c in mine if c.address not in failed), None)
            if other is not None:
                return other
        return None

    async def _claim_back(self, conversation_id: str, route: Route, failed_transfer: str) -> int:
        """After a failed transfer, make this bot the owner at a new version.

        The new version fences out the receiver: if it is still running and tries to take the
        conversation with the version we sent, its claim fails. If it already took it (and then
        died or timed out before answering us), the record names our transfer and we take it back.
        """
        timeout = max(0.05, route.remaining(0))
        try:
            return await self.state.claim(conversation_id, self.identity, route.owner_version, "", timeout)
        except OwnershipConflict:
            current = await self.state.owner(conversation_id, timeout)
            if current.owner is None or current.owner.bot_id == self.bot.bot_id or current.transfer_id == failed_transfer:
                return await self.state.claim(conversation_id, self.identity, current.version, "", timeout)
            raise Conflict(f"conversation {conversation_id!r} was taken by {current.owner.bot_id!r} meanwhile") from None

    async def accept_transfer(self, request: bot_pb2.TransferRequest, budget_seconds: float) -> TurnResult:
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
        if self.bot.bot_id in request.visited_bot_ids:
            BOT_TRANSFERS.labels("loop_stopped").inc()
            raise Refused(f"loop guard: bot {self.bot.bot_id!r} already handled this message")
        if request.hop_count >= self.config.max_hops:
            BOT_TRANSFERS.labels("loop_stopped").inc()
            raise Refused(
                f"loop guard: the message already went through {request.hop_count} transfers (maximum {self.config.max_hops})"
            )
        return await self.transfers.run_once(request.transfer_id, lambda: self._take(request, budget_seconds))

    async def _take(self, request: bot_pb2.TransferRequest, budget_seconds: float) -> TurnResult:
        with _fenced_refused():
            return await self._claim_and_answer(request, budget_seconds)

    async def _claim_and_answer(self, request: bot_pb2.TransferRequest, budget_seconds: float) -> TurnResult:
        message = Message(request.conversation_id, request.consumer_id, request.text, dict(request.channel_metadata))
        route = Route(time.monotonic() + budget_seconds, 0, (*request.visited_bot_ids, self.bot.bot_id), request.hop_count + 1)
        expected = request.owner_version
        if not self.state.shared:
            expected = (await self.state.owner(message.conversation_id, route.remaining(0))).version
        dialog = self._answerable_before_claim(request.intent)
        if dialog is not None:
            result = await self._answer_then_claim(request, message, route, expected, dialog)
            if result.outcome == bot_pb2.OUTCOME_ANSWERED and request.sender.address:
                await self._return_to_sender(request, route, result)
            return result
        # The dialog's variables are read beside the claim (a round trip less): the sender, which
        # holds the conversation until the claim, wrote them before it sent the transfer.
        variables_read = (
            asyncio.ensure_future(self.state.variables(message.conversation_id, route.remaining(0)))
            if request.intent in self._intents
            else None
        )
        try:
            route.owner_version = await self.state.claim(
                message.conversation_id, self.identity, expected, request.transfer_id, route.remaining(0)
            )
        except OwnershipConflict as e:
            _drop(variables_read)
            applied = await self._applied_elsewhere(request, route)
            if applied is not None:
                return applied
            raise Conflict(str(e)) from None
        except BaseException:
            _drop(variables_read)
            raise
        sender = request.sender.bot_id
        if variables_read is not None:
            result = await self._answer(
                message, request.intent, None, route, transferred_from=sender, variables_read=variables_read
            )
        else:
            if request.intent:
                log.warning("transfer_intent_unknown", intent=request.intent, from_bot=sender)
            if route.hops >= self.config.max_hops:
                decision, candidates, score = await self._decide_locally(message.text)
                if decision == router_pb2.DECISION_ACT:
                    result = await self._answer(message, candidates[0].intent, candidates[0], route, transferred_from=sender)
                else:
                    result = self._fallback(score)
            else:
                result = await self._route(message, route, include_self=True)
        await self._record_applied(request, route, result)
        if result.outcome == bot_pb2.OUTCOME_ANSWERED and not result.asked and request.sender.address:
            await self._return_to_sender(request, route, result)
        return result

    def _answerable_before_claim(self, intent: str) -> DialogDefinition | None:
        """The dialog of `intent` when its answer can be made before the conversation is claimed: one
        of the definition's (no handler, whose code may write), whose steps ask nothing (asking
        writes the question awaited). Its reply depends on the variables alone, and making it
        changes nothing, so one claim both takes the conversation and records the answer."""
        if intent not in self._intents or self.bot.handler_for(intent) is not None:
            return None
        dialog = self.definition.dialog_for(intent)
        if dialog is None or any(step.asks for step in dialog.steps):
            return None
        return dialog

    async def _answer_then_claim(
        self, request: bot_pb2.TransferRequest, message: Message, route: Route, expected: int, dialog: DialogDefinition
    ) -> TurnResult:
        """A transfer to a dialog that asks nothing, in one write: its reply is made first (from the
        variables, read only when the steps name one; the sender wrote them before it sent the
        transfer), then the conversation is claimed with that reply recorded for retries (what
        `_record_applied` does after the dialog otherwise)."""
        conversation = message.conversation_id
        named = any(mentions_variables(step.text) for step in dialog.steps)
        variables = await self.state.variables(conversation, route.remaining(0)) if named else {}
        texts, _ = dialog_texts(dialog, 0, variables)
        match = bot_pb2.MatchInfo(bot_id=self.bot.bot_id, intent=request.intent, rating=common_pb2.RATING_UNSPECIFIED)
        result = TurnResult([self._reply(t) for t in texts], self.identity, bot_pb2.OUTCOME_ANSWERED, match)
        try:
            route.owner_version = await self.state.claim(
                conversation,
                self.identity,
                expected,
                request.transfer_id,
                route.remaining(0),
                result.transfer_response() if self.state.shared else None,
            )
        except OwnershipConflict as e:
            applied = await self._applied_elsewhere(request, route)
            if applied is not None:
                return applied
            raise Conflict(str(e)) from None
        log.info("answered", intent=request.intent, score=0.0, transferred_from=request.sender.bot_id)
        return result

    async def _record_applied(self, request: bot_pb2.TransferRequest, route: Route, result: TurnResult) -> None:
        """Keep the transfer's answer in the owner record (a claim of the version this bot holds),
        where every instance of the bot finds it: a retry of the transfer on any of them returns
        it (`_applied_elsewhere`). Without a shared store, the in-process ledger does."""
        if not self.state.shared or route.stateless:
            return
        try:
            route.owner_version = await self.state.claim(
                request.conversation_id,
                self.identity,
                route.owner_version,
                request.transfer_id,
                route.remaining(0),
                result.transfer_response(),
            )
        except OwnershipConflict:
            # Handed on (a further transfer) or taken meanwhile: a retry finds a newer transfer.
            log.info("transfer_result_not_recorded", reason="owner_changed")
        except grpc.aio.AioRpcError as e:
            # The answer stands (the dialog ran, its writes are in): only a retry elsewhere loses.
            log.warning("transfer_result_not_recorded", reason=e.code().name, detail=e.details())

    async def _applied_elsewhere(self, request: bot_pb2.TransferRequest, route: Route) -> TurnResult | None:
        """The answer of an instance of this bot that applied (or is applying) the same transfer:
        read from the owner record, waited for while it is being applied, within the route's time.
        None when the record is at another transfer: the conversation moved on, a real conflict."""
        if not self.state.shared:
            return None  # every instance has its own conversations: the ledger saw any retry
        applied = (request.transfer_id, f"{RETURN_PREFIX}{request.transfer_id}")
        while True:
            current = await self.state.owner(request.conversation_id, route.remaining(0))
            if current.transfer_id not in applied:
                return None
            if current.transfer_response is not None:
                log.info("transfer_already_applied", by_instance=current.transfer_response.owner.instance_id)
                return TurnResult.of_transfer(current.transfer_response)
            if route.remaining(0) <= APPLIED_POLL_SECONDS:
                by = current.owner.instance_id if current.owner else "?"
                raise Conflict(f"transfer {request.transfer_id!r} is still being applied by instance {by!r}: retry later")
            await asyncio.sleep(APPLIED_POLL_SECONDS)

    async def _return_to_sender(self, request: bot_pb2.TransferRequest, route: Route, result: TurnResult) -> None:
        """With the group's return_to_sender on, hand the conversation back once the dialog ended."""
        if not (await self.group_settings.get()).return_to_sender:
            return
        returned = result.transfer_response()
        returned.owner.CopyFrom(request.sender)
        try:
            await self.state.claim(
                request.conversation_id,
                request.sender,
                route.owner_version,
                f"{RETURN_PREFIX}{request.transfer_id}",
                route.remaining(0),
                returned if self.state.shared else None,
            )
        except OwnershipConflict:
            return
        log.info("returned_to_sender", to_bot=request.sender.bot_id)
        result.owner = request.sender

    async def _decide_locally(self, text: str) -> tuple[int, list[router_pb2.Candidate], float]:
        """This bot's own intents only: act on the best one if rated GOOD or better."""
        intent, score, rating = await self.own.best(text)
        if intent and rating >= GOOD:
            c = router_pb2.Candidate(
                bot_id=self.bot.bot_id,
                intent=intent,
                score=score,
                rating=rating,  # type: ignore[arg-type]  # a Rating value
                address=self.identity.address,
            )
            return router_pb2.DECISION_ACT, [c], score
        return router_pb2.DECISION_NONE, [], score

    def _check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidInput("text is empty")
        if len(text) > self.config.max_text_chars:
            raise InvalidInput(f"text has {len(text)} characters; the maximum is {self.config.max_text_chars}")


def unavailable_bot(response: router_pb2.MatchResponse) -> str:
    """The bot a Match names as the best match with no live instance ("" for any other answer)."""
    if response.decision == router_pb2.DECISION_NONE and response.none_reason == router_pb2.NONE_REASON_BOT_UNAVAILABLE:
        return response.unavailable_bot_id
    return ""


def _drop(read: asyncio.Future | None) -> None:
    """Cancel a read started beside another call that failed; its outcome is not wanted."""
    if read is not None:
        read.cancel()
        read.add_done_callback(lambda f: f.cancelled() or f.exception())


@contextlib.contextmanager
def _fenced_refused():
    """A write refused because this bot lost the conversation meanwhile: FAILED_PRECONDITION."""
    try:
        yield
    except Fenced as e:
        log.warning("write_fenced", reason=str(e))
        raise Refused(str(e)) from None


def _chosen_option(options: tuple, answer: str) -> tuple[str, str, str] | None:
    """The option the consumer picked: by number, by "none", or by naming it (part of its label,
    or the label's bot name within the answer); None when the answer picks no single option."""
    answer = " ".join(answer.strip().lower().rstrip(".!").split())
    number = re.fullmatch(r"(?:option\s*|number\s*)?(\d+)\)?", answer)
    if number and 1 <= int(number.group(1)) <= len(options):
        return tuple(options[int(number.group(1)) - 1])
    if answer in ("none", "neither", "no", "none of these", "none of them", "none of the above"):
        return tuple(options[-1])

    def named(option) -> bool:
        label = option[2].lower()
        return bool(answer) and (answer in label or label.split(":")[0].strip() in answer)

    matches = [o for o in options[:-1] if named(o)]
    return tuple(matches[0]) if len(matches) == 1 else None
