"""Reading the consumer's answer to a clarifying question (pure logic)."""

import pytest

from bot_server.engine import _chosen_option

pytestmark = pytest.mark.unit

OPTIONS = (
    ("business-banking", "business_loan", "Business Banking Assistant: business loan"),
    ("personal-banking", "personal_loan", "Personal Banking Assistant: personal loan"),
    ("", "", "None of these"),
)


@pytest.mark.parametrize(
    "answer, bot",
    [
        ("1", "business-banking"),
        ("2)", "personal-banking"),
        ("option 2", "personal-banking"),
        ("3", ""),
        ("none of these", ""),
        ("Neither.", ""),
        ("personal loan", "personal-banking"),
        ("the Business Banking Assistant please", "business-banking"),
    ],
)
def test_answers_that_pick_an_option(answer, bot):
    assert _chosen_option(OPTIONS, answer)[0] == bot


@pytest.mark.parametrize("answer", ["4", "0", "loan", "what's my balance", ""])
def test_answers_that_pick_nothing_are_routed_as_new_messages(answer):
    assert _chosen_option(OPTIONS, answer) is None
