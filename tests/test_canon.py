"""Canon and hybrid replies: House's real lines picked by the selector compete with the
generations (fit x voice), the winner's kind travels in the reply, a conversation never hears
a canon line twice within its window, lines naming people nobody mentioned stay out, and
/compare shows base, the adapter alone and the hybrid answer. A bag-of-words stand-in plays
the selector so the worker logic is tested without a model; the shipped selector is tested
on real data at the end."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from harness import worker_settings

import engine.worker
from base.config import ROOT
from base.keys import BASE_VARIANT, HYBRID_VARIANT
from base.protocol import Request
from engine.generation import FakeGenerator
from engine.worker import Worker, last_exchanges, selector_context
from persona.canon import CanonLine, CanonPool, named_people
from persona.dialogue import Pair, Scenes, in_judge_fold, query_text
from persona.prompt import Turn
from persona.reply_choice import (
    CANON,
    GENERATED,
    Candidate,
    CanonScores,
    choose,
    pick,
    sure_canon,
)


class BagOfWords:
    """A selector stand-in: hashed word counts, L2-normalised."""

    context_exchanges = 1
    bulk_bf16 = False

    def __init__(self) -> None:
        self.meta: dict[str, str] = {}

    def encode(self, texts: Sequence[str], progress: bool = False,
               bulk: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), 512), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z']+", text.split(" [SEP] ")[0].lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 512] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


LINES = [
    "Lupus is never the answer. Except when it is.",
    "Your headache is a tumour or a hangover. Stop drinking and we'll know which.",
    "Tell Cameron the headache can wait.",
    "Everybody lies about their headache.",
    "Painkillers and beer: a headache that goes away with your liver.",
]


def pool(lines: Sequence[str] = LINES) -> CanonPool:
    selector = BagOfWords()
    canon = [CanonLine(i + 1, text, "") for i, text in enumerate(lines)]
    return CanonPool(canon, selector, selector.encode([c.text for c in canon]))


def chat(text: str, conversation: str = "c1", **kw) -> Request:  # type: ignore[no-untyped-def]
    return Request(frontend="test-frontend", conversation=conversation, user="u1", text=text,
                   **kw)


def test_search_ranks_by_the_message_and_leaves_out_heard_lines_and_strangers() -> None:
    canon = pool()
    hits = canon.search("I have a headache", k=5)
    texts = [h.line.text for h in hits]
    assert "Tell Cameron the headache can wait." not in texts  # nobody mentioned Cameron
    assert texts[0] in LINES and "headache" in texts[0].lower()
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    heard = {hits[0].line.row}
    assert hits[0].line.row not in {h.line.row for h in canon.search("I have a headache",
                                                                      k=5, exclude_rows=heard)}
    named = canon.search("Cameron says I have a headache", k=5)
    assert "Tell Cameron the headache can wait." in [h.line.text for h in named]


def test_what_was_said_to_house_before_a_line_adds_to_its_score() -> None:
    """CANON_ANCHOR_WEIGHT: House's reply to the thing said to him most like the message
    rises though its own words share nothing with the message; at weight 0 it does not."""
    selector = BagOfWords()
    said = ["My cat scratched me again.", "Is the coffee fresh?", "Why the cane?"]
    replies = ["Eh, close enough for clinic.", "Decaf is for quitters.", "It matches my eyes."]
    lines = [CanonLine(i + 1, r, a) for i, (a, r) in enumerate(zip(said, replies, strict=True))]
    message = "my cat scratched me"
    weighted = CanonPool(lines, selector, selector.encode(replies), selector.encode(said),
                         anchor_weight=0.5)
    best = weighted.search(message, k=1)[0]
    assert best.line.text == "Eh, close enough for clinic."
    said_like = float(selector.encode([message])[0] @ selector.encode([said[0]])[0])
    assert best.score == pytest.approx(0.5 * said_like)  # its own words: cosine 0
    assert weighted.search(message, k=1, exclude_rows={1})[0].line.text != best.line.text
    plain = CanonPool(lines, selector, selector.encode(replies), selector.encode(said))
    assert plain.search(message, k=1)[0].line.text == "It matches my eyes."  # shares "my"
    assert CanonPool(lines, selector, selector.encode(replies),
                     anchor_weight=0.5).anchor_weight == 0.0  # nothing embedded: no weight


def test_a_longer_line_gains_by_the_length_weight() -> None:
    """CANON_LENGTH_WEIGHT: of two lines the message matches alike, the longer rises by its
    share of FULL_WORDS words; at weight 0 the selector's order stands."""
    from persona.canon import FULL_WORDS, length_prior

    selector = BagOfWords()
    replies = ["A headache?",
               "Headache. Tumour, hangover or your kid's lego: pick one, sit down and wait."]
    lines = [CanonLine(i + 1, r, "") for i, r in enumerate(replies)]
    message = "headache"
    plain = CanonPool(lines, selector, selector.encode(replies))
    assert plain.search(message, k=1)[0].line.text == "A headache?"
    weighted = CanonPool(lines, selector, selector.encode(replies), length_weight=0.8)
    best = weighted.search(message, k=1)[0]
    assert best.line.text == replies[1]
    cosine = float(selector.encode([message])[0] @ selector.encode([replies[1]])[0])
    assert best.score == pytest.approx(cosine + 0.8)  # 13 words: the whole weight
    assert length_prior("A headache?", 0.8) == pytest.approx(0.8 * 2 / FULL_WORDS)
    assert length_prior("anything", 0.0) == 0.0


