"""A new group is routable as soon as its phrases are embedded: a provisional model of no heads
(its nearest phrases and intent centroids) answers until its trained model is swapped in
(router/core.py, `RouterConfig.provisional_models`). Real model, the router core in process."""

from __future__ import annotations

import asyncio

import pytest

from mbc.runtime.config import RouterConfig
from mbc.v1 import participant_pb2
from router.core import RouterCore

pytestmark = pytest.mark.integration

WORDS = ["account", "card", "loan", "flight", "hotel", "parcel", "invoice", "refund", "order", "ticket", "seat", "payment"]


def _snapshot(intents: int, phrases: int) -> dict:
    """One bot of many intents: training its heads (and cross-fitting τ) takes seconds."""
    p = participant_pb2.Participant(bot_id="library", instance_id="i1", address="127.0.0.1:1", group="big", collaboration=True)
    for i in range(intents):
        p.intents.add(
            name=f"topic_{i}",
            phrases=[f"question {j} about {WORDS[i % len(WORDS)]} {WORDS[j % len(WORDS)]} number {i}" for j in range(phrases)],
        )
    return {"/mbc/v1/participants/big/library/i1": p}


async def _first(core: RouterCore, text: str) -> str:
    result = await core.match(text, "", "big", 1, 0)
    return result.candidates[0].match.intent if result.candidates else ""


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
