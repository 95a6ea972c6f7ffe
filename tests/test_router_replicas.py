"""Router replicas (issue 15): routers register in etcd, and bots call every live replica through
gRPC's round_robin with client-side health checking (mbc/runtime/channels.py, discovery/routers.py).

One mesh of real processes: etcd, the store, three routers and the example bots, which find the
routers in etcd. A steady stream of Respond, each message handed over from the entry bot to cards
(a Match on some replica, then a Transfer), runs while the tests kill, add, drain and stop replicas.
A Match that failed would show as the entry bot's own answer instead of cards'.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from bot_server.bot import Bot
from discovery import EtcdClient
from discovery.routers import list_routers
from mbc import __version__
from mbc.runtime.config import RouterConfig, ServerConfig
from mbc.runtime.metrics import sample_value
from mbc.testing.mesh import EXAMPLE_BOTS, eventually, start_local
from mbc.testing.processes import ComponentProcess
from meshlib import LEASE_TTL, match, respond
from router.calibration import generic_none
from router.server import RouterProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ROUTER_TTL = 3
"""The routers' lease TTL here: a killed replica's record is gone within seconds."""
SLACK = 3.0
"""Seconds beyond the TTL a vanishing record may take on a loaded machine (etcd expires leases late)."""
TEXT = "I lost my debit card"
"""Sent to the entry bot (personal-banking): the router's answer is cards, which replies."""
HANDLED = "grpc_server_handled_total"
MATCH_OK = {"grpc_service": "mbc.v1.Router", "grpc_method": "Match", "grpc_code": "OK"}


@pytest.fixture(scope="module")
async def mesh(own_etcd, tmp_path_factory):
    async with start_local(
        EXAMPLE_BOTS,
        workdir=tmp_path_factory.mktemp("replicas"),
        etcd=own_etcd.endpoint,
        lease_ttl=LEASE_TTL,
        routers=3,
        # No embedding or heads cache: the replicas start cold, and share that work.
        router_env={"MBC_ROUTER__LEASE_TTL_SECONDS": str(ROUTER_TTL), "MBC_ROUTER__EMBEDDING_CACHE_DIR": "off"},
        start_timeout=600,  # seven processes loading models on a shared machine
        index_timeout=300,
    ) as mesh:
        yield mesh


@pytest.fixture
async def etcd(own_etcd):
    async with EtcdClient([own_etcd.endpoint]) as client:
        yield client


