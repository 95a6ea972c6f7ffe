"""The words-only matcher of a bot without the model (bot_server/lexical.py), and loading a host's
definitions (files, directories, each bot id once)."""

from __future__ import annotations

import shutil

import pytest

from bot_server.bot import load_bots
from bot_server.definition import DefinitionError
from bot_server.lexical import LEXICAL_THRESHOLD, LexicalIntents, normalise
from mbc.testing.mesh import EXAMPLE_BOTS
from mbc.v1 import common_pb2

pytestmark = pytest.mark.unit

CARDS = LexicalIntents(
    [
        ("lost_or_stolen_card", ["I lost my debit card", "my credit card was stolen"]),
        ("card_declined", ["my card was declined", "card not working at the ATM"]),
    ]
)


def test_normalisation_sets_case_punctuation_and_whitespace_aside():
    assert normalise("  I LOST my   debit-card!! ") == "i lost my debit card"
    assert normalise("Où est ma carte ?") == "où est ma carte"


async def test_an_exact_phrase_after_normalisation_is_its_intent_rated_very_good():
    assert await CARDS.best("i LOST my debit card?!") == ("lost_or_stolen_card", 1.0, common_pb2.RATING_VERY_GOOD)


async def test_a_near_phrase_matches_and_a_few_shared_words_do_not():
    intent, score, rating = await CARDS.best("lost my debit card")
    assert (intent, rating) == ("lost_or_stolen_card", common_pb2.RATING_GOOD) and score >= LEXICAL_THRESHOLD
    intent, score, rating = await CARDS.best("my card was declined at the store")
    assert (intent, rating) == ("card_declined", common_pb2.RATING_GOOD)
    for text in ("my card", "my card got declined at the grocery store", "which pizza place delivers fastest", "!!!"):
        intent, score, rating = await CARDS.best(text)
        assert intent == "" and score < LEXICAL_THRESHOLD and rating == common_pb2.RATING_POOR, text


def test_a_host_loads_files_and_directories_each_bot_once(tmp_path):
    folder = tmp_path / "bots"
    folder.mkdir()
    for path in EXAMPLE_BOTS[1:]:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not a bot")
    bots = load_bots([EXAMPLE_BOTS[0], folder])
    assert [b.bot_id for b in bots] == ["personal-banking", "business-banking", "cards"]
    with pytest.raises(DefinitionError, match="'cards' is defined twice"):
        load_bots([folder, EXAMPLE_BOTS[2]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefinitionError, match="no \\*.yaml bot definition"):
        load_bots([tmp_path / "empty"])
