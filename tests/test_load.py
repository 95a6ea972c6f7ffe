"""Sustained load and overload against real processes (the session's example mesh, plus routers
of this module's own settings), over a real etcd.

- Sustained: Match and Respond at a steady rate for two minutes: zero errors, and resident memory
  that stops growing once warmed up (the router's query cache is made small so that it fills
  during the warm-up and evicts for the rest of the run).
- Overload: a router limited to 4 concurrent RPCs, flooded by 48 callers: the excess gets
  RESOURCE_EXHAUSTED at once, the admitted calls keep their latency, and it serves normally after.
The figures are printed (pytest -s); the assertions are generous bounds, not speed targets.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import defaultdict

import grpc
import numpy as np
import pytest

from mbc.bench.loadgen import run_paced
from mbc.runtime.config import EncoderConfig
from mbc.runtime.encoder import Encoder
from mbc.testing.mesh import eventually
from mbc.testing.processes import ComponentProcess
from mbc.v1 import bot_pb2, bot_pb2_grpc, router_pb2, router_pb2_grpc
from meshlib import match
from probes import health, rss_kib

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(600)

WARMUP_SECONDS = 40.0
MEASURED_SECONDS = 100.0
SAMPLE_SECONDS = 4.0
MATCH_RATE = 8.0
RESPOND_RATE = 3.0
"""Rates a loaded 2-core machine sustains: above them calls queue up, and what grows is the queue."""
QUERY_CACHE = 256
GROWTH_BOUND_KIB = 8 * 1024
"""Allowed RSS growth over the last half of the measured window (50 s, ~550 calls). The warm-up
fills the caches (the query cache saturates after 256 distinct utterances) and the allocator's
arenas; measured, the router then moved by +0.1 to +7 MiB over 50 s (arena growth when a latency
spike queued calls) and the bots and the store by less than 1 MiB. A leak of the order of a kept
request or response per call (~10 KiB and more) passes 8 MiB within the window."""
OVERLOAD_LIMIT = 4

RESPOND_TEXTS = [
    "I lost my debit card",
    "my card got declined at the store",
    "How do I open a business account for my LLC?",
    "what's the balance on my checking account?",
    "which pizza place delivers the fastest tonight?",
]


def utterance(i: int) -> str:
    """A distinct consumer-like utterance per i (so each costs the encoder, past the query cache)."""
    topics = ["debit card", "credit limit", "checking account", "business loan", "wire transfer", "mortgage rate", "savings goal"]
    asks = ["what is going on with my", "can you help me with my", "I have a question about the", "tell me more about my"]
    return f"{asks[i % len(asks)]} {topics[(i // len(asks)) % len(topics)]}, reference {i}"


@pytest.fixture(scope="module")
def mesh(example_mesh):
    return example_mesh


@pytest.fixture(scope="module")
async def routers(mesh):
    """Two more routers on the mesh's etcd, started together: `load` with a small query cache,
    `overload` admitting OVERLOAD_LIMIT calls at once."""
    # The torch encoder, on which the bounds below were measured: an admitted call's cost is the
    # scale the refusals and the memory are judged against (the ONNX default makes a call cheaper).
    torch = ["--encoder-backend", "torch"]
    started = {
        "load": ComponentProcess(
            "router-load", ["router", "--etcd", mesh.etcd, "--query-cache", str(QUERY_CACHE), *torch], mesh.workdir
        ),
        "overload": ComponentProcess(
            "router-overload",
            ["router", "--etcd", mesh.etcd, *torch],
            mesh.workdir,
            env={"MBC_ROUTER__SERVER__MAX_CONCURRENT_RPCS": str(OVERLOAD_LIMIT)},
        ),
    }
    try:
        await asyncio.gather(*(r.wait_serving() for r in started.values()))

        async def indexed(router: ComponentProcess):
            r = await match(router.address, "I lost my debit card", group="retail-bank")
            return r.candidates and r.candidates[0].bot_id == "cards"

        for router in started.values():
            await eventually(lambda r=router: indexed(r), timeout=60)
        yield started
    finally:
        for router in started.values():
            router.terminate()


async def test_sustained_load_has_no_errors_and_memory_stops_growing(mesh, routers):
    watched = {
        "router": routers["load"],
        "cards": mesh.bots["cards"],
        "business-banking": mesh.bots["business-banking"],
        "store": mesh.store,
    }
    samples: list[tuple[float, dict[str, int]]] = []
    total = WARMUP_SECONDS + MEASURED_SECONDS
    async with (
        grpc.aio.insecure_channel(routers["load"].address) as router_channel,
        grpc.aio.insecure_channel(mesh.bots["cards"].address) as bot_channel,
    ):
        router = router_pb2_grpc.RouterStub(router_channel)
        bot = bot_pb2_grpc.BotStub(bot_channel)

        def match_call(i: int):
            return router.Match(router_pb2.MatchRequest(text=utterance(i), group="retail-bank"), timeout=30)

        def respond_call(i: int):
            request = bot_pb2.RespondRequest(conversation_id=uuid.uuid4().hex, text=RESPOND_TEXTS[i % len(RESPOND_TEXTS)])
            return bot.Respond(request, timeout=30)

        async def sample_memory():
            start = time.monotonic()
            while time.monotonic() - start < total + SAMPLE_SECONDS / 2:
                samples.append((time.monotonic() - start, {name: rss_kib(p.pid) for name, p in watched.items()}))
                await asyncio.sleep(SAMPLE_SECONDS)

        matches, responds, _ = await asyncio.gather(
            run_paced("Match", match_call, MATCH_RATE, total),
            run_paced("Respond", respond_call, RESPOND_RATE, total),
            sample_memory(),
        )
    for phase in (matches, responds):
        print(
            f"{phase['phase']}: {phase['requests']} calls in {phase['seconds']:.0f}s, statuses {phase['statuses']}, "
            f"p50 {phase['p50_ms']} ms, p99 {phase['p99_ms']} ms, max {phase['max_ms']} ms"
        )
    print("t(s)  " + "  ".join(f"{name:>17}" for name in watched) + "   (RSS, MiB)")
    for t, rss in samples:
        print(f"{t:5.0f} " + "  ".join(f"{rss[name] / 1024:17.1f}" for name in watched))

    assert matches["errors"] == 0 and responds["errors"] == 0, (matches["statuses"], responds["statuses"])
    assert matches["ok"] >= 0.95 * MATCH_RATE * total and responds["ok"] >= 0.95 * RESPOND_RATE * total

    middle = WARMUP_SECONDS + MEASURED_SECONDS / 2
    for name in watched:
        around_middle = [rss[name] for t, rss in samples if abs(t - middle) <= SAMPLE_SECONDS * 1.5]
        at_end = [rss[name] for t, rss in samples[-3:]]
        growth = statistics.median(at_end) - statistics.median(around_middle)
        print(
            f"{name}: RSS growth over the last {MEASURED_SECONDS / 2:.0f}s: {growth / 1024:+.1f} MiB "
            f"(bound {GROWTH_BOUND_KIB / 1024:.0f} MiB)"
        )
        assert growth <= GROWTH_BOUND_KIB, f"{name} kept growing: {growth / 1024:+.1f} MiB over the last half"


async def test_query_and_phrase_caches_are_bounded():
    """The router's caches cannot grow with traffic: both are LRUs of a configured size."""
    encoder = Encoder(EncoderConfig(query_cache_size=8, cache_size=16))
    try:
        for i in range(30):
            await encoder.aencode([utterance(i)])
        await encoder.aencode_phrases([utterance(100 + i) for i in range(40)])
        assert (encoder.cached_queries, encoder.cached_phrases) == (8, 16)
        # The most recent utterances are the ones kept: a repeat of one costs no model call.
        batches, _ = encoder.batch_stats
        await encoder.aencode([utterance(29)])
        assert encoder.batch_stats[0] == batches
    finally:
        encoder.close()


