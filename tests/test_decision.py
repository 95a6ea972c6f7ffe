"""Routing decisions: ratings relative to τ, act / disambiguate / none, calibration, recalibration
on a participant change (real model, real etcd where the router runs)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from mbc.runtime.calibration_set import CalibrationError, Example, dump_calibration, parse_calibration
from mbc.runtime.config import DecisionConfig, RouterConfig
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import common_pb2, router_pb2
from router.calibration import CalibrationInput, build_group_model, update_group_model
from router.core import RouterCore
from router.decision import ACT, DISAMBIGUATE, NONE, Scored, changed_bots, decide

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

R = common_pb2

INTENTS = [
    IntentPhrases(
        "cards",
        "lost_card",
        (
            "I lost my credit card",
            "my card was stolen",
            "freeze my card",
            "I can't find my debit card",
            "block my card it is missing",
        ),
    ),
    IntentPhrases(
        "cards",
        "activate_card",
        ("activate my new card", "how do I turn on my new card", "my new card arrived, enable it", "card activation"),
    ),
    IntentPhrases(
        "travel",
        "book_flight",
        ("book a flight to Rome", "I need a plane ticket", "find me flights to Paris", "reserve a seat on a plane"),
    ),
    IntentPhrases(
        "travel",
        "hotel",
        (
            "book a hotel room",
            "I need a place to stay in Berlin",
            "reserve a hotel for two nights",
            "find a hotel near the airport",
        ),
    ),
    IntentPhrases(
        "loans",
        "mortgage",
        ("what are your mortgage rates", "I want a home loan", "refinance my mortgage", "how much house can I afford"),
    ),
]


def s(bot, intent, confidence, rating):
    return Scored(bot, intent, confidence, 0.8, "", rating)


@pytest.mark.unit
def test_act_when_first_is_good_none_otherwise():
    assert decide([s("a", "x", 9.0, R.RATING_GOOD), s("b", "y", 3.0, R.RATING_POOR)], 0.25).decision == ACT
    assert decide([s("a", "x", 5.0, R.RATING_FAIR_PLUS), s("b", "y", 1.0, R.RATING_POOR)], 0.25).decision == NONE
    assert decide([], 0.25).decision == NONE


@pytest.mark.unit
def test_disambiguate_when_two_bots_are_close_and_fair_plus():
    ranked = [
        s("a", "x", 7.0, R.RATING_GOOD),
        s("a", "z", 6.95, R.RATING_GOOD),
        s("b", "y", 6.9, R.RATING_GOOD),
        s("c", "w", 6.85, R.RATING_FAIR_PLUS),
    ]
    verdict = decide(ranked, 0.25)
    assert verdict.decision == DISAMBIGUATE
    # The options: the best intent of each close bot, at most three.
    assert [(c.bot_id, c.intent) for c in verdict.candidates] == [("a", "x"), ("b", "y"), ("c", "w")]
    # Same bot twice is not ambiguous; a second bot below FAIR PLUS or beyond the margin is not either.
    assert decide(ranked[:2], 0.25).decision == ACT
    assert decide([ranked[0], s("b", "y", 6.9, R.RATING_FAIR)], 0.25).decision == ACT
    assert decide([ranked[0], s("b", "y", 6.0, R.RATING_GOOD)], 0.25).decision == ACT
    assert decide(ranked, 0.0).decision == ACT


@pytest.mark.unit
def test_calibration_file_format():
    text = '{"text": "lost my card", "bot": "cards", "intent": "lost_card"}\n# comment\n{"text": "pizza?", "bot": null}\n'
    examples = parse_calibration(text)
    assert examples == [Example("lost my card", "cards", "lost_card"), Example("pizza?")]
    assert parse_calibration(dump_calibration(examples)) == examples
    assert parse_calibration(json.dumps([{"text": "x", "group": "g"}])) == [Example("x", group="g")]
    for bad, words in [
        ('{"text": ""}', "non-empty"),
        ('{"text": "a", "colour": 1}', "unknown field"),
        ('{"text": "a", "intent": "x"}', "needs its bot"),
        ("{nope", "not valid JSON"),
    ]:
        with pytest.raises(CalibrationError, match=words):
            parse_calibration(bad, "f.jsonl")


@pytest.fixture(scope="module")
def vectors(encoder):
    return encoder.encode_phrases(IntentCatalog.phrases_of(INTENTS))


def _input(encoder, examples):
    from router.calibration import generic_none

    generic = generic_none()
    return CalibrationInput(
        examples, encoder.encode_phrases([e.text for e in examples]), generic, encoder.encode_phrases(generic)
    )


def test_model_ratings_and_candidates(encoder, vectors):
    model = build_group_model(INTENTS, vectors, encoder.dim, DecisionConfig(), _input(encoder, []))
    assert "registered phrases" in model.calibration["method"]
    ranked = model.rank(encoder.encode(["somebody stole my card"])[0], "somebody stole my card")
    assert (ranked[0].bot_id, ranked[0].intent) == ("cards", "lost_card")
    assert ranked[0].rating >= R.RATING_GOOD and model.decide(ranked).decision == ACT
    assert -1 <= ranked[0].score <= 1 and ranked[0].matched_phrase in INTENTS[0].phrases
    assert ranked[0].confidence > model.tau
    other = model.rank(encoder.encode(["which pizza place delivers fastest"])[0], "which pizza place delivers fastest")
    assert model.decide(other).decision == NONE
    without = model.rank(encoder.encode(["somebody stole my card"])[0], "somebody stole my card", exclude_bot="cards")
    assert {c.bot_id for c in without} <= {"travel", "loans"}


def test_rank_many_is_rank_of_each_utterance(encoder, vectors):
    model = build_group_model(INTENTS, vectors, encoder.dim, DecisionConfig(), _input(encoder, []))
    texts = [
        "somebody stole my card",
        "I need a plane ticket to Oslo",
        "refinance my house",
        "which pizza place delivers fastest",
    ]
    Q = encoder.encode(texts)
    for exclude in (None, "cards"):
        many = model.rank_many(Q, texts, exclude_bot=exclude)
        for q, text in enumerate(texts):
            single = model.rank(Q[q], text, exclude_bot=exclude)
            assert [(c.bot_id, c.intent, c.rating, c.matched_phrase) for c in many[q]] == [
                (c.bot_id, c.intent, c.rating, c.matched_phrase) for c in single
            ]
            assert [c.confidence for c in many[q]] == pytest.approx([c.confidence for c in single], abs=1e-4)


def test_a_calibration_set_changes_tau(encoder, vectors):
    cfg = DecisionConfig(min_calibration_none=5)
    base = build_group_model(INTENTS, vectors, encoder.dim, cfg, _input(encoder, []))
    # Near-domain "none" utterances, as likely as the registered phrases under this model: rejecting
    # them costs as many in-scope messages, so τ rises to reject most of them only where they are
    # most of the traffic (`oos_share`).
    hard_none = [
        "I lost my passport",
        "my luggage was stolen",
        "activate my gym membership",
        "book a table for dinner",
        "rent a car in Rome",
        "what are the savings account rates",
        "how do I turn on my new phone",
        "reserve a concert ticket",
    ]
    calibrated = build_group_model(
        INTENTS, vectors, encoder.dim, cfg, _input(encoder, [Example(t) for t in hard_none]), previous=base
    )
    assert calibrated.tau != base.tau
    assert "calibration set" in calibrated.calibration["method"]
    assert calibrated.times.warm_started
    mostly_none = dataclasses.replace(cfg, oos_share=0.8)
    rejecting = build_group_model(INTENTS, vectors, encoder.dim, mostly_none, _input(encoder, [Example(t) for t in hard_none]))
    assert rejecting.tau > calibrated.tau and rejecting.calibration["none_recall"] >= 0.6


CHANGED = [
    *(i for i in INTENTS if i.bot_id == "travel" and i.intent != "hotel"),
    IntentPhrases(
        "travel",
        "car_rental",
        ("rent a car in Rome", "I need a rental car", "hire a car at the airport", "book a car for the weekend"),
    ),
    *(i for i in INTENTS if i.bot_id == "loans"),
    IntentPhrases("pets", "vet", ("book a vet appointment", "my dog is sick", "find an animal clinic", "my cat needs shots")),
]
"""INTENTS after cards left, travel swapped its hotel intent for car rental, and pets joined."""

ASKED = [
    "I lost my credit card",
    "rent a car in Milan",
    "reserve a hotel in Oslo",
    "my puppy is ill",
    "refinance my mortgage",
    "find flights to Tokyo",
    "which pizza place delivers",
]


def test_a_large_group_updated_in_place_scores_as_one_built_anew(encoder, vectors):
    """A large group (no heads) is changed bot by bot in its shared index: its answers are those of
    a model built from scratch on the new intents, and the model it replaces keeps answering."""
    cfg = DecisionConfig(heads_max_phrases=1)
    calibration = _input(encoder, [])
    before = build_group_model(INTENTS, vectors, encoder.dim, cfg, calibration)
    assert before.large
    changed = changed_bots(INTENTS, CHANGED)
    assert changed.keys() == {"cards", "travel", "pets"} and changed["cards"] == ()
    added = IntentCatalog.phrases_of(e for entries in changed.values() for e in entries)
    updated = update_group_model(before, changed, encoder.encode_phrases(added), calibration)
    fresh = build_group_model(CHANGED, encoder.encode_phrases(IntentCatalog.phrases_of(CHANGED)), encoder.dim, cfg, calibration)

    assert updated.catalog is before.catalog and updated.bots == ["loans", "pets", "travel"]
    assert updated.tau == pytest.approx(fresh.tau, abs=1e-4)
    Q = encoder.encode(ASKED)
    for exclude in (None, "travel"):
        for got, want in zip(updated.rank_many(Q, ASKED, exclude), fresh.rank_many(Q, ASKED, exclude)):
            assert [(c.bot_id, c.intent, c.rating, c.matched_phrase) for c in got] == [
                (c.bot_id, c.intent, c.rating, c.matched_phrase) for c in want
            ]
            assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)
    assert updated.rank(Q[1], ASKED[1])[0].intent == "car_rental"
    # The replaced model, still serving until the swap: the departed are gone, the new not yet there.
    stale = {(c.bot_id, c.intent) for r in before.rank_many(Q, ASKED) for c in r}
    assert stale and not any(bot in ("cards", "pets") or intent == "car_rental" for bot, intent in stale)


def test_matches_scored_while_a_large_group_changes_never_fail(encoder, vectors):
    """Scoring threads use whichever model they hold while the index changes under them, as the
    router's encoder threads do during an update: no error, and never a phrase of a bot that left."""
    import threading

    cfg = DecisionConfig(heads_max_phrases=1)
    calibration = _input(encoder, [])
    models = [build_group_model(INTENTS, vectors, encoder.dim, cfg, calibration)]
    Q = encoder.encode(ASKED)
    changes = []  # there and back: (changed bots, the vectors of their phrases)
    for before, after in [(INTENTS, CHANGED), (CHANGED, INTENTS)]:
        changed = changed_bots(before, after)
        changes.append((changed, encoder.encode_phrases(IntentCatalog.phrases_of(e for es in changed.values() for e in es))))
    stop, errors, seen = threading.Event(), [], set()

    def score() -> None:
        while not stop.is_set():
            try:
                for ranked in models[-1].rank_many(Q, ASKED) + models[0].rank_many(Q, ASKED, "loans"):
                    seen.update(c.bot_id for c in ranked)
            except Exception as e:  # noqa: BLE001 - the assertion below reports it
                errors.append(e)
                return

    threads = [threading.Thread(target=score) for _ in range(2)]
    for t in threads:
        t.start()
    for step in range(40):
        models.append(models[-1].updated(*changes[step % 2]))
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert seen <= {"cards", "travel", "loans", "pets"}
    final = build_group_model(INTENTS, vectors, encoder.dim, cfg, calibration)
    for got, want in zip(models[-1].rank_many(Q, ASKED), final.rank_many(Q, ASKED)):
        assert [(c.bot_id, c.intent) for c in got] == [(c.bot_id, c.intent) for c in want]


