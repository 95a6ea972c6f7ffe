"""discovery/ against a real etcd: keys, client, registration, watcher, and etcd failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery import (
    DEFINITIONS_PREFIX,
    PARTICIPANTS_PREFIX,
    EtcdClient,
    EtcdUnavailable,
    ParticipantSnapshot,
    ParticipantWatcher,
    Registration,
    WatchCompacted,
    parse_participant_key,
    participant_key,
    validate_name,
)
from mbc.testing.etcd import EtcdNotFound, LocalEtcd, free_port
from mbc.testing.mesh import eventually
from mbc.v1 import participant_pb2

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def eventually_in_etcd(check, timeout: float = 5.0, what: str = "condition"):
    """`eventually`, polling every 50 ms, an unreachable etcd counting as not yet."""
    return eventually(check, timeout, 0.05, what=what, retry_on=(EtcdUnavailable,))


def participant(group: str, bot_id: str, instance_id: str = "i1", **fields: object) -> participant_pb2.Participant:
    fields.setdefault("address", "127.0.0.1:50051")
    return participant_pb2.Participant(
        group=group,
        bot_id=bot_id,
        instance_id=instance_id,
        collaboration=True,
        intents=[participant_pb2.Intent(name="greet", phrases=["hello"])],
        **fields,
    )


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict]:
    return [getattr(r, "mbc_fields", {}) for r in caplog.records if r.getMessage() == name]


class Collector:
    def __init__(self) -> None:
        self.snapshots: list[ParticipantSnapshot] = []

    async def __call__(self, snapshot: ParticipantSnapshot) -> None:
        self.snapshots.append(snapshot)

    @property
    def latest(self) -> ParticipantSnapshot:
        return self.snapshots[-1]


@pytest.fixture
async def group(etcd_client: EtcdClient) -> AsyncIterator[str]:
    """A group of its own for each test, so tests sharing the etcd do not see each other's keys;
    the bot definitions its registrations leave (they outlive instances) are removed after it."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    await etcd_client.delete_prefix(f"{DEFINITIONS_PREFIX}{name}/")


@contextlib.asynccontextmanager
async def watching(client: EtcdClient, group: str, on_change=None) -> AsyncIterator[tuple[ParticipantWatcher, Collector]]:
    collector = Collector()
    watcher = ParticipantWatcher(client, on_change or collector, prefix=f"{PARTICIPANTS_PREFIX}{group}/")
    watcher.start()
    try:
        yield watcher, collector
    finally:
        await asyncio.wait_for(watcher.stop(), 5)


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "Bot-1", "cards.v2", "x_y", "9lives", "a" * 64])
def test_validate_name_accepts(value):
    validate_name("bot_id", value)


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "a/b", "a b", "é", "a" * 65, "a\n"])
def test_validate_name_rejects(value):
    with pytest.raises(ValueError, match="is invalid: use 1-64 of letters, digits"):
        validate_name("group", value)


def test_validate_name_message_names_the_kind_and_value():
    with pytest.raises(ValueError) as e:
        validate_name("group", "a/b")
    assert str(e.value) == ("group 'a/b' is invalid: use 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit")


def test_participant_key_round_trip():
    key = participant_key("sales", "cards", "pod-7")
    assert key == "/mbc/v1/participants/sales/cards/pod-7"
    assert parse_participant_key(key) == ("sales", "cards", "pod-7")


def test_participant_key_validates():
    with pytest.raises(ValueError, match="instance_id"):
        participant_key("sales", "cards", "a/b")


@pytest.mark.parametrize(
    "key",
    [
        "/other/sales/cards/1",
        "/mbc/v1/participants/sales/cards",
        "/mbc/v1/participants/sales/cards/1/extra",
        "/mbc/v1/participants/sales//1",
        "/mbc/v1/participants/sa les/cards/1",
    ],
)
def test_parse_participant_key_rejects(key):
    with pytest.raises(ValueError):
        parse_participant_key(key)


# --- client -------------------------------------------------------------------------------


async def test_client_basic_operations(etcd_client, group):
    prefix = f"/test/{group}/"
    first = await etcd_client.put(prefix + "a", b"1")
    second = await etcd_client.put(prefix + "b", b"2")
    assert second > first
    items, revision = await etcd_client.get_prefix(prefix)
    assert [(kv.key, kv.value) for kv in items] == [(prefix + "a", b"1"), (prefix + "b", b"2")]
    assert revision >= second
    assert (await etcd_client.get(prefix + "a")).mod_revision == first
    assert await etcd_client.get(prefix + "missing") is None
    assert await etcd_client.delete(prefix + "a") is True
    assert await etcd_client.delete(prefix + "a") is False
    lease = await etcd_client.grant_lease(5)
    await etcd_client.put(prefix + "leased", b"x", lease)
    assert (await etcd_client.get(prefix + "leased")).lease == lease
    assert 0 < await etcd_client.refresh_lease(lease) <= 5
    await etcd_client.revoke_lease(lease)
    await etcd_client.revoke_lease(lease)
    assert await etcd_client.refresh_lease(lease) <= 0
    assert await etcd_client.get(prefix + "leased") is None


