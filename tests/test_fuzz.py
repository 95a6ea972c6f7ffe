"""Hostile input against the live mesh (the session's example mesh: store, router, three bots as
processes over a real etcd), generated with hypothesis: huge and odd strings, absurd ids, numbers
and enums out of range, raw bytes that are not valid protobuf or not valid UTF-8, and malformed
values written straight into etcd.

Every call must come back within its deadline with a status from the RPC's expected set (never
UNKNOWN or INTERNAL: those mean a crash) and a message when it is an error; afterwards every server
still reports SERVING and answers a normal request. Hypothesis runs derandomized (the same examples
on every run) with a bounded number of examples per RPC.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import struct_pb2, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.groups import settings_key
from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, context_pb2, context_pb2_grpc, participant_pb2, router_pb2, router_pb2_grpc
from meshlib import match, respond

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(600)

CALL_SECONDS = 20.0
"""Deadline of every fuzzed call: generous for a loaded machine; a call that needs it has hung."""

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

Code = grpc.StatusCode
MATCH_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
BOT_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ABORTED, Code.RESOURCE_EXHAUSTED}
STORE_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ABORTED, Code.RESOURCE_EXHAUSTED}

SEEN: dict[str, Counter] = defaultdict(Counter)
"""Status codes seen per RPC: the last test checks the fuzzing reached both answers and refusals."""

NAMESPACES = ["fuzz-a", "fuzz-b"]
ODD_TEXTS = [
    "",
    " ",
    "\u3000\t\n",
    "\x00",
    "a\x00b",
    "\u202e\u2066evil\u2069 \u200f",
    "e" + "\u0301" * 60,
    "🏦💳🧾" * 100,
    "\ufeff",
    "\U0010ffff\U000e0001",
    "\r\n\x0b\x0c",
    "𒐫" * 300,
    "ﷺ" * 10,
    "x" * 2000,
    "x" * 2001,
    "é" * 2000,
    "🏦" * 2001,
    "I lost my debit card",
    "open a business account for my LLC",
]
ODD_IDS = [
    "",
    " ",
    "cards",
    "personal-banking",
    "business-banking",
    "retail-bank",
    "x" * 256,
    "x" * 257,
    "x" * 5000,
    "a/b/c",
    "../..",
    "%2F%00",
    "\x00",
    "🏦",
    "*",
    "\u202e",
]

texts = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=60), st.sampled_from(ODD_TEXTS))
ids = st.one_of(st.sampled_from(ODD_IDS), st.text(st.characters(exclude_categories=("Cs",)), max_size=24))
fresh_or_odd_ids = st.one_of(st.uuids().map(lambda u: u.hex), ids)
int64 = st.integers(-(2**63), 2**63 - 1)
uint32 = st.integers(0, 2**32 - 1)
enum32 = st.integers(-(2**31), 2**31 - 1)
metadata = st.dictionaries(ids, texts, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=30) | st.sampled_from(["v" * 900_000, "🧾" * 1000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def to_value(obj) -> struct_pb2.Value:
    """Any JSON-like object as a Value, NaN and infinities included (json_format refuses them)."""
    value = struct_pb2.Value()
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, float):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, list):
        value.list_value.values.extend(to_value(v) for v in obj)
    else:
        for k, v in obj.items():
            value.struct_value.fields[k].CopyFrom(to_value(v))
    return value


values = st.one_of(json_values.map(to_value), st.just(struct_pb2.Value()))


@dataclass
class Stubs:
    router: router_pb2_grpc.RouterStub
    bot: bot_pb2_grpc.BotStub
    store: context_pb2_grpc.ContextStoreStub
    channels: dict[str, grpc.aio.Channel]


@pytest.fixture(scope="module")
def mesh(example_mesh):
    return example_mesh


@pytest.fixture(scope="module")
async def stubs(mesh):
    """Plain channels (no retries, no service config), so every status is the server's own."""
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    channels = {
        name: grpc.aio.insecure_channel(address, options=options)
        for name, address in (
            ("router", mesh.router.address),
            ("cards", mesh.bots["cards"].address),
            ("store", mesh.store.address),
        )
    }
    store = context_pb2_grpc.ContextStoreStub(channels["store"])
    for namespace in NAMESPACES:
        await store.RegisterNamespace(context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=3600), timeout=10)
    yield Stubs(router_pb2_grpc.RouterStub(channels["router"]), bot_pb2_grpc.BotStub(channels["cards"]), store, channels)
    for channel in channels.values():
        await channel.close()


