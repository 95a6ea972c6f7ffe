"""Near-domain none-of-these without a calibration set (router/calibration.py): cross-fitting holds
out whole intents as well as phrases, and the phrases of a held-out intent, scored by the fold
model that never saw it, are evidence of what a message no bot of the group serves looks like. On
small synthetic groups (a separable one, an overlapping one), τ then refuses most messages of an
intent the group lacks, which the far-domain generic set alone lets through."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from mbc.runtime.config import DecisionConfig
from mbc.runtime.matching import IntentPhrases
from router.calibration import MIN_INTENTS_TO_HOLD_OUT, CalibrationInput, Costs, cross_fit_scores, cross_fitted, fit_threshold
from router.decision import GroupModel

pytestmark = pytest.mark.unit

CONFIG = DecisionConfig(near_oos_share=0.15)
"""The method on (off by default), at the weight that refuses the example mesh's travel notice."""
OFF = dataclasses.replace(CONFIG, near_oos_share=0.0)
DIM = 32
NEAR = 0.3
"""How far the centres of the intents are from the domain's."""


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _group(seed: int, spread: float, intents: int = 10, phrases: int = 12, near: float = NEAR):
    """`intents` intents of 2 each per bot, each a cluster of `phrases` phrase vectors around its
    centre; all the centres near one domain direction (a near domain), and one more intent of that
    domain that no bot registered: its messages, and far-domain generic ones, come back too. The
    texts share nothing but "a phrase" and a random tag each (neither lexical head, by words or by
    characters, tells an intent from another): the vectors decide."""
    rng = np.random.default_rng(seed)
    domain = rng.normal(0, 1, DIM)
    centres = domain + rng.normal(0, near, (intents + 1, DIM))
    entries, rows = [], []
    for c in range(intents):
        rows.append(_unit(centres[c] + rng.normal(0, spread, (phrases, DIM))))
        words = tuple(f"a phrase {hashlib.sha256(f'{c} {j}'.encode()).hexdigest()[:8]}" for j in range(phrases))
        entries.append(IntentPhrases(f"bot{c // 2}", f"intent{c}", words))
    missing = _unit(centres[intents] + rng.normal(0, spread, (200, DIM)))
    far = _unit(rng.normal(0, 1, (4, DIM))[rng.integers(0, 4, 100)] + rng.normal(0, spread, (100, DIM)))
    in_scope = np.concatenate([_unit(centres[c] + rng.normal(0, spread, (20, DIM))) for c in range(intents)])
    return entries, np.concatenate(rows), missing, far, in_scope


def _fit(entries, vectors, far, config):
    model = GroupModel(entries, vectors, DIM, config)
    generic = [f"something else {j}" for j in range(len(far))]
    data = CalibrationInput([], np.zeros((0, DIM), np.float32), generic, far)
    tau, info = fit_threshold(model, data)
    return model, tau, info


def _accepted(model: GroupModel, tau: float, vectors: np.ndarray) -> float:
    """The share of `vectors` the router would act on (best candidate above τ)."""
    _, conf, _ = model.best(vectors, [f"a phrase {j}" for j in range(len(vectors))])
    return float((conf > tau).mean())


@pytest.mark.parametrize(
    "seed, spread, refused_before_at_most, refused_at_least, in_scope_at_least",
    [
        # Separable: each intent's phrases well apart from the others'; the missing intent among them.
        (7, 0.3, 0.25, 0.5, 0.97),
        (8, 0.3, 0.35, 0.6, 0.97),
        # Overlapping: the clusters touch; the generic set alone lets every such message through.
        (7, 0.45, 0.05, 0.2, 0.93),
        (8, 0.45, 0.05, 0.25, 0.93),
    ],
)
def test_held_out_intents_make_tau_refuse_a_near_domain_message(
    seed, spread, refused_before_at_most, refused_at_least, in_scope_at_least
):
    entries, vectors, missing, far, in_scope = _group(seed, spread)
    before, tau_before, info_before = _fit(entries, vectors, far, OFF)
    model, tau, info = _fit(entries, vectors, far, CONFIG)
    assert "held-out intents" in info["method"] and "near-domain share" in info["method"]
    assert "held-out intents" not in info_before["method"]
    assert tau > tau_before
    # A message of the intent no bot registered: mostly taken by its nearest intent without the
    # held-out evidence, refused far more often with it, for few in-scope messages.
    assert 1 - _accepted(before, tau_before, missing) <= refused_before_at_most
    assert 1 - _accepted(model, tau, missing) >= refused_at_least
    assert _accepted(model, tau, in_scope) >= in_scope_at_least


