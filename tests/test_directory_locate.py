"""Directory.locate: the live instances of a bot for a gateway (Router.Locate), by group or by the
one group that has the bot, each call starting with the next instance."""

from __future__ import annotations

import pytest

from mbc.v1 import participant_pb2
from router.directory import Directory

pytestmark = pytest.mark.unit


def _participant(group: str, bot_id: str, instance: str) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        bot_id=bot_id, instance_id=instance, address=f"127.0.0.1:{len(instance)}{ord(instance[-1])}", group=group
    )


def _directory() -> Directory:
    participants = {
        f"/p/{g}/{b}/{i}": _participant(g, b, i)
        for g, b, i in [("bank", "cards", "i1"), ("bank", "cards", "i2"), ("bank", "faq", "i1"), ("shop", "faq", "i3")]
    }
    definitions = {"/d/bank/loans": participant_pb2.Participant(bot_id="loans", group="bank")}
    return Directory.from_participants(participants, 1, definitions=definitions)


def test_locate_takes_the_instances_in_turn():
    directory = _directory()
    bot = directory.locate("cards", "bank")
    assert bot is not None and bot.bot_id == "cards" and bot.group == "bank"
    first, second = bot.instances_in_turn(), bot.instances_in_turn()
    assert sorted(first) == sorted(second) == [("i1", bot.instances[0][1]), ("i2", bot.instances[1][1])]
    assert first[0] != second[0]


def test_locate_without_a_group_needs_a_bot_id_of_one_group():
    directory = _directory()
    located = directory.locate("cards", "")
    assert located is not None and located.group == "bank"
    with pytest.raises(LookupError, match="groups 'bank', 'shop': name its group"):
        directory.locate("faq", "")
    faq = directory.locate("faq", "shop")
    assert faq is not None and faq.instances[0][0] == "i3"


def test_locate_an_unknown_bot_or_one_with_no_live_instance():
    directory = _directory()
    assert directory.locate("nobody", "bank") is None and directory.locate("cards", "shop") is None
    loans = directory.locate("loans", "bank")
    assert loans is not None and loans.absent and loans.instances_in_turn() == []