async def _closed_loop(stub, texts: list[str], callers: int, enough_admitted: int = 0) -> dict[str, list[float]]:
    """`callers` callers each sending the next text as soon as their previous call returns (until
    the texts run out, or `enough_admitted` calls were admitted); the latencies (seconds) by status."""
    latencies: dict[str, list[float]] = defaultdict(list)
    queue = iter(texts)

    async def caller() -> None:
        for text in queue:
            if enough_admitted and len(latencies["OK"]) >= enough_admitted:
                return
            started = time.perf_counter()
            try:
                await stub.Match(router_pb2.MatchRequest(text=text, group="retail-bank"), timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if code == "RESOURCE_EXHAUSTED":
                    latencies["details"].append(e.details())
            latencies[code].append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies


def _p50_ms(seconds: list[float]) -> float:
    return float(np.percentile(np.array(seconds) * 1000, 50))


async def test_overload_gets_resource_exhausted_quickly_and_admitted_calls_keep_their_latency(routers):
    overloaded = routers["overload"]
    async with grpc.aio.insecure_channel(overloaded.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        baseline = await _closed_loop(stub, [utterance(10_000 + i) for i in range(80)], OVERLOAD_LIMIT)
        flood = await _closed_loop(stub, [utterance(20_000 + i) for i in range(100_000)], 48, enough_admitted=40)
        after = await _closed_loop(stub, [utterance(30_000 + i) for i in range(40)], OVERLOAD_LIMIT)
    print(
        f"overload (limit {OVERLOAD_LIMIT}): baseline at {OVERLOAD_LIMIT} callers p50 {_p50_ms(baseline['OK']):.1f} ms "
        f"({len(baseline['OK'])} OK); flood by 48 callers: {len(flood['OK'])} admitted, p50 {_p50_ms(flood['OK']):.1f} ms; "
        f"{len(flood['RESOURCE_EXHAUSTED'])} RESOURCE_EXHAUSTED, p50 {_p50_ms(flood['RESOURCE_EXHAUSTED']):.1f} ms; "
        f"after: p50 {_p50_ms(after['OK']):.1f} ms ({len(after['OK'])} OK); message {flood['details'][:1]}"
    )
    assert set(baseline) == {"OK"} and set(after) == {"OK"}, "below the limit every call is admitted"
    assert set(flood) == {"OK", "RESOURCE_EXHAUSTED", "details"}, set(flood)
    # The excess is refused before any work: much faster than an admitted call.
    assert _p50_ms(flood["RESOURCE_EXHAUSTED"]) * 3 < _p50_ms(flood["OK"])
    # Admitted calls keep their latency, within what sharing the two cores with 48 callers that
    # retry without pause costs: 3.6-5.3x the baseline p50 in five runs of 2026-11-29 (110-160 ms
    # against 29-32), with the code of then and of the day before alike. A starved router is
    # far beyond: its admitted calls wait for the flood to end.
    assert _p50_ms(flood["OK"]) <= 5 * _p50_ms(baseline["OK"]) + 50
    assert await health(overloaded.address) == "SERVING"