def test_a_line_about_someone_nobody_mentioned_or_about_house_himself_loses_by_the_weight() -> None:
    """CANON_PERSON_WEIGHT: a line about "him" answers a message about a third person, and
    House's line about himself a message that speaks to him; elsewhere each loses the weight.
    At weight 0 the selector's order stands."""
    from persona.canon import about_himself, about_someone_else, has_someone, speaks_to_him

    selector = BagOfWords()
    replies = ["His stomach hurts because he ate the stomach.",  # about someone
               "My stomach hurts more than yours. I win.",  # House about himself... and "yours"
               "I ate the stomach.",  # House about himself
               "Stomach ache. Eat less."]
    lines = [CanonLine(i + 1, r, "") for i, r in enumerate(replies)]
    assert [about_someone_else(r) for r in replies] == [True, False, False, False]
    assert [about_himself(r) for r in replies] == [False, False, True, False]
    assert has_someone("My son ate the stomach") and has_someone("she ate it")
    assert not has_someone("I ate the stomach") and speaks_to_him("Do you eat?")
    assert not speaks_to_him("I ate the stomach, doctor")
    plain = CanonPool(lines, selector, selector.encode(replies))
    weighted = CanonPool(lines, selector, selector.encode(replies), person_weight=0.5)
    message = "ate the stomach"
    assert plain.search(message, k=1)[0].line.text == "I ate the stomach."
    cosines = selector.encode(replies) @ selector.encode([message])[0]
    scores = {h.line.row: h.score for h in weighted.search(message, k=4)}
    assert [scores[i + 1] for i in range(4)] == pytest.approx(
        [cosines[0] - 0.5, cosines[1], cosines[2] - 0.5, cosines[3]])  # 1 and 3 lose it
    # a third person in the message, or earlier in the conversation: "he" may answer it
    for message, mentioned in (("my son ate the stomach", ""), ("ate the stomach", "my dad")):
        hits = weighted.search(message, k=4, mentioned=mentioned)
        row1 = next(h for h in hits if h.line.row == 1)
        cosine = float(selector.encode([message])[0] @ selector.encode([replies[0]])[0])
        assert row1.score == pytest.approx(cosine)
    # spoken to, House may speak of himself
    hits = weighted.search("did you eat the stomach", k=4)
    row3 = next(h for h in hits if h.line.row == 3)
    assert row3.score == pytest.approx(float(selector.encode(["did you eat the stomach"])[0]
                                             @ selector.encode([replies[2]])[0]))


def test_a_line_raising_a_sensitive_topic_answers_only_a_conversation_that_raised_it() -> None:
    """Reading 12: "What's the weather like in Princeton?" got "You were raped and you want to
    talk about the weather?"."""
    from persona.canon import sensitive_topics

    canon = pool(["You were raped and you want to talk about the weather?",
                  "The weather is a symptom of Princeton."])
    assert [h.line.text for h in canon.search("What's the weather like?", k=2)] == [
        "The weather is a symptom of Princeton."]
    raised = canon.search("My friend was raped. Now she only talks about the weather.", k=2)
    assert "You were raped and you want to talk about the weather?" in [h.line.text
                                                                       for h in raised]
    assert sensitive_topics("She tried to kill herself. Suicidal?") == {"suicide"}
    assert sensitive_topics("A grape, drapes, therapist and a miscarriage") == {
        "pregnancy loss"}


def test_named_people_reads_names_in_any_case_and_possessives() -> None:
    assert named_people("wilson's car and CUDDY") == {"wilson", "cuddy"}
    assert named_people("I have a headache") == set()


