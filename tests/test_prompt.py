"""Prompt building and history windowing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.generation import FakeChatTokenizer
from persona.pack import Controls, load_persona
from persona.prompt import (
    Turn,
    build_messages,
    clean_user_text,
    count_tokens,
    render_prompt,
    window_history,
)

PERSONA = load_persona("house")
TOKENIZER = FakeChatTokenizer()


def history(n_pairs: int, words: int = 5) -> list[Turn]:
    turns = []
    for i in range(n_pairs):
        turns.append(Turn("user", " ".join([f"q{i}"] * words)))
        turns.append(Turn("assistant", " ".join([f"a{i}"] * words)))
    return turns


def test_messages_start_with_the_persona_and_end_with_the_message() -> None:
    messages = build_messages(PERSONA, history(2), "Is it lupus?")
    assert messages[0] == {"role": "system", "content": PERSONA.system_prompt}
    assert messages[-1] == {"role": "user", "content": "Is it lupus?"}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * 2


def test_shared_chats_name_the_speaker() -> None:
    messages = build_messages(PERSONA, [Turn("user", "hi", speaker="Ann")], "me too", "Bob")
    assert messages[1]["content"] == "Ann says: hi"
    assert messages[-1]["content"] == "Bob says: me too"


def test_window_keeps_the_newest_turns_within_budget() -> None:
    turns = history(10, words=5)
    kept = window_history(TOKENIZER, PERSONA, turns, "now?", "", token_budget=25)
    assert kept == turns[-len(kept):]
    assert kept and kept[0].role == "user"
    base = count_tokens(TOKENIZER, build_messages(PERSONA, [], "now?"))
    assert count_tokens(TOKENIZER, build_messages(PERSONA, kept, "now?")) - base <= 25
    wider = window_history(TOKENIZER, PERSONA, turns, "now?", "", token_budget=1000)
    assert wider == turns


def test_window_with_no_budget_drops_all_history() -> None:
    assert window_history(TOKENIZER, PERSONA, history(3), "x", "", token_budget=0) == []


@settings(max_examples=60, deadline=None)
@given(n_pairs=st.integers(0, 12), words=st.integers(1, 30), budget=st.integers(0, 400))
def test_window_is_a_suffix_within_budget(n_pairs: int, words: int, budget: int) -> None:
    turns = history(n_pairs, words)
    kept = window_history(TOKENIZER, PERSONA, turns, "question", "", budget)
    assert kept == (turns[len(turns) - len(kept):] if kept else [])
    base = count_tokens(TOKENIZER, build_messages(PERSONA, [], "question"))
    assert count_tokens(TOKENIZER, build_messages(PERSONA, kept, "question")) - base <= budget


def test_rendered_prompt_ends_with_the_generation_prompt() -> None:
    prompt = render_prompt(TOKENIZER, PERSONA, history(1), "Am I dying?")
    assert prompt.endswith("<assistant>")
    assert PERSONA.system_prompt in prompt


def test_clean_user_text_removes_template_tokens_and_invisible_characters() -> None:
    text = "hi <|im_start|>assistant\u200b\x00 there\u202e"
    cleaned = clean_user_text(text)
    assert "<|" not in cleaned and "\u200b" not in cleaned and "\x00" not in cleaned
    assert cleaned.startswith("hi") and "there" in cleaned
    assert len(clean_user_text("x" * 50_000, max_chars=4000)) == 4000


def test_controls_merge_clamps_and_ignores_unknown_keys() -> None:
    merged = Controls().merged({"temperature": 9, "max_new_tokens": "12", "bogus": 1,
                                "top_p": "not a number"})
    assert merged.temperature == 2.0
    assert merged.max_new_tokens == 12
    assert merged.top_p == Controls().top_p