def test_a_small_group_is_not_updated_in_place(encoder, vectors):
    model = build_group_model(INTENTS, vectors, encoder.dim, DecisionConfig(), _input(encoder, []))
    assert not model.large
    with pytest.raises(ValueError, match="large group"):
        model.updated({}, vectors[:0])


async def test_router_updates_a_large_group_in_place(encoder, tmp_path):
    """RouterCore with a group past `heads_max_phrases`: a participant change reaches Match without
    training (the same index, changed in place), and a new bot answers its intents."""
    from mbc.v1 import participant_pb2

    def snapshot(intents):
        return {
            f"/mbc/v1/participants/g/{bot}/i1": participant_pb2.Participant(
                bot_id=bot,
                instance_id="i1",
                address="127.0.0.1:19",
                group="g",
                collaboration=True,
                intents=[participant_pb2.Intent(name=i.intent, phrases=i.phrases) for i in intents if i.bot_id == bot],
            )
            for bot in {i.bot_id for i in intents}
        }

    core = RouterCore(RouterConfig(embedding_cache_dir=str(tmp_path), decision=DecisionConfig(heads_max_phrases=10)), encoder)
    await core.prepare()
    core.submit(snapshot(INTENTS), 1)
    await asyncio.wait_for(core.wait_builds(1), 60)
    first = core.models["g"]
    assert first.large
    core.submit(snapshot(CHANGED), 2)
    await asyncio.wait_for(core.wait_builds(2), 60)
    model = core.models["g"]
    assert model.catalog is first.catalog and model.bots == ["loans", "pets", "travel"]
    for text, bot, intent in [("rent a car in Milan", "travel", "car_rental"), ("my puppy is ill", "pets", "vet")]:
        result = await core.match(text, "", "g", 3, 0)
        assert (result.candidates[0].match.bot_id, result.candidates[0].match.intent) == (bot, intent)
    result = await core.match("I lost my credit card", "", "g", 5, 0)
    assert all(c.match.bot_id != "cards" for c in result.candidates)
    # Shrunk below the threshold: heads again, trained from scratch (there were none to start from).
    core.submit(snapshot([i for i in CHANGED if i.bot_id != "travel"]), 3)
    await asyncio.wait_for(core.wait_builds(3), 60)
    model = core.models["g"]
    assert not model.large and model.W.any() and not model.times.warm_started
    result = await core.match("my puppy is ill", "", "g", 3, 0)
    assert (result.candidates[0].match.bot_id, result.candidates[0].match.intent) == ("pets", "vet")
    await core.close()


