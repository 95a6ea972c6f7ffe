"""Fitting each group's threshold τ, and the labelled calibration set that feeds it.

A calibration set is a list of utterances labelled with the bot and intent that should take them,
or with nothing ("none of these"). File format (`mbc calibrate FILE`, `DecisionConfig.calibration_path`):
JSON Lines, one object per line, or one JSON array of such objects:

    {"text": "set a travel notice for Japan", "bot": "travel", "intent": "travel_notice"}
    {"text": "which pizza place delivers", "bot": null}          # none of these
    {"text": "...", "bot": "cards", "intent": "...", "group": "retail-bank"}   # optional group

How τ is fitted for a group, every time its participants or the calibration set change:

1. The "none" utterances of the group are the calibration items labelled none, plus those labelled
   with a bot that is not a (collaborating) participant of the group: when a bot leaves, what it
   served becomes out of scope for the others. Items with a `group` only count for that group.
2. With at least `min_calibration_none` of them, τ is the `oos_target` quantile of their fused
   scores (the router rejects at or below τ): that share of "none" utterances gets a fallback, and
   every other utterance is accepted.
3. Otherwise τ comes from what the participants registered: the `generic_quantile` of the scores
   of a built-in generic "none of these" set (plus the few calibration "none" items), capped at the
   `in_scope_floor` quantile of the registered phrases' scores under 5-fold cross-fitting (each
   phrase scored by a model trained without it), so that unusual but in-scope messages still pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbc.runtime.config import DecisionConfig
from mbc.runtime.matching import IntentPhrases
from router.decision import GroupModel, Heads

GENERIC_NONE_PATH = Path(__file__).resolve().parent / "data" / "generic_none.txt"


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    """One labelled utterance; empty bot_id means "none of these"."""

    text: str
    bot_id: str = ""
    intent: str = ""
    group: str = ""


def parse_calibration(text: str, source: str = "calibration set") -> list[Example]:
    """Examples from JSON Lines or a JSON array; raises CalibrationError naming the bad line."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            items = list(enumerate(json.loads(stripped), 1))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{source}: not valid JSON: {e}") from e
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{source}:{n}: not valid JSON: {e}") from e
    out = []
    for n, item in items:
        if not isinstance(item, dict):
            raise CalibrationError(f"{source}:{n}: expected an object with text, bot, intent")
        unknown = set(item) - {"text", "bot", "intent", "group"}
        if unknown:
            raise CalibrationError(f"{source}:{n}: unknown field(s) {', '.join(sorted(unknown))}")
        utterance = item.get("text")
        if not isinstance(utterance, str) or not utterance.strip():
            raise CalibrationError(f"{source}:{n}: text must be a non-empty string")
        bot = item.get("bot") or ""
        intent = item.get("intent") or ""
        group = item.get("group") or ""
        if not all(isinstance(v, str) for v in (bot, intent, group)):
            raise CalibrationError(f"{source}:{n}: bot, intent and group must be strings or null")
        if intent and not bot:
            raise CalibrationError(f"{source}:{n}: an intent needs its bot")
        out.append(Example(utterance.strip(), bot, intent, group))
    return out


def load_calibration(path: str | Path) -> list[Example]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read: {e.strerror}") from e
    return parse_calibration(text, str(path))


