"""The retrieval baseline (the earlier project's approach): answer with House's reply to the
most similar training anchor, by cosine of MiniLM sentence embeddings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from persona.classifier import Embedder, read_split


class RetrievalBaseline:
    def __init__(self, anchors: Sequence[str], responses: Sequence[str], embedder: Embedder,
                 anchor_embeddings: np.ndarray | None = None):
        if len(anchors) != len(responses) or not anchors:
            raise ValueError("need as many responses as anchors, and at least one")
        self.anchors = list(anchors)
        self.responses = list(responses)
        self.embedder = embedder
        self.matrix = (anchor_embeddings if anchor_embeddings is not None
                       else embedder.encode(self.anchors))

    @classmethod
    def from_split(cls, path: Path, embedder: Embedder) -> RetrievalBaseline:
        """Index a prepared JSONL split (its anchor embeddings are cached on disk)."""
        responses, anchors = read_split(path)
        vectors = embedder.encode(anchors, cache=True, progress=True)
        return cls(anchors, responses, embedder, vectors)

    def nearest(self, messages: Sequence[str]) -> list[int]:
        """Index of the most similar anchor for each message."""
        if not messages:
            return []
        scores = self.embedder.encode(messages) @ self.matrix.T
        return [int(i) for i in np.argmax(scores, axis=1)]

    def reply(self, messages: Sequence[str]) -> tuple[list[str], float]:
        """House's reply to the nearest anchor of each message, and the wall time in ms."""
        started = time.perf_counter()
        replies = [self.responses[i] for i in self.nearest(messages)]
        return replies, (time.perf_counter() - started) * 1000