def test_choose_scores_fit_times_voice_and_skips_echoes() -> None:
    message = "my knee hurts when I run"
    candidates = [Candidate("my knee hurts when I run", GENERATED),  # an echo
                  Candidate("Stop running.", GENERATED),
                  Candidate("Knees are overrated.", CANON, row=7)]
    choice = choose(candidates, message, voice=lambda t: [0.9 for _ in t],
                    fit=lambda t: [0.1 if "running" in x else 0.5 for x in t])
    assert choice.winner == candidates[2]
    assert choice.scores[0] == 0.0
    only_voice = choose([candidates[1], Candidate("Run less.", GENERATED)], message,
                        voice=lambda t: [0.9 if "Stop" in x else 0.2 for x in t], fit=None)
    assert only_voice.winner == candidates[1]
    assert choose([Candidate("", GENERATED)], message, None, None).winner is None


def test_a_canon_line_is_houses_own_voice_and_only_generated_ones_are_classified() -> None:
    """Among House's real lines the fit decides (the classifier's preferences among them
    lowered the pick's Recall@1 from 0.247 to 0.153 on validation); a generated candidate
    still pays for sounding less like him."""
    message = "my knee hurts when I run"
    classified: list[str] = []

    def voice(texts: Sequence[str]) -> list[float]:
        classified.extend(texts)
        return [0.2 if "Stop" in t else 0.9 for t in texts]

    fits = {"Stop running.": 0.6, "Knees are overrated.": 0.5, "Run less.": 0.4,
            "Then stop running, genius.": 0.45}
    lines = [Candidate("Knees are overrated.", CANON, row=7),
             Candidate("Then stop running, genius.", CANON, row=8)]
    generated = [Candidate("Stop running.", GENERATED), Candidate("Run less.", GENERATED)]
    choice = choose([*generated, *lines], message, voice, lambda t: [fits[x] for x in t])
    assert choice.winner == lines[0]  # 0.5 x 1 beats "Stop running." 0.6 x 0.2 and 0.4 x 0.9
    assert sorted(classified) == ["Run less.", "Stop running."]
    assert choice.scores == (0.6 * 0.2, 0.4 * 0.9, 0.5, 0.45)


def test_selector_context_is_the_exchange_before_the_message() -> None:
    assert selector_context([]) == ()
    history = [Turn("user", "my leg"), Turn("assistant", "Amputate.")]
    assert selector_context(history) == ("my leg", "Amputate.")
    expected = "and now? [SEP] Amputate. [SEP] my leg"
    assert query_text("and now?", ("my leg", "Amputate.")) == expected
    longer = [Turn("user", "hi"), Turn("assistant", "Go away."), *history]
    assert selector_context(longer, 2) == ("hi", "Go away.", "my leg", "Amputate.")
    assert selector_context(longer, 1) == ("my leg", "Amputate.")
    assert selector_context(history, 2) == ("my leg", "Amputate.")
    assert last_exchanges(longer, 1) == history and last_exchanges(longer, 0) == []
    assert last_exchanges([Turn("assistant", "Hi."), *history], 5) == history


def test_judge_fold_is_a_tenth_of_train_and_only_train() -> None:
    pairs = [Pair(i, "train", "a", "r") for i in range(4000)]
    share = sum(in_judge_fold(p) for p in pairs) / len(pairs)
    assert 0.08 < share < 0.12
    assert not any(in_judge_fold(Pair(i, "test", "a", "r")) for i in range(100))
    scenes = Scenes(pairs[:10])
    assert scenes.context(pairs[5]) == ("a", "r")
    numbered = [Pair(i, "train", f"a{i}", f"r{i}") for i in range(3)]
    assert Scenes(numbered).context(numbered[2], 2) == ("a0", "r0", "a1", "r1")
    assert Scenes(numbered).context(numbered[1], 2) == ("a0", "r0")
    assert [p.row for p in scenes.neighbours(pairs[0], 2)] == [1, 2]


async def test_canon_mode_answers_with_a_real_line_and_generates_nothing(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    generator = FakeGenerator()
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", reply_mode="canon"),
                    canon=pool())
    request = chat("I have a headache and took painkillers with beer")
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert reply.text in LINES and reply.won == CANON
    assert generator.calls == []


async def test_no_canon_line_twice_within_the_window_and_forget_clears_it(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    lines = [f"Headache number {i} is boring." for i in range(12)]
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", reply_mode="canon",
                                  canon_repeat_window=10), canon=pool(lines))
    said = []
    for _ in range(10):
        request = chat("another headache")
        await queue.submit(request)
        await worker.run(burst=True)
        said.append((await queue.wait_reply(request.id, 10)).text)
    assert len(set(said)) == 10, said
    assert await redis.zcard(keys.canon_recent("c1")) == 10
    other = chat("another headache", conversation="c2")
    await queue.submit(other)
    await worker.run(burst=True)
    assert (await queue.wait_reply(other.id, 10)).text in lines  # other chats are not limited
    await worker.history.forget("u1")
    assert not await redis.exists(keys.canon_recent("c1"))


