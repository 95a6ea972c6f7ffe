"""`mbc demo`: a local mesh (etcd, the Context Session Store, the router, three bank bots, each its
own process) and a scripted conversation that shows a local answer, transfers with intent and
message, data crossing bots through the store, and a fallback."""

from __future__ import annotations

import asyncio
import shutil
import textwrap

from mbc.cli.inspect import rating_name
from mbc.client.context import ContextClient
from mbc.client.gateway import Conversation
from mbc.runtime.channels import ChannelPool
from mbc.testing.mesh import EXAMPLE_BOTS, LocalMesh
from mbc.testing.processes import new_workdir
from mbc.v1 import bot_pb2, common_pb2

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
        return (
            f"{asked} asked the router, which rates {m.bot_id}/{how} best in the group: "
            f"transfer {response.transfer_id[:8]} with the message and the intent"
        )
    return f"no bot of the group, {asked} included, has an intent rated GOOD: {asked}'s fallback answers"


async def _recorded_owner(store: str, conversation_id: str) -> str:
    pool = ChannelPool()
    try:
        ownership, _ = await ContextClient(pool.channel(store)).get_owner(conversation_id)
        return ownership.owner.bot_id if ownership else "nobody"
    finally:
        await pool.close()


async def start_mesh(mesh: LocalMesh) -> None:
    """etcd (unless the mesh has endpoints), the store and the router, then the example bots, each
    announced as it serves."""
    if not mesh.etcd:
        etcd = mesh.start_etcd()
        say(f"etcd        started on {etcd.endpoint} (pid {etcd.pid})")
    store, router = await asyncio.gather(mesh.start_store(), mesh.start_router())
    say(f"store       serving on {store.address} (pid {store.pid}): the Context Session Store")
    say(f"router      serving on {router.address} (pid {router.pid})")
    for bot in await asyncio.gather(*(mesh.start_bot(path) for path in EXAMPLE_BOTS)):
        say(f"{bot.name:<11} serving on {bot.address} (pid {bot.pid}), group {mesh.bot_files[bot.name].group}")
    await mesh.wait_indexed()
    say("router      has indexed all three bots")
    say(f"logs        {mesh.workdir}")


async def play(mesh: LocalMesh) -> None:
    """The scripted conversation, from the entry bot (the first example bot)."""
    entry = next(iter(mesh.bots.values()))
    store = mesh.store.address if mesh.store else ""
    say(f"The consumer starts a conversation with {entry.name}.")
    say("=" * 78)
    async with Conversation(
        entry.address, consumer_id="consumer-42", channel_metadata={"channel": "web"}, store_address=store
    ) as chat:
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
        owner = await _recorded_owner(store, chat.conversation_id)
    say("=" * 78)
    say(f"The Context Session Store records {owner} as the owner of conversation {chat.conversation_id[:8]}.")


async def run_demo(etcd: tuple[str, ...] | None = None) -> int:
    """Start the mesh (on `etcd` when given, else a local etcd), play the conversation, stop."""
    mesh = LocalMesh(new_workdir("mbc-demo-"), ",".join(etcd or ()))
    try:
        await start_mesh(mesh)
        say()
        await play(mesh)
        return 0
    except Exception as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        owned_etcd = mesh.local_etcd is not None
        for name, code in mesh.stop().items():
            say(f"{name:<11} stopped (exit code {code})")
        if owned_etcd:
            say("etcd        stopped")
        shutil.rmtree(mesh.workdir, ignore_errors=True)
