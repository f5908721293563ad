"""Property-based tests (hypothesis) of the text handling every message goes through:
splitting long replies, cleaning (escaping) user text and names for the prompt, command
parsing, post-processing of generations, the prompt-leak guard and history windowing."""

from __future__ import annotations

import io
import re
import unicodedata

import redis.asyncio as aioredis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from bots.commands import parse_command
from bots.console import ConsoleFrontend
from bots.conversations import conversation_id
from bots.splitting import DISCORD_LIMIT, TELEGRAM_LIMIT, split_message
from engine.generation import FakeChatTokenizer
from persona.pack import load_persona
from persona.patterns import TEMPLATE_TOKENS
from persona.postprocess import (
    clean_reply,
    is_echo,
    leaks_prompt,
    speaker_tag_pattern,
    split_sentences,
    words,
)
from persona.prompt import (
    Turn,
    build_messages,
    clean_speaker,
    clean_user_text,
    count_tokens,
    fit_message,
    window_history,
)

PERSONA = load_persona("house")
TOKENIZER = FakeChatTokenizer()
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
INVISIBLE = "\x00\x01\x1b\x7f\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2066\ufeff"
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>",
           "<|start_header_id|>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")

# Text with the characters that matter here: letters, spaces, newlines, sentence ends,
# brackets, colons, emoji, RTL, combining marks and invisible characters.
alphabet = st.sampled_from([*"abcXYZ  \n\t.!?…,:;'\"()[]*<>|/@_-0123456789",
                            "😷", "頭", "ש", "\u0301", "é", *INVISIBLE])
texts = st.text(alphabet, max_size=400) | st.text(max_size=200)
word = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12)
sentence = st.lists(word, min_size=1, max_size=12).map(" ".join).flatmap(
    lambda s: st.sampled_from(".!?…").map(lambda end: s.capitalize() + end))


def non_space(text: str) -> str:
    return "".join(text.split())


# ---- splitting -------------------------------------------------------------------------------


@PROPS
@given(texts, st.integers(min_value=1, max_value=120))
def test_split_pieces_fit_and_keep_every_character(text: str, limit: int) -> None:
    pieces = split_message(text, limit)
    assert all(0 < len(p) <= limit for p in pieces)
    assert all(p == p.strip() for p in pieces)
    assert non_space("".join(pieces)) == non_space(text)
    if len(text.strip()) <= limit:
        assert pieces == ([text.strip()] if text.strip() else [])


@PROPS
@given(st.lists(sentence, min_size=1, max_size=30),
       st.sampled_from([60, 120, 300, DISCORD_LIMIT, TELEGRAM_LIMIT]))
def test_split_cuts_only_between_sentences_when_they_fit(sentences: list[str],
                                                         limit: int) -> None:
    assume(all(len(s) <= limit for s in sentences))
    text = " ".join(sentences)
    pieces = split_message(text, limit)
    assert " ".join(pieces) == text
    for piece in pieces:
        assert piece[-1] in ".!?…", piece
        assert piece[0].isupper()


# ---- cleaning user text and names (the prompt's escaping) ------------------------------------


@PROPS
@given(texts, st.integers(min_value=1, max_value=500))
def test_clean_user_text_is_safe_bounded_and_idempotent(text: str, max_chars: int) -> None:
    cleaned = clean_user_text(text, max_chars)
    assert len(cleaned) <= max_chars
    assert not CONTROL.search(cleaned)
    assert not TEMPLATE_TOKENS.search(cleaned)
    assert cleaned == cleaned.strip()
    assert "\n\n\n" not in cleaned and "  " not in cleaned
    assert clean_user_text(cleaned, max_chars) == cleaned


@PROPS
@given(texts, st.sampled_from(SPECIAL), st.lists(st.sampled_from(INVISIBLE), max_size=4),
       st.data())
def test_no_chat_marker_survives_cleaning(text: str, marker: str, hidden: list[str],
                                         data: st.DataObject) -> None:
    """A chat-template marker, whole or with invisible characters spread inside it, anywhere
    in a message, never reaches the prompt."""
    for char in hidden:
        at = data.draw(st.integers(min_value=0, max_value=len(marker)))
        marker = marker[:at] + char + marker[at:]
    at = data.draw(st.integers(min_value=0, max_value=len(text)))
    cleaned = clean_user_text(text[:at] + marker + text[at:], 10_000)
    for special in SPECIAL:
        assert special not in cleaned


@PROPS
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_clean_user_text_keeps_ordinary_text(text: str) -> None:
    ordinary = " ".join(w for w in text.split() if not any(c in w for c in "<>|"))
    ordinary = unicodedata.normalize("NFC", CONTROL.sub("", ordinary))
    ordinary = " ".join(ordinary.split())
    assert clean_user_text(ordinary) == ordinary


