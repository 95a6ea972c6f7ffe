"""`mbc overlap`: intents of different bots whose training phrases collide.

Every phrase is embedded; its nearest phrases of *other* bots (same group) above a cosine
threshold are collisions. Intent pairs are listed by their strongest collision, with examples, so
an operator sees an overlap before a bot joins (the product's guidance: no overlapping intents).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mbc.runtime.matching import IntentCatalog, IntentPhrases


@dataclass
class Overlap:
    group: str
    a: tuple[str, str]
    b: tuple[str, str]
    best: float
    pairs: list[tuple[float, str, str]] = field(default_factory=list)


def find_overlaps(
    groups: Mapping[str, Sequence[IntentPhrases]], encoder, threshold: float = 0.8, neighbours: int = 10
) -> list[Overlap]:
    found: dict[tuple, Overlap] = {}
    for group, intents in groups.items():
        if len({i.bot_id for i in intents}) < 2:
            continue
        catalog = IntentCatalog(intents, encoder.encode_phrases(IntentCatalog.phrases_of(intents)), encoder.dim)
        labels = [(e.bot_id, e.intent, p) for e in sorted(intents, key=lambda e: (e.bot_id, e.intent)) for p in e.phrases]
        vectors = encoder.encode_phrases([p for _, _, p in labels])
        S, I = catalog.search(vectors, min(neighbours, len(labels)))
        for row, (sims, ids) in enumerate(zip(S, I)):
            bot, intent, phrase = labels[row]
            for sim, j in zip(sims, ids):
                if j < 0 or sim < threshold:
                    continue
                other = labels[j]
                if other[0] == bot:
                    continue
                a, b = sorted([(bot, intent, phrase), other])
                key = (group, a[:2], b[:2])
                o = found.setdefault(key, Overlap(group, a[:2], b[:2], float(sim)))
                o.best = max(o.best, float(sim))
                pair = (round(float(sim), 3), a[2], b[2])
                if pair not in o.pairs:
                    o.pairs.append(pair)
    out = sorted(found.values(), key=lambda o: (-o.best, o.group))
    for o in out:
        o.pairs.sort(key=lambda p: -p[0])
    return out


def format_overlaps(overlaps: list[Overlap], examples: int = 2) -> str:
    if not overlaps:
        return "No overlapping intents between bots."
    lines = [f"{len(overlaps)} pair(s) of intents of different bots with colliding training phrases:", ""]
    for o in overlaps:
        lines.append(
            f"[{o.group}] {o.a[0]}/{o.a[1]}  <->  {o.b[0]}/{o.b[1]}   max cosine {o.best:.2f}, {len(o.pairs)} phrase pair(s)"
        )
        for sim, p, q in o.pairs[:examples]:
            lines.append(f"    {sim:.2f}  {p!r}  ~  {q!r}")
    return "\n".join(lines)


def intents_from_definitions(paths: Sequence[str]) -> dict[str, list[IntentPhrases]]:
    from bot_server.definition import BotDefinition

    groups: dict[str, list[IntentPhrases]] = {}
    for path in paths:
        d = BotDefinition.from_file(path)
        groups.setdefault(d.group, []).extend(IntentPhrases(d.bot_id, i.name, tuple(i.phrases)) for i in d.intents)
    return groups


async def intents_from_etcd(endpoints: Sequence[str], access=None) -> dict[str, list[IntentPhrases]]:
    """The intents of the collaborating participants registered in etcd (reached with
    `access`, an mbc.runtime.config.EtcdAccess), by group."""
    from discovery import EtcdClient
    from discovery.watcher import read_participants
    from router.directory import Directory

    client = EtcdClient(list(endpoints), access=access)
    await client.connect()
    try:
        snapshot = await read_participants(client)
    finally:
        await client.close()
    directory = Directory.from_participants(snapshot.participants, snapshot.revision)
    return {g: list(directory.candidates_of(g)) for g in directory.groups}