async def test_client_watch_yields_changes_and_reports_compaction(etcd_client, group):
    prefix = f"/test/{group}/"
    start = await etcd_client.put(prefix + "a", b"1")
    await etcd_client.delete(prefix + "a")
    seen = []
    async with contextlib.aclosing(etcd_client.watch_prefix(prefix, start)) as stream:
        async for event in stream:
            seen.append((event.kind, event.key, event.value))
            if len(seen) == 2:
                break
    assert seen == [("put", prefix + "a", b"1"), ("delete", prefix + "a", b"")]
    latest = await etcd_client.put(prefix + "b", b"2")
    await etcd_client.compact(latest)
    await etcd_client.compact(latest)
    with pytest.raises(WatchCompacted) as e:
        async with contextlib.aclosing(etcd_client.watch_prefix(prefix, start)) as stream:
            async for _ in stream:
                pass
    assert e.value.compact_revision == latest


async def test_client_fails_over_to_the_next_endpoint(etcd_server):
    dead = f"127.0.0.1:{free_port()}"
    client = EtcdClient([dead, etcd_server.endpoint], timeout=2.0)
    try:
        await asyncio.wait_for(client.connect(), 5)
        assert client.endpoint == etcd_server.endpoint
        await client.put("/test/failover", b"ok")
    finally:
        await client.close()


async def test_unreachable_etcd_raises_promptly(group):
    client = EtcdClient([f"127.0.0.1:{free_port()}"], timeout=1.0)
    try:
        with pytest.raises(EtcdUnavailable):
            await asyncio.wait_for(client.connect(), 5)
        registration = Registration(client, participant(group, "nobody"), ttl=3)
        with pytest.raises(EtcdUnavailable):
            await asyncio.wait_for(registration.start(), 5)
        assert not registration.registered
    finally:
        await client.close()


# --- registration and watcher --------------------------------------------------------------


async def test_registration_is_seen_and_stop_removes_it_at_once(etcd_client, group):
    async with watching(etcd_client, group) as (watcher, collector):
        await watcher.wait_ready(5)
        assert collector.latest.participants == {}
        registration = Registration(etcd_client, participant(group, "cards", display_name="Cards"), ttl=10)
        await registration.start()
        assert registration.registered and registration.key == participant_key(group, "cards", "i1")
        seen, _ = await eventually_in_etcd(lambda: watcher.snapshot.participants.get(registration.key), what="registration seen")
        assert seen.display_name == "Cards" and seen.intents[0].phrases == ["hello"]
        assert watcher.snapshot.revision >= collector.snapshots[0].revision
        await registration.stop()
        assert not registration.registered
        await eventually_in_etcd(
            lambda: registration.key not in watcher.snapshot.participants, timeout=1.0, what="registration gone after stop"
        )


async def test_update_replaces_the_content(etcd_client, group):
    registration = Registration(etcd_client, participant(group, "cards", definition_version="v1"), ttl=10)
    await registration.start()
    lease = registration.lease_id
    try:
        async with watching(etcd_client, group) as (watcher, _):
            await watcher.wait_ready(5)
            await registration.update(participant(group, "cards", definition_version="v2"))
            await eventually_in_etcd(
                lambda: watcher.snapshot.participants[registration.key].definition_version == "v2", what="updated content seen"
            )
            assert registration.lease_id == lease
            with pytest.raises(ValueError, match="use a new Registration"):
                await registration.update(participant(group, "other"))
    finally:
        await registration.stop()


