"""`mbc eval clinc150` on a small file in the CLINC150 format, `mbc overlap`, `mbc calibrate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent

DOMAINS = {
    "banking": {
        "balance": [
            "what's my balance",
            "how much money do I have",
            "show my account balance",
            "balance in checking",
            "tell me my savings balance",
            "how much is in my account",
            "current balance please",
            "check my balance",
        ],
        "transfer": [
            "move money to savings",
            "transfer 50 dollars to john",
            "send money to my other account",
            "make a transfer",
            "wire money to my landlord",
            "transfer funds between accounts",
            "pay my friend 20",
            "move cash to checking",
        ],
    },
    "travel": {
        "book_flight": [
            "book a flight to rome",
            "I need a plane ticket",
            "find flights to paris",
            "reserve a seat on a plane",
            "fly me to tokyo next week",
            "cheapest flight to london",
            "book an airplane ticket",
            "flights to new york",
        ],
        "book_hotel": [
            "book a hotel room",
            "I need a place to stay in berlin",
            "reserve a hotel for two nights",
            "find a hotel near the airport",
            "hotel in madrid please",
            "book accommodation in lisbon",
            "get me a room downtown",
            "find lodging for the weekend",
        ],
    },
    "kitchen": {
        "recipe": [
            "how do I make pancakes",
            "recipe for lasagna",
            "how to cook risotto",
            "give me a soup recipe",
            "how do you bake bread",
            "what's a good chili recipe",
            "steps to make pizza dough",
            "how to roast a chicken",
        ],
        "calories": [
            "how many calories in an apple",
            "calories in a banana",
            "is pizza high in calories",
            "calorie count of rice",
            "how fattening is cheese",
            "calories in a glass of milk",
            "how many calories does bread have",
            "energy in an egg",
        ],
    },
}
VAL = {
    "balance": ["what is the balance of my account", "how much do I have in checking"],
    "transfer": ["send 100 dollars to my mom", "transfer money into savings"],
    "book_flight": ["get me a flight to berlin", "I want to fly to madrid"],
    "book_hotel": ["a hotel room in rome please", "somewhere to stay in paris"],
    "recipe": ["how do I make a cake", "recipe for tomato sauce"],
    "calories": ["how many calories in a pear", "calories in pasta"],
}
OOS = [
    "what's the weather tomorrow",
    "tell me a joke",
    "who won the game",
    "play some music",
    "what time is it",
    "how tall is everest",
    "set an alarm for 7",
    "what's your name",
    "translate hello to french",
    "fix my laptop",
]


def _data(tmp_path: Path, rename: dict[str, str] | None = None) -> Path:
    """The data set as files; `rename`: labels replaced (in every split and the domain list)."""
    label = lambda i: (rename or {}).get(i, i)  # noqa: E731
    train = [[t, label(i)] for d in DOMAINS.values() for i, ts in d.items() for t in ts]
    val = [[t, label(i)] for i, ts in VAL.items() for t in ts]
    oos = [[t, "oos"] for t in OOS]
    data = {
        "train": train,
        "val": val,
        "oos_train": oos[:5],
        "oos_val": oos[5:],
        # The full file also has test and oos_test: here a copy of val, to exercise --split test.
        "test": val,
        "oos_test": oos[5:],
    }
    path = tmp_path / "clinc_small.json"
    path.write_text(json.dumps(data))
    (tmp_path / "domains.json").write_text(json.dumps({d: [label(i) for i in intents] for d, intents in DOMAINS.items()}))
    return path


def _mbc(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mbc", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.timeout(300)
def test_eval_clinc150_slice(tmp_path):
    # A label the bot definitions refuse (the banking data set has one ending in "?") is normalised.
    data = _data(tmp_path, rename={"transfer": "card_arrived?"})
    out = tmp_path / "figures.json"
    settings = tmp_path / "routers.yaml"  # the routers' settings: the eval's router decides with them
    settings.write_text("router:\n  decision:\n    cost_wrong_transfer: 2.5\n")
    run = _mbc(
        *("eval", "clinc150", "--data", str(data), "--split", "test", "--sample", "8", "--limit", "14"),
        *("--json", str(out), "--config", str(settings)),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in (
        "split",
        "n_in_scope",
        "n_oos",
        "in_scope_accuracy",
        "oos_recall",
        "bot_accuracy",
        "end_to_end_accuracy",
        "disambiguation_rate",
        "seconds",
    ):
        assert key in figures
    assert figures["split"] == "test" and not figures["in_sample_calibration"]
    assert figures["n_in_scope"] + figures["n_oos"] == 14
    assert figures["bot_accuracy"] >= 0.7 and figures["end_to_end_n"] == 8
    assert "in_scope_accuracy" in run.stdout and "DialogFlow" in run.stdout
    assert figures["retrain_on_bot_leaving"]["seconds"] > 0
    assert "wrong transfer 2.5," in figures["calibration"]["method"]
    assert "Traceback" not in run.stderr and "never awaited" not in run.stderr
    # The k-fold figure on the calibration set: never in-sample for the threshold.
    kfold = figures["kfold"]
    assert kfold["k"] >= 2 and kfold["n_in_scope"] == 12 and kfold["n_oos"] == 10
    assert len(kfold["oos_recall"]["folds"]) == kfold["k"] and 0 <= kfold["in_scope_accuracy"]["mean"] <= 1
    assert "fold on the calibration set" in run.stdout


def test_eval_data_may_be_the_directory_and_a_bad_file_is_a_clear_error(tmp_path):
    from mbc.evaluation.clinc150 import DATA_FILE, load

    data = _data(tmp_path)
    data.rename(tmp_path / DATA_FILE)
    dataset = load(str(tmp_path), "", "val", 0, 0, 0, 0)
    assert dataset.bot_of["balance"] == "banking" and len(dataset.in_scope) == 12

    empty = tmp_path / "empty"
    empty.mkdir()
    run = _mbc("eval", "clinc150", "--data", str(empty))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot read the CLINC150 data file {empty / DATA_FILE}" in run.stderr
    (empty / DATA_FILE).write_text("{not json")
    run = _mbc("eval", "clinc150", "--data", str(empty))
    assert run.returncode == 2 and "is not JSON" in run.stderr and "Traceback" not in run.stderr


def test_overlap_lists_colliding_intents(tmp_path):
    a = {
        "id": "cards",
        "group": "g",
        "collaboration": True,
        "fallback": "no",
        "intents": [{"name": "travel_note", "phrases": ["set a travel notice on my card", "lock my card"]}],
        "dialogs": [{"intent": "travel_note", "responses": ["ok"]}],
    }
    b = {
        "id": "travel",
        "group": "g",
        "collaboration": True,
        "fallback": "no",
        "intents": [{"name": "travel_notice", "phrases": ["set a travel notice", "book a flight"]}],
        "dialogs": [{"intent": "travel_notice", "responses": ["ok"]}],
    }
    paths = []
    for d in (a, b):
        p = tmp_path / f"{d['id']}.yaml"
        p.write_text(json.dumps(d))  # JSON is YAML
        paths.append(str(p))
    run = _mbc("overlap", "--definitions", *paths, "--threshold", "0.75", "--fail")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "cards/travel_note" in run.stdout and "travel/travel_notice" in run.stdout
    assert "'set a travel notice on my card'" in run.stdout


def test_calibrate_validates_fits_and_installs(tmp_path):
    good = tmp_path / "cal.jsonl"
    good.write_text("\n".join(json.dumps({"text": t, "bot": None}) for t in OOS) + "\n")
    target = tmp_path / "router" / "calibration.jsonl"
    run = _mbc("calibrate", str(good), "--definitions", str(ROOT / "examples" / "cards.yaml"), "--install", str(target))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "group retail-bank: tau" in run.stdout and target.read_text() == good.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "intent": "y"}\n')
    run = _mbc("calibrate", str(bad), "--definitions", str(ROOT / "examples" / "cards.yaml"))
    assert run.returncode != 0 and "needs its bot" in run.stderr
