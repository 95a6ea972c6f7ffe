"""The restart scenario of issue 16 ("the bar"): gateway traffic across the example group while
`cards` and then the router are SIGKILLed and restarted on their old addresses.

    async with start_local(EXAMPLE_BOTS, lease_ttl=10) as mesh:
        figures = await run_restart_scenario(mesh)

`run_restart_scenario` drives it on a running mesh of the example bots (entry bot first) and
returns the figures as a dict (see `ScenarioResult.figures`); the mesh's `router` and `bots["cards"]`
are replaced by their restarted processes, so `mesh.stop()` stops those.

The load: `conversations` gateways side by side, each sending the six messages of `SCRIPT` one
after the other (a new conversation once one ends), as docs/gateways.md advises: to the owner
named by the last response (or by the store's GetOwner when there is none); on FAILED_PRECONDITION
to where the store says now, once; on UNAVAILABLE to the entry bot, once; one deadline per message.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from mbc.client.context import ContextClient
from mbc.runtime.channels import ChannelPool
from mbc.testing.processes import ComponentProcess
from mbc.v1 import bot_pb2

SCRIPT: tuple[str, ...] = (
    "hi",
    "how do I set up direct deposit for my paycheck",
    "I need to run payroll for my employees",
    "I lost my debit card",
    "my card got declined at the grocery store",
    "I'd like to order a pepperoni pizza",
)
"""A conversation: greeting, personal banking, business banking, two cards questions, something
no bot handles (the fallback)."""
CARDS_STEPS: frozenset[int] = frozenset({3, 4})
"""The steps of `SCRIPT` that only `cards` should answer."""
CARDS = "cards"


@dataclass
class Message:
    """One consumer message as the gateway saw it (times: seconds since the scenario began)."""

    conversation: str
    step: int
    text: str
    sent: float
    done: float = 0.0
    delivered: bool = False
    bot_id: str = ""
    """The bot that wrote the last reply (the owner when there is no reply)."""
    owner: str = ""
    outcome: str = ""
    reply: str = ""
    attempts: int = 0
    error: str = ""
    """The gRPC code of the last failure of an undelivered message."""


@dataclass
class ScenarioResult:
    messages: list[Message] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    """Seconds since the scenario began: cards_killed, router_killed, router_started,
    router_serving, cards_started, cards_serving, load_stopped."""

    def figures(self) -> dict[str, Any]:
        e = self.events
        absent_from, absent_until = e["cards_killed"], e["cards_serving"]
        cards_step = [m for m in self.messages if m.step in CARDS_STEPS]
        while_absent = [m for m in cards_step if absent_from <= m.sent < absent_until]
        wrong = [
            m
            for m in while_absent
            if m.delivered and m.outcome in ("OUTCOME_ANSWERED", "OUTCOME_TRANSFERRED") and m.bot_id != CARDS
        ]
        to_cards = [
            m.done - absent_until
            for m in cards_step
            if m.delivered and m.outcome == "OUTCOME_TRANSFERRED" and m.bot_id == CARDS and m.sent >= absent_from
        ]
        after_serving = [m for m in cards_step if m.sent >= absent_until]
        undelivered = [m for m in self.messages if not m.delivered]
        outcomes: dict[str, int] = {}
        for m in while_absent:
            key = f"{m.outcome or m.error}:{m.bot_id}"
            outcomes[key] = outcomes.get(key, 0) + 1
        errors: dict[str, int] = {}
        for m in undelivered:
            errors[m.error] = errors.get(m.error, 0) + 1
        return {
            "messages": len(self.messages),
            "undelivered": len(undelivered),
            "undelivered_by_code": errors,
            "undelivered_while_router_down": sum(e["router_killed"] <= m.sent < e["router_serving"] for m in undelivered),
            "wrong_bot_while_absent": len(wrong),
            "cards_step_while_absent": len(while_absent),
            "cards_step_while_absent_outcomes": outcomes,
            "first_transfer_to_cards_after_serving_s": round(min(to_cards), 3) if to_cards else None,
            "router_serving_after_restart_s": round(e["router_serving"] - e["router_started"], 3),
            "cards_serving_after_restart_s": round(e["cards_serving"] - e["cards_started"], 3),
            "cards_absent_s": round(absent_until - absent_from, 3),
            "cards_step_after_serving": len(after_serving),
            "fallbacks_on_cards_step_after_serving": sum(m.outcome == "OUTCOME_FALLBACK" for m in after_serving),
            "answered_by_cards_after_serving": sum(m.bot_id == CARDS for m in after_serving if m.delivered),
            "events": {k: round(v, 3) for k, v in e.items()},
        }


def restart(component: ComponentProcess, env: dict[str, str] | None = None) -> ComponentProcess:
    """A new process of the same command line as `component` (dead by now), on the same port
    (same name: same log file, appended to)."""
    argv = [str(a) for a in component.process.args]  # type: ignore[union-attr]  # [python, -m, module, *args, --port, P, --port-file, F]
    assert argv[-4] == "--port" and argv[-2] == "--port-file", argv
    assert component.port is not None, f"{component.name} never bound a port"
    return ComponentProcess(component.name, argv[3:-4], component.workdir, env=env, port=component.port, module=argv[2])


class _Gateway:
    """One gateway worker: conversations of `script`, one after the other, until `stop` is set."""

    def __init__(
        self,
        entry: str,
        store: ContextClient,
        channels: ChannelPool,
        script: Sequence[str],
        deadline: float,
        think: float,
        clock: float,
        result: ScenarioResult,
    ) -> None:
        self.entry, self.store, self.channels = entry, store, channels
        self.script, self.deadline, self.think, self.clock, self.result = script, deadline, think, clock, result

    def now(self) -> float:
        return time.monotonic() - self.clock

    async def _owner(self, conversation: str, timeout: float) -> str:
        ownership, _ = await self.store.get_owner(conversation, timeout=max(timeout, 0.01))
        return ownership.owner.address if ownership is not None and ownership.owner.address else self.entry

    async def _send(self, conversation: str, step: int, owner: str) -> str:
        """Sends step `step`; returns the owner to send the next message to ("" when unknown)."""
        m = Message(conversation, step, self.script[step], self.now())
        self.result.messages.append(m)
        end = time.monotonic() + self.deadline
        request = bot_pb2.RespondRequest(conversation_id=conversation, text=m.text)
        retried = False
        try:
            address = owner or await self._owner(conversation, end - time.monotonic())
            while True:
                m.attempts += 1
                try:
                    r = await self.channels.bot(address).Respond(request, timeout=max(end - time.monotonic(), 0.01))
                    break
                except grpc.aio.AioRpcError as e:
                    m.error = e.code().name
                    if retried:
                        raise
                    retried = True
                    if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        address = await self._owner(conversation, end - time.monotonic())
                    elif e.code() == grpc.StatusCode.UNAVAILABLE and address != self.entry:
                        address = self.entry
                    else:
                        raise
        except grpc.aio.AioRpcError as e:
            m.error, m.done = e.code().name, self.now()
            return ""
        m.done, m.delivered, m.error = self.now(), True, ""
        m.outcome = bot_pb2.Outcome.Name(r.outcome)
        m.owner = r.owner.bot_id
        m.bot_id = r.replies[-1].bot_id if r.replies else r.owner.bot_id
        m.reply = r.replies[-1].text if r.replies else ""
        return r.owner.address

    async def run(self, stop: asyncio.Event, rng: random.Random) -> None:
        """Conversations one after the other, the first starting at a random point of a cycle and each
        pause drawn around `think`: like real consumers, the gateways are never in step, so every
        step of the script is in flight at any moment (a restarted bot is asked for at once)."""
        await asyncio.sleep(rng.uniform(0, len(self.script) * self.think))
        while not stop.is_set():
            conversation, owner = uuid.uuid4().hex, ""
            for step in range(len(self.script)):
                if stop.is_set():
                    return
                owner = await self._send(conversation, step, owner)
                await asyncio.sleep(self.think * rng.uniform(0.5, 1.5))


async def run_restart_scenario(
    mesh: Any,
    *,
    conversations: int = 40,
    script: Sequence[str] = SCRIPT,
    deadline: float = 6.0,
    think: float = 1.0,
    warmup: float = 5.0,
    cards_to_router: float = 10.0,
    router_down: float = 5.0,
    tail: float = 15.0,
    start_timeout: float = 240.0,
    messages_file: Path | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """Drive the scenario on `mesh` (a LocalMesh of the example bots, entry bot first, with a store)
    and return its figures. `warmup` s of load, SIGKILL cards; `cards_to_router` s later SIGKILL
    the router, restart it `router_down` s later on its port; once it serves, restart cards on its
    port; `tail` s of load after cards serves. Every message goes to `messages_file` (JSON lines)."""
    assert mesh.store is not None and mesh.router is not None and CARDS in mesh.bots
    entry = next(iter(mesh.bots.values())).address
    result = ScenarioResult()
    clock = time.monotonic()

    def now() -> float:
        return time.monotonic() - clock

    channels = ChannelPool(tls=mesh.client_tls)
    store = ContextClient(channels.channel(mesh.store.address), deadline)
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            _Gateway(entry, store, channels, script, deadline, think, clock, result).run(stop, random.Random(seed + i))
        )
        for i in range(conversations)
    ]
    try:
        await asyncio.sleep(warmup)
        cards = mesh.bots[CARDS]
        await asyncio.to_thread(cards.kill)
        result.events["cards_killed"] = now()

        await asyncio.sleep(cards_to_router)
        router = mesh.router
        await asyncio.to_thread(router.kill)
        result.events["router_killed"] = now()

        await asyncio.sleep(router_down)
        result.events["router_started"] = now()
        new_router = restart(router)
        mesh.routers[mesh.routers.index(router)] = new_router
        mesh.router = new_router
        await new_router.wait_serving("mbc.v1.Router", timeout=start_timeout, tls=mesh.client_tls)
        result.events["router_serving"] = now()

        result.events["cards_started"] = now()
        new_cards = restart(cards)
        mesh.bots[CARDS] = new_cards
        await new_cards.wait_serving("mbc.v1.Bot", timeout=start_timeout, tls=mesh.client_tls)
        result.events["cards_serving"] = now()

        await asyncio.sleep(tail)
    finally:
        stop.set()
        result.events["load_stopped"] = now()
        await asyncio.gather(*workers, return_exceptions=True)
        await channels.close()
    if messages_file is not None:
        with open(messages_file, "w") as f:
            for m in sorted(result.messages, key=lambda m: m.sent):
                f.write(json.dumps(asdict(m)) + "\n")
    return result.figures()
