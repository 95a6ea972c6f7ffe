"""τ chosen by what errors cost (router/calibration.py), on small synthetic groups: a separable one,
where almost every none-of-these message must be refused, and an overlapping one, where τ sits
where the costs balance and moves with them."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from mbc.runtime.calibration_set import Example
from mbc.runtime.config import DecisionConfig
from mbc.runtime.matching import IntentPhrases
from mbc.v1 import participant_pb2
from router.calibration import CalibrationInput, Costs, Outcomes, choose_threshold, cost_overrides, expected_cost, fit_threshold
from router.decision import GroupModel

pytestmark = pytest.mark.unit

CONFIG = DecisionConfig()
COSTS = Costs(wrong_transfer=1.0, fallback=0.5, clarify=0.2, oos_share=0.2)
"""Costs of these tests, whatever the defaults."""


def outcomes(right: np.ndarray, none: np.ndarray, wrong_bot: np.ndarray | None = None, costs: Costs = COSTS) -> Outcomes:
    """Utterances whose best candidate is right (scores `right`), of another bot (`wrong_bot`),
    and none-of-these ones (`none`); no second bot close enough to ask."""
    wrong_bot = np.zeros(0) if wrong_bot is None else wrong_bot
    top = np.concatenate([right, wrong_bot, none])
    kind = np.repeat([0, 1, 2], [len(right), len(wrong_bot), len(none)])
    return Outcomes(
        top=top,
        second=np.full(len(top), -np.inf),
        act_cost=np.where(kind == 0, 0.0, costs.wrong_transfer),
        fallback_cost=np.where(kind == 2, 0.0, costs.fallback),
        none=kind == 2,
        right=kind == 0,
        right_bot=kind == 0,
    )


def test_a_separable_group_refuses_almost_every_none_of_these_message():
    rng = np.random.default_rng(1)
    right, none = rng.normal(9.0, 1.0, 3000), rng.normal(3.0, 1.0, 200)
    for costs in (COSTS, Costs.of(CONFIG)):
        tau, info = choose_threshold(outcomes(right, none, costs=costs), costs, CONFIG)
        assert (none <= tau).mean() >= 0.98, "a quantile rule would accept 40% of them"
        assert (right > tau).mean() >= 0.98
        assert info["expected_cost"] < 0.02


def test_an_overlapping_group_puts_tau_where_the_costs_balance():
    rng = np.random.default_rng(2)
    right, wrong, none = rng.normal(6.0, 1.5, 2000), rng.normal(3.5, 1.0, 200), rng.normal(4.0, 1.5, 400)
    o = outcomes(right, none, wrong)
    tau, _ = choose_threshold(o, COSTS, CONFIG)
    # The least raw (unsmoothed) cost over every τ is within a hair of the cost at the τ chosen.
    taus = np.linspace(0, 10, 2001)
    raw = expected_cost(o, taus, COSTS, CONFIG, np.zeros(len(o)))
    at_tau = expected_cost(o, np.array([tau]), COSTS, CONFIG, np.zeros(len(o)))[0]
    assert at_tau <= raw.min() + 0.005
    assert 3.5 < tau < 6.0 and 0.4 < (none <= tau).mean() < 0.95
    # τ follows the costs: dearer wrong transfers or more out-of-scope traffic raise it, a dearer
    # fallback lowers it.
    for change, direction in [
        ({"wrong_transfer": 2.0}, +1),
        ({"oos_share": 0.4}, +1),
        ({"fallback": 0.9}, -1),
    ]:
        costs = dataclasses.replace(COSTS, **change)
        moved, _ = choose_threshold(outcomes(right, none, wrong, costs), costs, CONFIG)
        assert (moved - tau) * direction > 0.05, change


def test_counts_in_the_calibration_set_do_not_weigh_out_of_scope_traffic():
    """200 or 2,000 none-of-these utterances drawn alike give the same τ: `oos_share` weighs them."""
    rng = np.random.default_rng(3)
    right = rng.normal(6.0, 1.5, 2000)
    few = choose_threshold(outcomes(right, rng.normal(4.0, 1.5, 200)), COSTS, CONFIG)[0]
    many = choose_threshold(outcomes(right, rng.normal(4.0, 1.5, 2000)), COSTS, CONFIG)[0]
    assert abs(few - many) < 0.3


def test_smoothing_makes_a_small_calibration_set_cost_less_on_new_messages():
    """30 calibration sets of 40 in-scope and 20 none-of-these utterances: the τ of the blurred
    scores costs less, on the population they were drawn from, than that of the raw scores."""
    rng = np.random.default_rng(4)
    population = outcomes(rng.normal(6.0, 1.5, 20000), rng.normal(4.0, 1.5, 20000))
    raw_config = dataclasses.replace(CONFIG, threshold_smoothing=0.0)
    smooth_cost, raw_cost = [], []
    for _ in range(30):
        o = outcomes(rng.normal(6.0, 1.5, 40), rng.normal(4.0, 1.5, 20))
        for config, costs in ((CONFIG, smooth_cost), (raw_config, raw_cost)):
            tau, _ = choose_threshold(o, COSTS, config)
            costs.append(expected_cost(population, np.array([tau]), COSTS, CONFIG, np.zeros(len(population)))[0])
    assert np.mean(smooth_cost) < np.mean(raw_cost)


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    v = centres[rng.integers(0, len(centres), n)] + rng.normal(0, spread, (n, centres.shape[1]))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_registered_phrases_and_the_generic_set_stand_in_for_a_calibration_set():
    """A separable group of 3 bots with no calibration set: the registered phrases, cross-fitted,
    are the in-scope evidence; a generic none-of-these set far from them is refused, almost all."""
    rng = np.random.default_rng(5)
    dim = 32
    centres = rng.normal(0, 1, (6, dim))
    intents, rows = [], []
    for c in range(6):
        v = _clusters(rng, centres[c : c + 1], 12, 0.15)
        intents.append(IntentPhrases(f"bot{c // 2}", f"intent{c}", tuple(f"bot{c // 2} intent{c} phrase {j}" for j in range(12))))
        rows.append(v)
    model = GroupModel(intents, np.concatenate(rows), dim, CONFIG)
    elsewhere = rng.normal(0, 1, (4, dim))
    generic = [f"something else {j}" for j in range(100)]
    none = [Example(f"another question {j}") for j in range(15)]  # fewer than min_calibration_none
    data = CalibrationInput(none, _clusters(rng, elsewhere, 15, 0.15), generic, _clusters(rng, elsewhere, 100, 0.15))
    tau, info = fit_threshold(model, data)
    assert "cross-fitted registered phrases" in info["method"] and "generic" in info["method"]
    assert info["none_recall"] >= 0.95
    new = _clusters(rng, centres, 200, 0.15)
    top, conf, _ = model.best(new, ["bot intent phrase"] * len(new))
    assert (conf > tau).mean() >= 0.95


def test_bot_first_ranks_a_bot_by_the_mass_of_its_intents():
    """Two intents of bot a at 5.0 and 4.9 outweigh bot b's one at 5.2 (T = 1), not at T → 0."""
    rng = np.random.default_rng(6)
    intents = [IntentPhrases(b, i, (f"{b} {i} one", f"{b} {i} two")) for b, i in [("a", "x"), ("a", "y"), ("b", "z")]]
    vectors = _clusters(rng, rng.normal(0, 1, (3, 8)), 6, 0.1)
    fused = np.array([[5.0, 4.9, 5.2]])
    candidates = np.ones_like(fused, dtype=bool)
    for temperature, first in [(1.0, "a"), (0.05, "b")]:
        config = dataclasses.replace(CONFIG, bot_first=True, bot_temperature=temperature)
        scores = GroupModel(intents, vectors, 8, config)._bot_scores(fused, candidates)[0]
        assert scores[0] == scores[1]  # one score per bot
        assert ("a" if scores[0] > scores[2] else "b") == first
    # A bot without candidates has no mass.
    only_b = np.array([[False, False, True]])
    assert np.isneginf(GroupModel(intents, vectors, 8, CONFIG)._bot_scores(fused, only_b)[0][0])