KILLED_BOT = """
import asyncio, sys
from discovery import EtcdClient, Registration
from mbc.v1 import participant_pb2

async def main():
    client = EtcdClient([sys.argv[1]])
    await client.connect()
    p = participant_pb2.Participant(group=sys.argv[2], bot_id="killed", instance_id="i1", address="127.0.0.1:1")
    await Registration(client, p, ttl=int(sys.argv[3])).start()
    print("registered", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_process_drops_out_within_ttl(etcd_server, etcd_client, group):
    ttl = 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_BOT, etcd_server.endpoint, group, str(ttl), stdout=asyncio.subprocess.PIPE, env=env
    )
    key = participant_key(group, "killed", "i1")
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"registered\n"
        async with watching(etcd_client, group) as (watcher, _):
            await watcher.wait_ready(5)
            assert key in watcher.snapshot.participants
            await asyncio.sleep(ttl + 0.5)
            assert key in watcher.snapshot.participants, "the keep-alive should hold the key past one TTL"
            proc.send_signal(signal.SIGKILL)
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            await eventually_in_etcd(
                lambda: key not in watcher.snapshot.participants, timeout=ttl + 2.0, what="killed instance removed"
            )
            assert loop.time() - killed_at <= ttl + 2.0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_invalid_registrations_are_reported_once(etcd_client, group, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    base = f"{PARTICIPANTS_PREFIX}{group}/"
    good = participant_key(group, "good", "i1")
    garbage = participant_key(group, "garbage", "i1")
    mismatch = participant_key(group, "mismatch", "i1")
    no_address = participant_key(group, "noaddr", "i1")
    bad_name = base + "bad name/i1"
    too_deep = base + "deep/i1/extra"
    await etcd_client.put(good, participant(group, "good").SerializeToString())
    await etcd_client.put(garbage, b"not a protobuf")
    await etcd_client.put(mismatch, participant(group, "someone-else").SerializeToString())
    async with watching(etcd_client, group) as (watcher, _):
        await watcher.wait_ready(5)
        assert set(watcher.snapshot.invalid) == {garbage, mismatch}
        await etcd_client.put(no_address, participant(group, "noaddr", address="").SerializeToString())
        await etcd_client.put(bad_name, participant(group, "bad name").SerializeToString())
        await etcd_client.put(too_deep, participant(group, "deep").SerializeToString())
        await eventually_in_etcd(lambda: len(watcher.snapshot.invalid) == 5, what="all invalid registrations listed")
        invalid = watcher.snapshot.invalid
        assert "not a serialized mbc.v1.Participant" in invalid[garbage]
        assert invalid[mismatch] == "bot_id 'someone-else' does not match the key segment 'mismatch'"
        assert invalid[no_address] == "address is empty"
        assert "bot_id 'bad name' is invalid" in invalid[bad_name]
        assert "is not /mbc/v1/participants/<group>/<bot_id>/<instance_id>" in invalid[too_deep]
        assert set(watcher.snapshot.participants) == {good}

        await etcd_client.put(garbage, b"not a protobuf")
        await etcd_client.put(participant_key(group, "other", "i1"), participant(group, "other").SerializeToString())
        await eventually_in_etcd(lambda: len(watcher.snapshot.participants) == 2, what="second valid participant")
        logged = [f["key"] for f in events(caplog, "invalid_registration")]
        assert sorted(logged) == sorted([garbage, mismatch, no_address, bad_name, too_deep])

        await etcd_client.put(mismatch, participant(group, "mismatch").SerializeToString())
        await eventually_in_etcd(lambda: mismatch in watcher.snapshot.participants, what="fixed registration valid")
        assert mismatch not in watcher.snapshot.invalid


async def test_lost_lease_is_renewed(etcd_client, group, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    registration = Registration(etcd_client, participant(group, "cards"), ttl=2)
    await registration.start()
    try:
        old_lease = registration.lease_id
        await etcd_client.revoke_lease(old_lease)
        await eventually_in_etcd(lambda: registration.lease_id not in (None, old_lease), timeout=3.0, what="new lease")
        kv = await etcd_client.get(registration.key)
        assert kv is not None and kv.lease == registration.lease_id
        assert events(caplog, "registration_renewed")
        assert registration.registered
    finally:
        await registration.stop()
    assert await etcd_client.get(registration.key) is None


async def test_watcher_relists_after_compaction(etcd_client, group, caplog):
    """Changes and a compaction land between the list and the watch: the watch from the list
    revision is compacted, so the watcher must list again to converge."""
    caplog.set_level(logging.INFO, logger="discovery")
    collector = Collector()
    keys = [participant_key(group, f"bot{i}", "i1") for i in range(3)]
    await etcd_client.put(keys[0], participant(group, "bot0").SerializeToString())

    async def on_change(snapshot: ParticipantSnapshot) -> None:
        await collector(snapshot)
        if len(collector.snapshots) == 1:
            await etcd_client.put(keys[1], participant(group, "bot1").SerializeToString())
            await etcd_client.put(keys[2], participant(group, "bot2").SerializeToString())
            latest = await etcd_client.put(keys[0], participant(group, "bot0", display_name="renamed").SerializeToString())
            await etcd_client.compact(latest)

    async with watching(etcd_client, group, on_change) as (watcher, _):
        await watcher.wait_ready(5)
        assert set(collector.snapshots[0].participants) == {keys[0]}
        await eventually_in_etcd(lambda: set(watcher.snapshot.participants) == set(keys), what="converged after compaction")
        assert watcher.snapshot.participants[keys[0]].display_name == "renamed"
        assert events(caplog, "watch_compacted")
        await etcd_client.delete(keys[1])
        await eventually_in_etcd(lambda: keys[1] not in watcher.snapshot.participants, what="watch resumed after re-list")


async def test_watcher_waits_for_an_unreachable_etcd(group):
    client = EtcdClient([f"127.0.0.1:{free_port()}"], timeout=1.0)
    try:
        async with watching(client, group) as (watcher, collector):
            with pytest.raises(TimeoutError):
                await watcher.wait_ready(0.7)
            assert not collector.snapshots and watcher.snapshot.revision == 0
    finally:
        await client.close()


# --- etcd failures (a dedicated etcd each) ---------------------------------------------------


@pytest.fixture
def own_etcd():
    with LocalEtcd() as server:
        yield server


async def test_survives_frozen_etcd(own_etcd, group, caplog):
    """etcd frozen (SIGSTOP) for longer than the TTL: the watch does not hang, and afterwards the
    expired lease is replaced and the watcher follows again."""
    caplog.set_level(logging.INFO, logger="discovery")
    ttl = 2
    client = EtcdClient([own_etcd.endpoint], timeout=1.0, heartbeat=0.5)
    await client.connect()
    registration = Registration(client, participant(group, "cards"), ttl=ttl)
    try:
        await registration.start()
        async with watching(client, group) as (watcher, _):
            await watcher.wait_ready(5)
            assert registration.key in watcher.snapshot.participants
            loop = asyncio.get_running_loop()
            paused_at = loop.time()
            own_etcd.pause()
            try:
                await eventually_in_etcd(
                    lambda: events(caplog, "watch_interrupted"), timeout=4.0, what="watch reports the frozen etcd"
                )
                await asyncio.sleep(max(0.0, paused_at + ttl + 1.0 - loop.time()))
            finally:
                own_etcd.resume()
            await eventually_in_etcd(lambda: events(caplog, "registration_renewed"), timeout=8.0, what="lease renewed")
            await eventually_in_etcd(
                lambda: registration.key in watcher.snapshot.participants, timeout=5.0, what="registration seen again"
            )
            assert watcher.snapshot.participants[registration.key].bot_id == "cards"
            later = participant_key(group, "later", "i1")
            await client.put(later, participant(group, "later").SerializeToString())
            await eventually_in_etcd(lambda: later in watcher.snapshot.participants, what="later change seen")
    finally:
        own_etcd.resume()
        await registration.stop()
        await client.close()


async def test_survives_etcd_restart(own_etcd, group, caplog):
    caplog.set_level(logging.INFO, logger="discovery")
    ttl = 3
    client = EtcdClient([own_etcd.endpoint], timeout=1.0, heartbeat=0.5)
    await client.connect()
    registration = Registration(client, participant(group, "cards"), ttl=ttl)
    second = Registration(client, participant(group, "second"), ttl=ttl)
    try:
        await registration.start()
        async with watching(client, group) as (watcher, _):
            await watcher.wait_ready(5)
            await asyncio.to_thread(own_etcd.stop)
            await eventually_in_etcd(lambda: events(caplog, "watch_interrupted"), timeout=3.0, what="watch interrupted")
            with pytest.raises(EtcdUnavailable):
                await client.get(registration.key)
            await asyncio.sleep(3.0)
            listed = len(events(caplog, "participants_listed"))
            await asyncio.to_thread(own_etcd.start)
            await eventually_in_etcd(lambda: client.get(registration.key), timeout=ttl + 5.0, what="key present after restart")
            await eventually_in_etcd(
                lambda: len(events(caplog, "participants_listed")) > listed, timeout=5.0, what="watcher listed again"
            )
            await second.start()
            await eventually_in_etcd(lambda: second.key in watcher.snapshot.participants, what="new registration seen")
            assert registration.key in watcher.snapshot.participants
            await second.stop()
            await eventually_in_etcd(lambda: second.key not in watcher.snapshot.participants, what="removal seen")
    finally:
        await second.stop()
        await registration.stop()
        await client.close()


def test_local_etcd_reports_a_missing_binary(tmp_path):
    with pytest.raises(EtcdNotFound, match="apt-get install etcd-server"):
        LocalEtcd(data_dir=tmp_path, binary=str(tmp_path / "no-etcd"))