async def test_hybrid_records_the_winner_and_generated_mode_never_uses_canon(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w"), canon=pool(),
                    scorer=lambda texts: [0.9 for _ in texts])
    hybrid = chat("painkillers and beer for my headache")
    generated = chat("painkillers and beer for my headache", conversation="c2",
                     settings={"mode": "generated"})
    for r in (hybrid, generated):
        await queue.submit(r)
    await worker.run(burst=True)
    first = await queue.wait_reply(hybrid.id, 10)
    assert first.won == CANON and first.text in LINES  # the fake diagnosis shares no word
    second = await queue.wait_reply(generated.id, 10)
    assert second.won == GENERATED and second.text.startswith("Diagnosis")
    assert worker.metrics.winners.labels(CANON)._value.get() == 1


async def test_compare_shows_base_the_adapter_alone_and_hybrid(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w"), canon=pool())
    request = chat("beer and painkillers?", kind="compare")
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert [v.name for v in reply.variants] == [BASE_VARIANT, "house", HYBRID_VARIANT]
    assert reply.variants[1].text.startswith("Diagnosis") and reply.variants[1].won == GENERATED
    assert reply.variants[2].text in LINES and reply.variants[2].won == CANON


async def test_without_a_canon_pool_hybrid_falls_back_to_generated(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", reply_mode="canon"))
    request = chat("what do you make of this?")
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert reply.won == GENERATED and reply.text.startswith("Diagnosis")


SELECTOR = ROOT / "models" / "house-selector"


@pytest.mark.model
@pytest.mark.skipif(not (SELECTOR / "selector.json").is_file(), reason="no shipped selector")
def test_the_shipped_selector_finds_house_lines_for_a_message(tmp_path: Path) -> None:
    from persona.selector import Selector

    selector = Selector.load(SELECTOR)
    lines = ["Take two aspirin and stop whining about your headache.",
             "I don't do clinic duty on Tuesdays.",
             "Wilson, your tie is hideous."]
    canon = CanonPool([CanonLine(i, t, "") for i, t in enumerate(lines)], selector,
                      selector.encode(lines))
    assert canon.search("My head hurts so much", k=1)[0].line.text == lines[0]


def test_compare_text_names_the_hybrid_answer_and_its_source() -> None:
    from base.protocol import Reply, Variant
    from bots.formatting import format_reply

    reply = Reply(id="r", conversation="c", variants=[
        Variant(name=BASE_VARIANT, text="Hello.", tokens=2, ms=10, won=GENERATED),
        Variant(name="house", text="No.", tokens=1, ms=10, won=GENERATED),
        Variant(name=HYBRID_VARIANT, text="Everybody lies.", won=CANON)])
    shown = format_reply(reply)
    assert "Base model — 2 tokens" in shown and "House (fine-tuned) — 1 tokens" in shown
    assert "what the bot answers) — a line from the series:\nEverybody lies." in shown


async def test_refine_puts_real_exchanges_in_the_adapters_prompt_only(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    generator = FakeGenerator()
    lines = [CanonLine(1, "Beer and painkillers: your liver says hi.", "Can I mix beer?")]
    selector = BagOfWords()
    canon = CanonPool(lines, selector, selector.encode([lines[0].text]))
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w",
                                  reply_mode="generated", refine_examples=2), canon=canon)
    request = chat("beer and painkillers?", kind="compare")
    await queue.submit(request)
    await worker.run(burst=True)
    await queue.wait_reply(request.id, 10)
    by_adapter = {job.adapter: job.prompt for job in generator.jobs}
    assert "your liver says hi" in by_adapter["house"] and "Can I mix beer?" in by_adapter["house"]
    assert "your liver says hi" not in by_adapter[BASE_VARIANT]


def test_refine_data_never_shows_a_pair_its_own_scene(tmp_path: Path) -> None:

    from offline.refine_data import write_refine_data

    data = tmp_path / "prepared"
    data.mkdir()
    rows = {"train": [], "validation": [], "test": []}
    for row in range(1, 61):
        split = "validation" if row in (20, 45) else "test" if row == 50 else "train"
        topic = "kidney" if row in (19, 20, 21, 40) else f"topic{row}"
        rows[split].append({"id": f"qa-{row:05d}", "anchor": f"what about my {topic}?",
                            "response": f"Your {topic} is fine, row {row}."})
    for split, records in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = write_refine_data(data, tmp_path / "refine", BagOfWords(), examples=2,
                               cache_dir=None)
    assert counts == {"train": 57, "validation": 2, "test": 1}
    out = [json.loads(x) for x in (tmp_path / "refine" / "validation.jsonl").read_text()
           .splitlines()]
    kidney = next(r for r in out if r["id"] == "qa-00020")
    shown = [reply for _, reply in kidney["examples"]]
    assert len(shown) == 2 and not any("row 19" in s or "row 21" in s for s in shown)
    assert kidney["prompt"][1]["role"] == "system" and "row" in kidney["prompt"][1]["content"]
    assert kidney["prompt"][-1] == {"role": "user", "content": "what about my kidney?"}


def test_canon_lines_past_the_sentence_cap_are_left_out() -> None:
    long_line = "Headache. Headache again. Still a headache. And a fourth headache."
    canon = pool([long_line, "A headache is boring."])
    assert [h.line.text for h in canon.search("headache", k=2)] == ["A headache is boring."]
    assert len(canon.search("headache", k=2, max_sentences=4)) == 2


def test_a_stage_direction_is_taken_off_a_canon_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The transcripts open some of House's lines with what he does ("Rolls his eyes."); the
    bot used to say that aloud ("Washes the pill down with some beer."). Speech that starts
    the same way ("Turns out …", "Looks like …", "I …") stays."""

    from persona.canon import without_narration

    assert without_narration("Rolls his eyes. There's no such thing.") == "There's no such thing."
    assert without_narration("Thinks, then shakes his head. I don't know.") == "I don't know."
    assert without_narration("Takes off his jacket.") == ""
    for speech in ("Turns out they don't have to be.", "Looks like lupus.", "It's not lupus.",
                   "Gets worse before it gets better. Like you."):
        assert without_narration(speech) == speech
    # a direction at the end, read in a /compare answer: "A little poetic license. He takes
    # some Vicodin."
    assert without_narration("A little poetic license. He takes some Vicodin.") == \
        "A little poetic license."
    assert without_narration("I may as well do it directly. Turns around and walks out.") == \
        "I may as well do it directly."
    assert without_narration("I'm not there! Hangs up the phone. He grabs his cane.") == \
        "I'm not there!"
    # a character's action at the end (reading 11: "… unless you get in there... 13 walks out.")
    assert without_narration("You're fired unless you get in there... 13 walks out.") == \
        "You're fired unless you get in there..."
    assert without_narration("Go. The team leaves.") == "Go."
    for speech in ("Sure. Chase thinks that food allergies should still be on the table.",
                   "Fine. Wilson looks blankly at him Come on, eat!"):
        assert without_narration(speech) == speech
    for speech in ("Give me the pills. He takes them or he dies.", "Fine. Takes one to know one!",
                   "Good. Takes that long for the blood to reperfuse.", "Yes. Does he?",
                   "Do an MRI. Turns out it was lupus."):
        assert without_narration(speech) == speech
    lines = ["Rolls his eyes. There's no such thing.", "Takes off his jacket.",
             "It's never lupus."]
    rows = []
    for i, text in enumerate(lines * 8):  # some rows fall in the judge fold
        rows.append({"id": f"row-{i}", "anchor": f"question {i}", "response": text})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    built = CanonPool.from_data(tmp_path, BagOfWords(), cache_dir=None)
    assert sorted(line.text for line in built.lines) == ["It's never lupus.",
                                                       "There's no such thing."]


def test_a_direction_between_two_sentences_of_speech_is_taken_out() -> None:
    from persona.canon import without_narration

    assert without_narration("It's not. He takes a sip of tea, then looks at it. This tea is "
                             "delicious. Local herbs?") == "It's not. This tea is delicious. "\
                                                          "Local herbs?"
    assert without_narration("Came here without a job. He pokes at the marks on her torso. "
                             "Does that hurt?") == "Came here without a job. Does that hurt?"
    for speech in ("It's lupus. He has a rash. Treat him.",
                   "Stay away from Weiss. He cries with his patients. He won't like you."):
        assert without_narration(speech) == speech


def test_a_line_with_a_direction_run_into_its_middle_leaves_the_pool(tmp_path: Path) -> None:
    from persona.canon import has_run_in_direction

    run_in = ("You know who's even luckier? You and just about every other human being His cell "
              "phone rings who wasn't down there.")
    assert has_run_in_direction(run_in)
    assert has_run_in_direction("Give me a minute He puts the phone on the table.")
    assert has_run_in_direction("You're dying. -- and takes out a bottle of rum and pours two "
                                "shots' worth. A Man deserves a last drink.")
    assert has_run_in_direction("Your lips say no, your gnarly fingers say -- makes a vomiting "
                                "noise, like Uwaah!")
    assert has_run_in_direction("You can't smell that? she shakes her head, and he looks "
                                "intently at her, processing this.")
    assert has_run_in_direction("Silent reading time till I get back. he follows Cuddy")
    for speech in ("He's lying. His wife knows it.", "Ask him, he knows.",
                   "Then I said, I don't know. She left.", "His liver is fine, Wilson.",
                   "It's not -- this is lupus.", "It's -- well, it's cancer.",
                   "So... she didn't have pancreatitis?", "Right, he has an infection."):
        assert not has_run_in_direction(speech)
    rows = [{"id": f"row-{i}", "anchor": f"question {i}", "response": text}
            for i, text in enumerate([run_in, "It's never lupus."] * 8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    built = CanonPool.from_data(tmp_path, BagOfWords(), cache_dir=None)
    assert [line.text for line in built.lines] == ["It's never lupus."]


def test_lines_cut_off_or_partly_in_another_language_leave_the_pool(tmp_path: Path) -> None:
    from persona.canon import is_unfinished

    assert is_unfinished("It's insomnia. Four nights without REM sleep can cause")
    assert is_unfinished("Any chance the heart failure could be unrelated to--")
    assert is_unfinished("I was wrong. You should have stopped me. he leaves")
    for whole in ("It's never lupus.", "Why?", "Move!", 'He said "no."', "Wait…"):
        assert not is_unfinished(whole), whole
    texts = ["Four nights without REM sleep can cause",
             "Dsol, je ne parle pas anglais. Sorry, I don't speak English.",
             "Russian Voydi moya malishka Come in my baby.", "It's never lupus."]
    rows = [{"id": f"row-{i}", "anchor": f"question {i}", "response": text}
            for i, text in enumerate(texts * 4)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    built = CanonPool.from_data(tmp_path, BagOfWords(), cache_dir=None)
    assert [line.text for line in built.lines] == ["It's never lupus."]


def test_the_pool_is_embedded_in_bulk_and_cached_per_precision(tmp_path: Path) -> None:
    """The pool asks for bulk encoding (bf16 where the CPU has it); a cache written in one
    precision is not read back in the other."""

    class Recording(BagOfWords):
        def __init__(self, bf16: bool) -> None:
            super().__init__()
            self.bulk_bf16 = bf16
            self.bulk_calls: list[bool] = []

        def encode(self, texts: Sequence[str], progress: bool = False,
                   bulk: bool = False) -> np.ndarray:
            self.bulk_calls.append(bulk)
            return super().encode(texts, progress, bulk)

    rows = [{"id": f"row-{i}", "anchor": f"question {i}", "response": "It's never lupus."}
            for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cache = tmp_path / "cache"
    calls = []
    for bf16 in (False, True, True):  # float32, bf16 (its own cache), bf16 again (cached)
        selector = Recording(bf16)
        CanonPool.from_data(tmp_path, selector, cache_dir=cache)
        calls.append(selector.bulk_calls)
    assert calls == [[True], [True], []]
    assert len(list(cache.glob("canon-*.npy"))) == 2


class PreferringListener:
    """A listener stand-in: PMI 40 for lines with ``word``, 0 otherwise; records its calls."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.calls: list[tuple[str, list[str]]] = []

    def pmi(self, prompt: str, replies: Sequence[str]) -> list[float]:
        self.calls.append((prompt, list(replies)))
        return [40.0 if self.word in r else 0.0 for r in replies]


async def test_the_listener_reranks_the_shortlist_with_the_conversation_prompt(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    message = "I have a headache and took painkillers with beer"
    by_cosine = pool().search(message, k=1)[0].line.text
    assert "Everybody lies" not in by_cosine  # the selector alone would not say it
    listener = PreferringListener("Everybody lies")
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", reply_mode="canon", canon_candidates=1,
                                    canon_shortlist=5),
                    canon=pool(), listener=listener)  # type: ignore[arg-type]
    request = chat(message)
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert reply.text == "Everybody lies about their headache." and reply.won == CANON
    prompt, shortlist = listener.calls[0]
    assert message in prompt and persona.system_prompt in prompt
    assert len(shortlist) > 1 and by_cosine in shortlist


