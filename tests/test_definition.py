"""Bot definition files: the examples load, and mistakes get errors that say what is wrong."""

from pathlib import Path

import pytest
import yaml

from bot_server.definition import BotDefinition, DefinitionError

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

VALID = {
    "id": "cards",
    "group": "retail-bank",
    "fallback": "Sorry.",
    "intents": [{"name": "lost_card", "phrases": ["I lost my card"]}],
    "dialogs": [{"intent": "lost_card", "responses": ["I froze it."]}],
}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_real_bots(path):
    d = BotDefinition.from_file(path)
    assert d.collaboration and d.group == "retail-bank"
    assert len(d.intents) >= 5
    assert all(len(i.phrases) >= 10 for i in d.intents)


def test_examples_do_not_share_phrases():
    seen = {}
    for path in EXAMPLES.glob("*.yaml"):
        d = BotDefinition.from_file(path)
        for intent in d.intents:
            for phrase in intent.phrases:
                assert seen.setdefault(phrase.lower(), d.bot_id) == d.bot_id, phrase


@pytest.mark.parametrize(
    "change, message",
    [
        ({"id": "bad/id"}, "id 'bad/id' is invalid"),
        ({"fallback": ""}, "fallback is required"),
        ({"intents": []}, "intents is required"),
        ({"dialogs": [{"intent": "nope", "responses": ["x"]}]}, "'nope', which is not defined"),
        ({"dialogs": [{"intent": "lost_card", "responses": []}]}, "responses must be a non-empty list"),
        ({"intents": [{"name": "lost_card", "phrases": []}]}, "phrases must be a non-empty list"),
        ({"colour": "red"}, "unknown field(s): colour"),
        ({"collaboration": "yes"}, "collaboration must be true or false"),
    ],
)
def test_mistakes_are_explained(change, message):
    with pytest.raises(DefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BotDefinition.from_dict({**VALID, **change})


def test_intent_without_dialog_is_refused():
    data = {**VALID, "intents": VALID["intents"] + [{"name": "activate", "phrases": ["activate my card"]}]}
    with pytest.raises(DefinitionError, match="intents without a dialog: activate"):
        BotDefinition.from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bot.yaml"
    path.write_text("id: [unclosed")
    with pytest.raises(DefinitionError, match=str(path)):
        BotDefinition.from_file(path)
    path.write_text(yaml.safe_dump({**VALID, "group": ""}))
    with pytest.raises(DefinitionError, match=f"{path}: group is required"):
        BotDefinition.from_file(path)


def test_version_changes_with_content():
    a = BotDefinition.from_dict(VALID)
    b = BotDefinition.from_dict({**VALID, "intents": [{"name": "lost_card", "phrases": ["my card is gone"]}]})
    assert a.version == BotDefinition.from_dict(VALID).version
    assert a.version != b.version
