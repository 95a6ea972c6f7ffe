"""A 3-member etcd cluster on loopback under a mesh of real processes: with a follower stopped, and
then with the leader killed (2 of 3 members left, quorum holds), Match and a transfer keep
working, leases keep being renewed, and a bot that joins while the leader is down is routed to."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from discovery import PARTICIPANTS_PREFIX, EtcdClient
from mbc.testing.etcd import LocalEtcdCluster
from mbc.testing.mesh import EXAMPLE_PROBES, EXAMPLES, LocalMesh, eventually
from mbc.v1 import bot_pb2
from meshlib import LEASE_TTL, match, respond

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(600)

FIRST_ENDPOINT = {"router": 0, "store": 1, "personal-banking": 2, "cards": 1, "business-banking": 0}
"""Which member each component talks to first: whichever member stops, some component loses its
connection and must fail over."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalEtcdCluster(3, tmp_path_factory.mktemp("etcd-cluster")) as cluster:
        yield cluster


def endpoints_from(cluster: LocalEtcdCluster, first: int) -> str:
    endpoints = cluster.endpoints
    return ",".join(endpoints[first:] + endpoints[:first])


@pytest_asyncio.fixture(scope="module")
async def cluster_mesh(cluster, tmp_path_factory):
    # A later --etcd overrides the first one: each component gets the cluster in its own order.
    mesh = LocalMesh(
        tmp_path_factory.mktemp("cluster-mesh"),
        endpoints_from(cluster, 0),
        etcd_flags=lambda name: ["--etcd", endpoints_from(cluster, FIRST_ENDPOINT[name])],
        lease_ttl=LEASE_TTL,
    )
    try:
        await asyncio.gather(mesh.start_store(), mesh.start_router())
        await asyncio.gather(
            mesh.start_bot(EXAMPLES / "personal_banking.yaml", "personal-banking"),
            mesh.start_bot(EXAMPLES / "cards.yaml", "cards"),
        )
        await mesh.wait_indexed(("personal-banking", "cards"), timeout=120)
        yield mesh
    finally:
        mesh.stop()


async def registered_bots(cluster: LocalEtcdCluster) -> list[str]:
    async with EtcdClient(cluster.endpoints, timeout=3.0) as etcd:
        items, _ = await etcd.get_prefix(PARTICIPANTS_PREFIX)
    return sorted(kv.key.split("/")[-2] for kv in items)


async def transfer_works(mesh: LocalMesh) -> bool:
    """A consumer message to personal-banking that only cards can answer: a Match, then a Transfer."""
    try:
        r = await respond(mesh.bots["personal-banking"].address, "I lost my debit card", timeout=20)
    except Exception:
        return False
    return r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.replies[-1].bot_id == "cards"


async def assert_mesh_keeps_working(cluster: LocalEtcdCluster, mesh: LocalMesh, bots: list[str]) -> float:
    """Seconds until a transfer worked again; then three more in a row, and registrations that
    outlive twice their lease TTL (so their leases are being renewed)."""
    _, recovered = await eventually(lambda: transfer_works(mesh), timeout=90, interval=1.0)
    for _ in range(3):
        assert await transfer_works(mesh)
    await asyncio.sleep(2 * LEASE_TTL)
    assert await registered_bots(cluster) == sorted(bots)
    r = await match(mesh.router.address, EXAMPLE_PROBES["cards"], group="retail-bank")
    assert r.candidates[0].bot_id == "cards"
    return recovered


async def test_cluster_elects_one_leader_and_serves_on_every_member(cluster, cluster_mesh):
    leader = cluster.leader()
    assert sum(m.is_leader() for m in cluster.members) == 1 and leader.running
    for member in cluster.members:  # every member has the registrations (replicated)
        async with EtcdClient([member.endpoint], timeout=3.0) as etcd:
            items, _ = await etcd.get_prefix(PARTICIPANTS_PREFIX)
        assert sorted(kv.key.split("/")[-2] for kv in items) == ["cards", "personal-banking"]


async def test_mesh_keeps_working_while_a_follower_is_stopped(cluster, cluster_mesh):
    follower = cluster.followers()[0]
    follower.stop()
    try:
        seconds = await assert_mesh_keeps_working(cluster, cluster_mesh, ["cards", "personal-banking"])
        print(f"follower {follower.name} stopped: transfers worked again after {seconds:.1f}s")
    finally:
        follower.start()  # waits until it is healthy again, caught up with the others
    assert all(m.running for m in cluster.members)


async def test_mesh_keeps_working_when_the_leader_is_killed(cluster, cluster_mesh):
    leader = cluster.leader()
    leader.kill()
    started = time.monotonic()
    try:
        new_leader = await asyncio.to_thread(cluster.leader, 60.0)
        assert new_leader is not leader
        print(f"leader {leader.name} killed: {new_leader.name} leads after {time.monotonic() - started:.1f}s")
        seconds = await assert_mesh_keeps_working(cluster, cluster_mesh, ["cards", "personal-banking"])
        print(f"transfers worked again after {seconds:.1f}s")
        # A bot joins while the old leader is still down: it registers and the router routes to it.
        await cluster_mesh.start_bot(EXAMPLES / "business_banking.yaml", "business-banking")
        await cluster_mesh.wait_indexed(("business-banking",), timeout=120)
        await assert_mesh_keeps_working(cluster, cluster_mesh, ["business-banking", "cards", "personal-banking"])
    finally:
        leader.start()
    assert len({m.name for m in cluster.members if m.is_leader()}) <= 1