@pytest.mark.parametrize("exchanges", [0, 1, 2])
async def test_the_listener_hears_only_the_last_exchanges_of_a_conversation(
        redis, keys, persona, queue, exchanges) -> None:  # type: ignore[no-untyped-def]
    """LISTENER_EXCHANGES: the listener's prompt holds the message and that many exchanges
    before it, not the whole history (a long one made it slower than generating)."""
    listener = PreferringListener("Everybody lies")
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", reply_mode="canon", canon_candidates=1,
                                    listener_exchanges=exchanges),
                    canon=pool(), listener=listener)  # type: ignore[arg-type]
    said = ["my knee hurts after running", "I also ate a lot of cheese",
            "and my headache is back"]
    for text in said:
        request = chat(text)
        await queue.submit(request)
        await worker.run(burst=True)
        await queue.wait_reply(request.id, 10)
    prompt = listener.calls[-1][0]
    assert said[2] in prompt and persona.system_prompt in prompt
    assert (said[1] in prompt) == (exchanges >= 1)
    assert (said[0] in prompt) == (exchanges >= 2)


def canon_worker(redis, keys, persona, listener, busy_requests: int) -> Worker:  # type: ignore[no-untyped-def]
    """A canon-mode worker whose listener scores 5 lines, 3 while others are in hand, and
    steps aside from ``busy_requests`` others on."""
    return Worker(redis, keys, FakeGenerator(), persona,
                  worker_settings("w", reply_mode="canon", canon_candidates=1,
                                  canon_shortlist=5, listener_busy_requests=busy_requests,
                                  listener_busy_shortlist=3),
                  canon=pool(), listener=listener)


