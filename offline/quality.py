"""Persona quality metrics on single replies and on a system's set of replies.

Every metric is defined on the text the user would see (after `clean_reply` and the candidate
choice), so the figures describe the real bot; ``raw_*`` diagnostics look at the generation
before post-processing. One-line definitions for the report live in `DEFINITIONS`.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from persona.patterns import LOOP_SEQ_REP, SELF_NAMES, STAGE_DIRECTION, TEMPLATE_TOKENS
from persona.postprocess import (
    ends_sentence,
    is_echo,
    lcs_length,
    seq_rep_n,
    split_sentences,
    words,
)

# A new turn of an unnamed speaker: one or two capitalised words and a colon at a line start.
GENERIC_TURN = re.compile(r"(?:^|\n)\s*(?:Dr\.\s*)?[A-Z][\w'-]*(?:\s[A-Z][\w'-]*)?\s*:\s")
SELF_AND_USER = (*SELF_NAMES, "User", "Assistant", "Human")

DEFINITIONS: dict[str, str] = {
    "scene_insert_rate": "share of replies with another speaker's tag (`Wilson:`), a stage "
    "direction (`[…]`, `(…)`, `*…*`), a `User:`/`Dr. House:` turn or a chat-template token",
    "echo_rate": "share of replies that repeat the message: they start with it, or ROUGE-L "
    "precision of the reply against the message ≥ 0.8",
    "crep4": "mean share of the reply's 4-grams that also occur in the message",
    "loop_rate": f"share of replies with seq-rep-4 > {LOOP_SEQ_REP} (repeated 4-grams), or that "
    "hit max_new_tokens and still end mid-sentence",
    "over_cap_rate": "share of replies with more sentences than the persona's sentence cap",
    "over_p95_rate": "share of replies longer (in words) than 95% of House's real train replies",
    "median_words": "median reply length in words",
    "distinct_1": "distinct unigrams / all unigrams, on an equal-size random sample of n-grams "
    "for every system (mean of 5 draws)",
    "distinct_2": "the same for bigrams",
    "persona_score": "mean P(House) of the persona classifier (MiniLM fine-tuned with LoRA on "
    "House's lines vs the other characters' lines of the train split)",
    "rougeL": "mean ROUGE-L F1 (word LCS) against House's real reply to the same message",
    "embed_cosine": "mean cosine of MiniLM embeddings of the reply and House's real reply",
    "fallback_rate": "share of prompts where no candidate survived post-processing and the "
    "persona's fallback line was sent",
    "raw_scene_insert_rate": "scene-insert rate of the raw generation, before post-processing",
    "cap_hit_rate": "share of chosen generations that ran to max_new_tokens without ending",
    "fit_score": "mean percentile of the reply among 99 other House replies of the split for the "
    "same message, by the fit judge (a cross-encoder trained on the judge fold; 0.5 = a random "
    "House line, 1.0 = preferred to all 99); evaluation only, never used to choose",
    "canon_share": "share of replies that are House's real lines picked by the selector",
    "pick_ms": "mean wall time of the reply choice (selector search, fit and voice scoring) per "
    "reply, on top of generation",
    "median_ms": "median wall time of the batched generate() that produced a reply (+ rerank)",
    "tokens_per_s": "generated tokens (all candidates) / generation wall time",
}


def _tag_pattern(speakers: Iterable[str]) -> re.Pattern[str]:
    names = {s.strip() for s in (*speakers, *SELF_AND_USER) if s.strip()}
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])(?:{alternatives})\s*:(?!\d)")


class SceneDetector:
    """Finds invented scenes: other speakers' turns, stage directions, template leftovers."""

    def __init__(self, speakers: Iterable[str] = ()):
        self.tags = _tag_pattern(speakers)

    def __call__(self, text: str) -> bool:
        return bool(
            self.tags.search(text)
            or GENERIC_TURN.search(text)
            or STAGE_DIRECTION.search(text)
            or TEMPLATE_TOKENS.search(text)
        )


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def crep_n(reply: str, message: str, n: int = 4) -> float:
    """Share of the reply's n-grams that also occur in the message (0 when it has none)."""
    grams = ngrams(words(reply), n)
    if not grams:
        return 0.0
    seen = set(ngrams(words(message), n))
    return sum(g in seen for g in grams) / len(grams)