@PROPS
@given(texts)
def test_speaker_names_are_one_clean_short_line(name: str) -> None:
    cleaned = clean_speaker(name)
    assert len(cleaned) <= 64 and "\n" not in cleaned
    assert not CONTROL.search(cleaned) and not TEMPLATE_TOKENS.search(cleaned)
    content = build_messages(PERSONA, [], "hi", name)[-1]["content"]
    assert content == (f"{cleaned} says: hi" if cleaned else "hi")


@PROPS
@given(texts | st.sampled_from([":smile:", "[bold]x[/bold]", "a\\", "[/]", "\\[red]"]),
       st.booleans())
def test_console_prints_text_literally(text: str, interactive: bool) -> None:
    """The terminal frontend prints user and model text as it is: no markup, no emoji codes,
    whatever brackets or backslashes it holds."""
    assume("\r" not in text and "\t" not in text and not CONTROL.search(text))
    out = io.StringIO()
    queue = QueueClient(aioredis.Redis(), Keys("props"), "console-props")
    frontend = ConsoleFrontend(Settings(_env_file=None), PERSONA, queue,  # type: ignore[call-arg]
                               Keys("props"), stdin=io.StringIO(), stdout=out,
                               interactive=interactive)
    frontend.out.width = 100_000
    frontend.say(text)
    assert out.getvalue() == (f"House: {text}\n" if interactive else f"{text}\n")


# ---- commands --------------------------------------------------------------------------------

command_name = st.from_regex(r"[A-Za-z0-9_]{1,32}", fullmatch=True)
bot_name = st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True)


@PROPS
@given(command_name, st.none() | bot_name, st.text(max_size=80))
def test_commands_parse_to_name_target_and_args(name: str, target: str | None,
                                                args: str) -> None:
    text = f"/{name}" + (f"@{target}" if target else "") + (f" {args}" if args.strip() else "")
    command = parse_command(text)
    assert command is not None
    assert command.name == name.lower()
    assert command.target == (target or "")
    assert command.args == (args.strip() if args.strip() else "")


@PROPS
@given(texts)
def test_parsing_any_text_never_fails(text: str) -> None:
    command = parse_command(text)
    assert (command is None) == (not text.strip().startswith("/"))
    if command is not None:
        assert command.name == command.name.lower()
        assert re.fullmatch(r"[a-z0-9_]{0,32}", command.name)


# ---- conversations ---------------------------------------------------------------------------

ids = st.integers(min_value=-(10**13), max_value=10**13).map(str)


@PROPS
@given(st.lists(st.tuples(ids, ids, st.booleans(), st.none() | ids), min_size=2, max_size=8,
                unique=True))
def test_conversation_ids_separate_people_and_chats(places: list) -> None:  # type: ignore[type-arg]
    """Per-user scope: different (user, chat, thread) places never share a conversation."""
    seen = {}
    for user, chat, private, thread in places:
        key = (user,) if private else (user, chat, thread)
        cid = conversation_id("telegram", user, chat, thread, private=private)
        assert seen.setdefault(cid, key) == key


# ---- post-processing -------------------------------------------------------------------------


@PROPS
@given(texts, st.integers(min_value=1, max_value=5), st.booleans())
def test_clean_reply_never_invents_and_never_stages_a_scene(raw: str, cap: int,
                                                            finished: bool) -> None:
    reply = clean_reply(raw, PERSONA.other_speakers, cap, finished=finished)
    assert len(split_sentences(reply)) <= cap
    assert speaker_tag_pattern(PERSONA.other_speakers).search(reply) is None
    assert not any(c in reply for c in "[(*")
    assert "<|" not in reply and "|>" not in reply
    assert "\n" not in reply and reply == reply.strip()
    # Only deletions: the reply's words are a subsequence of the raw words (carriage
    # returns are dropped first, as clean_reply does).
    remaining = iter(words(raw.replace("\r", "")))
    assert all(any(w == r for r in remaining) for w in words(reply))


@PROPS
@given(st.lists(sentence, min_size=1, max_size=6), st.sampled_from(PERSONA.other_speakers),
       st.lists(sentence, min_size=1, max_size=3))
def test_a_scene_is_cut_at_the_first_other_speaker(house: list[str], speaker: str,
                                                   scene: list[str]) -> None:
    raw = " ".join(house) + f"\n{speaker}: " + " ".join(scene)
    reply = clean_reply(raw, PERSONA.other_speakers, 10)
    assert reply == " ".join(house) or len(reply) < len(" ".join(house))
    for line in scene:
        if line not in " ".join(house):
            assert line not in reply