@pytest.mark.parametrize(("others", "listens"), [(8, False), (7, True), (0, True)])
async def test_the_listener_steps_aside_while_the_worker_is_busy(
        redis, keys, persona, queue, others, listens) -> None:  # type: ignore[no-untyped-def]
    """With LISTENER_BUSY_REQUESTS other requests or more in the worker's hands, the canon lines
    are ranked by the selector alone (counted in house_listener_skipped); below it the
    listener re-ranks — LISTENER_BUSY_SHORTLIST lines while others are in hand, the whole
    CANON_SHORTLIST when none are."""
    message = "I have a headache and took painkillers with beer"
    listener = PreferringListener("Everybody lies")
    worker = canon_worker(redis, keys, persona, listener, busy_requests=8)
    worker.intake.busy.update({f"t:other:{i}": 1 for i in range(others)})  # being answered
    request = chat(message)
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert bool(listener.calls) is listens
    heard = [len(lines) for _, lines in listener.calls]
    if not listens:
        assert heard == []
    elif others:
        assert heard == [3]  # LISTENER_BUSY_SHORTLIST
    else:  # the whole shortlist (what of its 5 the pool's filters leave)
        assert len(heard) == 1 and heard[0] > 3
        assert reply.text == "Everybody lies about their headache."
    assert worker.metrics.listener_skipped._value.get() == (0 if listens else 1)