def dump_calibration(examples: Iterable[Example]) -> str:
    lines = []
    for e in examples:
        item = {"text": e.text, "bot": e.bot_id or None}
        if e.intent:
            item["intent"] = e.intent
        if e.group:
            item["group"] = e.group
        lines.append(json.dumps(item, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def generic_none() -> list[str]:
    return [line.strip() for line in GENERIC_NONE_PATH.read_text().splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class CalibrationInput:
    """The calibration utterances relevant to one group, with their embeddings."""

    examples: Sequence[Example]
    vectors: np.ndarray
    generic: Sequence[str]
    generic_vectors: np.ndarray


def for_group(examples: Sequence[Example], group: str) -> list[Example]:
    return [e for e in examples if not e.group or e.group == group]


def fit_threshold(model: GroupModel, data: CalibrationInput) -> tuple[float, dict]:
    """τ for `model` and how it was fitted."""
    cfg = model.config
    t0 = time.perf_counter()
    classes = set(model.classes)
    bots = set(model.bots)
    examples = list(data.examples)
    none_mask = np.array([not e.bot_id or e.bot_id not in bots for e in examples], dtype=bool)
    info: dict = {"classes": len(model.classes), "bots": len(bots), "calibration_examples": len(examples)}
    # None only without examples or without classes (no model is built for a group without
    # intents): the uses below have examples, "none" ones or labelled ones.
    top: np.ndarray | None = None
    conf: np.ndarray | None = None
    if examples and len(model.classes):
        top, conf, _ = model.best(data.vectors, [e.text for e in examples])
    n_none = int(none_mask.sum())
    info["calibration_none"] = n_none
    if n_none >= cfg.min_calibration_none:
        assert conf is not None  # min_calibration_none "none" examples were scored
        tau = float(np.quantile(conf[none_mask], cfg.oos_target, method="higher"))
        info["method"] = f"calibration set: {cfg.oos_target:.2f} quantile of {n_none} none-of-these scores"
    else:
        pool = []
        if len(data.generic) and len(model.classes):
            pool.append(model.best(data.generic_vectors, list(data.generic))[1])
        if n_none:
            assert conf is not None  # the "none" examples were scored
            pool.append(conf[none_mask])
        scores = np.concatenate(pool) if pool else np.zeros(0)
        tau = float(np.quantile(scores, cfg.generic_quantile, method="higher")) if len(scores) else 0.0
        info["method"] = f"registered phrases: {cfg.generic_quantile:.2f} quantile of {len(scores)} generic none-of-these scores"
        if model.vectors is not None and 0 < len(model.texts) <= cfg.cross_fit_max_phrases and len(model.classes) >= 2:
            oof = cross_fit_scores(model, model.vectors)
            floor = float(np.quantile(oof, cfg.in_scope_floor))
            info["in_scope_floor"] = round(floor, 3)
            if floor < tau:
                tau = floor
                info["method"] += f", capped at the {cfg.in_scope_floor:.2f} quantile of cross-fitted phrase scores"
    info["tau"] = round(tau, 4)
    if examples:
        labelled = [(i, e) for i, e in enumerate(examples) if e.bot_id in bots and e.intent]
        if labelled:
            assert top is not None and conf is not None  # examples of the model's bots: it has classes
            idx = np.array([i for i, _ in labelled])
            right = np.array([model.classes[top[i]] == (e.bot_id, e.intent) if top[i] >= 0 else False for i, e in labelled])
            right_bot = np.array([model.classes[top[i]][0] == e.bot_id if top[i] >= 0 else False for i, e in labelled])
            acted = conf[idx] > tau
            info["calibration_in_scope"] = len(labelled)
            info["in_scope_accuracy"] = round(float((right & acted).mean()), 4)
            info["bot_accuracy"] = round(float((right_bot & acted).mean()), 4)
        if n_none:
            assert conf is not None  # the "none" examples were scored
            info["none_recall"] = round(float((conf[none_mask] <= tau).mean()), 4)
        unknown = [e for e in examples if e.bot_id in bots and e.intent and (e.bot_id, e.intent) not in classes]
        if unknown:
            info["unknown_intents"] = len(unknown)
    model.times.calibrate = time.perf_counter() - t0
    return tau, info


def cross_fit_scores(model: GroupModel, vectors: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fused score of each registered phrase's best intent under a model trained without it."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, folds, len(model.texts))
    out = np.full(len(model.texts), -np.inf)
    for k in range(folds):
        held = np.where(fold == k)[0]
        if not len(held):
            continue
        sub: list[IntentPhrases] = []
        rows: list[int] = []
        for c, (bot_id, intent) in enumerate(model.classes):
            mine = np.where((model.row_class == c) & (fold != k))[0]
            if len(mine):
                sub.append(IntentPhrases(bot_id, intent, tuple(model.texts[j] for j in mine)))
                rows.extend(mine.tolist())
        if not sub:
            continue
        # IntentPhrases sorted by (bot, intent) = the order of model.classes: rows line up.
        fold_model = GroupModel(sub, vectors[rows], vectors.shape[1], model.config)
        _, conf, _ = fold_model.best(vectors[held], [model.texts[j] for j in held])
        out[held] = conf
    return out[np.isfinite(out)]


def build_group_model(
    intents: Sequence[IntentPhrases],
    vectors: np.ndarray,
    dim: int,
    config: DecisionConfig,
    calibration: CalibrationInput,
    previous: GroupModel | None = None,
    heads: Heads | None = None,
) -> GroupModel:
    """Train the heads (warm-started from `previous`) and fit τ: the work done on every change.
    With `heads` trained earlier from the same inputs, only the index is built."""
    if heads is not None:
        return GroupModel(intents, vectors, dim, config, heads=heads)
    return _with_threshold(GroupModel(intents, vectors, dim, config, previous=previous), calibration)


def update_group_model(
    previous: GroupModel, changed: Mapping[str, Sequence[IntentPhrases]], vectors: np.ndarray, calibration: CalibrationInput
) -> GroupModel:
    """A large group's model after some bots changed (`GroupModel.updated`), with τ fitted again."""
    return _with_threshold(previous.updated(changed, vectors), calibration)


def _with_threshold(model: GroupModel, calibration: CalibrationInput) -> GroupModel:
    model.tau, model.calibration = fit_threshold(model, calibration)
    return model
