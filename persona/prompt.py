"""Prompt building: persona system prompt + windowed history + the new message, through the
tokenizer's chat template. Training uses the same functions, so train and serve prompts match.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from persona.pack import Persona
from persona.patterns import TEMPLATE_TOKENS

# Chat-template control sequences a user must not be able to inject (ChatML, Llama 3, Gemma).
# Control characters except tab and newline; zero-width and bidi controls stay out of prompts.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
# Most tokens the new message may take in a prompt; the rest of a longer message is cut.
MESSAGE_TOKEN_BUDGET = 1024


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Turn:
    """One stored turn of a conversation."""

    role: str  # "user" | "assistant"
    content: str
    speaker: str = ""


def clean_user_text(text: str, max_chars: int = 4000) -> str:
    """Normalise a message for the prompt: drop invisible and control characters, then
    template tokens, collapse whitespace, cap the length.

    Invisible characters go first, or ``<\u200b|im_start|>`` would become a real
    ``<|im_start|>`` after its template check; template tokens are removed until none is
    left, since removing one can join the text around it into another."""
    text = _INVISIBLE.sub("", text)
    text = unicodedata.normalize("NFC", text)
    previous = None
    while previous != text:
        previous, text = text, TEMPLATE_TOKENS.sub(" ", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text[:max_chars].strip()


def has_words(text: str) -> bool:
    """False for a message of only punctuation, symbols and emoji ("???", "👍👍")."""
    return any(c.isalnum() for c in text)


def clean_speaker(speaker: str) -> str:
    """A display name as it may appear in a prompt: cleaned like a message, on one line, at
    most 64 characters (names are chosen by users, so they are input too)."""
    return " ".join(clean_user_text(speaker, 256).split())[:64].strip()


def user_content(text: str, speaker: str = "") -> str:
    """A user turn as the model sees it; in shared group chats it carries the speaker's name."""
    speaker = clean_speaker(speaker) if speaker else ""
    return f"{speaker} says: {text}" if speaker else text


EXAMPLES_INTRO = "Things you really said in moments like this one:"


def examples_message(examples: Sequence[tuple[str, str]]) -> dict[str, str]:
    """A second system turn with a few of House's real exchanges for the message (retrieve and
    refine): after the persona's own system turn, so its cached prefix stays the same."""
    lines = [EXAMPLES_INTRO, *(f'- "{a}" You: "{r}"' for a, r in examples)]
    return {"role": "system", "content": "\n".join(lines)}


def build_messages(
    persona: Persona, history: Sequence[Turn], text: str, speaker: str = "",
    examples: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": persona.system_prompt}]
    if examples:
        messages.append(examples_message(examples))
    for turn in history:
        content = user_content(turn.content, turn.speaker) if turn.role == "user" else turn.content
        messages.append({"role": turn.role, "content": content})
    messages.append({"role": "user", "content": user_content(text, speaker)})
    return messages


def system_block(tokenizer: ChatTokenizer, persona: Persona) -> str:
    """The rendered system turn every prompt of this persona starts with (the generator caches
    its keys and values once instead of recomputing them for every request)."""
    return tokenizer.apply_chat_template([{"role": "system", "content": persona.system_prompt}],
                                         tokenize=False, add_generation_prompt=False)


def count_tokens(tokenizer: ChatTokenizer, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def window_history(
    tokenizer: ChatTokenizer,
    persona: Persona,
    history: Sequence[Turn],
    text: str,
    speaker: str,
    token_budget: int,
) -> list[Turn]:
    """The longest suffix of ``history`` whose turns fit in ``token_budget`` tokens.

    The budget covers the history only; the system prompt and the new message always stay.
    Pairs are dropped oldest first, and the window never starts with an assistant turn.
    """
    base = count_tokens(tokenizer, build_messages(persona, [], text, speaker))
    kept = list(history)
    while kept:
        if kept[0].role != "user":
            kept.pop(0)
            continue
        used = count_tokens(tokenizer, build_messages(persona, kept, text, speaker)) - base
        if used <= token_budget:
            break
        kept.pop(0)
    return kept


def fit_message(
    tokenizer: ChatTokenizer, persona: Persona, text: str, speaker: str, max_tokens: int
) -> str:
    """``text`` cut to its longest prefix that takes at most ``max_tokens`` tokens in the
    prompt. A message within MAX_MESSAGE_CHARS can still be many tokens (4,000 emoji or CJK
    characters are about 12,000 for SmolLM2, past its context), and one such row would pad a
    whole batch to that length."""

    def cost(candidate: str) -> int:
        return count_tokens(tokenizer, build_messages(persona, [], candidate, speaker)) - base

    if len(text.encode("utf-8")) <= max_tokens:  # a token covers at least one byte
        return text
    base = count_tokens(tokenizer, build_messages(persona, [], "", speaker))
    if cost(text) <= max_tokens:
        return text
    fits, too_long = 0, len(text)
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if cost(text[:middle]) <= max_tokens:
            fits = middle
        else:
            too_long = middle
    return text[:fits].rstrip()


def render_prompt(
    tokenizer: ChatTokenizer,
    persona: Persona,
    history: Sequence[Turn],
    text: str,
    speaker: str = "",
    token_budget: int = 384,
    message_token_budget: int = MESSAGE_TOKEN_BUDGET,
    examples: Sequence[tuple[str, str]] = (),
) -> str:
    """The full prompt string (generation prompt appended) for one request: at most
    ``message_token_budget`` tokens of the new message and ``token_budget`` of history, and
    House's real ``examples`` (anchor, reply) for the message when given."""
    text = fit_message(tokenizer, persona, text, speaker, message_token_budget)
    window = window_history(tokenizer, persona, history, text, speaker, token_budget)
    messages = build_messages(persona, window, text, speaker, examples)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