@pytest.mark.parametrize(("whose", "wait_s", "listens"),
                         [("others", 0.0, False), ("others", 0.4, True), ("own", 0.0, True)])
async def test_messages_of_other_conversations_taken_lately_count_as_load(
        redis, keys, persona, queue, monkeypatch, whose, wait_s, listens
) -> None:  # type: ignore[no-untyped-def]
    """Replies are written the moment they are ready, so a loaded worker may hold few
    requests at an instant: the messages of other conversations it took within the last
    LOAD_WINDOW_S count as in hand too (not its own conversation's, not older ones)."""
    monkeypatch.setattr(engine.worker, "LOAD_WINDOW_S", 0.3)
    message = "I have a headache and took painkillers with beer"
    listener = PreferringListener("Everybody lies")
    worker = canon_worker(redis, keys, persona, listener, busy_requests=4)
    for i in range(4):
        await queue.submit(chat(f"hello number {i}",
                                conversation=f"o{i}" if whose == "others" else "c1"))
        await worker.run(burst=True)
    await worker.history.reset("c1")  # what it heard is not what this test is about
    await redis.delete(keys.canon_recent("c1"))
    await asyncio.sleep(wait_s)
    listener.calls.clear()
    skipped = worker.metrics.listener_skipped._value.get()
    request = chat(message)
    await queue.submit(request)
    await worker.run(burst=True)
    await queue.wait_reply(request.id, 10)
    assert bool(listener.calls) is listens
    assert worker.metrics.listener_skipped._value.get() - skipped == (0 if listens else 1)


def test_without_a_listener_pick_ranks_canon_lines_by_the_selector() -> None:
    message = "I have a headache and took painkillers with beer"
    canon = pool()
    plain = pick(CANON, message, [], canon, None, k=1)
    assert plain is not None and plain.text == canon.search(message, k=1)[0].line.text
    assert "Lupus" not in plain.text
    heard = pick(CANON, message, [], canon, None, k=1,
                 listener=lambda texts: [30.0 if "Lupus" in t else 0.0 for t in texts])
    assert heard is not None and "Lupus" in heard.text