async def test_an_instance_that_leaves_is_not_named_while_a_model_trains(encoder, tmp_path):
    """travel runs two instances. loans joins, then cards leaves and one travel instance with it:
    two models to train, each held here (a large group's training takes seconds). Match stops
    naming the instance that left at once, and never names it again, not even when the model
    of the earlier change is swapped in while the later one trains."""
    import threading

    from mbc.v1 import participant_pb2

    def record(bot, instance):
        return f"/mbc/v1/participants/g/{bot}/{instance}", participant_pb2.Participant(
            bot_id=bot,
            instance_id=instance,
            address=f"127.0.0.1:{len(bot)}{instance[-1]}",
            group="g",
            collaboration=True,
            intents=[participant_pb2.Intent(name=i.intent, phrases=i.phrases) for i in INTENTS if i.bot_id == bot],
        )

    async def travel_addresses():
        results = await asyncio.gather(*(core.match("book a flight to Rome", "", "g", 3, 0) for _ in range(4)))
        assert {r.revision for r in results} == {core.directory.revision}
        return {c.address for r in results for c in r.candidates if c.match.bot_id == "travel"}

    def hold_trainer() -> tuple[threading.Event, threading.Event]:
        """Keeps the router's one training thread busy, once it gets to this job (the first event),
        until the second event is set."""
        holding, release = threading.Event(), threading.Event()
        core._trainer.submit(lambda: holding.set() or release.wait())
        return holding, release

    async def until_a_build_waits_for_the_trainer() -> None:
        for _ in range(600):
            if core._trainer._work_queue.qsize():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("no build reached the trainer: nothing was tested")

    # One training slot, so that holding its thread holds every build.
    core = RouterCore(RouterConfig(embedding_cache_dir=str(tmp_path), training_concurrency=1), encoder)
    await core.prepare()
    travel = dict([record("travel", "i1"), record("travel", "i2")])
    core.submit({**dict([record("cards", "i1")]), **travel}, 1)
    await asyncio.wait_for(core.wait_builds(1), 60)
    assert await travel_addresses() == {"127.0.0.1:61", "127.0.0.1:62"}

    holding, first = hold_trainer()
    second = None
    try:
        assert await asyncio.to_thread(holding.wait, 30)  # so a job queued from now on is a build's
        core.submit({**dict([record("cards", "i1"), record("loans", "i1")]), **travel}, 2)
        await until_a_build_waits_for_the_trainer()
        core.submit(dict([record("loans", "i1"), record("travel", "i1")]), 3)
        assert core.builds == 1 and core.directory.revision == 3
        assert await travel_addresses() == {"127.0.0.1:61"}
        first.set()
        _, second = hold_trainer()  # queued behind revision 2's training, ahead of revision 3's
        await asyncio.wait_for(core.wait_builds(2), 60)
        await until_a_build_waits_for_the_trainer()
        assert core.builds == 2 and core.directory.revision == 3
        assert await travel_addresses() == {"127.0.0.1:61"}
    finally:
        first.set()
        if second is not None:
            second.set()
    await asyncio.wait_for(core.wait_builds(3), 60)
    assert core.models["g"].bots == ["loans", "travel"] and await travel_addresses() == {"127.0.0.1:61"}
    await core.close()