def _short(request) -> str:
    if isinstance(request, bytes):
        return repr(request[:300])
    text = text_format.MessageToString(request, as_one_line=True)
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} characters)"


async def call(name: str, rpc, request, allowed: set) -> Code:
    """Make the call; its status must be in `allowed`, come within the deadline, say what was wrong."""
    try:
        await asyncio.wait_for(rpc(request, timeout=CALL_SECONDS), CALL_SECONDS + 10)
        code, details = Code.OK, ""
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details()
    SEEN[name][code] += 1
    assert code in allowed, f"{name}: {code.name} ({details}) for {_short(request)}"
    assert code == Code.OK or details, f"{name}: {code.name} without a message for {_short(request)}"
    return code


# -- the RPCs, message by message ---------------------------------------------------------------


@settings(FUZZ, max_examples=60)
@given(
    text=texts,
    bot_id=ids,
    group=st.one_of(st.just("retail-bank"), ids),
    max_candidates=st.one_of(st.integers(0, 101), uint32),
    min_rating=enum32,
    include_asking_bot=st.booleans(),
)
async def test_match(stubs, text, bot_id, group, max_candidates, min_rating, include_asking_bot):
    request = router_pb2.MatchRequest(
        text=text,
        bot_id=bot_id,
        group=group,
        max_candidates=max_candidates,
        min_rating=min_rating,
        include_asking_bot=include_asking_bot,
    )
    await call("Match", stubs.router.Match, request, MATCH_CODES)


@FUZZ
@given(conversation_id=fresh_or_odd_ids, consumer_id=ids, text=texts, channel_metadata=metadata)
async def test_respond(stubs, conversation_id, consumer_id, text, channel_metadata):
    request = bot_pb2.RespondRequest(
        conversation_id=conversation_id, consumer_id=consumer_id, text=text, channel_metadata=channel_metadata
    )
    await call("Respond", stubs.bot.Respond, request, BOT_CODES)


TRANSFER_FIELDS = {
    # field: (a well-formed value, a hostile one); each example makes a few fields hostile.
    "transfer_id": (st.uuids().map(lambda u: u.hex), ids),
    "conversation_id": (st.uuids().map(lambda u: u.hex), ids),
    "consumer_id": (st.just("consumer-1"), ids),
    "text": (st.sampled_from(["I lost my debit card", "my card got declined", "what's my balance"]), texts),
    "intent": (st.sampled_from(["lost_or_stolen_card", "card_declined", ""]), ids),
    "sender": (
        st.just(common_pb2.BotRef(bot_id="personal-banking")),
        st.builds(common_pb2.BotRef, bot_id=ids, instance_id=ids, address=st.one_of(st.just("127.0.0.1:1"), ids)),
    ),
    "receiver_bot_id": (st.just("cards"), ids),
    "channel_metadata": (st.just({}), metadata),
    "visited_bot_ids": (
        st.just(["personal-banking"]),
        st.one_of(st.lists(ids, max_size=5), st.just([f"bot-{i}" for i in range(5000)])),
    ),
    "hop_count": (st.integers(0, 1), uint32),
    "owner_version": (st.just(0), int64),
}


def some_hostile(table: dict, data, hostile: set) -> dict:
    """Draw each field of `table` well-formed, except those in `hostile`."""
    return {name: data.draw(strategies[name in hostile], label=name) for name, strategies in table.items()}


@settings(FUZZ, max_examples=50)
@given(data=st.data(), hostile=st.sets(st.sampled_from(sorted(TRANSFER_FIELDS)), max_size=3))
async def test_transfer(stubs, data, hostile):
    request = bot_pb2.TransferRequest(**some_hostile(TRANSFER_FIELDS, data, hostile))
    await call("Transfer", stubs.bot.Transfer, request, BOT_CODES)


