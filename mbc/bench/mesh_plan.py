"""The mesh of `mbc bench mesh`, planned from CLINC150: bots in groups, instances on hosts, and the
utterances that drive it.

- **Groups** of at most `bots_per_group` bots (15, as the product page advises for one group), as
  even as they can be. Each group draws its own intents from the 150 (distinct within the group,
  shared with other groups), `intents_per_bot` per bot, each with `phrases_per_intent` train
  utterances; the groups take different slices of an intent's utterances, so a large mesh has
  many distinct phrases for the routers to embed.
- **Instances.** The first bot of a group is its entry bot (where new conversations start) and
  runs 2 instances; every 10th bot runs 3; the others 1. The instances, in order, go to the
  hosts in turn, so the hosts are even and the instances of a bot are on distinct hosts.
- **Held back.** A conversation sends the train utterances an intent's definition does not hold;
  the Match phase sends `val` utterances, which no definition holds either.

Pure logic, no I/O except `write_definitions`: tests/test_bench_mesh.py checks it as a unit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

ENTRY_INSTANCES = 2
"""Instances of each group's entry bot: killing one host leaves the entry reachable."""
MANY_INSTANCES = 3
MANY_EVERY = 10
"""Every MANY_EVERY-th bot (5th, 15th, ...) runs MANY_INSTANCES instances."""


class PlanError(ValueError):
    """A plan these options cannot make; the message names the flag."""


@dataclass(frozen=True)
class PlanOptions:
    bots: int
    bots_per_group: int = 15
    intents_per_bot: int = 3
    phrases_per_intent: int = 10
    bots_per_host: int = 50
    """Bot instances per host process (today, without multi-bot hosts: per group of processes
    killed together)."""
    seed: int = 0


@dataclass(frozen=True)
class BotPlan:
    bot_id: str
    group: str
    intents: tuple[tuple[str, tuple[str, ...]], ...]
    """(intent name, its phrases) in order."""
    instances: int

    @property
    def probe(self) -> str:
        """A phrase of its own (unique in its group): the router ranks this bot first for it once indexed."""
        return self.intents[0][1][0]

    def definition(self) -> dict:
        """The YAML definition (`mbc bot` reads it)."""
        return {
            "id": self.bot_id,
            "display_name": f"Bot {self.bot_id} of {self.group}",
            "group": self.group,
            "collaboration": True,
            "fallback": f"Sorry, {self.bot_id} cannot help with that.",
            "intents": [{"name": name, "phrases": list(phrases)} for name, phrases in self.intents],
            "dialogs": [{"intent": name, "responses": [f"[{self.bot_id}/{name}]"]} for name, _ in self.intents],
        }


@dataclass(frozen=True)
class Instance:
    bot_id: str
    number: int
    host: int

    @property
    def name(self) -> str:
        """Its component name in the harness (log file name)."""
        return f"h{self.host:02d}-{self.bot_id}-i{self.number}"


@dataclass(frozen=True)
class MeshPlan:
    bots: tuple[BotPlan, ...]
    instances: tuple[Instance, ...]
    hosts: int
    messages: dict[str, tuple[str, ...]]
    """Per group: utterances of its intents that no definition of the group holds (Respond)."""
    match_texts: dict[str, tuple[str, ...]]
    """Per group: `val` utterances of its intents (the Match phase)."""

    @property
    def groups(self) -> list[str]:
        return sorted({b.group for b in self.bots})

    def bot(self, bot_id: str) -> BotPlan:
        return next(b for b in self.bots if b.bot_id == bot_id)

    def on_host(self, host: int) -> list[Instance]:
        return [i for i in self.instances if i.host == host]

    def entry_bot(self, group: str) -> BotPlan:
        return next(b for b in self.bots if b.group == group)

    def phrases(self) -> int:
        return sum(len(p) for b in self.bots for _, p in b.intents)


def group_sizes(bots: int, per_group: int) -> list[int]:
    """`bots` split into as few groups of at most `per_group` as possible, sizes differing by at most 1."""
    groups = max(1, math.ceil(bots / per_group))
    base, extra = divmod(bots, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def plan_mesh(
    opts: PlanOptions, domains: dict[str, list[str]], train: dict[str, list[str]], val: dict[str, list[str]]
) -> MeshPlan:
    """The mesh for `opts` from CLINC150's intents (`domains`), their `train` and `val` utterances."""
    all_intents = sorted(i for intents in domains.values() for i in intents if train.get(i))
    if min(opts.bots, opts.bots_per_group, opts.intents_per_bot, opts.phrases_per_intent, opts.bots_per_host) < 1:
        raise PlanError("--bots, --bots-per-group, --intents-per-bot, --phrases-per-intent, --bots-per-host: at least 1")
    sizes = group_sizes(opts.bots, opts.bots_per_group)
    needed = max(sizes) * opts.intents_per_bot
    if needed > len(all_intents):
        raise PlanError(f"a group of {max(sizes)} bots needs {needed} intents; there are {len(all_intents)}")
    rng = random.Random(opts.seed)
    bots: list[BotPlan] = []
    messages: dict[str, tuple[str, ...]] = {}
    match_texts: dict[str, tuple[str, ...]] = {}
    for g, size in enumerate(sizes):
        group = f"g{g:03d}"
        chosen = rng.sample(all_intents, size * opts.intents_per_bot)
        start = (g * opts.phrases_per_intent) % 100
        used: set[str] = set()
        held: list[str] = []
        for b in range(size):
            intents = []
            for name in chosen[b * opts.intents_per_bot : (b + 1) * opts.intents_per_bot]:
                utterances = train[name][start:] + train[name][:start]
                phrases = [p for p in dict.fromkeys(utterances) if p not in used][: opts.phrases_per_intent]
                used.update(phrases)
                held += [u for u in utterances if u not in phrases]
                intents.append((name, tuple(phrases)))
            k = len(bots)
            instances = ENTRY_INSTANCES if b == 0 else MANY_INSTANCES if k % MANY_EVERY == MANY_EVERY // 2 else 1
            bots.append(BotPlan(f"b{k:04d}", group, tuple(intents), instances))
        messages[group] = tuple(u for u in dict.fromkeys(held) if u not in used)
        match_texts[group] = tuple(dict.fromkeys(u for name in chosen for u in val.get(name, ())))
    total = sum(b.instances for b in bots)
    hosts = max(2, math.ceil(total / opts.bots_per_host))
    numbered = [(b.bot_id, n) for b in bots for n in range(min(b.instances, hosts))]
    placed = tuple(Instance(bot_id, n, j % hosts) for j, (bot_id, n) in enumerate(numbered))
    return MeshPlan(tuple(bots), placed, hosts, messages, match_texts)


def write_definitions(plan: MeshPlan, directory: Path) -> dict[str, Path]:
    """One YAML file per bot in `directory`; returns bot id → file."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for bot in plan.bots:
        path = directory / f"{bot.bot_id}.yaml"
        path.write_text(yaml.safe_dump(bot.definition(), sort_keys=False, allow_unicode=True))
        files[bot.bot_id] = path
    return files
