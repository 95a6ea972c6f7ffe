"""Human-readable views of the mesh for the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery import PARTICIPANTS_PREFIX, EtcdClient
from discovery.errors import EtcdError
from discovery.watcher import read_participants
from mbc.runtime.channels import ChannelPool, open_channel
from mbc.runtime.config import EtcdAccess, TlsConfig
from mbc.v1 import bot_pb2, common_pb2, router_pb2

BOT_SERVICE = bot_pb2.DESCRIPTOR.services_by_name["Bot"].full_name


def rating_name(rating: int) -> str:
    return common_pb2.Rating.Name(rating).removeprefix("RATING_").replace("_", " ")


DECISIONS = {
    router_pb2.DECISION_ACT: "ACT",
    router_pb2.DECISION_DISAMBIGUATE: "DISAMBIGUATE",
    router_pb2.DECISION_NONE: "NONE",
}


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_candidates(candidates, chosen: int = -1) -> str:
    """A table of candidates, best first; `chosen` (an index) is marked with ▶."""
    if not candidates:
        return "  (no candidates)"
    bot_w = max(3, *(len(c.bot_id) for c in candidates))
    intent_w = max(6, *(len(c.intent) for c in candidates))
    rows = [f"      {'bot':<{bot_w}}  {'intent':<{intent_w}}  {'rating':<9}  {'conf':>5}  {'score':>6}  best phrase"]
    for i, c in enumerate(candidates):
        mark = "▶" if i == chosen else " "
        rows.append(
            f"  {mark}{i + 1:>2} {c.bot_id:<{bot_w}}  {c.intent:<{intent_w}}  {rating_name(c.rating):<9}  "
            f"{c.confidence:5.2f}  {c.score:6.3f}  {_shorten(c.matched_phrase, 48)!r}"
        )
    return "\n".join(rows)


def verdict(response: router_pb2.MatchResponse, asking_bot: str = "") -> tuple[str, int]:
    """One line saying what the mesh would do with the message, and the index of the chosen candidate."""
    candidates = list(response.candidates)
    decision = response.decision
    if decision == router_pb2.DECISION_UNSPECIFIED:  # an older router: judge by rating
        decision = (
            router_pb2.DECISION_ACT if candidates and candidates[0].rating >= common_pb2.RATING_GOOD else router_pb2.DECISION_NONE
        )
    asker = asking_bot or "the bot in the conversation"
    if decision == router_pb2.DECISION_ACT and candidates:
        best = candidates[0]
        who = "itself" if best.bot_id == asking_bot else best.bot_id
        how = "answers" if best.bot_id == asking_bot else f"gets the conversation (transfer from {asker})"
        return f"→ ACT: {who} {how}, intent {best.intent} ({rating_name(best.rating)}, score {best.score:.2f})", 0
    if decision == router_pb2.DECISION_DISAMBIGUATE:
        names = []
        for c in candidates:
            if c.bot_id not in names:
                names.append(c.bot_id)
        return f"→ DISAMBIGUATE: too close to call, {asker} asks the consumer: {' or '.join(names[:3])}?", -1
    best_note = (
        f" (best: {candidates[0].bot_id}/{candidates[0].intent}, {rating_name(candidates[0].rating)})" if candidates else ""
    )
    return f"→ NONE: no bot rated GOOD or better{best_note}: {asker}'s fallback answers", -1


async def print_match(router: str, text: str, bot: str, group: str, n: int, tls: TlsConfig = TlsConfig()) -> int:
    pool = ChannelPool(tls=tls)
    try:
        response = await pool.router(router).Match(
            router_pb2.MatchRequest(text=text, bot_id=bot, group=group, max_candidates=n), timeout=10
        )
    except grpc.aio.AioRpcError as e:
        print(f"mbc match: {e.code().name}: {e.details()}")
        return 1
    finally:
        await pool.close()
    line, chosen = verdict(response, bot)
    print(f"{text!r}")
    print(line)
    print(format_candidates(response.candidates, chosen))
    print(
        f"  (index revision {response.index_revision}; rating: VERY GOOD > GOOD > FAIR PLUS > FAIR > POOR, "
        f"the mesh acts on GOOD or better)"
    )
    return 0


# -- mbc participants -----------------------------------------------------------------------


@dataclass
class InstanceRow:
    group: str
    bot_id: str
    display_name: str
    instance_id: str
    address: str
    collaboration: bool
    intents: list[str]
    definition_version: str
    software_version: str
    health: str = "UNKNOWN"

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


async def check_health(address: str, service: str, timeout: float, tls: TlsConfig = TlsConfig()) -> str:
    """grpc.health.v1 status of `service` at `address`: SERVING, NOT_SERVING, ... or UNREACHABLE."""
    try:
        async with open_channel(address, tls) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.aio.AioRpcError as e:
        return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else e.code().name


async def list_participants(
    etcd_endpoints: list[str],
    group: str = "",
    timeout: float = 2.0,
    tls: TlsConfig = TlsConfig(),
    etcd_access: EtcdAccess | None = None,
) -> tuple[list[InstanceRow], dict[str, str]]:
    """Every registered instance (health checked in parallel) and the invalid registrations by key."""
    async with EtcdClient(etcd_endpoints, timeout=timeout, access=etcd_access) as etcd:
        snapshot = await read_participants(etcd, PARTICIPANTS_PREFIX + (f"{group}/" if group else ""))
    rows: list[InstanceRow] = []
    invalid = dict(snapshot.invalid)
    for p in snapshot.participants.values():
        rows.append(
            InstanceRow(
                p.group,
                p.bot_id,
                p.display_name or p.bot_id,
                p.instance_id,
                p.address,
                p.collaboration,
                [i.name for i in p.intents],
                p.definition_version,
                p.software_version,
            )
        )
    statuses = await asyncio.gather(*(check_health(r.address, BOT_SERVICE, timeout, tls) for r in rows))
    for row, status in zip(rows, statuses):
        row.health = status
    rows.sort(key=lambda r: (r.group, r.bot_id, r.instance_id))
    return rows, invalid


def format_participants(rows: list[InstanceRow], invalid: dict[str, str], width: int = 100) -> str:
    if not rows and not invalid:
        return "no participants registered"
    out: list[str] = []
    for group in sorted({r.group for r in rows}):
        members = [r for r in rows if r.group == group]
        bots = sorted({r.bot_id for r in members})
        serving = sum(r.health == "SERVING" for r in members)
        out.append(f"group {group}: {len(bots)} bot(s), {len(members)} instance(s), {serving} serving")
        bot_w = max(3, *(len(r.bot_id) for r in members))
        addr_w = max(7, *(len(r.address) for r in members))
        out.append(f"  {'bot':<{bot_w}}  {'instance':<12}  {'address':<{addr_w}}  {'health':<11}  {'collab':<6}  intents")
        for bot in bots:
            instances = [r for r in members if r.bot_id == bot]
            for i, r in enumerate(instances):
                intents = f"{len(r.intents)}: {', '.join(r.intents)}" if i == 0 else '"'
                left = (
                    f"  {r.bot_id if i == 0 else '':<{bot_w}}  {r.instance_id[:12]:<12}  {r.address:<{addr_w}}  "
                    f"{r.health:<11}  {'yes' if r.collaboration else 'no':<6}  "
                )
                out.append(left + _shorten(intents, max(20, width - len(left))))
            if instances[0].display_name != bot:
                out.append(f"  {'':<{bot_w}}  ({instances[0].display_name}, definition {instances[0].definition_version or '-'})")
        out.append("")
    if invalid:
        out.append(f"{len(invalid)} invalid registration(s), ignored by the router:")
        out.extend(f"  {key}: {reason}" for key, reason in sorted(invalid.items()))
    return "\n".join(out).rstrip()


async def print_participants(
    etcd_endpoints: list[str],
    group: str,
    timeout: float,
    as_json: bool,
    tls: TlsConfig = TlsConfig(),
    etcd_access: EtcdAccess | None = None,
) -> int:
    """Exit status: 0 when every instance is SERVING, 1 when one is not, 2 when etcd cannot be read."""
    try:
        rows, invalid = await list_participants(etcd_endpoints, group, timeout, tls, etcd_access)
    except (EtcdError, OSError) as e:
        print(f"mbc participants: cannot read etcd at {','.join(etcd_endpoints)}: {e}", file=sys.stderr)
        return 2
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()))
    else:
        print(format_participants(rows, invalid, shutil.get_terminal_size((120, 24)).columns))
    return 0 if all(r.health == "SERVING" for r in rows) else 1