context_keys = st.builds(
    context_pb2.ContextKey,
    namespace=st.one_of(st.sampled_from(NAMESPACES), ids),
    scope=st.one_of(st.sampled_from([1, 2, 3]), enum32),
    scope_id=st.one_of(st.just(""), fresh_or_odd_ids),
    key=st.one_of(st.sampled_from(["name", "k.1", "mbc.awaiting.cards", "Z" * 128, "Z" * 129]), ids),
)
versions = st.one_of(st.none(), st.just(0), int64)


@FUZZ
@given(namespace=st.one_of(st.sampled_from(NAMESPACES), ids), ttl_seconds=st.one_of(st.integers(3000, 4000), int64))
async def test_register_namespace(stubs, namespace, ttl_seconds):
    request = context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=ttl_seconds)
    await call("RegisterNamespace", stubs.store.RegisterNamespace, request, STORE_CODES)


@FUZZ
@given(key=context_keys, value=values, expected_version=versions)
async def test_set_then_get_list_delete(stubs, key, value, expected_version):
    request = context_pb2.SetContextRequest(key=key, value=value, expected_version=expected_version)
    if expected_version is None:
        request.ClearField("expected_version")
    await call("Set", stubs.store.Set, request, STORE_CODES)
    await call("Get", stubs.store.Get, context_pb2.GetContextRequest(key=key), STORE_CODES)
    listing = context_pb2.ListContextRequest(namespace=key.namespace, scope=key.scope, scope_id=key.scope_id)
    await call("List", stubs.store.List, listing, STORE_CODES)
    delete = context_pb2.DeleteContextRequest(key=key, expected_version=expected_version)
    if expected_version is None:
        delete.ClearField("expected_version")
    await call("Delete", stubs.store.Delete, delete, STORE_CODES)


CLAIM_FIELDS = {
    "conversation_id": (st.uuids().map(lambda u: u.hex), ids),
    "ownership": (
        st.just(context_pb2.Ownership(owner=common_pb2.BotRef(bot_id="cards", instance_id="i1", address="127.0.0.1:1"))),
        st.builds(
            context_pb2.Ownership,
            owner=st.builds(common_pb2.BotRef, bot_id=ids, instance_id=ids, address=ids),
            transfer_id=ids,
            updated_at_unix_ms=int64,
        ),
    ),
    "expected_version": (st.just(0), int64),
}


@FUZZ
@given(data=st.data(), hostile=st.sets(st.sampled_from(sorted(CLAIM_FIELDS)), max_size=2))
async def test_claim_and_get_owner(stubs, data, hostile):
    request = context_pb2.ClaimOwnerRequest(**some_hostile(CLAIM_FIELDS, data, hostile))
    conversation_id = request.conversation_id
    await call("ClaimOwner", stubs.store.ClaimOwner, request, STORE_CODES)
    await call("GetOwner", stubs.store.GetOwner, context_pb2.GetOwnerRequest(conversation_id=conversation_id), STORE_CODES)


# -- bytes that are not the message they claim to be -------------------------------------------

METHODS = {
    "/mbc.v1.Router/Match": ("router", router_pb2.MatchRequest, MATCH_CODES),
    "/mbc.v1.Bot/Respond": ("cards", bot_pb2.RespondRequest, BOT_CODES),
    "/mbc.v1.Bot/Transfer": ("cards", bot_pb2.TransferRequest, BOT_CODES),
    **{
        f"/mbc.v1.ContextStore/{name}": ("store", getattr(context_pb2, request), STORE_CODES)
        for name, request in (
            ("RegisterNamespace", "RegisterNamespaceRequest"),
            ("Get", "GetContextRequest"),
            ("Set", "SetContextRequest"),
            ("Delete", "DeleteContextRequest"),
            ("List", "ListContextRequest"),
            ("GetOwner", "GetOwnerRequest"),
            ("ClaimOwner", "ClaimOwnerRequest"),
        )
    },
}


