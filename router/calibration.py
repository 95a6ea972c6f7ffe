"""Fitting each group's threshold τ, and the labelled calibration set that feeds it.

A calibration set is a list of utterances labelled with the bot and intent that should take them,
or with nothing ("none of these"). File format (`mbc calibrate FILE`, `DecisionConfig.calibration_path`):
JSON Lines, one object per line, or one JSON array of such objects:

    {"text": "set a travel notice for Japan", "bot": "travel", "intent": "travel_notice"}
    {"text": "which pizza place delivers", "bot": null}          # none of these
    {"text": "...", "bot": "cards", "intent": "...", "group": "retail-bank"}   # optional group

How τ is fitted for a group, every time its participants or the calibration set change: the τ
that minimises the expected cost of the decisions the router would make on the evidence
(`choose_threshold`), with explicit costs for a wrong transfer, a fallback for a message a bot
could serve and a clarifying question, and the share of out-of-scope traffic weighing the
none-of-these utterances against the in-scope ones (`Costs`, `DecisionConfig`). The scores are
blurred by a kernel of Silverman's bandwidth so that τ does not hang on one utterance of a small set.

The evidence: the calibration set's utterances for the group (items with a `group` count only
for that group). In scope, those labelled with a (collaborating) participant; with fewer than
`min_calibration_in_scope` of them, the registered phrases, each scored by a model trained without
it (5-fold cross-fitting), are added. None of these, those labelled none or with a bot that is not
a participant (when a bot leaves, what it served becomes out of scope for the others); with fewer
than `min_calibration_none`, the built-in generic none-of-these set is added, and, where the
phrases were cross-fitted, near-domain none-of-these too. A large group with no in-scope evidence
gets the `none_quantile` of the none-of-these scores.

Near-domain none-of-these without a calibration set (`cross_fit_scores`): the generic set is far
from any bank or shop (pizza, weather), and τ fitted against it alone lets through a message next
to the group's intents that no bot serves (a travel notice, once the travel bot has left, taken
as a card declined). So each of the five folds that cross-fitting trains anyway also leaves out
whole intents: a seeded permutation of the intents dealt to the folds in turn, each intent out of
one fold exactly, about a fifth of them per fold. The phrases of an intent left out, scored by the
fold model that never saw it, show how a message of a service the group lacks scores; those of the
other intents of the fold's fifth of phrases stay the in-scope evidence. No model is trained on top
of the five. The near-domain evidence weighs `near_oos_share` in all (0: no intent is left out),
beside `oos_share` for the generic set and the in-scope phrases the rest (`Outcomes.weights`),
whatever the counts; each kind has its own kernel bandwidth. Groups of fewer than
`MIN_INTENTS_TO_HOLD_OUT` intents leave none out (a fold model of one or two intents says little of
how the group scores such a message), and a phrase that another intent registered too is not
evidence (a bot of the group serves it). Leaving intents out is a trade: the held-out phrases are
siblings of the intents that remain, often harder to refuse than real out-of-scope traffic, so
their weight buys near-domain refusals with in-scope fallbacks (docs/routing-quality.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from mbc.runtime.calibration_set import Example
from mbc.runtime.config import DecisionConfig, check_cost, check_share
from mbc.runtime.matching import IntentPhrases
from mbc.v1 import participant_pb2
from router.decision import GroupModel, Heads

GENERIC_NONE_PATH = Path(__file__).resolve().parent / "data" / "generic_none.txt"


def generic_none() -> list[str]:
    return [line.strip() for line in GENERIC_NONE_PATH.read_text().splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class CalibrationInput:
    """The calibration utterances relevant to one group, with their embeddings."""

    examples: Sequence[Example]
    vectors: np.ndarray
    generic: Sequence[str]
    generic_vectors: np.ndarray
    costs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """The group's own decision costs (`cost_overrides`): `DecisionConfig` fields, by name."""


