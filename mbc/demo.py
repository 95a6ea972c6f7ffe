"""`mbc demo`: a local mesh (etcd, the Context Session Store, the router, three bank bots, each its
own process) and a scripted conversation that shows a local answer, transfers with intent and
message, data crossing bots through the store, and a fallback."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
import time
from pathlib import Path

import yaml

from mbc.channels import ChannelPool
from mbc.gateway import Conversation
from mbc.inspect import rating_name
from mbc.processes import ComponentProcess, new_workdir
from mbc.v1 import bot_pb2, common_pb2, router_pb2

EXAMPLES = Path(__file__).resolve().parent / "examples"
BOT_FILES = ("personal_banking.yaml", "business_banking.yaml", "cards.yaml")
ENTRY_BOT = "personal_banking.yaml"

SCRIPT = (
    "Hi there!",
    "Sam",
    "What's the balance on my checking account?",
    "I just started a bakery. How do I open a business account for my LLC?",
    "Could my bookkeeper get her own login to our business account?",
    "Also, I think I lost my debit card yesterday",
    "Which pizza place near me delivers the fastest?",
)


def say(line: str = "") -> None:
    print(line, flush=True)


def describe(response: bot_pb2.RespondResponse, asked: str) -> str:
    m = response.match
    how = f"{m.intent or '-'} ({m.score:.2f}, {rating_name(m.rating)})"
    if response.outcome == bot_pb2.OUTCOME_ANSWERED:
        if m.rating == common_pb2.RATING_UNSPECIFIED:  # resumed: the message answered a question
            return f"{asked} was waiting for this answer: it stores it in the Context Session Store and goes on"
        return f"{asked} matched its own intent {how}: it answers"
    if response.outcome == bot_pb2.OUTCOME_CLARIFY:
        return f"{asked}: two bots match about equally well, so it asks the consumer"
    if response.outcome == bot_pb2.OUTCOME_TRANSFERRED:
        return (f"{asked} asked the router, which rates {m.bot_id}/{how} best in the group: "
                f"transfer {response.transfer_id[:8]} with the message and the intent")
    return f"no bot of the group, {asked} included, has an intent rated GOOD: {asked}'s fallback answers"


async def wait_indexed(router: str, probes: dict[str, str], timeout: float = 60.0) -> None:
    """Until the router ranks each bot first for one of its own phrases."""
    pool = ChannelPool()
    deadline = time.monotonic() + timeout
    try:
        pending = dict(probes)
        while pending:
            for bot_id, phrase in list(pending.items()):
                try:
                    r = await pool.router(router).Match(router_pb2.MatchRequest(text=phrase, max_candidates=1), timeout=5)
                    if r.candidates and r.candidates[0].bot_id == bot_id:
                        pending.pop(bot_id)
                except Exception:
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"router did not index {sorted(pending)} within {timeout:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await pool.close()


async def _recorded_owner(store: str, conversation_id: str) -> str:
    from mbc.context_client import ContextClient

    pool = ChannelPool()
    try:
        ownership, _ = await ContextClient(pool.channel(store)).get_owner(conversation_id)
        return ownership.owner.bot_id if ownership else "nobody"
    finally:
        await pool.close()


async def run_demo(etcd: tuple[str, ...] | None = None) -> int:
    from discovery import LocalEtcd

    workdir = new_workdir("mbc-demo-")
    local_etcd = None
    components: list[ComponentProcess] = []
    try:
        if not etcd:
            local_etcd = LocalEtcd(data_dir=workdir / "etcd")
            local_etcd.start()
            etcd = (local_etcd.endpoint,)
            say(f"etcd        started on {local_etcd.endpoint} (pid {local_etcd.pid})")
        endpoints = ",".join(etcd)
        store = ComponentProcess("store", ["store", "--etcd", endpoints], workdir)
        components.append(store)
        router = ComponentProcess("router", ["router", "--etcd", endpoints], workdir)
        components.append(router)
        await store.wait_serving()
        say(f"store       serving on {store.address} (pid {store.pid}): the Context Session Store")
        await router.wait_serving()
        say(f"router      serving on {router.address} (pid {router.pid})")
        definitions = {f: yaml.safe_load((EXAMPLES / f).read_text()) for f in BOT_FILES}
        bots = {}
        for f in BOT_FILES:
            bot = ComponentProcess(definitions[f]["id"], ["bot", str(EXAMPLES / f), "--etcd", endpoints, "--router", router.address, "--store", store.address], workdir)
            components.append(bot)
            bots[f] = bot
        for f, bot in bots.items():
            await bot.wait_serving()
            say(f"{bot.name:<11} serving on {bot.address} (pid {bot.pid}), group {definitions[f]['group']}")
        await wait_indexed(router.address, {d["id"]: d["intents"][0]["phrases"][0] for d in definitions.values()})
        say("router      has indexed all three bots")
        say(f"logs        {workdir}")
        say()
        entry = bots[ENTRY_BOT]
        say(f"The consumer starts a conversation with {entry.name}.")
        say("=" * 78)
        async with Conversation(entry.address, consumer_id="consumer-42", channel_metadata={"channel": "web"}, store_address=store.address) as chat:
            for text in SCRIPT:
                asked = chat.owner_bot_id or entry.name
                response = await chat.send(text)
                say(f"consumer > {text}")
                say(textwrap.indent(textwrap.fill(f"[{describe(response, asked)}]", 74), "    "))
                for reply in response.replies:
                    say(textwrap.indent(textwrap.fill(f"{reply.bot_id} > {reply.text}", 74, subsequent_indent="    "), "  "))
                if response.outcome == bot_pb2.OUTCOME_TRANSFERRED:
                    say(f"    [the conversation now belongs to {response.owner.bot_id}]")
                say()
            owner = await _recorded_owner(store.address, chat.conversation_id)
        say("=" * 78)
        say(f"The Context Session Store records {owner} as the owner of conversation {chat.conversation_id[:8]}.")
        return 0
    except Exception as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        for component in reversed(components):
            code = component.terminate()
            say(f"{component.name:<11} stopped (exit code {code})")
        if local_etcd:
            local_etcd.stop()
            say("etcd        stopped")
        shutil.rmtree(workdir, ignore_errors=True)
