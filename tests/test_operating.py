"""Operating the mesh: metrics scraped during a conversation, one trace id across hops in the logs,
`mbc participants` and `mbc chat` against the live example mesh (shared with tests/test_mesh.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid

import grpc
import pytest

from mbc.client.gateway import Conversation
from mbc.runtime import tracing
from mbc.runtime.metrics import sample_value, scrape_text
from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2, bot_pb2_grpc
from meshlib import ROOT, transfer

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(300)

BOT_RPC = "mbc.v1.Bot"


@pytest.fixture(scope="module")
def mesh(example_mesh):
    return example_mesh


async def scrape(component) -> str:
    return await asyncio.to_thread(scrape_text, component.metrics_address)


def log_events(component) -> list[dict]:
    events = []
    for line in component.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def run_mbc(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mbc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_metrics_move_with_a_conversation(mesh):
    personal, business = mesh.bots["personal-banking"], mesh.bots["business-banking"]
    components = {"personal": personal, "business": business, "router": mesh.router, "store": mesh.store}
    before = {name: await scrape(c) for name, c in components.items()}

    async with Conversation(personal.address, store_address=mesh.store.address) as chat:
        own = await chat.send("what's the balance on my checking account?")
        moved = await chat.send("How do I open a business checking account for my LLC?")
        fallback = await chat.send("which pizza place delivers the fastest tonight?")
    assert own.outcome == bot_pb2.OUTCOME_ANSWERED
    assert moved.outcome == bot_pb2.OUTCOME_TRANSFERRED and moved.owner.bot_id == "business-banking"
    assert fallback.outcome == bot_pb2.OUTCOME_FALLBACK
    # The loop guard refuses a message that already visited the receiver.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(
            business.address,
            receiver_bot_id="business-banking",
            text="open a business account",
            visited_bot_ids=["personal-banking", "business-banking"],
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    after = {name: await scrape(c) for name, c in components.items()}

    def delta(component: str, name: str, **labels: str) -> float:
        return sample_value(after[component], name, labels) - sample_value(before[component], name, labels)

    # RPCs by method and status, with latency.
    assert delta("personal", "grpc_server_handled_total", grpc_service=BOT_RPC, grpc_method="Respond", grpc_code="OK") == 2
    assert delta("personal", "grpc_server_handling_seconds_count", grpc_service=BOT_RPC, grpc_method="Respond") == 2
    assert delta("business", "grpc_server_handled_total", grpc_service=BOT_RPC, grpc_method="Respond", grpc_code="OK") == 1
    assert delta("business", "grpc_server_handled_total", grpc_service=BOT_RPC, grpc_method="Transfer", grpc_code="OK") == 1
    assert (
        delta(
            "business", "grpc_server_handled_total", grpc_service=BOT_RPC, grpc_method="Transfer", grpc_code="FAILED_PRECONDITION"
        )
        == 1
    )
    # Transfers by outcome, on the sending side and at the loop guard.
    assert delta("personal", "mbc_bot_transfers_total", outcome="sent") == 1
    assert delta("personal", "mbc_bot_transfers_total", outcome="taken") == 1
    assert delta("personal", "mbc_bot_transfers_total", outcome="failed") == 0
    assert delta("business", "mbc_bot_transfers_total", outcome="fallback") == 1
    assert delta("business", "mbc_bot_transfers_total", outcome="loop_stopped") == 1
    assert delta("business", "mbc_bot_turns_total", rpc="Transfer", outcome="ANSWERED") == 1
    assert delta("business", "mbc_bot_turns_total", rpc="Respond", outcome="FALLBACK") == 1
    # The router: one Match per consumer message, by decision and rating; participants and index size.
    assert delta("router", "grpc_server_handled_total", grpc_service="mbc.v1.Router", grpc_method="Match", grpc_code="OK") >= 3
    assert delta("router", "mbc_router_matches_total", decision="ACT") >= 2
    assert (
        delta("router", "mbc_router_matches_total", decision="ACT", rating="VERY_GOOD")
        + delta("router", "mbc_router_matches_total", decision="ACT", rating="GOOD")
        >= 2
    )
    assert delta("router", "mbc_router_matches_total", decision="NONE") >= 1
    assert sample_value(after["router"], "mbc_router_participants", {"group": "retail-bank"}) >= 3
    assert sample_value(after["router"], "mbc_router_bots", {"group": "retail-bank"}) >= 3
    assert sample_value(after["router"], "mbc_router_index_phrases", {"group": "retail-bank"}) >= 30
    assert sample_value(after["router"], "mbc_router_index_intents", {"group": "retail-bank"}) >= 10
    # Where a Match's time goes: every Match is scored in a micro-batch on an encoder worker (its
    # encoding may come from the utterance cache: earlier tests sent these messages; the encode
    # stage is checked by the bench smoke test, with utterances never sent before).
    assert delta("router", "mbc_encoder_batch_seconds_count", stage="post") >= 1
    assert delta("router", "mbc_encoder_batch_seconds_sum", stage="post") > 0
    # The store: the conversation's owner read and claimed through it.
    assert (
        delta("store", "grpc_server_handled_total", grpc_service="mbc.v1.ContextStore", grpc_method="ClaimOwner", grpc_code="OK")
        >= 2
    )
    assert (
        delta("store", "grpc_server_handled_total", grpc_service="mbc.v1.ContextStore", grpc_method="GetOwner", grpc_code="OK")
        >= 3
    )


async def test_one_trace_id_follows_a_transfer_through_the_logs(mesh):
    personal, business = mesh.bots["personal-banking"], mesh.bots["business-banking"]
    async with Conversation(personal.address) as chat:
        r = await chat.send("How do I open a business checking account for my LLC?")
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.transfer_id

    # The first hop made the trace id: find it on the sender's transfer line...
    async def sent():
        return [e for e in log_events(personal) if e["event"] == "transfer_sent" and e.get("transfer_id") == r.transfer_id]

    (line,), _ = await eventually(sent, timeout=5)
    trace_id = line["trace_id"]
    assert len(trace_id) == 32 and line["conversation_id"] == chat.conversation_id and line["bot_id"] == "personal-banking"

    # ...then on the router's Match, the receiver's answer and the store's ownership change.
    async def everywhere():
        router = [e for e in log_events(mesh.router) if e.get("trace_id") == trace_id and e["event"] == "matched"]
        receiver = [e for e in log_events(business) if e.get("trace_id") == trace_id and e["event"] == "answered"]
        store = [e for e in log_events(mesh.store) if e.get("trace_id") == trace_id and e["event"] == "owner_claimed"]
        return (router, receiver, store) if router and receiver and store else None

    (router, receiver, store), _ = await eventually(everywhere, timeout=5)
    assert router[0]["asking_bot"] == "personal-banking"
    assert receiver[0]["conversation_id"] == chat.conversation_id and receiver[0]["bot_id"] == "business-banking"
    assert receiver[0]["from_bot"] == "personal-banking"
    assert {e["bot_id"] for e in store} >= {"personal-banking", "business-banking"}
    # Every line of the sender about this message carries the trace id.
    mine = [e for e in log_events(personal) if e.get("conversation_id") == chat.conversation_id]
    assert mine and all(e.get("trace_id") == trace_id for e in mine)


@pytest.mark.parametrize("header", ["x-mbc-trace-id", "traceparent"])
async def test_a_callers_trace_id_is_kept(mesh, header):
    trace_id = tracing.new_trace_id()
    value = trace_id if header == "x-mbc-trace-id" else f"00-{trace_id}-{'1' * 16}-01"
    conversation = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(mesh.bots["cards"].address) as channel:
        r = await bot_pb2_grpc.BotStub(channel).Respond(
            bot_pb2.RespondRequest(conversation_id=conversation, text="I want to open a business account for my company"),
            metadata=[(header, value)],
            timeout=10,
        )
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED

    async def found():
        return all(
            any(e.get("trace_id") == trace_id for e in log_events(c))
            for c in (mesh.bots["cards"], mesh.router, mesh.bots["business-banking"])
        )

    await eventually(found, timeout=5)


async def test_participants_shows_bots_instances_health_and_intents(mesh):
    result = await asyncio.to_thread(run_mbc, "participants", "--etcd", mesh.etcd, "--group", "retail-bank")
    out = result.stdout
    assert "group retail-bank:" in out, result.stderr
    for bot, address in ((b, mesh.bots[b].address) for b in ("personal-banking", "business-banking", "cards")):
        row = next(line for line in out.splitlines() if address in line)
        assert bot in row and "SERVING" in row and "yes" in row
    cards_row = next(line for line in out.splitlines() if mesh.bots["cards"].address in line)
    assert "lost_or_stolen_card" in cards_row

    result = await asyncio.to_thread(run_mbc, "participants", "--etcd", mesh.etcd, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    cards = next(r for r in rows if r["bot_id"] == "cards")
    assert cards["health"] == "SERVING" and cards["group"] == "retail-bank" and "lost_or_stolen_card" in cards["intents"]
    assert result.returncode == (0 if all(r["health"] == "SERVING" for r in rows) else 1)


async def test_chat_in_the_terminal_shows_who_answers_and_every_transfer(mesh):
    lines = (
        "\n".join(
            [
                "what's the balance on my checking account?",
                "How do I open a business checking account for my LLC?",
                "which pizza place delivers the fastest tonight?",
                "/quit",
                "this line is never sent",
            ]
        )
        + "\n"
    )
    result = await asyncio.to_thread(
        run_mbc, "chat", "--entry", mesh.bots["personal-banking"].address, "--store", mesh.store.address, stdin=lines
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "you > what's the balance on my checking account?" in out
    assert "[personal-banking answers: intent check_balance" in out
    assert "transfer personal-banking → business-banking: intent open_business_account" in out
    assert "the conversation now belongs to business-banking" in out
    assert "  business-banking > " in out
    assert "no bot can take this: business-banking's fallback" in out
    assert "never sent" not in out and out.rstrip().endswith("bye")


def test_match_output_is_readable(mesh):
    result = run_mbc("match", "I lost my debit card", "--router", mesh.router.address, "--group", "retail-bank", "-n", "3")
    out = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert out[1].startswith("→ ACT: cards gets the conversation") and "lost_or_stolen_card" in out[1]
    assert out[3].lstrip().startswith("▶ 1 cards") and "GOOD" in out[3] and "lost_or_stolen_card" in out[3]