COST_SETTINGS = {
    "wrong_transfer": "cost_wrong_transfer",
    "fallback": "cost_fallback",
    "clarify": "cost_clarify",
    "oos_share": "oos_share",
}
"""Each field of a group's `DecisionCosts` (its settings in etcd) and the router setting it overrides."""


def cost_overrides(costs: participant_pb2.DecisionCosts) -> dict[str, float]:
    """The router settings a group's `DecisionCosts` override (the fields it sets), by name;
    ValueError naming the field out of range (checked as `DecisionConfig` checks its own)."""
    given = {field: float(getattr(costs, field)) for field in COST_SETTINGS if costs.HasField(field)}
    for field, value in given.items():
        (check_share if field == "oos_share" else check_cost)(field, value)
    return {COST_SETTINGS[field]: value for field, value in given.items()}


def group_cost_overrides(
    stored: Mapping[str, participant_pb2.DecisionCosts],
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """`cost_overrides` of each group's stored costs, and apart, why a group's were refused (that
    group keeps the router's costs)."""
    overrides: dict[str, dict[str, float]] = {}
    refused: dict[str, str] = {}
    for group, costs in sorted(stored.items()):
        try:
            overrides[group] = cost_overrides(costs)
        except ValueError as e:
            refused[group] = str(e)
    return overrides, refused


def for_group(examples: Sequence[Example], group: str) -> list[Example]:
    return [e for e in examples if not e.group or e.group == group]


@dataclass(frozen=True)
class Costs:
    """What each kind of decision costs the consumer, in one unit (a wrong transfer: 1 by default),
    and the share of the group's traffic that no bot of it can serve (`DecisionConfig`)."""

    wrong_transfer: float
    fallback: float
    clarify: float
    oos_share: float
    near_oos_share: float = 0.0
    """The weight of the near-domain none-of-these evidence (the held-out intents of cross-fitting,
    `Outcomes.near`), beside `oos_share` for the other none-of-these utterances."""

    @classmethod
    def of(cls, config: DecisionConfig, overrides: Mapping[str, float] | None = None) -> Costs:
        """The router's settings, those a group overrides (`cost_overrides`) replaced."""
        mine = {name: getattr(config, name) for name in COST_SETTINGS.values()} | dict(overrides or {})
        return cls(
            mine["cost_wrong_transfer"], mine["cost_fallback"], mine["cost_clarify"], mine["oos_share"], config.near_oos_share
        )


@dataclass(frozen=True)
class Outcomes:
    """What the decision on each calibration utterance depends on, as a function of τ."""

    top: np.ndarray
    """Fused score of the best candidate (-inf: no candidate)."""
    second: np.ndarray
    """Fused score of the best candidate of another bot (-inf: none): a clarifying question when close."""
    act_cost: np.ndarray
    """Cost of acting on the best candidate: 0 when right, `fallback` for the right bot's wrong
    intent (the consumer stays with the bot that can help), `wrong_transfer` otherwise."""
    fallback_cost: np.ndarray
    """Cost of the fallback: `fallback` for an in-scope utterance, 0 for a none-of-these one."""
    none: np.ndarray
    """No bot of the group should take it."""
    right: np.ndarray
    """In scope, and the best candidate is its intent."""
    right_bot: np.ndarray
    """In scope, and the best candidate is of its bot."""
    near: np.ndarray | None = None
    """None of these, near the group's domain: the phrases of an intent held out of cross-fitting
    (weighed by `Costs.near_oos_share`); None: no such utterance."""

    def __post_init__(self) -> None:
        if self.near is None:
            object.__setattr__(self, "near", np.zeros(len(self.top), dtype=bool))

    def __len__(self) -> int:
        return len(self.top)

    @classmethod
    def of(
        cls,
        model: GroupModel,
        top_class: np.ndarray,
        top: np.ndarray,
        second: np.ndarray,
        labels: Sequence[tuple[str, str]],
        costs: Costs,
    ) -> Outcomes:
        """From `GroupModel.best` of utterances labelled (bot, intent), ("", "") for none of these
        (as is a bot that is not a participant: when a bot leaves, what it served is out of scope)."""
        bots = set(model.bots)
        none = np.array([bot not in bots for bot, _ in labels], dtype=bool)
        best = [model.classes[c] if c >= 0 else ("", "") for c in np.asarray(top_class).tolist()]
        right_bot = np.array([b == bot for (b, _), (bot, _) in zip(best, labels)], dtype=bool) & ~none
        right = right_bot & np.array([not intent or i == intent for (_, i), (_, intent) in zip(best, labels)], dtype=bool)
        act_cost = np.where(right, 0.0, np.where(right_bot, costs.fallback, costs.wrong_transfer))
        fallback_cost = np.where(none, 0.0, costs.fallback)
        return cls(np.asarray(top, np.float64), np.asarray(second, np.float64), act_cost, fallback_cost, none, right, right_bot)

    def __add__(self, other: Outcomes) -> Outcomes:
        return Outcomes(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))

    def as_near(self) -> Outcomes:
        """These none-of-these utterances as near-domain evidence (`near`)."""
        return dataclasses.replace(self, near=self.none.copy())

    def weights(self, costs: Costs) -> np.ndarray:
        """What each utterance weighs in the mean cost per message: the near-domain none-of-these
        `near_oos_share` in all, the other none-of-these `oos_share`, the in-scope ones the rest,
        whatever their counts (without in-scope utterances, the none-of-these weigh alike)."""
        assert self.near is not None
        near = self.none & self.near
        far = self.none & ~self.near
        n_near, n_far = int(near.sum()), int(far.sum())
        n_in = len(self) - n_near - n_far
        if not n_in:
            return np.full(len(self), 1.0 / max(len(self), 1))
        s_near = costs.near_oos_share if n_near else 0.0
        s_far = costs.oos_share if n_far else 0.0
        s_in = max(0.0, 1.0 - s_near - s_far)
        return np.where(near, s_near / max(n_near, 1), np.where(far, s_far / max(n_far, 1), s_in / n_in))


