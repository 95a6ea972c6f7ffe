"""etcd used at scale, against real etcd processes: instance records without phrases joined with
their bot's definition, lists read in pages, one keep-alive stream per client, one lease shared by
a process's registrations, clients spread over a cluster, auto-compaction and the backend quota."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery import (
    DEFINITIONS_PREFIX,
    PARTICIPANTS_PREFIX,
    DefinitionError,
    EtcdClient,
    ParticipantSnapshot,
    ParticipantWatcher,
    Registration,
    RegistrationConflict,
    definition_key,
    participant_key,
)
from discovery.errors import EtcdLimitExceeded, RevisionCompacted
from discovery.leases import LeasedKey, LeaseKeeper
from mbc.cli.main import run_component
from mbc.testing.etcd import EtcdServerLimits, LocalEtcd, LocalEtcdCluster
from mbc.testing.mesh import EXAMPLE_BOTS, EXAMPLE_GROUP, LocalMesh, eventually
from mbc.v1 import participant_pb2
from router.directory import Directory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def bot(group: str, bot_id: str, instance_id: str = "i1", intents: int = 1, phrases: int = 1) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        group=group,
        bot_id=bot_id,
        instance_id=instance_id,
        address=f"127.0.0.1:{50100 + len(instance_id)}",
        collaboration=True,
        display_name=f"{bot_id} desk",
        definition_version="v1",
        software_version="test",
        intents=[
            participant_pb2.Intent(
                name=f"intent_{i}", phrases=[f"please help me with topic {i} in the way number {j}" for j in range(phrases)]
            )
            for i in range(intents)
        ],
    )


@pytest.fixture
async def group(etcd_client: EtcdClient) -> AsyncIterator[str]:
    name = f"s-{uuid.uuid4().hex[:12]}"
    yield name
    await etcd_client.delete_prefix(f"{DEFINITIONS_PREFIX}{name}/")
    await etcd_client.delete_prefix(f"{PARTICIPANTS_PREFIX}{name}/")


class Latest:
    def __init__(self) -> None:
        self.snapshot = ParticipantSnapshot()

    def __call__(self, snapshot: ParticipantSnapshot) -> None:
        self.snapshot = snapshot


async def watch(client: EtcdClient, group: str) -> tuple[ParticipantWatcher, Latest]:
    latest = Latest()
    watcher = ParticipantWatcher(client, latest, prefix=f"{PARTICIPANTS_PREFIX}{group}/")
    watcher.start()
    await watcher.wait_ready(10)
    return watcher, latest


# --- the instance key holds only what an instance adds --------------------------------------------


async def test_three_instances_of_a_large_bot_have_small_keys_and_the_router_sees_every_intent(etcd_client, group):
    registrations = [Registration(etcd_client, bot(group, "big", f"i{n}", intents=300, phrases=10), ttl=10) for n in range(3)]
    for registration in registrations:
        await registration.start()
    watcher, latest = await watch(etcd_client, group)
    try:
        instances, _ = await etcd_client.get_prefix(f"{PARTICIPANTS_PREFIX}{group}/")
        assert len(instances) == 3
        assert all(len(kv.value) < 1024 for kv in instances), [len(kv.value) for kv in instances]
        definition = await etcd_client.get(definition_key(group, "big"))
        assert definition is not None and len(definition.value) > 100_000  # the phrases, written once

        await eventually(lambda: len(latest.snapshot.participants) == 3, 10, what="three instances joined")
        for key, participant in latest.snapshot.participants.items():
            assert participant.address and participant.instance_id == key.rsplit("/", 1)[1]
            assert len(participant.intents) == 300 and sum(len(i.phrases) for i in participant.intents) == 3000
            assert participant.display_name == "big desk" and participant.collaboration
        # What the router builds from the snapshot: every intent of the bot is a candidate, and
        # the bot has its three instances.
        directory = Directory.from_participants(
            latest.snapshot.participants, latest.snapshot.revision, definitions=latest.snapshot.definitions
        )
        assert len(directory.candidates_of(group)) == 300
        entry = directory.find_bot("big", group)
        assert entry is not None and len(entry.instances) == 3
    finally:
        await watcher.stop()
        for registration in registrations:
            await registration.stop()


async def test_an_old_style_record_with_intents_is_still_routed(etcd_client, group):
    """A rolling upgrade: an instance of the previous version put its whole Participant under its
    instance key and wrote no definition; routers keep routing to it."""
    old = bot(group, "legacy", intents=2, phrases=3)
    await etcd_client.put(participant_key(group, "legacy", "i1"), old.SerializeToString())
    watcher, latest = await watch(etcd_client, group)
    try:
        (participant,) = latest.snapshot.participants.values()
        assert [i.name for i in participant.intents] == ["intent_0", "intent_1"]
    finally:
        await watcher.stop()


async def test_an_instance_waits_for_its_definition(etcd_client, group):
    """A record without intents whose definition is not in etcd (not written yet, or forgotten) is
    not routed to: it is reported invalid until its definition arrives, then joined with it."""
    full = bot(group, "late", intents=4)
    record = participant_pb2.Participant(
        group=group, bot_id="late", instance_id="i1", address="127.0.0.1:50999", definition_version="v1"
    )
    key = participant_key(group, "late", "i1")
    await etcd_client.put(key, record.SerializeToString())
    watcher, latest = await watch(etcd_client, group)
    try:
        assert key not in latest.snapshot.participants
        assert "no definition of bot 'late'" in latest.snapshot.invalid[key]
        definition = participant_pb2.Participant()
        definition.CopyFrom(full)
        definition.ClearField("instance_id")
        definition.ClearField("address")
        await etcd_client.put(definition_key(group, "late"), definition.SerializeToString())
        await eventually(lambda: key in latest.snapshot.participants, 10, what="joined once the definition arrived")
        assert len(latest.snapshot.participants[key].intents) == 4
        assert latest.snapshot.participants[key].address == "127.0.0.1:50999"
        assert key not in latest.snapshot.invalid
        await etcd_client.delete(definition_key(group, "late"))
        await eventually(lambda: key not in latest.snapshot.participants, 10, what="dropped with its definition")
    finally:
        await watcher.stop()


def test_an_oversized_instance_record_is_refused_at_registration():
    huge = bot("g", "cards")
    huge.address = "h" * 5000 + ":1"
    with pytest.raises(DefinitionError, match="instance record of cards@g/i1 is .* bytes serialized; the maximum is 4096"):
        Registration(None, huge)  # type: ignore[arg-type]


async def test_a_request_over_etcds_limit_gets_a_clear_error(etcd_client, group):
    with pytest.raises(EtcdLimitExceeded, match="max-request-bytes"):
        await etcd_client.put(f"{DEFINITIONS_PREFIX}{group}/huge", b"x" * (3 * 1024 * 1024))


# --- lists in pages ---------------------------------------------------------------------------------


async def test_lists_are_read_in_pages_smaller_than_the_number_of_keys(etcd_server, group):
    client = EtcdClient([etcd_server.endpoint], timeout=5.0, page_size=7)
    await client.connect()
    registrations = []
    try:
        for n in range(20):
            registrations.append(Registration(client, bot(group, f"bot{n}", intents=2), ttl=10))
        await asyncio.gather(*(r.start() for r in registrations))
        before = client.pages_read
        (instances, definitions), revision = await client.get_prefixes(
            [f"{PARTICIPANTS_PREFIX}{group}/", f"{DEFINITIONS_PREFIX}{group}/"]
        )
        assert len(instances) == 20 and len(definitions) == 20
        assert len({kv.key for kv in instances}) == 20  # no key twice across pages
        assert client.pages_read - before >= 6  # 20 keys in pages of 7, twice
        assert revision >= max(kv.mod_revision for kv in instances + definitions)
        watcher, latest = await watch(client, group)
        try:
            assert len(latest.snapshot.participants) == 20
            assert all(len(p.intents) == 2 for p in latest.snapshot.participants.values())
        finally:
            await watcher.stop()
    finally:
        await asyncio.gather(*(r.stop() for r in registrations))
        await client.close()


async def test_a_list_over_the_receive_limit_is_read_in_smaller_pages():
    """70 values of 1 MiB: one Range of them is over the client's 64 MiB receive limit (etcd
    answers RESOURCE_EXHAUSTED), so the pages shrink until they fit."""
    with LocalEtcd() as server:
        async with EtcdClient([server.endpoint], timeout=30.0) as client:
            for n in range(70):
                await client.put(f"/big/{n:03d}", bytes([n]) * (1024 * 1024))
            items, _ = await client.get_prefix("/big/")
            assert client.pages_read >= 3  # no page of more than 64 values fits
            assert [kv.key for kv in items] == [f"/big/{n:03d}" for n in range(70)]
            assert all(kv.value == bytes([n]) * (1024 * 1024) for n, kv in enumerate(items))


def test_a_registration_too_large_stops_a_component_with_a_message():
    async def start() -> None:
        huge = bot("g", "cards")
        huge.address = "h" * 5000 + ":1"
        Registration(None, huge)  # type: ignore[arg-type]

    with pytest.raises(SystemExit, match="mbc bot: cannot register: instance record of cards@g/i1 is"):
        run_component("bot", start())


# --- keep-alive: one stream per client, one lease per process -------------------------------------


async def test_one_keepalive_stream_per_client():
    """20 registrations, each with its own lease, refreshed several times: etcd (of this test
    alone) sees one LeaseKeepAlive stream opened, and every refresh goes over it."""
    method = 'grpc_method="LeaseKeepAlive"'
    with LocalEtcd() as server:
        client = EtcdClient([server.endpoint], timeout=5.0)
        await client.connect()
        registrations = [Registration(client, bot("keepalive", f"bot{n}"), ttl=3) for n in range(20)]
        try:
            await asyncio.gather(*(r.start() for r in registrations))
            await asyncio.sleep(3.5)  # about three refreshes of each lease (every ttl/3)
            assert all(r.registered for r in registrations)
            assert server.metric("grpc_server_msg_received_total", method) >= 40
            assert server.metric("grpc_server_started_total", method) == 1
            assert client.keepalive_streams_opened == 1
        finally:
            await asyncio.gather(*(r.stop() for r in registrations))
            await client.close()


_HOST = textwrap.dedent(
    """
    import asyncio, sys
    from discovery import EtcdClient, Registration
    from discovery.leases import LeaseKeeper
    from mbc.v1 import participant_pb2

    async def main(endpoint, group, count):
        client = EtcdClient([endpoint], timeout=5.0)
        keeper = LeaseKeeper(client, ttl=3, name="host")
        for n in range(count):
            p = participant_pb2.Participant(group=group, bot_id=f"bot{n}", instance_id="i1", address=f"127.0.0.1:{40000 + n}",
                intents=[participant_pb2.Intent(name="greet", phrases=["hello"])])
            await Registration(client, p, lease=keeper).start()
        print("ready", keeper.lease_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_a_host_keeps_one_lease_for_all_its_bots_and_loses_them_all_when_killed(etcd_server, etcd_client, group):
    count = 60
    host = subprocess.Popen(
        [sys.executable, "-c", _HOST, etcd_server.endpoint, group, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(host.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.startswith(b"ready"), line
        lease = int(line.split()[1])
        await asyncio.sleep(2.5)  # past a refresh of the lease
        items, _ = await etcd_client.get_prefix(f"{PARTICIPANTS_PREFIX}{group}/")
        assert len(items) == count
        assert {kv.lease for kv in items} == {lease}
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        killed = time.monotonic()

        async def gone() -> bool:
            return await etcd_client.count_prefix(f"{PARTICIPANTS_PREFIX}{group}/") == 0

        await eventually(gone, 3 + 2.0, 0.1, what="all keys gone within the TTL")
        assert time.monotonic() - killed <= 3 + 2.0
        definitions, _ = await etcd_client.get_prefix(f"{DEFINITIONS_PREFIX}{group}/")
        assert len(definitions) == count  # the bots are absent, not forgotten
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


async def test_a_bot_host_keeps_one_lease_for_its_bots_and_they_leave_together_when_killed(own_etcd, tmp_path):
    """`mbc bot` hosting the three example bots: one lease holds the three instance keys; SIGKILL
    drops all three within the TTL."""
    ttl = 3
    mesh = LocalMesh(tmp_path, own_etcd.endpoint, lease_ttl=ttl)
    prefix = f"{PARTICIPANTS_PREFIX}{EXAMPLE_GROUP}/"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nowhere = s.getsockname()[1]  # no router: registering needs none
        host = await mesh.start_host(EXAMPLE_BOTS, "lease-host", "--router", f"127.0.0.1:{nowhere}")
        async with EtcdClient([own_etcd.endpoint], timeout=5.0) as etcd:

            async def registered() -> list | None:
                items, _ = await etcd.get_prefix(prefix)
                return items if len(items) == len(EXAMPLE_BOTS) else None

            items, _ = await eventually(registered, 30, 0.2, what="the host's bots registered")
            assert len({kv.lease for kv in items}) == 1, [kv.lease for kv in items]
            host.kill()
            killed = time.monotonic()

            async def gone() -> bool:
                return await etcd.count_prefix(prefix) == 0

            await eventually(gone, ttl + 2.0, 0.1, what="every bot of the killed host gone")
            assert time.monotonic() - killed <= ttl + 2.0
    finally:
        mesh.stop()


async def test_a_lost_shared_lease_is_replaced_and_every_key_put_again(etcd_client, group, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    keeper = LeaseKeeper(etcd_client, ttl=3, name="shared")
    keys = [LeasedKey(keeper, f"{PARTICIPANTS_PREFIX}{group}/k{n}/i1", f"v{n}".encode()) for n in range(10)]
    try:
        for key in keys:
            await key.start()
        first = keeper.lease_id
        assert first is not None
        await etcd_client.revoke_lease(first)  # as if etcd had been away for longer than the TTL

        async def all_back() -> bool:
            items, _ = await etcd_client.get_prefix(f"{PARTICIPANTS_PREFIX}{group}/")
            return len(items) == 10 and {kv.lease for kv in items} == {keeper.lease_id} and keeper.lease_id != first

        await eventually(all_back, 10, 0.1, what="every key back under one new lease")
        assert all(key.registered for key in keys)
    finally:
        await keeper.stop()
    assert await etcd_client.count_prefix(f"{PARTICIPANTS_PREFIX}{group}/") == 0  # revoked with the lease


async def test_a_shared_lease_never_overwrites_a_key_another_lease_holds(etcd_client, group):
    key = f"{PARTICIPANTS_PREFIX}{group}/taken/i1"
    other = await etcd_client.grant_lease(2)
    await etcd_client.put(key, b"theirs", other)
    keeper = LeaseKeeper(etcd_client, ttl=3, name="shared")
    mine = LeasedKey(keeper, key, b"mine")
    try:
        waiting = asyncio.create_task(mine.start())
        await asyncio.sleep(1.0)
        await etcd_client.refresh_lease(other)  # the other holder is alive: it keeps the key
        await asyncio.sleep(1.0)
        await etcd_client.refresh_lease(other)
        with pytest.raises(RegistrationConflict):
            await asyncio.wait_for(waiting, 10)
        kv = await etcd_client.get(key)
        assert kv is not None and kv.value == b"theirs"
    finally:
        await keeper.stop()
        await etcd_client.revoke_lease(other)


async def test_a_stopped_key_leaves_the_shared_lease_and_the_others_stay(etcd_client, group):
    keeper = LeaseKeeper(etcd_client, ttl=3, name="shared")
    registrations = [Registration(etcd_client, bot(group, f"bot{n}"), lease=keeper) for n in range(3)]
    try:
        for registration in registrations:
            await registration.start()
        await registrations[0].stop()
        assert await etcd_client.get(registrations[0].key) is None  # at once, not when the lease expires
        await asyncio.sleep(2.0)
        assert all([await etcd_client.get(r.key) is not None for r in registrations[1:]])
        assert keeper.lease_id is not None and keeper.keys == [r.key for r in registrations[1:]]
    finally:
        await keeper.stop()


# --- endpoints spread over a cluster's members --------------------------------------------------


async def test_clients_spread_over_the_members_of_a_cluster():
    with LocalEtcdCluster(3) as cluster:
        clients = [EtcdClient(cluster.endpoints, timeout=5.0) for _ in range(12)]
        try:
            for client in clients:
                await client.connect()
                await client.put("/spread/x", b"1")
            used = {client.endpoint for client in clients}
            assert len(used) >= 2, used  # each starts at a random member (all on one: 3 * 3**-12)
            served = [m.metric("grpc_server_handled_total", 'grpc_method="Put"') for m in cluster.members]
            assert sum(1 for count in served if count > 0) >= 2, served
            # The member a client uses stops: its requests go to another member.
            victim = next(m for m in cluster.members if m.endpoint == clients[0].endpoint)
            victim.stop()
            await clients[0].put("/spread/y", b"2")
            assert clients[0].endpoint != victim.endpoint
        finally:
            for client in clients:
                await client.close()


# --- auto-compaction and quota ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compacting_etcd():
    """An etcd that keeps one second of history (the harness default keeps five minutes)."""
    with LocalEtcd(limits=EtcdServerLimits(compaction_retention="1s")) as server:
        yield server


def test_the_harness_etcd_runs_with_compaction_and_a_quota(etcd_server):
    assert etcd_server.metric("etcd_server_quota_backend_bytes") == EtcdServerLimits().quota_backend_bytes


async def test_old_revisions_are_compacted_after_writes(compacting_etcd):
    async with EtcdClient([compacting_etcd.endpoint], timeout=5.0) as client:
        first = await client.put("/history/k", b"old")
        for n in range(20):
            await client.put("/history/k", str(n).encode())

        async def compacted() -> bool:
            await client.put("/history/k", b"tick")
            try:
                await client.get_at("/history/k", first)
            except RevisionCompacted:
                return True
            return False

        await eventually(compacted, 30, 0.5, what="the first revision compacted by etcd itself")


async def test_the_watcher_survives_an_auto_compaction(compacting_etcd, caplog):
    """Changes land between the watcher's list and its watch, and etcd's own compaction passes the
    list's revision meanwhile: the watch is compacted, the watcher lists again and converges."""
    caplog.set_level(logging.INFO, logger="discovery")
    group = "compacting"
    async with EtcdClient([compacting_etcd.endpoint], timeout=5.0) as client:
        registrations = [Registration(client, bot(group, f"bot{n}"), ttl=10) for n in range(3)]
        await registrations[0].start()
        listed: list[int] = []
        latest = Latest()

        async def on_change(snapshot: ParticipantSnapshot) -> None:
            latest(snapshot)
            if not listed:
                listed.append(snapshot.revision)
                await registrations[1].start()
                await registrations[2].start()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # hold the watch back until etcd compacted past the list
                    await client.put("/history/noise", b"x")
                    try:
                        await client.get_at("/history/noise", snapshot.revision + 1)  # where the watch starts
                    except RevisionCompacted:
                        return
                    await asyncio.sleep(0.3)

        watcher = ParticipantWatcher(client, on_change, prefix=f"{PARTICIPANTS_PREFIX}{group}/")
        watcher.start()
        try:
            await eventually(lambda: len(latest.snapshot.participants) == 3, 45, 0.2, what="converged after compaction")
            assert latest.snapshot.revision > listed[0]
            assert any(r.getMessage() == "watch_compacted" for r in caplog.records)
        finally:
            await watcher.stop()
            for registration in registrations:
                await registration.stop(forget=True)


async def test_a_full_backend_gives_a_clear_error():
    with LocalEtcd(limits=EtcdServerLimits(quota_backend_bytes=8 * 1024 * 1024)) as server:
        async with EtcdClient([server.endpoint], timeout=5.0) as client:
            with pytest.raises(EtcdLimitExceeded, match="quota-backend-bytes.*NOSPACE"):
                for n in range(100):
                    await client.put(f"/fill/{n}", b"x" * (512 * 1024))