def _raw_rpc(stubs: Stubs, method: str):
    return stubs.channels[METHODS[method][0]].unary_unary(method)  # bytes in, bytes out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_invalid_utf8_in_every_string_field_is_invalid_argument(stubs, method):
    """Proto strings must be UTF-8; a client can still put any bytes in one on the wire."""
    cases = dict(_invalid_utf8(METHODS[method][1].DESCRIPTOR))
    assert cases, method
    for path, raw in cases.items():
        code = await call(method, _raw_rpc(stubs, method), raw, {Code.INVALID_ARGUMENT})
        assert code == Code.INVALID_ARGUMENT, path


def _invalid_utf8(descriptor, depth: int = 3):
    """(field path, message bytes) with invalid UTF-8 in each string field, nested ones included."""
    for field in descriptor.fields:
        if field.type == field.TYPE_STRING:
            yield field.name, _length_delimited(field.number, b"\xff\xfe\xc0\x80")
        elif field.type == field.TYPE_MESSAGE and depth > 1:
            for path, inner in _invalid_utf8(field.message_type, depth - 1):
                yield f"{field.name}.{path}", _length_delimited(field.number, inner)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


async def test_value_nested_beyond_the_parsers_depth_limit_is_invalid_argument(stubs):
    """A Set whose value is a list in a list ... 200 deep (protobuf parses 100 levels at most)."""
    value = _length_delimited(3, b"bottom")  # Value.string_value
    for _ in range(200):
        value = _length_delimited(6, _length_delimited(1, value))  # Value.list_value.values
    key = context_pb2.ContextKey(namespace=NAMESPACES[0], scope=context_pb2.SCOPE_GLOBAL, key="deep").SerializeToString()
    raw = _length_delimited(1, key) + _length_delimited(2, value)
    method = "/mbc.v1.ContextStore/Set"
    assert await call(method, _raw_rpc(stubs, method), raw, {Code.INVALID_ARGUMENT}) == Code.INVALID_ARGUMENT


@settings(FUZZ, max_examples=150)
@given(
    method=st.sampled_from(sorted(METHODS)),
    raw=st.one_of(st.binary(max_size=64), st.just(b"\xff" * 10), st.just(b"\x0a\xff\xff\xff\xff\x0f")),
)
async def test_arbitrary_bytes(stubs, method, raw):
    await call(method, _raw_rpc(stubs, method), raw, METHODS[method][2])


@pytest.mark.parametrize(
    "method, request_of",
    [
        ("/mbc.v1.Router/Match", lambda text: router_pb2.MatchRequest(text=text)),
        ("/mbc.v1.Bot/Respond", lambda text: bot_pb2.RespondRequest(conversation_id=uuid.uuid4().hex, text=text)),
        (
            "/mbc.v1.ContextStore/Set",
            lambda text: context_pb2.SetContextRequest(
                key=context_pb2.ContextKey(namespace=NAMESPACES[0], scope=context_pb2.SCOPE_GLOBAL, key="big"),
                value=struct_pb2.Value(string_value=text),
            ),
        ),
    ],
)
@pytest.mark.parametrize("size", [4 * 2**20 - 64, 4 * 2**20 + 64, 16 * 2**20])
async def test_messages_near_and_over_the_size_limit(stubs, method, request_of, size):
    """Just under the 4 MiB message limit: refused as too long; over it: RESOURCE_EXHAUSTED."""
    request = request_of("x" * size)
    code = await call(
        method,
        getattr(_stub_of(stubs, method), method.rsplit("/", 1)[1]),
        request,
        {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED},
    )
    assert code == (Code.INVALID_ARGUMENT if request.ByteSize() < 4 * 2**20 else Code.RESOURCE_EXHAUSTED)


def _stub_of(stubs: Stubs, method: str):
    return {"router": stubs.router, "cards": stubs.bot, "store": stubs.store}[METHODS[method][0]]


# -- malformed values in etcd -------------------------------------------------------------------