def _overlapping_group(seed: int = 6):
    """3 bots of 2 intents whose clusters touch, and a calibration set of in-scope and none-of-these
    messages near them: τ sits where the costs balance."""
    rng = np.random.default_rng(seed)
    dim = 32
    centres = rng.normal(0, 1, (6, dim))
    intents, rows, examples, vectors = [], [], [], []
    for c in range(6):
        rows.append(_clusters(rng, centres[c : c + 1], 12, 0.45))
        intents.append(IntentPhrases(f"bot{c // 2}", f"intent{c}", tuple(f"phrase {c * 12 + j}" for j in range(12))))
        examples += [Example(f"asked {c} {j}", f"bot{c // 2}", f"intent{c}") for j in range(10)]
        vectors.append(_clusters(rng, centres[c : c + 1], 10, 0.45))
    examples += [Example(f"not served {j}") for j in range(30)]
    vectors.append(_clusters(rng, centres.mean(0, keepdims=True), 30, 0.45))
    model = GroupModel(intents, np.concatenate(rows), dim, CONFIG)
    return model, CalibrationInput(examples, np.concatenate(vectors), [], np.zeros((0, dim), np.float32))


def test_a_groups_own_costs_fit_tau_as_the_same_router_settings_would():
    """The costs a group sets (`GroupSettings.decision_costs`) replace the router's for its τ only:
    the τ the same router-wide settings would give, named in how τ was fitted."""
    model, data = _overlapping_group()
    tau_default, _ = fit_threshold(model, data)
    own = cost_overrides(participant_pb2.DecisionCosts(wrong_transfer=4.0, oos_share=0.3))
    assert own == {"cost_wrong_transfer": 4.0, "oos_share": 0.3}
    tau_own, info = fit_threshold(model, dataclasses.replace(data, costs=own))
    router_wide = copy.copy(model)
    router_wide.config = dataclasses.replace(CONFIG, cost_wrong_transfer=4.0, oos_share=0.3)
    assert tau_own == fit_threshold(router_wide, data)[0]
    assert tau_own > tau_default  # dearer wrong transfers, more out-of-scope traffic: fewer acts
    assert info["group_costs"] == own and "wrong transfer 4," in info["method"]
    assert fit_threshold(model, dataclasses.replace(data, costs={}))[0] == tau_default


@pytest.mark.parametrize(
    ("costs", "words"),
    [
        ({"wrong_transfer": -1.0}, "wrong_transfer is -1.0"),
        ({"clarify": float("inf")}, "clarify is inf"),
        ({"oos_share": 1.0}, "oos_share is 1.0: a share"),
        ({"oos_share": 0.0}, "oos_share is 0.0"),
    ],
)
def test_a_cost_out_of_range_is_refused_with_what_is_wrong(costs, words):
    with pytest.raises(ValueError, match=words):
        cost_overrides(participant_pb2.DecisionCosts(**costs))
    assert cost_overrides(participant_pb2.DecisionCosts()) == {}
    assert cost_overrides(participant_pb2.DecisionCosts(clarify=0.0)) == {"cost_clarify": 0.0}  # set to 0: not unset