def router_metric(router: ComponentProcess, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://{router.metrics_address}/metrics", timeout=10) as r:
        return sample_value(r.read().decode(), name, labels)


def matches_of(router: ComponentProcess) -> float:
    """Match calls a router process answered OK, read from its /metrics."""
    return router_metric(router, HANDLED, MATCH_OK)


def matches_in_process() -> float:
    """Match calls answered OK by the router running in this test process."""
    return REGISTRY.get_sample_value(HANDLED, MATCH_OK) or 0.0


async def answered_by(entry: str, text: str = TEXT) -> str:
    """The bot that answered `text` on a new conversation started at `entry`; "error: CODE" on a failure."""
    try:
        response = await respond(entry, text, timeout=10)
    except Exception as e:  # noqa: BLE001 - counted by the tests
        return f"error: {type(e).__name__}: {e}"[:300]
    return response.replies[-1].bot_id if response.replies else "no reply"


async def stream(entry: str, seconds: float, concurrency: int = 6) -> Counter[str]:
    """Who answered each of the messages sent by `concurrency` conversations in a row for `seconds`."""
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def conversation() -> None:
        while time.monotonic() < deadline:
            answers[await answered_by(entry)] += 1

    await asyncio.gather(*(conversation() for _ in range(concurrency)))
    return answers


async def registered(etcd: EtcdClient) -> dict[str, str]:
    """address -> version of every registered router."""
    return {r.address: r.version for r in await list_routers(etcd)}


async def test_every_replica_registers_and_gets_matches(mesh, etcd):
    assert await registered(etcd) == {r.address: __version__ for r in mesh.routers}
    before = [matches_of(r) for r in mesh.routers]
    answers = await stream(mesh.describe()["entry"], 6)
    assert set(answers) == {"cards"}, answers
    after = [matches_of(r) for r in mesh.routers]
    assert all(a > b for a, b in zip(after, before)), f"Match calls per replica before {before}, after {after}"


async def test_replicas_share_the_work_of_becoming_ready(mesh):
    """Started at once with empty caches, the three replicas split the phrases to embed and the
    group's heads to train (router/peers.py) instead of each doing all of it, and agree."""
    distinct = {p for path in EXAMPLE_BOTS for i in Bot.from_file(path).definition.intents for p in i.phrases}
    generic = len(generic_none())  # embedded by every replica before it knows the others
    here = [router_metric(r, "mbc_router_phrases_embedded_total", {"source": "here"}) - generic for r in mesh.routers]
    fetched = [router_metric(r, "mbc_router_phrases_embedded_total", {"source": "peer"}) for r in mesh.routers]
    print(f"\nphrases embedded here {here}, fetched from a peer {fetched}, distinct {len(distinct)}")
    assert sum(here) < 2 * len(distinct), f"embedded {here} of {len(distinct)} distinct phrases: the work was not shared"
    assert all(n > 0 for n in fetched), fetched
    builds = {
        how: sum(router_metric(r, "mbc_router_group_builds_total", {"how": how}) for r in mesh.routers)
        for how in ("retrained", "fetched")
    }
    assert builds["fetched"] >= 1 and builds["retrained"] <= 2, builds
    answers = [await match(r.address, "my card was declined at the shop", max_candidates=3) for r in mesh.routers]
    assert len({tuple((c.bot_id, c.intent, round(c.confidence, 5)) for c in a.candidates) for a in answers}) == 1, answers


async def test_a_killed_replica_costs_no_respond_and_leaves_etcd(mesh, etcd):
    entry = mesh.describe()["entry"]
    victim = mesh.routers[1]
    traffic = asyncio.create_task(stream(entry, 20))
    await asyncio.sleep(5)
    victim.kill()  # SIGKILL under the steady stream
    killed = time.monotonic()
    await eventually(
        lambda: _absent(etcd, victim.address), timeout=ROUTER_TTL + SLACK + 10, interval=0.2, what="killed router's record gone"
    )
    gone_after = time.monotonic() - killed
    answers = await traffic
    print(f"\nrouter kill: answers {dict(answers)}, record gone {gone_after:.1f}s after SIGKILL (ttl {ROUTER_TTL}s)")
    assert set(answers) == {"cards"}, f"answers during the kill: {answers}"
    assert sum(answers.values()) >= 20, answers
    assert gone_after <= ROUTER_TTL + SLACK, f"record gone {gone_after:.1f}s after SIGKILL (ttl {ROUTER_TTL}s)"


async def _absent(etcd: EtcdClient, address: str) -> bool:
    return address not in await registered(etcd)


async def test_a_new_replica_gets_traffic_and_a_not_serving_one_none(mesh, etcd, tmp_path):
    entry = mesh.describe()["entry"]
    config = RouterConfig(
        etcd_endpoints=(mesh.etcd,),
        server=ServerConfig(port=0, metrics_port=-1),
        embedding_cache_dir=str(tmp_path / "embeddings"),
        router_id="in-process",
        lease_ttl_seconds=ROUTER_TTL,
    )
    router = RouterProcess(config)
    await router.start()
    try:
        await router.core.wait_ready()
        await eventually(lambda: _present(etcd, router.server.address), timeout=10, what="new router registered")
        start = matches_in_process()
        answers = await stream(entry, 8)
        assert set(answers) == {"cards"}, answers
        assert matches_in_process() - start >= 3, "the new replica got no Match"

        await router.server.set_serving(False)  # as while it warms up or drains: still registered, still listening
        await asyncio.sleep(1.0)  # the bots' health watches hear of it
        start = matches_in_process()
        answers = await stream(entry, 6)
        assert set(answers) == {"cards"}, answers
        assert matches_in_process() == start, "a NOT_SERVING replica got Match calls"

        await router.server.set_serving(True)
        await asyncio.sleep(1.0)
        start = matches_in_process()
        await stream(entry, 6)
        assert matches_in_process() > start, "the replica serving again got no Match"
    finally:
        await router.stop()
    assert await _absent(etcd, router.server.address), "a router stopped cleanly must leave etcd at once"


async def _present(etcd: EtcdClient, address: str) -> bool:
    return address in await registered(etcd)


async def test_a_replica_stopped_cleanly_leaves_etcd_at_once(mesh, etcd):
    router = mesh.routers[2]
    assert await _present(etcd, router.address)
    assert await asyncio.to_thread(router.terminate) == 0
    assert await _absent(etcd, router.address), "record still there after a clean stop"
    answers = await stream(mesh.describe()["entry"], 4)
    assert set(answers) == {"cards"}, answers