async def test_hostile_registrations_leave_the_router_serving(mesh, stubs, etcd_client):
    """Participants the router must ignore or survive, in a group of their own: garbage bytes, keys
    and values that do not agree, one bot with thousands of intents (over max_intents_per_bot:
    ignored), one with hundreds of intents and hostile phrases and names (indexed)."""
    group = "fuzz-" + uuid.uuid4().hex[:6]
    thousands = participant_pb2.Participant(
        bot_id="thousands",
        instance_id="i1",
        address="127.0.0.1:1",
        group=group,
        collaboration=True,
        intents=[participant_pb2.Intent(name=f"intent_{i}", phrases=[f"please do chore number {i}"]) for i in range(3000)],
    )
    big = participant_pb2.Participant(
        bot_id="big",
        instance_id="i1",
        address="127.0.0.1:1",
        group=group,
        collaboration=True,
        intents=[
            participant_pb2.Intent(name=f"intent_{i}", phrases=[f"please do task number {i}", f"task {i} now"])
            for i in range(300)
        ],
    )
    big.intents.add(name="hostile", phrases=["", " ", "\x00", "🏦" * 3000, "z" * 100_000, "e\u0301" * 500])
    big.intents.add(name="", phrases=["an intent without a name"])
    big.intents.add(name="no_phrases")
    big.intents.add(name="intent_1", phrases=["the same intent name twice"])
    wrong_key = participant_pb2.Participant(bot_id="other", instance_id="i1", address="127.0.0.1:1", group=group)
    no_address = participant_pb2.Participant(bot_id="nowhere", instance_id="i1", group=group)
    prefix = f"/mbc/v1/participants/{group}/"
    writes = {
        prefix + "thousands/i1": thousands.SerializeToString(),
        prefix + "big/i1": big.SerializeToString(),
        prefix + "liar/i1": wrong_key.SerializeToString(),
        prefix + "nowhere/i1": no_address.SerializeToString(),
        prefix + "garbage/i1": b"\xff\xfe not a participant",
        prefix + "too/many/segments": big.SerializeToString(),
        "/mbc/v1/participants/retail-bank/cards/" + "x" * 300: b"",
    }

    async def top(text: str, group: str) -> str:
        r = await stubs.router.Match(router_pb2.MatchRequest(text=text, group=group, max_candidates=100), timeout=CALL_SECONDS)
        return r.candidates[0].bot_id if r.candidates else ""

    try:
        for key, value in writes.items():
            await etcd_client.put(key, value)
        # While the router trains the big group, it keeps answering for the others.
        for _ in range(5):
            assert await top("I lost my debit card", "retail-bank") == "cards"
        _, seconds = await eventually(lambda: _equals(top("please do task number 123", group), "big"), timeout=180, interval=1.0)
        print(f"a participant with {len(big.intents)} intents indexed in {seconds:.0f}s")
        r = await stubs.router.Match(
            router_pb2.MatchRequest(text="please do chore number 77", group=group, max_candidates=100), timeout=CALL_SECONDS
        )
        assert {c.bot_id for c in r.candidates} == {"big"}, "only big is a valid participant of its group"
    finally:
        for key in writes:
            await etcd_client.delete(key)
    await eventually(lambda: _equals(top("please do task number 123", group), ""), timeout=180, interval=1.0)
    assert await top("I lost my debit card", "retail-bank") == "cards"
    assert "participant_ignored" in mesh.router.log_path.read_text(errors="replace")


async def _equals(value, expected) -> bool:
    return await value == expected


async def test_corrupt_group_settings_are_ignored(mesh, etcd_client):
    await etcd_client.put(settings_key("retail-bank"), b"\xff\xff\xff garbage")
    try:
        r = await respond(mesh.bots["personal-banking"].address, "I lost my debit card")
        assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "cards"
    finally:
        await etcd_client.delete(settings_key("retail-bank"))


