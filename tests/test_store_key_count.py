"""The store's per-namespace key limit (StoreConfig.max_keys_per_namespace) against a real etcd, with
two store replicas on the same etcd: the limit refuses the key past it (RESOURCE_EXHAUSTED, the
message it always had), deletes and expiry free room, concurrent writers on both replicas keep
the count right, and a new key costs no count of the namespace's keys (the etcd requests each
replica's client makes are recorded)."""

from __future__ import annotations

import asyncio
import collections
import uuid

import grpc
import pytest

from context_store.core import DATA, StoreConfig
from context_store.server import StoreProcess
from mbc.client.context import ContextClient, Scope
from mbc.runtime.config import ServerConfig

pytestmark = pytest.mark.integration

MAX_KEYS = 12


class Requests:
    """Every etcd request a store replica's EtcdClient makes (all of them go through `_unary`), and
    the prefixes it reads or counts."""

    def __init__(self, etcd) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.prefixes: list[tuple[str, str]] = []
        unary, count_prefix, get_prefix = etcd._unary, etcd.count_prefix, etcd.get_prefix

        async def recorded_unary(op, call):
            self.ops[op] += 1
            return await unary(op, call)

        async def recorded_count(prefix):
            self.prefixes.append(("count_prefix", prefix))
            return await count_prefix(prefix)

        async def recorded_get_prefix(prefix):
            self.prefixes.append(("get_prefix", prefix))
            return await get_prefix(prefix)

        etcd._unary, etcd.count_prefix, etcd.get_prefix = recorded_unary, recorded_count, recorded_get_prefix

    def clear(self) -> None:
        self.ops.clear()
        self.prefixes.clear()


@pytest.fixture(scope="module")
async def replicas(etcd_server):
    processes = [
        StoreProcess(
            (etcd_server.endpoint,), ServerConfig(port=0), StoreConfig(max_keys_per_namespace=MAX_KEYS, lease_bucket_seconds=1)
        )
        for _ in range(2)
    ]
    for process in processes:
        await process.start()
        process.requests = Requests(process.etcd)
    channels = [grpc.aio.insecure_channel(p.server.address) for p in processes]
    yield processes, [ContextClient(c) for c in channels]
    for channel in channels:
        await channel.close()
    for process in processes:
        await process.stop()


async def _namespace(client: ContextClient, ttl: int = 3600) -> str:
    name = "count-" + uuid.uuid4().hex[:8]
    await client.register_namespace(name, ttl_seconds=ttl)
    return name


