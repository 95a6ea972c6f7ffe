"""The k-fold figure of `mbc eval`: τ fitted on k−1 folds of the calibration set, the decisions
measured on the fold left out, so that no printed figure is in-sample for calibration.

The group's model (heads, index) is the one the router trained on the registered phrases; only τ
is refitted per fold, as the router does when its calibration set changes. The decisions are
`GroupModel.rank_many` and `GroupModel.decide`, what Match answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mbc.runtime.calibration_set import Example
from router.calibration import CalibrationInput, fit_threshold
from router.decision import ACT, NONE, GroupModel, TrainTimes


def stratified_folds(none: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per item, none-of-these and in-scope items spread evenly over the k folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(none), np.int64)
    for mask in (none, ~none):
        idx = np.flatnonzero(mask)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % k
    return fold


def _spread(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4)}


def kfold(
    model: GroupModel,
    examples: Sequence[Example],
    vectors: np.ndarray,
    generic: Sequence[str],
    generic_vectors: np.ndarray,
    k: int = 5,
    seed: int = 0,
) -> dict:
    """In-scope accuracy, out-of-scope recall, right bot and clarifying questions on each held-out
    fold of `examples` (labelled with bots of `model`, or none of these), τ fitted on the others:
    per fold, and their mean and spread (sample standard deviation)."""
    bots = set(model.bots)
    none = np.array([e.bot_id not in bots for e in examples], dtype=bool)
    k = max(2, min(k, int(none.sum()) or k, int((~none).sum()) or k))
    fold = stratified_folds(none, k, seed)
    figures: dict[str, list[float]] = {"in_scope_accuracy": [], "oos_recall": [], "bot_accuracy": [], "disambiguation_rate": []}
    taus = []
    for f in range(k):
        fit_rows = np.flatnonzero(fold != f).tolist()
        held = np.flatnonzero(fold == f).tolist()
        scratch = model.with_threshold(model.tau, model.calibration)
        scratch.times = TrainTimes()  # fitting writes its time there: not the router's model's
        tau, info = fit_threshold(
            scratch, CalibrationInput([examples[i] for i in fit_rows], vectors[fit_rows], generic, generic_vectors)
        )
        fitted = model.with_threshold(tau, info)
        taus.append(tau)
        verdicts = [fitted.decide(r) for r in fitted.rank_many(vectors[held], [examples[i].text for i in held])]
        right = right_bot = rejected = asked = 0
        for i, v in zip(held, verdicts):
            e, top = examples[i], (v.candidates[0] if v.candidates else None)
            asked += v.decision not in (ACT, NONE)
            if none[i]:
                rejected += v.decision == NONE
            elif v.decision == ACT and top is not None and top.bot_id == e.bot_id:
                right_bot += 1
                right += not e.intent or top.intent == e.intent
        n_none = int(none[held].sum())
        n_in = len(held) - n_none
        figures["in_scope_accuracy"].append(right / max(n_in, 1))
        figures["bot_accuracy"].append(right_bot / max(n_in, 1))
        figures["oos_recall"].append(rejected / max(n_none, 1))
        figures["disambiguation_rate"].append(asked / max(len(held), 1))
    return {
        "k": k,
        "n_in_scope": int((~none).sum()),
        "n_oos": int(none.sum()),
        **{name: {**_spread(values), "folds": [round(v, 4) for v in values]} for name, values in figures.items()},
        "tau": {**_spread(taus), "folds": [round(t, 4) for t in taus]},
    }