async def test_corrupt_store_records_count_as_absent_and_are_replaced(mesh, stubs, etcd_client):
    """Values not written by the store (garbage, a Struct without a value, a NaN expiry) read as
    absent, a write replaces them; a corrupt owner record is no owner, and the bot takes over."""
    conversation = uuid.uuid4().hex
    data = f"/mbc/v1/context/data/{NAMESPACES[0]}/conversation/{conversation}/"
    nan_expiry = struct_pb2.Struct()
    nan_expiry.fields["value"].string_value = "x"
    nan_expiry.fields["expires_at_unix_ms"].number_value = math.nan
    no_value = struct_pb2.Struct()
    no_value.fields["expires_at_unix_ms"].number_value = 1e18
    corrupt = {"garbage": b"\xff\xfe\xfd", "novalue": no_value.SerializeToString(), "nanexpiry": nan_expiry.SerializeToString()}
    for key, raw in corrupt.items():
        await etcd_client.put(data + key, raw)
    await etcd_client.put(data + "good", _stored("kept"))

    def key(name: str) -> context_pb2.ContextKey:
        return context_pb2.ContextKey(
            namespace=NAMESPACES[0], scope=context_pb2.SCOPE_CONVERSATION, scope_id=conversation, key=name
        )

    for name in corrupt:
        r = await stubs.store.Get(context_pb2.GetContextRequest(key=key(name)), timeout=10)
        assert not r.found, name
    listing = await stubs.store.List(
        context_pb2.ListContextRequest(namespace=NAMESPACES[0], scope=context_pb2.SCOPE_CONVERSATION, scope_id=conversation),
        timeout=10,
    )
    assert [(e.key, e.value.string_value) for e in listing.entries] == [("good", "kept")]
    written = await stubs.store.Set(
        context_pb2.SetContextRequest(key=key("garbage"), value=struct_pb2.Value(string_value="new"), expected_version=0),
        timeout=10,
    )
    r = await stubs.store.Get(context_pb2.GetContextRequest(key=key("garbage")), timeout=10)
    assert r.found and r.value.string_value == "new" and r.version == written.version

    # A corrupt namespace registration: NOT_FOUND saying so, until it is registered again.
    broken = "fuzz-broken-" + uuid.uuid4().hex[:6]
    await etcd_client.put(f"/mbc/v1/context/namespaces/{broken}", b"\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.store.Get(
            context_pb2.GetContextRequest(key=context_pb2.ContextKey(namespace=broken, scope=context_pb2.SCOPE_GLOBAL, key="k")),
            timeout=10,
        )
    assert err.value.code() == Code.NOT_FOUND and "corrupt" in err.value.details()
    await stubs.store.RegisterNamespace(context_pb2.RegisterNamespaceRequest(namespace=broken, ttl_seconds=60), timeout=10)
    await stubs.store.Get(
        context_pb2.GetContextRequest(key=context_pb2.ContextKey(namespace=broken, scope=context_pb2.SCOPE_GLOBAL, key="k")),
        timeout=10,
    )

    # A corrupt owner record: the conversation has no owner, and its next message is answered.
    owned = uuid.uuid4().hex
    await etcd_client.put(f"/mbc/v1/conversations/{owned}/owner", b"\xff garbage owner")
    r = await stubs.store.GetOwner(context_pb2.GetOwnerRequest(conversation_id=owned), timeout=10)
    assert not r.found and r.version == 0
    r = await respond(mesh.bots["cards"].address, "I lost my debit card", owned)
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.owner.bot_id == "cards"
    r = await stubs.store.GetOwner(context_pb2.GetOwnerRequest(conversation_id=owned), timeout=10)
    assert r.found and r.ownership.owner.bot_id == "cards"


def _stored(text: str) -> bytes:
    payload = struct_pb2.Struct()
    payload.fields["value"].string_value = text
    payload.fields["expires_at_unix_ms"].number_value = 4e12
    return payload.SerializeToString()


# -- after all of it ---------------------------------------------------------------------------


async def test_every_server_still_serving_and_answering(mesh, stubs):
    for name, process in [("router", mesh.router), ("store", mesh.store), *mesh.bots.items()]:
        assert process.process.poll() is None, f"{name} exited:\n{process.log_tail()}"
        async with grpc.aio.insecure_channel(process.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    r = await respond(mesh.bots["personal-banking"].address, "I lost my debit card")
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "cards"
    assert (await match(mesh.router.address, "what's my checking balance", group="retail-bank")).candidates[
        0
    ].bot_id == "personal-banking"
    # The fuzzing (of the RPCs fuzzed in this run) reached both sides: answers and refusals.
    for rpc in ("Match", "Respond", "Transfer", "RegisterNamespace", "Set", "Get", "List", "Delete", "ClaimOwner", "GetOwner"):
        if SEEN[rpc]:
            assert SEEN[rpc][Code.OK] and SEEN[rpc][Code.INVALID_ARGUMENT], (rpc, dict(SEEN[rpc]))