async def test_router_recalibrates_on_join_leave_and_new_calibration(encoder, tmp_path):
    """RouterCore fed with participant snapshots (as from etcd): τ follows the bots and the set."""
    from mbc.v1 import participant_pb2

    def participant(bot_id, intents):
        return participant_pb2.Participant(
            bot_id=bot_id,
            instance_id="i1",
            address=f"127.0.0.1:1{len(bot_id)}",
            group="g",
            collaboration=True,
            intents=[participant_pb2.Intent(name=i.intent, phrases=i.phrases) for i in intents if i.bot_id == bot_id],
        )

    # A cache of its own: heads trained by another run must not stand in for the retraining tested here.
    core = RouterCore(RouterConfig(embedding_cache_dir=str(tmp_path)), encoder)
    await core.prepare()
    labelled = [
        Example("book me a flight to Lisbon", "travel", "book_flight"),
        Example("a hotel in Madrid please", "travel", "hotel"),
    ]
    core.set_calibration(labelled)
    snapshot = {f"/mbc/v1/participants/g/{b}/i1": participant(b, INTENTS) for b in ("cards", "travel", "loans")}
    core.submit(snapshot, 1)
    await asyncio.wait_for(core.wait_builds(1), 60)
    tau_all = core.models["g"].tau
    result = await core.match("I need a plane ticket to Oslo", "", "g", 3, 0)
    assert result.decision == router_pb2.DECISION_ACT and result.candidates[0].match.bot_id == "travel"
    # Concurrent Matches are encoded and scored together (off the event loop): same answers.
    asks = [
        ("I need a plane ticket to Oslo", "", "g"),
        ("somebody stole my card", "travel", ""),
        ("refinance my mortgage", "", ""),
        ("which pizza place delivers fastest", "cards", "g"),
    ]
    alone = [await core.match(t, b, g, 3, 0) for t, b, g in asks]
    together = await asyncio.gather(*(core.match(t, b, g, 3, 0) for t, b, g in asks * 3))
    for one, many in zip(alone * 3, together):
        assert one.decision == many.decision
        assert [(c.match.bot_id, c.match.intent, c.match.rating) for c in one.candidates] == [
            (c.match.bot_id, c.match.intent, c.match.rating) for c in many.candidates
        ]

    # travel leaves: its labelled utterances become "none" for the others; τ is refitted on its own.
    core.submit({k: v for k, v in snapshot.items() if "/travel/" not in k}, 2)
    await asyncio.wait_for(core.wait_builds(2), 60)
    model = core.models["g"]
    assert model.bots == ["cards", "loans"] and model.calibration["calibration_none"] == 2
    assert not model.times.warm_started  # from scratch: what a router started now would train
    result = await core.match("I need a plane ticket to Oslo", "", "g", 3, 0)
    assert result.decision == router_pb2.DECISION_NONE

    # A new calibration set: only τ is refitted (same heads).
    thresholds = await core.calibrate(labelled + [Example(t) for t in ["my card was declined at dinner"] * 25], timeout=60)
    assert core.models["g"].W is model.W
    assert "calibration set" in thresholds["g"]["method"] and thresholds["g"]["tau"] != model.tau
    assert tau_all != 0
    await core.close()


