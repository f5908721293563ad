"""Persona quality metrics on hand-made replies whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offline.eval_report import check_targets, summary_table, write_tuning
from offline.evaluate import Prompt, generate_replies, pick_systems, prompt_seed
from offline.quality import (
    Sample,
    SceneDetector,
    crep_n,
    distinct_n,
    distinct_table,
    is_loop,
    over_cap,
    paired_cosine,
    rouge_l_f1,
    text_metrics,
)

CLEAN = "You're not sick, you're bored. Go home and watch some television."
MESSAGE = "I have had a headache for three days and my left arm feels numb."


@pytest.fixture
def detector(persona) -> SceneDetector:
    return SceneDetector(persona.other_speakers)


@pytest.mark.parametrize("reply", [
    "Wilson: hi",
    "You're an idiot. Wilson: No, I'm not.",
    "Fine.\nCuddy: House, my office.",
    "He limps away. [exits]",
    "(sarcastically) Great news.",
    "*rolls eyes* Sure.",
    "User: what about me?",
    "Dr. House: It's lupus.",
    "It's not lupus.<|im_start|>user",
    "Go away.\nMarcus: Why?",
])
def test_scene_inserts_are_caught(detector: SceneDetector, reply: str) -> None:
    assert detector(reply)


@pytest.mark.parametrize("reply", [
    CLEAN,
    "Here's the thing: everybody lies.",
    "It's 3:30 and you're still here. Wilson was right about you.",
    "Give her 20 mg of prednisone. If I'm right, she'll be fine by morning.",
])
def test_clean_house_lines_are_not_scene_inserts(detector: SceneDetector, reply: str) -> None:
    assert not detector(reply)


def test_echo_is_caught_and_crep4_measures_copying(detector: SceneDetector) -> None:
    echo = Sample(MESSAGE, "I have had a headache for three days and my left arm feels numb.")
    partial = Sample(MESSAGE, "A headache for three days is nothing. Take an aspirin, stop "
                              "whining.")
    clean = Sample(MESSAGE, CLEAN)
    figures = text_metrics([echo, partial, clean], detector, sentence_cap=3, word_limit=25)
    assert figures["echo_rate"] == pytest.approx(1 / 3)
    assert crep_n(echo.reply, MESSAGE) == 1.0
    assert 0.0 < crep_n(partial.reply, MESSAGE) < 1.0
    assert crep_n(CLEAN, MESSAGE) == 0.0
    assert figures["crep4"] == pytest.approx((1.0 + crep_n(partial.reply, MESSAGE)) / 3)


def test_loops_are_caught() -> None:
    looping = "I know what you did. I know what you did. I know what you did. I know what."
    assert is_loop(looping)
    assert not is_loop(CLEAN)
    # Cut off by max_new_tokens in the middle of a sentence: counts as a loop.
    assert is_loop("You have a tumor the size of a", hit_cap=True)
    # Hit the token cap but the reply the user sees ends properly: not a loop.
    assert not is_loop("You have a tumor.", hit_cap=True)


def test_sentence_cap_and_length() -> None:
    assert not over_cap(CLEAN, 3)
    assert over_cap("One. Two. Three. Four.", 3)
    assert not over_cap("One. Two. Three. Four.", 4)


def test_clean_house_line_has_no_flags(detector: SceneDetector) -> None:
    figures = text_metrics([Sample(MESSAGE, CLEAN, reference=CLEAN)], detector, 3, 25)
    for key in ("scene_insert_rate", "echo_rate", "loop_rate", "over_cap_rate",
                "over_p95_rate", "fallback_rate", "crep4"):
        assert figures[key] == 0.0, key
    assert figures["rougeL"] == 1.0
    assert figures["median_words"] == 11


def test_rouge_l_f1_known_values() -> None:
    assert rouge_l_f1("the cat sat", "the cat sat") == 1.0
    assert rouge_l_f1("the cat", "dog bites man") == 0.0
    # LCS "the cat" = 2: precision 2/2, recall 2/4 -> F1 2/3
    assert rouge_l_f1("the cat", "the big cat sat") == pytest.approx(2 / 3)


def test_distinct_n_known_values_and_equal_size_samples() -> None:
    assert distinct_n(["a b c d"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    assert distinct_n(["a b", "a b"], 2) == 0.5
    # n-grams never cross replies
    assert distinct_n(["a", "b"], 2) == 0.0
    short = ["alpha beta gamma delta"]
    long = ["alpha beta gamma delta " * 5]
    table = distinct_table({"short": short, "long": long}, 1)
    # the long system is sampled down to 4 unigrams as well, so its score is not 4/20
    assert table["short"] == 1.0
    assert table["long"] > 4 / 20


def test_paired_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0]])
    assert paired_cosine(a, b).tolist() == [1.0, 0.0]


def test_targets_are_checked() -> None:
    base = {"scene_insert_rate": 0.1, "echo_rate": 0.1, "loop_rate": 0.1, "over_cap_rate": 0.0,
            "distinct_2": 0.5, "persona_score": 0.3, "fit_score": 0.55}
    house = {**base, "scene_insert_rate": 0.0, "echo_rate": 0.01, "loop_rate": 0.0,
             "distinct_2": 0.7, "persona_score": 0.5, "fit_score": 0.7}
    human = {**base, "distinct_2": 0.8, "persona_score": 0.6, "fit_score": 0.8}
    retrieval = {**base, "fit_score": 0.62}
    rows = check_targets({"base": base, "house": house, "retrieval": retrieval,
                          "human": human, "classifier_auc": 0.82})
    met = {target.split(": ", 1)[1]: ok for target, _, ok in rows}
    assert met == {"scene-insert ≤ 1%": True, "echo ≤ 2%": True, "loops ≤ 2%": True,
                   "100% within the sentence cap": True, "distinct-2 ≥ 0.8× human": True,
                   "fit_score ≥ 0.8× human": True, "fit_score ≥ retrieval v1": True}
    assert all(t.startswith("house: ") for t, _, _ in rows)
    # what the bot answers (default) is the subject when it is there
    rows = check_targets({"base": base, "house": house, "default": {**house, "fit_score": 0.6},
                          "retrieval": retrieval, "human": human, "classifier_auc": 0.7})
    assert all(t.startswith("default: ") for t, _, _ in rows)
    assert [ok for _, _, ok in rows].count(False) == 2  # 0.6 < 0.64 and < 0.62
    assert "| scene_insert_rate | 10.0% | 0.0% | 10.0% |" in summary_table(
        {"base": base, "house": house, "human": human, "classifier_auc": 0.82})


def test_tuning_table(tmp_path) -> None:
    run = tmp_path / "t08"
    run.mkdir()
    figures = {"n": 3, "scene_insert_rate": 0.0, "echo_rate": 0.0, "loop_rate": 0.0,
               "over_cap_rate": 0.0, "median_words": 9.0, "distinct_2": 0.9,
               "persona_score": 0.61, "rougeL": 0.1, "fallback_rate": 0.0}
    (run / "metrics.json").write_text(json.dumps({"house": figures, "human": figures}))
    controls = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.15,
                "no_repeat_ngram_size": 3, "candidates": 4}
    (run / "run.json").write_text(json.dumps({"label": "", "controls": controls,
                                              "reranker": "persona"}))
    text = write_tuning([run], tmp_path).read_text()
    assert "| t08 | house | 0.8 | 0.9 | 1.15 | 3 | 4 | persona | 3 |" in text
    assert "| human |" not in text


def test_systems_and_seeds() -> None:
    every = ["base", "house", "house-classifier", "canon", "hybrid", "default", "retrieval"]
    assert pick_systems(None, ["house"], True) == [*every, "human"]
    assert pick_systems(None, ["house"], False) == every
    assert pick_systems("house,human", ["house"], True) == ["house", "human"]
    with pytest.raises(SystemExit, match="unknown wilson"):
        pick_systems("house,wilson", ["house"], True)
    assert prompt_seed(0, 1) != prompt_seed(0, 2) != prompt_seed(1, 1)


def test_generation_goes_through_the_serving_path(persona, fake_generator) -> None:
    """Candidates per prompt, seeds per candidate, reply_candidate + best_generated (the
    worker's rule) with the scorer."""
    prompts = [Prompt("my knee hurts", "Take two aspirin."), Prompt("#long story", None)]
    controls = persona.controls.merged({"candidates": 3})
    scored: list[list[str]] = []

    def scorer(texts):
        scored.append(list(texts))
        return [float(i) for i in range(len(texts))]  # prefers the last candidate

    samples, timing = generate_replies(fake_generator, persona, prompts, "house", controls,
                                       seed=5, batch_size=1, scorer=scorer, token_budget=384)
    assert fake_generator.calls == [3, 3]
    expected = fake_generator.reply_for("my knee hurts", "house", prompt_seed(5, 0) + 2)
    assert samples[0].reply == expected and samples[0].reference == "Take two aspirin."
    assert len(scored[0]) == 3
    # the #long reply is cut to the persona's sentence cap
    assert samples[1].reply.count(".") == persona.controls.sentence_cap
    assert timing["tokens"] > 0


def test_refine_examples_go_into_the_adapters_prompt_as_the_worker_puts_them(
        persona, fake_generator) -> None:  # type: ignore[no-untyped-def]
    from persona.prompt import EXAMPLES_INTRO

    shown = [("Can I mix beer?", "Beer and painkillers: your liver says hi.")]
    asked: list[str] = []

    def examples(message: str) -> list[tuple[str, str]]:
        asked.append(message)
        return shown

    generate_replies(fake_generator, persona, [Prompt("beer and painkillers?")], "house",
                     persona.controls, seed=0, batch_size=1, scorer=None, token_budget=384,
                     examples=examples)
    generate_replies(fake_generator, persona, [Prompt("beer and painkillers?")], "house",
                     persona.controls, seed=0, batch_size=1, scorer=None, token_budget=384)
    refined, plain = fake_generator.jobs[0].prompt, fake_generator.jobs[-1].prompt
    assert asked == ["beer and painkillers?"]
    assert EXAMPLES_INTRO in refined and "your liver says hi" in refined
    assert EXAMPLES_INTRO not in plain


def test_outputs_can_be_reused_by_a_later_run(tmp_path, detector: SceneDetector) -> None:
    from offline.eval_report import compute_metrics, write_outputs
    from offline.evaluate import order_systems, reuse_run

    prompts = [Prompt("my knee hurts", "Stop running."), Prompt("is it lupus?", "No.")]
    samples = {
        "human": [Sample(p.message, p.reference or "", p.reference) for p in prompts],
        "base": [Sample(p.message, "Wilson: hi", p.reference, raw="Wilson: hi", ms=5.0)
                 for p in prompts],
    }

    class FlatClassifier:
        def predict_proba(self, texts, embeddings=None):
            return np.full(len(texts), 0.5)

    class ZeroEmbedder:
        def encode(self, texts, cache=False):
            return np.ones((len(texts), 3))

    metrics = compute_metrics(samples, {"base": {"tokens": 10, "generate_s": 2.0}},
                              FlatClassifier(), ZeroEmbedder(), ["Wilson"], 3, ["a b c"], 0.7)
    assert metrics["base"]["scene_insert_rate"] == 1.0
    assert metrics["base"]["tokens_per_s"] == 5.0 and metrics["base"]["median_ms"] == 5.0
    assert metrics["human"]["rougeL"] is None and metrics["classifier_auc"] == 0.7
    run = {"controls": {}, "reranker": "none", "systems": {"base": {"load_before": 0.1}},
           "n_prompts": 2, "prompts": "x", "seed": 0, "base_model": "m", "adapters": {},
           "batch_size": 16, "command": "drhouse eval", "started": "now", "cpu_count": 2,
           "load_before": [0.1, 0, 0], "load_after": [0.2, 0, 0]}
    write_outputs(tmp_path, metrics, run, samples)
    report = (tmp_path / "report.md").read_text()
    assert "| base: scene-insert ≤ 1% | 100.0% | **no** |" in report
    assert (tmp_path / "chart.png").stat().st_size > 0
    loaded, timing = reuse_run(tmp_path, prompts, skip=["human"])
    assert list(loaded) == ["base"] and loaded["base"] == samples["base"]
    assert timing["base"]["load_before"] == 0.1
    with pytest.raises(SystemExit):
        reuse_run(tmp_path, [Prompt("something else")], skip=[])
    assert order_systems(["human", "retrieval", "house", "base"], ["house"]) == \
        ["base", "house", "retrieval", "human"]


def test_counterfactual_without_reranker(persona, fake_generator) -> None:
    from offline.evaluate import rechoose, without_reranker

    prompts = [Prompt("my knee hurts", "Stop running.")]
    controls = persona.controls.merged({"candidates": 2})
    samples, _ = generate_replies(fake_generator, persona, prompts, "house", controls, seed=1,
                                  batch_size=4, scorer=lambda texts: [0.0, 1.0],
                                  token_budget=384)
    assert samples[0].reply == samples[0].candidates[1][0]
    first = without_reranker(samples, persona)[0]
    assert first.reply == samples[0].candidates[0][0] != samples[0].reply
    again = rechoose(samples, persona, lambda texts: [1.0, 0.0])[0]
    assert again.reply == first.reply and again.candidates == samples[0].candidates
    assert rechoose([first], persona, lambda texts: [0.0, 1.0])[0].reply == samples[0].reply
    figures = {"scene_insert_rate": 0.0, "echo_rate": 0.0, "loop_rate": 0.0,
               "over_cap_rate": 0.0}
    rows = check_targets({"house-norerank": figures, "house": figures, "classifier_auc": None})
    assert rows[0][0].startswith("house: ")


def test_time_budget_stops_between_batches(persona, fake_generator) -> None:
    import time

    prompts = [Prompt(f"message {i}") for i in range(3)]
    done, _ = generate_replies(fake_generator, persona, prompts, "house", persona.controls,
                               seed=0, batch_size=1, scorer=None, token_budget=384,
                               deadline=time.monotonic() - 1)
    assert done == []
    done, _ = generate_replies(fake_generator, persona, prompts, "house", persona.controls,
                               seed=0, batch_size=1, scorer=None, token_budget=384,
                               deadline=time.monotonic() + 600)
    assert [s.message for s in done] == [p.message for p in prompts]


def test_eval_says_what_to_run_before_generating_when_no_data_is_prepared(
        tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Do I need surgery?\n")
    with pytest.raises(SystemExit, match="drhouse data prepare"):
        main(["eval", "--prompts", str(prompts), "--data-dir", str(tmp_path / "none"),
              "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_eval_says_what_is_wrong_with_a_reuse_folder_before_generating(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_selector_train import write_splits

    from cli.main import main

    write_splits(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Do I need surgery?\n")
    args = ["eval", "--prompts", str(prompts), "--data-dir", str(tmp_path / "data"),
            "--systems", "human", "--out", str(tmp_path / "out")]
    (tmp_path / "copied" / "samples").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no run\.json there"):
        main([*args, "--reuse", str(tmp_path / "copied")])
    (tmp_path / "copied" / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no samples/\*.jsonl there"):
        main([*args, "--reuse", str(tmp_path / "copied")])
    assert not (tmp_path / "out").exists()