def is_loop(reply: str, hit_cap: bool = False) -> bool:
    """A reply that repeats itself, or one cut off by the token limit mid-sentence."""
    return seq_rep_n(reply, 4) > LOOP_SEQ_REP or (hit_cap and not ends_sentence(reply))


def over_cap(reply: str, sentence_cap: int) -> bool:
    return len(split_sentences(reply)) > sentence_cap


def rouge_l_f1(reply: str, reference: str) -> float:
    r, m = words(reply), words(reference)
    lcs = lcs_length(r, m)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(r), lcs / len(m)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: Sequence[str], n: int, size: int | None = None, draws: int = 5,
               seed: int = 0) -> float:
    """Distinct n-grams / all n-grams (n-grams never cross replies).

    With ``size``, the figure is the mean over ``draws`` random samples of ``size`` n-grams,
    so systems with longer replies are not penalised for having more n-grams.
    """
    pool = [g for t in texts for g in ngrams(words(t), n)]
    if not pool:
        return 0.0
    if size is None or size >= len(pool):
        return len(set(pool)) / len(pool)
    rng = random.Random(seed)
    return statistics.fmean(len(set(rng.sample(pool, size))) / size for _ in range(draws))


def ngram_count(texts: Sequence[str], n: int) -> int:
    return sum(max(0, len(words(t)) - n + 1) for t in texts)


def distinct_table(systems: dict[str, Sequence[str]], n: int, seed: int = 0) -> dict[str, float]:
    """distinct-n for every system on samples of the same size (the smallest pool)."""
    sizes = [ngram_count(texts, n) for texts in systems.values()]
    size = min((s for s in sizes if s > 0), default=0)
    return {name: distinct_n(texts, n, size or None, seed=seed)
            for name, texts in systems.items()}


def word_percentile(texts: Sequence[str], q: float) -> float:
    return float(np.percentile([len(words(t)) for t in texts], q)) if texts else 0.0


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two equally shaped embedding matrices."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Sample:
    """One reply of one system to one message."""

    message: str
    reply: str
    reference: str | None = None
    raw: str | None = None
    hit_cap: bool = False
    fallback: bool = False
    tokens: int = 0
    ms: float | None = None
    # Every candidate of a model reply as (cleaned text, raw text, finished), for
    # counterfactual choices (e.g. without the reranker) from the same generations.
    candidates: tuple[tuple[str, str, bool], ...] = ()
    # "generated" or "canon" (systems that choose among both), "jab", "differential" or "topic" (a
    # reply that needed no model: persona.reply_choice.canned_reply)
    won: str | None = None


def rate(flags: Iterable[bool]) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else 0.0


def text_metrics(samples: Sequence[Sample], detector: SceneDetector, sentence_cap: int,
                 word_limit: float) -> dict[str, float | None]:
    """The per-system figures that need nothing but the texts (no models, no other systems)."""
    replies = [s.reply for s in samples]
    with_ref = [s for s in samples if s.reference is not None]
    raws = [s.raw for s in samples if s.raw is not None]
    return {
        "n": len(samples),
        "scene_insert_rate": rate(detector(r) for r in replies),
        "echo_rate": rate(is_echo(s.reply, s.message) for s in samples),
        "crep4": statistics.fmean(crep_n(s.reply, s.message) for s in samples) if samples else 0,
        "loop_rate": rate(is_loop(s.reply, s.hit_cap) for s in samples),
        "over_cap_rate": rate(over_cap(r, sentence_cap) for r in replies),
        "over_p95_rate": rate(len(words(r)) > word_limit for r in replies),
        "median_words": float(statistics.median(len(words(r)) for r in replies)) if replies
        else 0.0,
        "fallback_rate": rate(s.fallback for s in samples),
        "rougeL": statistics.fmean(rouge_l_f1(s.reply, s.reference or "") for s in with_ref)
        if with_ref else None,
        "raw_scene_insert_rate": rate(detector(r) for r in raws) if raws else None,
        "cap_hit_rate": rate(s.hit_cap for s in samples) if raws else None,
    }