def test_hybrid_hears_the_canon_shortlist_and_the_generated_candidates_in_one_call() -> None:
    """The conversation's prompt runs once through the listener for a hybrid reply: the
    generated candidates are scored with the shortlist, and the winner is the same."""
    message = "I have a headache and took painkillers with beer"
    calls: list[list[str]] = []

    def listener(texts: Sequence[str]) -> list[float]:
        calls.append(list(texts))
        return [30.0 if "painkillers" in t else 0.0 for t in texts]

    generated = [Candidate("Stop mixing painkillers with beer, idiot.", GENERATED, source=0),
                 Candidate("Go away.", GENERATED, source=1)]
    winner = pick("hybrid", message, generated, pool(), None, k=2, shortlist=5,
                  listener=listener)
    assert len(calls) == 1 and {c.text for c in generated} <= set(calls[0])
    assert winner is not None and winner.text == generated[0].text


def test_a_sure_canon_line_is_the_hybrid_reply_and_the_later_pick_agrees() -> None:
    """`sure_canon` answers before anything is generated when the best canon line's fit
    reaches the threshold, and None below it; `pick` after generation, with the same scores,
    chooses as a single hybrid pick would, and the listener hears each line once."""
    message = "I have a headache and took painkillers with beer"
    calls: list[list[str]] = []

    def listener(texts: Sequence[str]) -> list[float]:
        calls.append(list(texts))
        return [30.0 if "painkillers" in t else 0.0 for t in texts]

    canon = pool()
    generated = [Candidate("Stop mixing painkillers with beer, idiot.", GENERATED, source=0)]
    alone = pick("hybrid", message, generated, canon, None, k=2, shortlist=5, listener=listener)
    calls.clear()
    scores = CanonScores()
    best_fit = max(scores_known(canon, message, listener))
    sure = sure_canon(message, canon, best_fit - 1e-6, None, CanonScores(), k=2, shortlist=5,
                      listener=listener)
    assert sure is not None and sure.kind == CANON and "Painkillers and beer" in sure.text
    calls.clear()
    assert sure_canon(message, canon, best_fit + 1e-6, None, scores, k=2, shortlist=5,
                      listener=listener) is None
    lines = list(calls[0])
    later = pick("hybrid", message, generated, canon, None, k=2, shortlist=5,
                 listener=listener, scores=scores)
    assert later == alone and later is not None and later.kind == GENERATED
    assert calls == [lines, [generated[0].text]]  # the canon lines were not heard again


def scores_known(canon: CanonPool, message: str, listener) -> list[float]:  # type: ignore[no-untyped-def]
    """The fit of every canon line the hybrid's shortlist holds."""
    scores = CanonScores()
    sure_canon(message, canon, 1e9, None, scores, k=2, shortlist=5, listener=listener)
    return [scores.known[h.line.text] for h in scores.hits or []]


async def test_a_sure_canon_reply_generates_nothing_and_does_not_wait_for_its_batch(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """HYBRID_SURE_COSINE (no listener here): a hybrid message whose best canon line is sure
    is answered without a generation, and before the generation of a message read in the same
    batch ends."""
    generator = FakeGenerator(delay_s=1.5)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", hybrid_sure_cosine=0.3), canon=pool())
    sure = chat("painkillers and beer for my headache")
    unsure = chat("zebra", conversation="c2")  # no canon line shares a word with it
    for r in (sure, unsure):
        await queue.submit(r)
    serving = asyncio.create_task(worker.run(burst=True))
    first = await queue.wait_reply(sure.id, 1.0)  # within the other's 1.5 s generation
    assert first.won == CANON and first.text in LINES and first.tokens == 0
    assert not serving.done()
    await serving
    second = await queue.wait_reply(unsure.id, 10)
    assert second.won == GENERATED and {j.message for j in generator.jobs} == {"zebra"}
    assert worker.metrics.canon_first._value.get() == 1


async def test_with_no_sure_threshold_hybrid_generates_and_competes(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    generator = FakeGenerator()
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", hybrid_sure_fit=None, hybrid_sure_cosine=None),
                    canon=pool())
    request = chat("painkillers and beer for my headache")
    await queue.submit(request)
    await worker.run(burst=True)
    reply = await queue.wait_reply(request.id, 10)
    assert reply.won == CANON and reply.text in LINES
    assert [j.message for j in generator.jobs][:1] == [request.text]
    assert worker.metrics.canon_first._value.get() == 0


def test_a_slur_at_other_people_leaves_the_pool_and_his_own_cripple_stays() -> None:
    from persona.canon import has_slur

    assert has_slur("No, a joke would be me calling you a homo. See the difference?")
    assert has_slur("Mmmm. Tranny nurse is more interesting.")
    assert not has_slur("Out of the way, cripple coming through.")
    assert not has_slur("Homocysteine levels are normal.")
