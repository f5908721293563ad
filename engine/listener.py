"""How much the message explains a reply: the House adapter as a *listener*.

``PMI(reply; conversation) = log P(reply | conversation) - log P(reply | an empty message)``
under the House model. The first term alone favours lines that fit anything ("Yeah.", "Not
now."); subtracting what the reply costs with no message at all leaves how much *this* message
makes it likely — the maximum-mutual-information reranking of Li et al. (2016). It sees the
message and the reply together, which the selector's two separate vectors cannot, and it costs
one forward of the prompt plus one of the replies side by side (the prompt's keys and values
are shared, not repeated per reply).

Measured on 200 validation messages (`runs`-style probe, the selector's 10 best of 100
candidates): Recall@1 0.175 by the selector's cosine, 0.225 by PMI, 0.24 by
``20 * cosine + 0.5 * PMI``; docs/reply-choice.md has the test-split figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.generation import PrefixCache

log = logging.getLogger(__name__)

REPLY_END = "<|im_end|>"
GROUP = 4  # replies scored side by side (sorted by length: little padding)
PRIME_CHUNK = 4  # lines scored per turn while priming (one short turn of the engine thread)
SAVE_EVERY_S = 30.0  # a priming run writes what it has scored at most this often


class Listener:
    """PMI of replies given a rendered prompt, under one (merged or single-adapter) model.

    ``model`` must not be shared with a thread that changes its adapters while this runs; the
    runtime gives the listener its own merged copy of the House model."""

    def __init__(self, model: Any, tokenizer: Any, empty_prompt: str, shared_prefix: str = "",
                 max_reply_tokens: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.empty_prompt = empty_prompt
        self.max_reply_tokens = max_reply_tokens
        # the persona's system block: its keys and values once, not in every prompt's forward
        self.prefix = PrefixCache(model, tokenizer, shared_prefix, [])
        self._start_empty_terms()

    def _start_empty_terms(self) -> None:
        """No empty-message term known yet (every listener starts so)."""
        self._empty_cache: dict[str, float] = {}
        self._prior: dict[str, float] = {}  # primed empty-message terms (`prime`), never cleared
        self.prior_path: Path | None = None  # where `prime` keeps them

    def pmi(self, prompt: str, replies: Sequence[str]) -> list[float]:
        """``log P(reply | prompt) - log P(reply | empty message)`` for each reply (nats)."""
        if not replies:
            return []
        empty, unknown = self._known_empty(replies)
        conditional, values = self._both_terms(prompt, replies, unknown)
        empty.update(self._remember_empty(unknown, values))
        return [c - empty[r] for c, r in zip(conditional, replies, strict=True)]

    def _both_terms(self, prompt: str, replies: Sequence[str], unknown: Sequence[str]
                    ) -> tuple[list[float], list[float]]:
        """``log P(reply | prompt)`` of the replies and ``log P(reply | empty message)`` of
        ``unknown`` (an engine may run both in one turn)."""
        return (self.logprobs(prompt, replies),
                self.logprobs(self.empty_prompt, unknown) if unknown else [])

    def keep_prior(self, path: Path) -> int:
        """Keep the empty-message terms in ``path`` (made by `prime`; its name must say which
        model and prompt scored them): read what it holds now, write there later. Returns how
        many terms it held."""
        self.prior_path = path
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0
        if not isinstance(stored, dict):
            return 0
        self._prior.update({str(k): float(v) for k, v in stored.items()})
        return len(stored)

    @property
    def primed(self) -> Collection[str]:
        """The texts whose empty-message term `prime` has scored."""
        return self._prior.keys()

    def prime(self, texts: Sequence[str], stop: threading.Event | None = None,
              progress: Any = None, chunk: int = PRIME_CHUNK) -> int:
        """Score ``log P(text | empty message)`` of the texts not yet known (a canon pool's
        lines: it never changes, and it is half of what a reply's PMI costs), a few at a time
        when the engine is idle (`_idle_logprobs`), and write them to the `keep_prior` file
        every `SAVE_EVERY_S` and at the end. ``progress(n)`` is told each chunk's size
        (``chunk`` lines: more run faster a line, and hold the engine longer).
        Returns how many were scored; ``stop`` ends it early (what was scored is kept)."""
        unknown = [t for t in dict.fromkeys(texts) if t not in self._prior]
        scored, saved = 0, time.monotonic()
        for first in range(0, len(unknown), chunk):
            if stop is not None and stop.is_set():
                break
            lines = unknown[first : first + chunk]
            self._prior.update(zip(lines, self._idle_logprobs(lines), strict=True))
            scored += len(lines)
            if progress is not None:
                progress(len(lines))
            if time.monotonic() - saved > SAVE_EVERY_S:
                self._save_prior()
                saved = time.monotonic()
        if scored:
            self._save_prior()
        return scored

    def _idle_logprobs(self, texts: Sequence[str]) -> list[float]:
        """``log P(text | empty message)`` for priming. This listener has its own model copy
        and no engine thread, so it runs here, beside whatever the engine does; the llama.cpp
        listener waits for an idle engine."""
        return self.logprobs(self.empty_prompt, texts)

    def _save_prior(self) -> None:
        """Write the empty-message terms to the `keep_prior` file (atomically)."""
        if self.prior_path is None:
            return
        self.prior_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.prior_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._prior))
        tmp.replace(self.prior_path)

    def _known_empty(self, replies: Sequence[str]) -> tuple[dict[str, float], list[str]]:
        """``log P(reply | empty message)`` of the replies scored before (it never changes),
        read once here (another thread may clear the cache meanwhile), and the others."""
        known: dict[str, float] = {}
        unknown = []
        for reply in dict.fromkeys(replies):
            value = self._prior.get(reply, self._empty_cache.get(reply))
            if value is None:
                unknown.append(reply)
            else:
                known[reply] = value
        return known, unknown

    def _remember_empty(self, unknown: Sequence[str], values: Sequence[float]
                        ) -> dict[str, float]:
        """The just-scored empty-message terms, kept for later calls (up to 50,000: a
        canon pool's 13,288 lines and what else the bot said)."""
        scored = dict(zip(unknown, values, strict=True))
        if len(self._empty_cache) + len(scored) > 50_000:
            self._empty_cache.clear()
        self._empty_cache.update(scored)
        return scored

    @torch.no_grad()
    def logprobs(self, prompt: str, replies: Sequence[str]) -> list[float]:
        """``log P(reply + end of turn | prompt)`` for each reply: the prompt runs once, the
        replies run side by side on its keys and values, in groups of similar length (a
        reply's cost is its tokens, not the longest reply's)."""
        from transformers import DynamicCache

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if self.prefix.covers([ids]):
            out = self.model(input_ids=torch.tensor([ids[len(self.prefix.ids):]], device=device),
                             use_cache=True, past_key_values=self.prefix.batch_cache([""]))
        else:
            out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        rows = [tok(r.strip() + REPLY_END, add_special_tokens=False)["input_ids"]
                [: self.max_reply_tokens] for r in replies]
        scores = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for group in (order[i : i + GROUP] for i in range(0, len(order), GROUP)):
            cache = DynamicCache()
            for number, (keys, values) in enumerate(layers):
                cache.update(keys.expand(len(group), -1, -1, -1).contiguous(),
                             values.expand(len(group), -1, -1, -1).contiguous(), number)
            for i, value in zip(group, self._continuations(cache, len(ids),
                                                           [rows[i] for i in group], device),
                                strict=True):
                scores[i] = float(first[rows[i][0]]) + value
        return [s if math.isfinite(s) else -1e9 for s in scores]

    def _continuations(self, cache: Any, p: int, rows: list[list[int]], device: Any
                       ) -> list[float]:
        """Sum of log-probabilities of each row's tokens after its first, on ``cache``."""
        n, width = len(rows), max(len(r) for r in rows)
        ids = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros((n, p + width), dtype=torch.long, device=device)
        mask[:, :p] = 1
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, device=device)
            mask[i, p : p + len(row)] = 1
        positions = torch.arange(p, p + width, device=device).expand(n, width)
        logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                            position_ids=positions, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        sums = []
        for i, row in enumerate(rows):
            nxt = torch.tensor(row[1:], device=device)
            sums.append(float(logp[i, : len(row) - 1].gather(-1, nxt[:, None]).sum())
                        if len(row) > 1 else 0.0)
        return sums