def test_each_intent_is_held_out_of_one_fold_and_no_training_is_added(monkeypatch):
    entries, vectors, *_ = _group(8, 0.3, intents=12, phrases=10)
    model = GroupModel(entries, vectors, DIM, CONFIG)
    trained = []
    real_init = GroupModel.__init__

    def counting(self, intents, *args, **kwargs):
        trained.append({(e.bot_id, e.intent) for e in intents})
        real_init(self, intents, *args, **kwargs)

    monkeypatch.setattr(GroupModel, "__init__", counting)
    scored, held = cross_fit_scores(model, vectors)
    assert len(trained) == 5  # the five fold models, as before
    missing = [set(model.classes) - seen for seen in trained]
    assert sorted(len(m) for m in missing) == [2, 2, 2, 3, 3]
    assert set().union(*missing) == set(model.classes)  # each intent held out of exactly one fold
    # Every phrase of every intent is near-domain evidence once; in scope, those of another fold's fifth.
    assert sorted(held[0].tolist()) == list(range(len(model.texts)))
    assert len(set(scored[0].tolist())) == len(scored[0]) and len(scored[0]) > 0.7 * len(model.texts)
    # A held-out phrase is never scored by a model that knows its intent.
    assert not np.any(held[1] == model.row_class[held[0]])
    # Seeded: replicas get the same evidence.
    monkeypatch.setattr(GroupModel, "__init__", real_init)
    again = cross_fit_scores(model, vectors)
    for a, b in zip(scored + held, again[0] + again[1]):
        assert np.array_equal(a, b)


def test_small_groups_and_a_zero_share_keep_the_previous_evidence():
    """Two or three intents: a fold model of one or two says little of the group, so no intent is
    held out; `near_oos_share` 0 holds none out either, and gives the τ of before bit for bit."""
    costs = Costs.of(CONFIG)
    for intents in (2, MIN_INTENTS_TO_HOLD_OUT - 1):
        entries, vectors, *_ = _group(9, 0.3, intents=intents)
        crossed = cross_fitted(GroupModel(entries, vectors, DIM, CONFIG), costs)
        assert crossed is not None and crossed[1] is None
    entries, vectors, _, far, _ = _group(10, 0.3)
    model = GroupModel(entries, vectors, DIM, OFF)
    crossed = cross_fitted(model, Costs.of(OFF))
    assert crossed is not None and crossed[1] is None
    scored, held = cross_fit_scores(model, vectors, hold_out_intents=False)
    assert len(held[0]) == 0 and sorted(scored[0].tolist()) == list(range(len(model.texts)))


def test_a_phrase_another_intent_registered_is_not_near_domain_evidence():
    entries, vectors, *_ = _group(11, 0.3, intents=6, phrases=8)
    other = entries[3].phrases[2]  # registered by intent3, and by intent0 in other case and spacing
    shared = IntentPhrases(entries[0].bot_id, entries[0].intent, (*entries[0].phrases[:-1], other.upper().replace(" ", "  ")))
    entries = [shared, *entries[1:]]
    model = GroupModel(entries, vectors, DIM, CONFIG)
    _, held = cross_fit_scores(model, vectors)
    texts = {model.texts[j].casefold() for j in held[0].tolist()}
    assert other not in texts
    assert len(held[0]) == len(model.texts) - 2


def test_a_calibration_set_with_enough_none_of_these_holds_no_intent_out():
    """Its none-of-these stand for the out-of-scope traffic: the phrases are cross-fitted as before."""
    from mbc.runtime.calibration_set import Example

    entries, vectors, missing, far, _ = _group(12, 0.3)
    model = GroupModel(entries, vectors, DIM, CONFIG)
    none = [Example(f"not served {j}") for j in range(CONFIG.min_calibration_none)]
    data = CalibrationInput(none, missing[: len(none)], [f"something else {j}" for j in range(len(far))], far)
    _, info = fit_threshold(model, data)
    _, info_off = fit_threshold(GroupModel(entries, vectors, DIM, OFF), data)
    assert "held-out" not in info["method"] and "generic" not in info["method"]
    assert info["tau"] == info_off["tau"]