def bandwidth(scores: np.ndarray, smoothing: float) -> float:
    """Silverman's rule of thumb for a kernel density of `scores` (finite ones), times `smoothing`."""
    s = scores[np.isfinite(scores)]
    if len(s) < 2 or smoothing <= 0:
        return 0.0
    q75, q25 = np.percentile(s, [75, 25])
    spread = min(float(np.std(s)), float(q75 - q25) / 1.34) or float(np.std(s))
    return smoothing * 0.9 * spread * len(s) ** -0.2


def _step(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """P(x > 0) once x is blurred by a logistic kernel of standard deviation h (a hard step at h = 0)."""
    scale = np.maximum(h, 1e-12) * (np.sqrt(3.0) / np.pi)
    z = np.clip(x / scale, -60.0, 60.0)
    return np.where(h > 0, 1.0 / (1.0 + np.exp(-z)), (x > 0).astype(np.float64))


def expected_cost(o: Outcomes, taus: np.ndarray, costs: Costs, config: DecisionConfig, h: np.ndarray) -> np.ndarray:
    """The mean cost per message of the decisions the router would make on `o` with each τ of
    `taus`: none-of-these utterances weigh `oos_share` in all, in-scope ones the rest. Each score is
    blurred by `h` (per utterance), so that the cost is smooth in τ and its minimum does not sit on
    one utterance of a small calibration set."""
    w = o.weights(costs)
    floor = -1e6
    top = np.where(np.isfinite(o.top), o.top, floor)
    second = np.where(np.isfinite(o.second), o.second, floor)
    close = (second >= top - config.disambiguation_margin) & (config.disambiguation_margin > 0) & (second > floor)
    out = np.empty(len(taus))
    for lo in range(0, len(taus), 64):
        t = np.asarray(taus[lo : lo + 64], np.float64)[:, None]
        act = _step(top - t, h)
        clarify = np.where(close, _step(second - (t + config.fair_plus_offset), h), 0.0)
        cost = clarify * costs.clarify + (1.0 - clarify) * (act * o.act_cost + (1.0 - act) * o.fallback_cost)
        out[lo : lo + 64] = cost @ w
    return out


def choose_threshold(o: Outcomes, costs: Costs, config: DecisionConfig) -> tuple[float, dict]:
    """τ minimising `expected_cost` on `o`, with each score blurred by the bandwidth of its kind
    (none of these, in scope) by Silverman's rule times `config.threshold_smoothing`."""
    assert o.near is not None
    near = o.none & o.near
    h_none = bandwidth(o.top[o.none & ~near], config.threshold_smoothing)
    h_near = bandwidth(o.top[near], config.threshold_smoothing)
    h_in = bandwidth(o.top[~o.none], config.threshold_smoothing)
    h = np.where(near, h_near, np.where(o.none, h_none, h_in))
    finite = o.top[np.isfinite(o.top)]
    if not len(finite):
        return 0.0, {"expected_cost": None}
    pad = 3 * max(h_none, h_near, h_in) + 1e-6
    lo, hi = float(finite.min()) - pad, float(finite.max()) + pad
    taus = np.linspace(lo, hi, 257)
    cost = expected_cost(o, taus, costs, config, h)
    best = int(np.argmin(cost))
    step = taus[1] - taus[0]
    fine = np.linspace(taus[best] - step, taus[best] + step, 129)
    fine_cost = expected_cost(o, fine, costs, config, h)
    at = np.flatnonzero(fine_cost <= fine_cost.min() + 1e-12)
    tau = float(fine[at[len(at) // 2]])  # the middle of a flat minimum
    info = {
        "expected_cost": round(float(fine_cost.min()), 4),
        "bandwidth_in_scope": round(h_in, 4),
        "bandwidth_none": round(h_none, 4),
    }
    if near.any():
        info["bandwidth_near_none"] = round(h_near, 4)
    return tau, info


def fit_threshold(model: GroupModel, data: CalibrationInput) -> tuple[float, dict]:
    """τ for `model` and how it was fitted: the threshold that minimises the expected cost of the
    decisions (`choose_threshold`) on the evidence there is (see the module's docstring)."""
    cfg = model.config
    costs = Costs.of(cfg, data.costs)
    t0 = time.perf_counter()
    bots = set(model.bots)
    examples = list(data.examples)
    info: dict = {"classes": len(model.classes), "bots": len(bots), "calibration_examples": len(examples)}
    if data.costs:
        info["group_costs"] = dict(data.costs)
    calibration = None
    if examples and len(model.classes):
        labels = [(e.bot_id, e.intent) if e.bot_id in bots else ("", "") for e in examples]
        calibration = Outcomes.of(model, *model.best(data.vectors, [e.text for e in examples]), labels, costs)
    n_none = int(calibration.none.sum()) if calibration is not None else 0
    n_in = len(calibration) - n_none if calibration is not None else 0
    info["calibration_none"] = n_none
    evidence = calibration
    sources = []
    if n_in:
        sources.append(f"{n_in} in-scope of the calibration set")
    if n_none:
        sources.append(f"{n_none} none-of-these of the calibration set")
    if n_in < cfg.min_calibration_in_scope and len(model.classes) >= 2:
        crossed = cross_fitted(model, costs, hold_out=n_none < cfg.min_calibration_none)
        if crossed is not None:
            phrases, near = crossed
            evidence = phrases if evidence is None else evidence + phrases
            sources.append(f"{len(phrases)} cross-fitted registered phrases")
            if near is not None:
                evidence = evidence + near
                sources.append(f"{len(near)} phrases of held-out intents (near-domain none-of-these)")
    if n_none < cfg.min_calibration_none and len(data.generic) and len(model.classes):
        generic = [("", "")] * len(data.generic)
        built_in = Outcomes.of(model, *model.best(data.generic_vectors, list(data.generic)), generic, costs)
        evidence = built_in if evidence is None else evidence + built_in
        sources.append(f"{len(data.generic)} generic none-of-these")
    if evidence is None or not evidence.none.any() or evidence.none.all():
        none_scores = evidence.top[evidence.none & np.isfinite(evidence.top)] if evidence is not None else np.zeros(0)
        tau = float(np.quantile(none_scores, cfg.none_quantile, method="higher")) if len(none_scores) else 0.0
        info["method"] = f"no in-scope evidence: the {cfg.none_quantile:.2f} quantile of {len(none_scores)} none-of-these scores"
    else:
        tau, fit = choose_threshold(evidence, costs, cfg)
        info.update(fit)
        info["method"] = (
            "least expected cost (wrong transfer {:g}, fallback {:g}, clarifying question {:g}, none-of-these share {:g}{}) "
            "on {}".format(
                costs.wrong_transfer,
                costs.fallback,
                costs.clarify,
                costs.oos_share,
                f", near-domain share {costs.near_oos_share:g}" if evidence.near is not None and evidence.near.any() else "",
                ", ".join(sources),
            )
        )
    info["tau"] = round(tau, 4)
    if calibration is not None:
        acted = calibration.top > tau
        if n_in:
            info["calibration_in_scope"] = n_in
            info["in_scope_accuracy"] = round(float((calibration.right & acted)[~calibration.none].mean()), 4)
            info["bot_accuracy"] = round(float((calibration.right_bot & acted)[~calibration.none].mean()), 4)
        if n_none:
            info["none_recall"] = round(float((~acted)[calibration.none].mean()), 4)
        classes = set(model.classes)
        unknown = [e for e in examples if e.bot_id in bots and e.intent and (e.bot_id, e.intent) not in classes]
        if unknown:
            info["unknown_intents"] = len(unknown)
    model.times.calibrate = time.perf_counter() - t0
    return tau, info


MIN_INTENTS_TO_HOLD_OUT = 4
"""Whole intents are held out of cross-fitting only in groups of at least this many: each fold
model then keeps three or more (a model of one or two intents says little of how the group scores a
message none of its intents serves), and the groups of two or three intents keep the generic set."""


def cross_fitted(
    model: GroupModel, costs: Costs, folds: int = 5, hold_out: bool = True
) -> tuple[Outcomes, Outcomes | None] | None:
    """The registered phrases as in-scope evidence, each scored by a model trained without it, and
    the phrases of the intents held out whole as near-domain none-of-these evidence, each scored by
    a model trained without its intent (`cross_fit_scores`; None: no intent held out). None for a
    group too large to train five more times. `hold_out` False: no intent held out (the
    none-of-these evidence is the calibration set's)."""
    if model.vectors is None or not 0 < len(model.texts) <= model.config.cross_fit_max_phrases:
        return None
    hold_out = hold_out and costs.near_oos_share > 0 and len(model.classes) >= MIN_INTENTS_TO_HOLD_OUT
    scored, held = cross_fit_scores(model, model.vectors, folds, hold_out_intents=hold_out)
    rows, top_class, top, second = scored
    labels = [model.classes[c] for c in model.row_class[rows].tolist()]
    in_scope = Outcomes.of(model, top_class, top, second, labels, costs)
    rows, top_class, top, second = held
    if not len(rows):
        return in_scope, None
    near = Outcomes.of(model, top_class, top, second, [("", "")] * len(rows), costs).as_near()
    return in_scope, near


Scores = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(the rows of `GroupModel.texts` scored, their best class in `model.classes`, its fused score,
the best score of another bot)."""


def cross_fit_scores(
    model: GroupModel, vectors: np.ndarray, folds: int = 5, seed: int = 0, hold_out_intents: bool = True
) -> tuple[Scores, Scores]:
    """`GroupModel.best` of the registered phrases under `folds` models, each trained without a
    random fifth of the phrases (a seeded draw per phrase) and, with `hold_out_intents`, without
    every phrase of about a fifth of the intents (a seeded permutation of the intents dealt to the
    folds in turn: each intent is held out of one fold exactly).

    Returns the in-scope scores (each phrase of its fold's fifth, by the fold model, which knows its
    intent; a phrase whose intent is held out of the same fold is not among them) and the held-out
    scores (each phrase of an intent held out, by the model of the fold that never saw the intent;
    phrases that another intent registered too are left out: a bot of the group does serve them)."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, folds, len(model.texts))
    n_classes = len(model.classes)
    intent_fold = np.full(n_classes, -1, np.int64)
    if hold_out_intents and n_classes:
        intent_fold[rng.permutation(n_classes)] = np.arange(n_classes) % folds
    row_fold = intent_fold[model.row_class]
    elsewhere = _registered_elsewhere(model)
    scored: list[Scores] = []
    held_out: list[Scores] = []
    for k in range(folds):
        in_scope = np.flatnonzero((fold == k) & (row_fold != k))
        near = np.flatnonzero((row_fold == k) & ~elsewhere)
        if not len(in_scope) and not len(near):
            continue
        sub: list[IntentPhrases] = []
        rows: list[int] = []
        for c, (bot_id, intent) in enumerate(model.classes):
            if intent_fold[c] == k:
                continue
            mine = np.flatnonzero((model.row_class == c) & (fold != k))
            if len(mine):
                sub.append(IntentPhrases(bot_id, intent, tuple(model.texts[j] for j in mine)))
                rows.extend(mine.tolist())
        if not sub:
            continue
        # IntentPhrases sorted by (bot, intent) = the order of model.classes: rows line up.
        fold_model = GroupModel(sub, vectors[rows], vectors.shape[1], model.config)
        for held, out in ((in_scope, scored), (near, held_out)):
            if len(held):
                best, top, second = fold_model.best(vectors[held], [model.texts[j] for j in held])
                top_class = np.array([model.class_of[fold_model.classes[i]] if i >= 0 else -1 for i in best.tolist()], np.int64)
                out.append((held, top_class, np.asarray(top, np.float64), np.asarray(second, np.float64)))
    return _merged(scored), _merged(held_out)


def _registered_elsewhere(model: GroupModel) -> np.ndarray:
    """Per phrase: another intent of the group registered the same text (case and spaces aside)."""
    classes_of: dict[str, set[int]] = {}
    keys = [" ".join(t.casefold().split()) for t in model.texts]
    for key, c in zip(keys, model.row_class.tolist()):
        classes_of.setdefault(key, set()).add(c)
    return np.array([len(classes_of[key]) > 1 for key in keys], dtype=bool)


def _merged(parts: list[Scores]) -> Scores:
    """The scores of the folds as one, by row; the rows left unscored (-inf: no candidate) out."""
    if not parts:
        empty = np.zeros(0)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty
    rows, top_class, top, second = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(rows, kind="stable")
    keep = order[np.isfinite(top[order])]
    return rows[keep], top_class[keep], top[keep], second[keep]


def build_group_model(
    intents: Sequence[IntentPhrases],
    vectors: np.ndarray,
    dim: int,
    config: DecisionConfig,
    calibration: CalibrationInput,
    previous: GroupModel | None = None,
    heads: Heads | None = None,
    heads_free: bool = False,
) -> GroupModel:
    """Train the heads (warm-started from `previous`) and fit τ: the work done on every change.
    With `heads` trained earlier from the same inputs, only the index is built; `heads_free`:
    no heads, the nearest phrases and the intents' centroids, as a large group (no training)."""
    if heads is not None:
        return GroupModel(intents, vectors, dim, config, heads=heads)
    return _with_threshold(GroupModel(intents, vectors, dim, config, previous=previous, heads_free=heads_free), calibration)


def update_group_model(
    previous: GroupModel, changed: Mapping[str, Sequence[IntentPhrases]], vectors: np.ndarray, calibration: CalibrationInput
) -> GroupModel:
    """A large group's model after some bots changed (`GroupModel.updated`), with τ fitted again."""
    return _with_threshold(previous.updated(changed, vectors), calibration)


def _with_threshold(model: GroupModel, calibration: CalibrationInput) -> GroupModel:
    model.tau, model.calibration = fit_threshold(model, calibration)
    return model
