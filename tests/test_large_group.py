"""A group past `DecisionConfig.heads_max_phrases`, end to end: a router process whose groups are all
"large" (no heads; a participant change updates the index in place), the example bots and a real
etcd. The bot tango must work as with a small group, and a bot that joins, changes its intents or
leaves must reach Match through the watcher."""

from __future__ import annotations

import uuid

import pytest
import yaml

from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2
from meshlib import LEASE_TTL, TEST_BOTS, match, respond, start_example_mesh

pytestmark = pytest.mark.integration

GROUP = "retail-bank"


@pytest.fixture(scope="module")
async def mesh(own_etcd, tmp_path_factory):
    # Every group is large: one phrase reaches the threshold (a setting from the environment).
    large = {"MBC_ROUTER__DECISION__HEADS_MAX_PHRASES": "1"}
    async with start_example_mesh(own_etcd.endpoint, tmp_path_factory.mktemp("large"), router_env=large) as mesh:
        yield mesh


async def test_transfers_work_in_a_large_group(mesh):
    r = await respond(
        mesh.bots["personal-banking"].address, "How do I open a business checking account for my LLC?", uuid.uuid4().hex
    )
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "business-banking"
    r = await respond(mesh.bots["cards"].address, "which pizza place delivers the fastest tonight?", uuid.uuid4().hex)
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "cards"


async def test_a_bot_joining_changing_and_leaving_reaches_match(mesh, tmp_path):
    router = mesh.router.address

    async def first(text: str) -> tuple[str, str]:
        r = await match(router, text, group=GROUP)
        return (r.candidates[0].bot_id, r.candidates[0].intent) if r.candidates else ("", "")

    notice = "set a travel notice for my trip to Japan"
    travel = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel")
    await eventually(lambda: _is(first(notice), ("travel", "travel_notice")), timeout=10)

    # travel registers again with an intent swapped for another: the new one is matched, the old one gone.
    definition = yaml.safe_load((TEST_BOTS / "travel.yaml").read_text())
    definition["intents"] = [i for i in definition["intents"] if i["name"] != "travel_notice"] + [
        {
            "name": "lounge_access",
            "phrases": [
                "can I use the airport lounge",
                "lounge access with my card",
                "which airport lounges can I enter",
                "get me into the lounge",
            ],
        }
    ]
    definition["dialogs"] = [d for d in definition["dialogs"] if d["intent"] != "travel_notice"] + [
        {"intent": "lounge_access", "responses": ["Your card gives you access to 1,200 lounges."]}
    ]
    changed = tmp_path / "travel.yaml"
    changed.write_text(yaml.safe_dump(definition))
    travel.terminate()
    travel = await mesh.start_bot(changed, "travel")
    await eventually(lambda: _is(first("can I get into the airport lounge?"), ("travel", "lounge_access")), timeout=10)
    assert (await first(notice))[1] != "travel_notice"
    r = await respond(mesh.bots["cards"].address, "can I get into the airport lounge?", uuid.uuid4().hex)
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "travel"

    # The router updated the group in place (its log line says how each build went), never trained.
    builds = [line for line in mesh.router.log_path.read_text().splitlines() if "group_model_built" in line]
    assert any('"how": "updated in place"' in line for line in builds), builds[-3:]
    assert not any('"how": "retrained"' in line or '"how": "restored"' in line for line in builds)

    travel.kill()  # no deregistration: the lease expires
    mesh.bots.pop("travel")
    await mesh.forget(mesh.bot_files["travel"].group, mesh.bot_files["travel"].bot_id)  # it left for good
    await eventually(lambda: _not_bot(first("can I get into the airport lounge?"), "travel"), timeout=LEASE_TTL + 5)


async def _is(pending, expected) -> bool:
    return await pending == expected


async def _not_bot(pending, bot_id: str) -> bool:
    return (await pending)[0] != bot_id
