"""The listener (`engine.listener`) on llama.cpp, for a worker whose engine is llama.cpp: its
own context on the engine's weights with the House LoRA, so scoring canon lines never waits
for, or disturbs, the running batch's cache.

The prompt runs once as one sequence (on the persona's block, shared); each reply is a sequence
that shares the prompt's cells (``llama_memory_seq_cp``), and all the replies run in one
``llama_decode`` with scores kept for every token of theirs — the prompt's tokens still to
compute too, each in the prompt's sequence and every reply's (one decode, not two: 97–100 ms
against 106 ms a call, same process, Zen 4 EPYC); a reply's last token is never fed (its scores
would pick nothing, its cell is freed): 84–85 ms against 91–101 ms a call. A scored prompt
keeps its cells afterwards (up to ``KEPT_PROMPTS``, oldest given up first), as the engine's
ended rows do: the empty-message prompt of the second term is computed once, and a
conversation's next prompt computes only what is new since its last (the history it starts with
is already there). Profiled on an AVX2-only EPYC, recomputing the conversation's prompt was
30 % of the listener's time in a conversation with history (docs/reply-choice.md). The scoring
runs on the engine's thread between two of its decode steps (`RowScheduler.run_on_engine`): run
beside a step, the two sets of llama.cpp threads would share the same cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.listener import REPLY_END, Listener
from engine.llamacpp_engine import PREFIX_SEQ, LlamaCppGenerator

MAX_REPLIES = 16  # replies per decode
KEPT_PROMPTS = 8  # scored prompts whose cells stay for the next call (room allowing)


class LlamaCppListener(Listener):
    """PMI of replies under the House model, computed by llama.cpp."""

    def __init__(self, engine: LlamaCppGenerator, adapter: str, empty_prompt: str,
                 max_reply_tokens: int = 64, kv_tokens: int = 4096):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.empty_prompt = empty_prompt
        self.max_reply_tokens = max_reply_tokens
        self._start_empty_terms()
        self.context = engine.make_context(adapter, kv_tokens, MAX_REPLIES + KEPT_PROMPTS + 1,
                                           batch_tokens=(MAX_REPLIES + 1) * max_reply_tokens,
                                           shared_by=MAX_REPLIES + 1)
        self._firsts: dict[int, np.ndarray] = {}  # kept prompt's sequence -> its next-token scores
        self.prompt_tokens = 0  # prompt tokens computed (past the persona's block), for tests

    def _both_terms(self, prompt: str, replies: Sequence[str], unknown: Sequence[str]
                    ) -> tuple[list[float], list[float]]:
        """Both terms of `Listener.pmi` in one turn of the engine thread."""
        return self.engine.run_on_engine(lambda: (
            self._logprobs(prompt, replies),
            self._logprobs(self.empty_prompt, unknown) if unknown else []))

    def _idle_logprobs(self, texts: Sequence[str]) -> list[float]:
        """Priming's scoring, only while the engine has no rows (`RowScheduler.run_on_engine`
        ``when_idle``): it never stalls a step."""
        return self.engine.run_on_engine(lambda: self._logprobs(self.empty_prompt, texts),
                                         when_idle=True)

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
        seq, start, first = self._prompt(ids, sum(len(row) for row in rows))
        # the prompt's tokens still to compute run in the replies' own decode, each token in
        # the prompt's sequence and every reply's (one decode instead of two: on 2 cores a
        # small decode costs more a token than a larger one)
        pending = list(range(start, len(ids))) if first is None else []
        if pending and len(pending) + sum(len(row) - 1 for row in rows) > lane.batch_tokens:
            first = self._compute(seq, ids, start)  # too long for one decode
            pending = []
        replies: list[int] = []
        try:
            for _ in rows:
                replies.append(self._free_sequence())
                llama.llama_memory_seq_cp(memory, seq, replies[-1], -1, -1)
            shared = (seq, *replies)
            items: list[tuple[int, int, int | tuple[int, ...], bool]] = [
                (ids[p], p, shared, p == len(ids) - 1) for p in pending]
            wanted = []
            for i, row in enumerate(rows):
                # each token's scores pick the row's next one: the last token is never fed
                for j, token in enumerate(row[:-1]):
                    items.append((token, len(ids) + j, replies[i], True))
                    wanted.append((i, row[j + 1]))
            scores = np.empty((0, engine.n_vocab), dtype=np.float32)
            if wanted or pending:
                engine.run_batch(lane, items)
                scores = np.ctypeslib.as_array(llama.llama_get_logits(lane.ctx), shape=(
                    len(wanted) + bool(pending), engine.n_vocab))
            if pending:
                first, scores = _log_softmax(scores[0]), scores[1:]
                self.prompt_tokens += len(pending)
            assert first is not None
            totals = [float(first[row[0]]) for row in rows]
            if wanted:
                picked = _token_logprobs(scores, [token for _, token in wanted])
                for (i, _), value in zip(wanted, picked, strict=True):
                    totals[i] += float(value)
        except Exception:
            self._drop(seq)  # its cells may hold a failed decode's tokens
            raise
        finally:
            for reply in replies:
                engine.free_sequence(lane, reply)
        lane.kept[seq] = ids  # the newest kept prompt (given up last)
        self._firsts[seq] = first
        while len(lane.kept) > KEPT_PROMPTS:
            self._forget_oldest()
        return totals

    def _prompt(self, ids: list[int], reply_cells: int) -> tuple[int, int, np.ndarray | None]:
        """The sequence for ``ids``, from where its tokens are still to compute, and the scores
        of the token after them when nothing is (else None): a kept prompt that is ``ids``,
        the one that starts it furthest (the rest to compute) or a new one on the persona's
        block; kept prompts are given up, oldest first, for the cells this call needs."""
        llama, engine, lane = self.engine.llama, self.engine, self.context
        memory = llama.llama_get_memory(lane.ctx)
        same = next((s for s, kept in lane.kept.items() if kept == ids), None)
        found = (same, len(ids)) if same is not None else lane.longest_kept(ids)
        if found is not None:
            seq, start = found
            del lane.kept[seq]
            first = self._firsts.pop(seq, None)
            if start == len(ids) and first is None:
                start -= 1  # its last token again, for the scores after it
            if start < len(ids):
                llama.llama_memory_seq_rm(memory, seq, start, -1)
        else:
            seq, start, first = self._free_sequence(), 0, None
            if lane.prefix_len and ids[: lane.prefix_len] == engine.prefix_ids \
                    and len(ids) > lane.prefix_len:
                llama.llama_memory_seq_cp(memory, PREFIX_SEQ, seq, -1, -1)
                start = lane.prefix_len
        while (lane.kept_cells() + len(ids) + reply_cells > lane.capacity
               and self._forget_oldest()):
            pass
        return seq, start, first if start == len(ids) else None

    def _compute(self, seq: int, ids: list[int], start: int) -> np.ndarray:
        """Compute ``ids[start:]`` in ``seq`` on their own; the scores of the token after."""
        llama, engine, lane = self.engine.llama, self.engine, self.context
        try:
            last = engine.run_chunked(lane, [(ids[p], p, seq, p == len(ids) - 1)
                                             for p in range(start, len(ids))])
        except Exception:
            self._drop(seq)
            raise
        self.prompt_tokens += len(ids) - start
        return _log_softmax(np.ctypeslib.as_array(
            llama.llama_get_logits_ith(lane.ctx, last), shape=(engine.n_vocab,)))

    def _free_sequence(self) -> int:
        """A sequence id with no cells, giving up the oldest kept prompt when none is free."""
        lane = self.context
        if not lane.free_slots:
            self._forget_oldest()
        return lane.free_slots.pop(0)

    def _forget_oldest(self) -> bool:
        """Give up the oldest kept prompt; False when none is kept."""
        if not self.context.kept:
            return False
        self._drop(next(iter(self.context.kept)))
        return True

    def _drop(self, seq: int) -> None:
        """Free ``seq``: its cells, its kept prompt, its scores."""
        self._firsts.pop(seq, None)
        self.engine.free_sequence(self.context, seq)


def _token_logprobs(scores: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """``log P(tokens[i])`` under row ``i`` of ``scores`` (a row of logits per scored token, the
    vocabulary wide): each row's log-sum-exp by torch (vectorised, on every thread), never a
    whole log-softmax matrix — numpy's took 48 ms of a reply's 530 ms of choosing (py-spy,
    Zen 4 EPYC)."""
    rows = torch.from_numpy(scores)
    picked = rows[torch.arange(len(tokens)), torch.tensor(tokens)]
    return (picked - torch.logsumexp(rows, dim=1)).numpy()


def _log_softmax(logits: Any) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float32)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