@PROPS
@given(st.lists(word, min_size=3, max_size=20))
def test_a_reply_that_repeats_the_message_is_an_echo(message_words: list[str]) -> None:
    message = " ".join(message_words)
    assert is_echo(message, message)
    assert is_echo(message.upper() + "!", message)


prompt_words = PERSONA.system_prompt.split()


@PROPS
@given(st.integers(min_value=0, max_value=len(prompt_words) - 8),
       st.integers(min_value=8, max_value=20), st.lists(sentence, max_size=3),
       st.lists(sentence, max_size=3))
def test_any_long_span_of_the_system_prompt_is_caught(start: int, length: int,
                                                      before: list[str],
                                                      after: list[str]) -> None:
    span = " ".join(prompt_words[start:start + length])
    assert leaks_prompt(" ".join([*before, span, *after]), PERSONA.system_prompt)


@PROPS
@given(st.lists(st.text("qxzjvkw", min_size=1, max_size=8), max_size=40))
def test_text_without_prompt_words_is_no_leak(tokens: list[str]) -> None:
    assert not leaks_prompt(" ".join(tokens), PERSONA.system_prompt)


# ---- windowing -------------------------------------------------------------------------------

turn_text = st.lists(word, min_size=1, max_size=30).map(" ".join)
histories = st.lists(st.tuples(turn_text, turn_text), max_size=12).map(
    lambda pairs: [t for u, a in pairs for t in (Turn("user", u), Turn("assistant", a))])


def history_tokens(history: list[Turn], text: str) -> int:
    base = count_tokens(TOKENIZER, build_messages(PERSONA, [], text))
    return count_tokens(TOKENIZER, build_messages(PERSONA, history, text)) - base


@PROPS
@given(histories, turn_text, st.integers(min_value=0, max_value=300), st.booleans())
def test_window_is_the_longest_fitting_suffix_starting_with_a_user_turn(
        history: list[Turn], text: str, budget: int, drop_first: bool) -> None:
    if drop_first and history:
        history = history[1:]  # a history that starts with an assistant turn
    window = window_history(TOKENIZER, PERSONA, history, text, "", budget)
    start = len(history) - len(window)
    assert window == history[start:]
    assert not window or window[0].role == "user"
    assert history_tokens(window, text) <= budget
    for j in range(start):
        if history[j].role == "user":
            assert history_tokens(history[j:], text) > budget
    bigger = window_history(TOKENIZER, PERSONA, history, text, "", budget + 50)
    assert len(bigger) >= len(window)


@PROPS
@given(st.lists(word, min_size=0, max_size=400).map(" ".join),
       st.integers(min_value=1, max_value=200))
def test_fit_message_keeps_the_longest_prefix_within_the_budget(text: str,
                                                                budget: int) -> None:
    fitted = fit_message(TOKENIZER, PERSONA, text, "", budget)
    assert text.startswith(fitted)
    base = count_tokens(TOKENIZER, build_messages(PERSONA, [], ""))

    def cost(t: str) -> int:
        return count_tokens(TOKENIZER, build_messages(PERSONA, [], t)) - base

    assert cost(fitted) <= budget or fitted == ""
    if fitted != text:  # one more character (past the spaces cut off) would not fit
        rest = text[len(fitted):]
        gap = len(rest) - len(rest.lstrip())
        assert cost(text[: len(fitted) + gap + 1]) > budget


@PROPS
@given(st.lists(st.integers(0, 11), min_size=0, max_size=60), st.integers(1, 8),
       st.sampled_from([1.0, 1.15, 1.5]), st.integers(0, 4))
def test_row_penalties_score_as_transformers_processors(
        prompt: list[int], generated: int, penalty: float, ngram: int) -> None:
    """The scheduler's incremental penalties give the scores transformers' processors give
    on the whole sequence, at every step of a growing sequence."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from engine.penalties import RowPenalties

    rows = RowPenalties(prompt, penalty, ngram)
    gen = torch.Generator().manual_seed(len(prompt) * 31 + generated)
    seq = list(prompt)
    for _ in range(generated):
        scores = torch.randn((1, 12), generator=gen) * 3
        expected = scores.clone()
        seen = torch.tensor([seq], dtype=torch.long)
        if penalty != 1.0 and seq:
            expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, expected)
        if ngram > 0 and seq:
            expected = NoRepeatNGramLogitsProcessor(ngram)(seen, expected)
        assert torch.equal(rows(scores), expected)
        token = int(torch.randint(0, 12, (1,), generator=gen))
        seq.append(token)
        rows.push(token)