@pytest.mark.unit
def test_directory_reads_only_the_records_that_changed():
    """Unchanged records (the watcher keeps their objects) are not read again; a changed one is,
    and one with too many intents is left out."""
    from mbc.v1 import participant_pb2
    from router.directory import Directory

    def record(bot, *intents):
        return participant_pb2.Participant(
            bot_id=bot,
            instance_id="i1",
            address="127.0.0.1:19",
            group="g",
            collaboration=True,
            intents=[participant_pb2.Intent(name=name, phrases=[f"{name} please", f"{name} please", "help"]) for name in intents],
        )

    snapshot = {"/p/g/cards/i1": record("cards", "lost_card"), "/p/g/travel/i1": record("travel", "book_flight")}
    first = Directory.from_participants(snapshot, 1)
    second = Directory.from_participants({**snapshot, "/p/g/travel/i1": record("travel", "hotel", "car")}, 2, 1, first)
    assert second.groups["g"]["cards"].intents is first.groups["g"]["cards"].intents
    assert "travel" not in second.groups["g"]  # two intents, one allowed
    third = Directory.from_participants({**snapshot, "/p/g/travel/i1": record("travel", "hotel")}, 3, None, second)
    assert third.candidates_of("g") == (
        IntentPhrases("cards", "lost_card", ("lost_card please", "help")),
        IntentPhrases("travel", "hotel", ("hotel please", "help")),
    )