async def _refused(client: ContextClient, namespace: str, scope_id: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.set(namespace, Scope.CONVERSATION, scope_id, "k", 1)
    return err.value


async def test_the_limit_refuses_the_key_past_it_and_deletes_free_room(replicas, etcd_client):
    processes, (a, b) = replicas
    ns = await _namespace(a)
    await asyncio.gather(*((a if i % 2 else b).set(ns, Scope.CONVERSATION, f"c{i}", "k", i) for i in range(MAX_KEYS)))
    for client in (a, b):
        err = await _refused(client, ns, "one-more")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == f"namespace {ns!r} holds {MAX_KEYS} keys; the maximum is {MAX_KEYS}"
    await b.set(ns, Scope.CONVERSATION, "c0", "k", "updated")  # an existing key is still written
    # A delete on either replica frees room for one key, on either replica.
    assert await a.delete(ns, Scope.CONVERSATION, "c1", "k")
    assert await b.delete(ns, Scope.CONVERSATION, "c2", "k")
    assert not await b.delete(ns, Scope.CONVERSATION, "c2", "k")  # already gone: frees nothing more
    await b.set(ns, Scope.CONVERSATION, "new-1", "k", 1)
    await a.set(ns, Scope.CONVERSATION, "new-2", "k", 1)
    assert (await _refused(a, ns, "new-3")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await etcd_client.count_prefix(f"{DATA}{ns}/") == MAX_KEYS
    for process in processes:
        assert await process.core.key_count(ns) == MAX_KEYS


async def test_concurrent_writers_on_two_replicas_keep_the_count(replicas, etcd_client):
    processes, (a, b) = replicas
    ns = await _namespace(a)
    await a.set(ns, Scope.GLOBAL, "", "first", 0)
    # Twice the limit in creations, racing on both replicas: whatever got in is what is counted.
    results = await asyncio.gather(
        *((a if i % 2 else b).set(ns, Scope.CONVERSATION, f"c{i}", "k", i) for i in range(2 * MAX_KEYS)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), refused
    held = await etcd_client.count_prefix(f"{DATA}{ns}/")
    assert held == 1 + len(results) - len(refused) >= MAX_KEYS
    assert await processes[0].core.key_count(ns) == held
    # Everything deleted, racing on both replicas: the count is back to zero, and the limit is whole again.
    await a.delete(ns, Scope.GLOBAL, "", "first")
    deleted = await asyncio.gather(
        *((b if i % 2 else a).delete(ns, Scope.CONVERSATION, f"c{i}", "k") for i in range(2 * MAX_KEYS))
    )
    assert sum(deleted) == held - 1
    assert await processes[1].core.key_count(ns) == 0 == await etcd_client.count_prefix(f"{DATA}{ns}/")
    for i in range(MAX_KEYS):
        await (a if i % 2 else b).set(ns, Scope.CONSUMER, f"u{i}", "k", i)
    assert (await _refused(b, ns, "late")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_new_key_costs_no_count_of_the_namespace(replicas):
    processes, (a, b) = replicas
    ns = await _namespace(a)
    await a.set(ns, Scope.GLOBAL, "", "first", 0)
    await b.set(ns, Scope.GLOBAL, "", "second", 0)
    for process in processes:
        process.requests.clear()
    creates = MAX_KEYS - 2
    for i in range(creates):  # one at a time: no retry inflates the numbers
        await (a if i % 2 else b).set(ns, Scope.CONVERSATION, f"c{i}", "k", i)
    await a.delete(ns, Scope.CONVERSATION, "c1", "k")
    await b.delete(ns, Scope.CONVERSATION, "c0", "k")
    ops = sum((p.requests.ops for p in processes), collections.Counter())
    prefixes = [entry for p in processes for entry in p.requests.prefixes]
    # No count over the namespace's keys, nor any read of them, per write.
    assert not [entry for entry in prefixes if entry[0] == "count_prefix" or entry[1].startswith(DATA)], prefixes
    assert ops["count"] == 0, ops
    # A bounded number of requests per write: the key, the namespace's counter, one transaction
    # (and a lease now and then), whatever the number of keys.
    writes = creates + 2
    assert ops["txn"] == writes and ops["get"] == writes, ops
    assert sum(ops.values()) <= 4 * writes, ops


async def test_expired_keys_free_room(replicas, etcd_client):
    processes, (a, b) = replicas
    ns = await _namespace(a, ttl=1)
    await asyncio.gather(*(a.set(ns, Scope.CONVERSATION, f"c{i}", "k", i) for i in range(MAX_KEYS)))
    assert (await _refused(b, ns, "more")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # etcd drops the keys when their shared lease runs out (no store call counts that).
    for _ in range(60):
        if await etcd_client.count_prefix(f"{DATA}{ns}/") == 0:
            break
        await asyncio.sleep(0.1)
    assert await etcd_client.count_prefix(f"{DATA}{ns}/") == 0
    await asyncio.sleep(1.1)  # past the last recount's bucket (StoreConfig.lease_bucket_seconds)
    await b.set(ns, Scope.CONVERSATION, "after", "k", 1)
    await asyncio.gather(*(a.set(ns, Scope.CONSUMER, f"u{i}", "k", i) for i in range(MAX_KEYS - 1)))
    assert (await _refused(a, ns, "more")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
