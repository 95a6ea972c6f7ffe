"""The Context Session Store over gRPC against a real etcd."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from context_store.core import StoreConfig
from context_store.server import StoreProcess
from mbc.client.context import ContextClient, Scope
from mbc.runtime.config import ServerConfig
from mbc.v1 import common_pb2

pytestmark = pytest.mark.integration

MAX_KEYS = 30


@pytest.fixture(scope="module")
async def store_process(etcd_server):
    process = StoreProcess(
        (etcd_server.endpoint,), ServerConfig(port=0), StoreConfig(max_keys_per_namespace=MAX_KEYS, lease_bucket_seconds=1)
    )
    await process.start()
    yield process
    await process.stop()


@pytest.fixture
async def store(store_process):
    channel = grpc.aio.insecure_channel(store_process.server.address)
    yield ContextClient(channel)
    await channel.close()


@pytest.fixture
async def namespace(store):
    name = "ns-" + uuid.uuid4().hex[:8]
    await store.register_namespace(name, ttl_seconds=3600)
    return name


async def test_values_round_trip_in_every_scope(store, namespace):
    value = {"name": "Sam", "age": 42, "vip": True, "balance": 12.5, "tags": ["a", "b"], "none": None}
    v1 = await store.set(namespace, Scope.CONVERSATION, "conv/1", "profile", value)
    assert await store.get(namespace, Scope.CONVERSATION, "conv/1", "profile") == (value, v1)
    await store.set(namespace, Scope.CONSUMER, "consumer-7", "tier", "gold")
    await store.set(namespace, Scope.GLOBAL, "", "opening_hours", "9-5")
    assert await store.list(namespace, Scope.CONSUMER, "consumer-7") == {"tier": "gold"}
    assert await store.list(namespace, Scope.GLOBAL) == {"opening_hours": "9-5"}
    # Scopes do not leak into each other.
    assert await store.get(namespace, Scope.CONVERSATION, "conv/2", "profile") == (None, 0)
    assert await store.delete(namespace, Scope.CONVERSATION, "conv/1", "profile")
    assert await store.get(namespace, Scope.CONVERSATION, "conv/1", "profile") == (None, 0)


async def test_ttl_expires_per_namespace_without_a_lease_per_key(store, store_process, etcd_client):
    short, long = "short-" + uuid.uuid4().hex[:6], "long-" + uuid.uuid4().hex[:6]
    await store.register_namespace(short, ttl_seconds=1)
    await store.register_namespace(long, ttl_seconds=3600)
    leases_before = store_process.core.leases.live_leases
    await asyncio.gather(*(store.set(short, Scope.CONVERSATION, f"c{i}", "k", i) for i in range(MAX_KEYS - 5)))
    await store.set(long, Scope.CONVERSATION, "c0", "k", "stays")
    # 25 keys, a handful of shared leases at most.
    assert store_process.core.leases.live_leases - leases_before <= 4
    await asyncio.sleep(1.2)
    assert await store.get(short, Scope.CONVERSATION, "c0", "k") == (None, 0)
    assert (await store.get(long, Scope.CONVERSATION, "c0", "k"))[0] == "stays"
    # etcd itself drops the expired keys (the shared lease ran out), not just the reads.
    for _ in range(50):
        if await etcd_client.count_prefix(f"/mbc/v1/context/data/{short}/") == 0:
            break
        await asyncio.sleep(0.1)
    assert await etcd_client.count_prefix(f"/mbc/v1/context/data/{short}/") == 0


async def test_compare_and_set(store, namespace):
    v1 = await store.set(namespace, Scope.CONSUMER, "u1", "counter", 1, expected_version=0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.set(namespace, Scope.CONSUMER, "u1", "counter", 1, expected_version=0)
    assert err.value.code() == grpc.StatusCode.ABORTED
    v2 = await store.set(namespace, Scope.CONSUMER, "u1", "counter", 2, expected_version=v1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.set(namespace, Scope.CONSUMER, "u1", "counter", 3, expected_version=v1)
    assert err.value.code() == grpc.StatusCode.ABORTED and "read it again" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError):
        await store.delete(namespace, Scope.CONSUMER, "u1", "counter", expected_version=v1)
    assert await store.delete(namespace, Scope.CONSUMER, "u1", "counter", expected_version=v2)


async def test_concurrent_increments_lose_nothing(store, namespace):
    await store.set(namespace, Scope.GLOBAL, "", "visits", 0)

    async def increment():
        while True:
            value, version = await store.get(namespace, Scope.GLOBAL, "", "visits")
            try:
                return await store.set(namespace, Scope.GLOBAL, "", "visits", value + 1, expected_version=version)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.ABORTED

    await asyncio.gather(*(increment() for _ in range(12)))
    assert (await store.get(namespace, Scope.GLOBAL, "", "visits"))[0] == 12


@pytest.mark.parametrize(
    "call, code, words",
    [
        (lambda s, ns: s.set("9bad", Scope.GLOBAL, "", "k", 1), grpc.StatusCode.INVALID_ARGUMENT, "namespace '9bad' is invalid"),
        (lambda s, ns: s.set(ns, Scope.GLOBAL, "", "bad key", 1), grpc.StatusCode.INVALID_ARGUMENT, "key 'bad key' is invalid"),
        (lambda s, ns: s.set(ns, Scope.GLOBAL, "x", "k", 1), grpc.StatusCode.INVALID_ARGUMENT, "scope_id must be empty"),
        (
            lambda s, ns: s.set(ns, Scope.CONVERSATION, "", "k", 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "conversation id) is required",
        ),
        (lambda s, ns: s.set(ns, Scope.CONVERSATION, "c" * 300, "k", 1), grpc.StatusCode.INVALID_ARGUMENT, "maximum is 256"),
        (lambda s, ns: s.set(ns, 0, "c", "k", 1), grpc.StatusCode.INVALID_ARGUMENT, "scope must be"),
        (
            lambda s, ns: s.set(ns, Scope.GLOBAL, "", "big", "x" * 900_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the maximum is 800000",
        ),
        (lambda s, ns: s.set("never-registered", Scope.GLOBAL, "", "k", 1), grpc.StatusCode.NOT_FOUND, "RegisterNamespace"),
        (lambda s, ns: s.register_namespace(ns, 0), grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must be at least 1"),
    ],
    ids=[
        "namespace-syntax",
        "key-syntax",
        "global-with-id",
        "missing-id",
        "long-id",
        "no-scope",
        "too-big",
        "unregistered",
        "zero-ttl",
    ],
)
async def test_limits_and_names_are_explained(store, namespace, call, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(store, namespace)
    assert err.value.code() == code
    assert words in err.value.details()
    assert await store.set(namespace, Scope.GLOBAL, "", "still_works", True)


async def test_a_namespace_holds_a_bounded_number_of_keys(store, namespace):
    await asyncio.gather(*(store.set(namespace, Scope.CONVERSATION, f"c{i}", "k", i) for i in range(MAX_KEYS)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.set(namespace, Scope.CONVERSATION, "one-more", "k", 1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Updating an existing key is still fine.
    await store.set(namespace, Scope.CONVERSATION, "c0", "k", "updated")


async def test_exactly_one_concurrent_owner_claim_wins(store):
    conversation = uuid.uuid4().hex
    version = await store.claim_owner(conversation, common_pb2.BotRef(bot_id="a"), 0)
    results = await asyncio.gather(
        *(store.claim_owner(conversation, common_pb2.BotRef(bot_id=f"bot-{i}"), version, transfer_id=f"t{i}") for i in range(5)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, int)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 4
    assert all(e.code() == grpc.StatusCode.ABORTED for e in losers)
    ownership, now = await store.get_owner(conversation)
    assert now == winners[0]
    assert ownership.transfer_id == f"t{results.index(winners[0])}"
