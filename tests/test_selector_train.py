"""The response selector's trainer on a tiny data set: it writes a selector that loads, can
continue from a stored one, and logs the validation curve it was asked for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from offline.selector_train import SelectorConfig, train
from persona.selector import Selector

WORDS = ("leg", "pain", "lupus", "vicodin", "wilson", "coffee", "heart", "rash", "fever",
         "liver", "kidney", "brain", "cough", "blood", "sleep", "patient")


def write_splits(directory: Path, per_split: int = 104) -> None:
    """Prepared splits of short made-up exchanges, rows numbered so scenes exist."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    row = 0
    for split in ("train", "validation", "test"):
        with (directory / f"{split}.jsonl").open("w", encoding="utf-8") as out:
            for _ in range(per_split):
                a, b = rng.sample(WORDS, 2)
                record = {"id": f"qa-{row:05d}", "anchor": f"My {a} hurts since {row}.",
                          "response": f"Your {a} is fine. The {b} is the problem {row}."}
                out.write(json.dumps(record) + "\n")
                row += 1


def test_a_short_run_writes_a_loadable_selector_and_can_continue_from_it(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_splits(data)
    config = SelectorConfig(batch_size=16, max_steps=2, bf16=False, eval_every=1)
    first = train(data, tmp_path / "first", config, tmp_path / "work1")
    assert [p["step"] for p in first["validation_curve"]] == [1, 2]
    assert all(0 <= p["recall@1"] <= 1 and p["n"] == 104 for p in first["validation_curve"])
    trained = load_file(str(tmp_path / "first" / "selector.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k)
    vectors = Selector.load(tmp_path / "first").encode(["My leg hurts.", "Your leg is fine."])
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()

    again = SelectorConfig(batch_size=16, max_steps=1, bf16=False,
                           init_from=str(tmp_path / "first"))
    second = train(data, tmp_path / "second", again, tmp_path / "work2")
    assert second["config"]["init_from"] == str(tmp_path / "first")
    assert second["validation_curve"] == []
    assert Selector.load(tmp_path / "second").context_exchanges == 1
    with pytest.raises(SystemExit, match="does not fit"):
        train(data, tmp_path / "third",
              SelectorConfig(batch_size=16, max_steps=1, bf16=False, lora_r=8,
                             init_from=str(tmp_path / "first")), tmp_path / "work3")


def test_the_cached_loss_with_longer_context_writes_a_selector_that_says_so(
        tmp_path: Path) -> None:
    write_splits(tmp_path / "data")
    config = SelectorConfig(batch_size=16, cached_mini_batch=4, context_exchanges=2,
                            max_steps=1, bf16=False)
    report = train(tmp_path / "data", tmp_path / "out", config, tmp_path / "work")
    assert report["context_exchanges"] == 2
    assert Selector.load(tmp_path / "out").context_exchanges == 2


class RandomEncoder:
    """Encoder stand-in: a fixed random unit vector per text."""

    def encode(self, texts, batch_size=64, normalize_embeddings=True):  # type: ignore[no-untyped-def]
        out = []
        for text in texts:
            v = np.random.default_rng(abs(hash(text)) % 2**32).normal(size=16)
            out.append(v / np.linalg.norm(v))
        return np.array(out)


class KnowingListener:
    """Listener stand-in: PMI 1000 for the message's true reply, 0 for others (the prompt it
    is given is the message itself)."""

    tokenizer = None

    def __init__(self, true: dict[str, str]) -> None:
        self.true = true

    def pmi(self, prompt: str, replies: list[str]) -> list[float]:
        return [1000.0 if r == self.true[prompt] else 0.0 for r in replies]


def test_the_listener_stage_ranks_first_every_true_reply_in_the_shortlist(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import persona.prompt
    from offline import selector_train
    from persona.dialogue import Scenes, read_pairs

    write_splits(tmp_path / "d", per_split=120)
    pairs = [p for p in read_pairs(tmp_path / "d") if p.split == "test"]
    scenes = Scenes(pairs)
    monkeypatch.setattr(persona.prompt, "render_prompt", lambda tok, persona, history, text: text)
    encoder = RandomEncoder()
    plain = selector_train.ranking_metrics(encoder, pairs, scenes, context=True)
    both = selector_train.listener_ranking_metrics(
        encoder, pairs, scenes, KnowingListener({p.anchor: p.response for p in pairs}), None,
        shortlist=10, weight=1.0)
    # every true reply the selector puts in its 10 best goes first; the rest keep their rank
    assert both["recall@1"] == plain["recall@10"] and both["recall@10"] == plain["recall@10"]
    assert both["n"] == plain["n"] == 120
