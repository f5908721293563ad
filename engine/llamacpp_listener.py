"""The listener (`engine.listener`) on llama.cpp, for a worker whose engine is llama.cpp: its
own context on the engine's weights with the House LoRA, so scoring canon lines never waits
for, or disturbs, the running batch's cache.

The prompt runs once as one sequence (on the persona's block, shared); each reply is a
sequence that shares the prompt's cells (``llama_memory_seq_cp``), and all the replies run in
one ``llama_decode`` with scores kept for every token of theirs. The scoring runs on the
engine's thread between two of its decode steps (`RowScheduler.run_on_engine`): run beside a
step, the two sets of llama.cpp threads would share the same cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.listener import REPLY_END, Listener
from engine.llamacpp_engine import PREFIX_SEQ, LlamaCppGenerator

PROMPT_SEQ = 1
MAX_REPLIES = 16  # replies per decode (a context's sequences beside the prompt's)


class LlamaCppListener(Listener):
    """PMI of replies under the House model, computed by llama.cpp."""

    def __init__(self, engine: LlamaCppGenerator, adapter: str, empty_prompt: str,
                 max_reply_tokens: int = 64, kv_tokens: int = 4096):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.empty_prompt = empty_prompt
        self.max_reply_tokens = max_reply_tokens
        self._empty_cache: dict[str, float] = {}
        self.context = engine.make_context(adapter, kv_tokens, MAX_REPLIES + 1,
                                           batch_tokens=(MAX_REPLIES + 1) * max_reply_tokens)

    def _both_terms(self, prompt: str, replies: Sequence[str], unknown: Sequence[str]
                    ) -> tuple[list[float], list[float]]:
        """Both terms of `Listener.pmi` in one turn of the engine thread."""
        return self.engine.run_on_engine(lambda: (
            self._logprobs(prompt, replies),
            self._logprobs(self.empty_prompt, unknown) if unknown else []))

    def logprobs(self, prompt: str, replies: Sequence[str]) -> list[float]:
        """``log P(reply + end of turn | prompt)`` for each reply."""
        # one scoring at a time, never beside a step
        return self.engine.run_on_engine(lambda: self._logprobs(prompt, replies))

    def _logprobs(self, prompt: str, replies: Sequence[str]) -> list[float]:
        rows = [self.tokenizer(r.strip() + REPLY_END, add_special_tokens=False)["input_ids"]
                [: self.max_reply_tokens] for r in replies]
        scores: list[float] = []
        for first in range(0, len(rows), MAX_REPLIES):
            scores += self._score(prompt, rows[first : first + MAX_REPLIES])
        return [s if math.isfinite(s) else -1e9 for s in scores]

    def _score(self, prompt: str, rows: list[list[int]]) -> list[float]:
        llama, engine, lane = self.engine.llama, self.engine, self.context
        memory = llama.llama_get_memory(lane.ctx)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = 0
        if lane.prefix_len and ids[: lane.prefix_len] == engine.prefix_ids \
                and len(ids) > lane.prefix_len:
            llama.llama_memory_seq_cp(memory, PREFIX_SEQ, PROMPT_SEQ, -1, -1)
            start = lane.prefix_len
        try:
            last = engine.run_chunked(lane, [(ids[p], p, PROMPT_SEQ, p == len(ids) - 1)
                                             for p in range(start, len(ids))])
            first = _log_softmax(np.ctypeslib.as_array(
                llama.llama_get_logits_ith(lane.ctx, last), shape=(engine.n_vocab,)))
            items, wanted = [], []
            for i, row in enumerate(rows):
                seq = PROMPT_SEQ + 1 + i
                llama.llama_memory_seq_cp(memory, PROMPT_SEQ, seq, -1, -1)
                for j, token in enumerate(row):
                    scored = j < len(row) - 1  # its scores pick the next token of the row
                    items.append((token, len(ids) + j, seq, scored))
                    if scored:
                        wanted.append((i, row[j + 1]))
            totals = [float(first[row[0]]) for row in rows]
            if wanted:
                engine.run_batch(lane, items)
                logits = np.ctypeslib.as_array(llama.llama_get_logits(lane.ctx),
                                               shape=(len(wanted), engine.n_vocab))
                picked = _log_softmax(logits)[np.arange(len(wanted)),
                                              [token for _, token in wanted]]
                for (i, _), value in zip(wanted, picked, strict=True):
                    totals[i] += float(value)
            return totals
        finally:
            for seq in range(PROMPT_SEQ, PROMPT_SEQ + 1 + len(rows)):
                llama.llama_memory_seq_rm(memory, seq, -1, -1)


def _log_softmax(logits: Any) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float32)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
