"""A running row's repetition penalty and no-repeat n-grams, kept up to date token by token.

transformers' ``RepetitionPenaltyLogitsProcessor`` and ``NoRepeatNGramLogitsProcessor`` look
at the whole sequence (prompt and reply) at every step: the n-gram one rebuilds its table in
Python from every position, which for a 300-token prompt cost the scheduler more per row than
the rest of the row's step. `RowPenalties` keeps the set of seen tokens and the n-gram table
and extends them by the one token a step adds; the scores it returns are the processors'
(the tests compare them on the same sequences).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RowPenalties:
    """The penalties of one sequence; ``push`` each token it gains."""

    def __init__(self, ids: Sequence[int], repetition_penalty: float, ngram_size: int):
        self.penalty = repetition_penalty
        self.n = ngram_size
        self.seq: list[int] = []
        self._seen: set[int] = set()
        self._seen_ids = torch.empty(0, dtype=torch.long)
        self._new: list[int] = []  # seen tokens not yet in _seen_ids
        self._ngrams: dict[tuple[int, ...], set[int]] = {}
        for token in ids:
            self.push(token)

    def push(self, token: int) -> None:
        self.seq.append(token)
        if self.penalty != 1.0 and token not in self._seen:
            self._seen.add(token)
            self._new.append(token)
        n = self.n
        if n > 0 and len(self.seq) >= n:
            gram = self.seq[-n:]
            self._ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ([1, vocab], float32) penalised for the sequence so far (a new tensor
        where anything changes)."""
        if self.penalty != 1.0 and self._seen:
            if self._new:
                self._seen_ids = torch.cat([self._seen_ids, torch.tensor(self._new)])
                self._new = []
            picked = scores[0, self._seen_ids]
            scores = scores.clone()
            scores[0, self._seen_ids] = torch.where(picked < 0, picked * self.penalty,
                                                    picked / self.penalty)
        n = self.n
        if n > 0 and len(self.seq) + 1 >= n:
            banned = self._ngrams.get(tuple(self.seq[len(self.seq) - n + 1 :]))
            if banned:
                if self.penalty == 1.0:
                    scores = scores.clone()
                scores[0, list(banned)] = float("-inf")
        return scores
