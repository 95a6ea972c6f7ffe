"""A new group is routable as soon as its phrases are embedded: a provisional model of no heads
(its nearest phrases and intent centroids) answers until its trained model is swapped in
(router/core.py, `RouterConfig.provisional_models`). Real model, the router core in process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mbc.runtime.config import RouterConfig
from mbc.v1 import participant_pb2
from router.core import RouterCore

pytestmark = pytest.mark.integration

WORDS = ["account", "card", "loan", "flight", "hotel", "parcel", "invoice", "refund", "order", "ticket", "seat", "payment"]


def _snapshot(intents: int, phrases: int, joining: bool = False) -> dict:
    """One bot of many intents: training its heads (and cross-fitting τ) takes seconds. `joining`:
    with a second bot, of gardening questions."""
    p = participant_pb2.Participant(bot_id="library", instance_id="i1", address="127.0.0.1:1", group="big", collaboration=True)
    for i in range(intents):
        p.intents.add(
            name=f"topic_{i}",
            phrases=[f"question {j} about {WORDS[i % len(WORDS)]} {WORDS[j % len(WORDS)]} number {i}" for j in range(phrases)],
        )
    snapshot = {"/mbc/v1/participants/big/library/i1": p}
    if joining:
        garden = participant_pb2.Participant(
            bot_id="garden", instance_id="g1", address="127.0.0.1:2", group="big", collaboration=True
        )
        garden.intents.add(
            name="prune_roses",
            phrases=["when should I prune my roses", "how do I cut back rose bushes", "pruning roses in spring"],
        )
        snapshot["/mbc/v1/participants/big/garden/g1"] = garden
    return snapshot


async def _first(core: RouterCore, text: str) -> str:
    result = await core.match(text, "", "big", 1, 0)
    return result.candidates[0].match.intent if result.candidates else ""


async def _until(condition, timeout: float) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.timeout(600)
async def test_a_new_group_is_answered_on_its_nearest_phrases_until_its_heads_are_trained(encoder):
    core = RouterCore(RouterConfig(embedding_cache_dir="off", training_concurrency=1), encoder)
    await core.prepare()
    try:
        core.submit(_snapshot(120, 12), 1)
        await asyncio.wait_for(core.wait_serving(), 300)
        answered = await _first(core, "question 5 about card refund number 25")
        provisional_at_first = core.provisional
        await asyncio.wait_for(core.wait_ready(), 600)
        assert answered == "topic_25"  # routable before its heads were trained
        assert provisional_at_first == ["big"] and core.provisional == []
        assert core.built.get("provisional") == 1 and core.builds == 1  # one trained model, counted alone
        assert not core.models["big"].large  # the trained model has its heads
        assert await _first(core, "question 5 about card refund number 25") == "topic_25"
    finally:
        await core.close()


async def test_off_the_router_serves_only_trained_models(encoder):
    core = RouterCore(RouterConfig(embedding_cache_dir="off", provisional_models=False), encoder)
    await core.prepare()
    try:
        core.submit(_snapshot(6, 5), 1)
        await asyncio.wait_for(core.wait_serving(), 300)
        assert core.ready and core.provisional == [] and "provisional" not in core.built
    finally:
        await core.close()


@contextlib.asynccontextmanager
async def _joined_a_trained_group(encoder) -> AsyncIterator[RouterCore]:
    """A router whose group "big" is trained, then joined by the garden bot: yields once the group
    is served provisionally (its heads wait 5 s of quiet, then train)."""
    config = RouterConfig(embedding_cache_dir="off", training_concurrency=1, train_quiet_seconds=5.0)
    core = RouterCore(config, encoder)
    await core.prepare()
    try:
        core.submit(_snapshot(30, 6), 1)
        await asyncio.wait_for(core.wait_ready(), 300)
        core.submit(_snapshot(30, 6, joining=True), 2)
        await _until(lambda: core.provisional == ["big"], 60)
        yield core
    finally:
        await core.close()


@pytest.mark.timeout(600)
async def test_a_bot_joining_a_trained_group_is_routable_before_the_group_retrains(encoder):
    async with _joined_a_trained_group(encoder) as core:
        assert await _first(core, "how should I prune the roses") == "prune_roses"
        assert core.provisional == ["big"] and core.builds == 1  # answered before its group retrained
        await _until(lambda: core.provisional == [] and core.builds == 2, 300)
        assert not core.models["big"].large  # trained, with heads, the joining bot's intent in them
        assert await _first(core, "how should I prune the roses") == "prune_roses"
        assert await _first(core, "question 5 about card refund number 25") == "topic_25"


@pytest.mark.timeout(600)
async def test_a_bot_leaving_before_its_group_retrains_leaves_the_group_trained_without_it(encoder):
    async with _joined_a_trained_group(encoder) as core:
        core.submit(_snapshot(30, 6), 3)  # back to the intents of the trained model
        await _until(lambda: core.provisional == [], 300)
        assert await _first(core, "how should I prune the roses") != "prune_roses"
        assert await _first(core, "question 5 about card refund number 25") == "topic_25"
        assert not core.models["big"].large