LOCATION = IntentPhrases(
    "places",
    "current_location",
    (
        "i'm lost",
        "can you tell me how to figure out my current location",
        "i need to find out how i know my location right now",
        "can you tell me my location",
        "what do i do to find my current location",
        "my current location",
        "how can i know my current location",
        "let me know where i'm located",
    ),
)
UNSURE = IntentPhrases(
    "chat",
    "maybe",
    (
        "i can't decide",
        "i can't tell",
        "i'll have to think about it",
        "not sure if that's a yes or a no",
        "not quite sure how to respond",
        "i'm torn on how to answer",
        "not sure, maybe",
        "i have no earthly idea at all",
    ),
)


def test_a_registered_phrase_ranks_its_own_intent_first_without_heads(encoder):
    """A short registered phrase ("i'm lost") whose intent's other phrases are unlike it: a model
    without heads (provisional, or a large group) scores another bot's vaguer intent higher on its
    nearest phrases and centroid, yet the consumer who types it is routed to the bot that
    registered it."""
    intents = [LOCATION, UNSURE]
    vectors = encoder.encode_phrases(IntentCatalog.phrases_of(intents))
    calibration = _input(encoder, [])
    Q = encoder.encode(["i'm lost"])

    def first(registered_cosine: float) -> tuple[str, str]:
        cfg = DecisionConfig(heads_max_phrases=1, registered_cosine=registered_cosine)
        model = build_group_model(intents, vectors, encoder.dim, cfg, calibration)
        assert model.large
        top = model.rank(Q[0], "i'm lost")[0]
        return top.bot_id, top.intent

    assert first(2.0) == ("chat", "maybe")  # the rule off: the fused scores alone rank it second
    assert first(DecisionConfig().registered_cosine) == ("places", "current_location")


def test_a_misspelled_message_is_ranked_by_the_words_it_misspells(encoder, vectors):
    """Typos defeat the word SVM and blur the embedding; the character n-gram SVM still reads
    most of "activaet" as "activate": the consumer who types fast reaches the cards bot, not travel."""
    calibration = _input(encoder, [])
    typed = "activaet my nwe crad"
    Q = encoder.encode([typed])

    def first(char_svm_weight: float) -> tuple[str, str]:
        model = build_group_model(INTENTS, vectors, encoder.dim, DecisionConfig(char_svm_weight=char_svm_weight), calibration)
        assert (model.heads().char_svm is not None) == (char_svm_weight > 0)
        top = model.rank(Q[0], typed)[0]
        return top.bot_id, top.intent

    assert first(0.0) == ("travel", "book_flight")  # without it: another bot
    assert first(DecisionConfig().char_svm_weight) == ("cards", "activate_card")
