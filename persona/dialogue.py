"""The prepared dialogue pairs as scenes: each pair with the exchange that came before it.

The source rows follow the episodes in order, so the row before a pair (``qa-NNNNN`` ids keep
the row number) is, most of the time, the exchange just before it in the same scene. The
response selector's queries carry that context the way the bot's history does (the message,
House's previous reply, the message before it), and rows a few apart count as one scene for
hard negatives and for keeping a pair's own scene out of its retrieved examples.

The train split is cut once more, by a seeded hash of the pair id, into the **canon pool**
(the House lines the bot may answer with) and the **judge fold** (pairs only the evaluation's
fit judge trains on), so the judge never saw a line it will be asked to judge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")
SCENE_RADIUS = 4  # rows within this distance are treated as one scene
# Share of the train split kept for the fit judge only (never in the canon pool). 0.25 until
# 2026-12-07 b; at 0.1 the pool holds about 2,600 more of House's lines, and the judge trains on
# the validation pairs outside its held-out sample as well (offline/judge.py).
JUDGE_FOLD = 0.1
CONTEXT_SEP = " [SEP] "


@dataclass(frozen=True)
class Pair:
    row: int
    split: str
    anchor: str
    response: str

    @property
    def id(self) -> str:
        return f"qa-{self.row:05d}"


def row_number(pair_id: str) -> int:
    return int(pair_id.rsplit("-", 1)[1])


def load_split(data_dir: Path | str, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """The records of one prepared split (the first ``limit``, when given): the one reader of
    ``data/prepared/*.jsonl``. A missing split says what to run."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `drhouse data prepare` first")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                records.append(json.loads(line))
                if limit and len(records) >= limit:
                    break
    return records


def read_pairs(data_dir: Path | str, splits: Sequence[str] = SPLITS) -> list[Pair]:
    """Every pair of the prepared splits, in row order."""
    pairs = [Pair(row_number(rec["id"]), split, rec["anchor"], rec["response"])
             for split in splits for rec in load_split(data_dir, split)]
    return sorted(pairs, key=lambda p: p.row)


def in_judge_fold(pair: Pair, seed: int = 0) -> bool:
    """True for the train pairs kept for the fit judge (never in the canon pool)."""
    if pair.split != "train":
        return False
    digest = hashlib.sha1(f"judge\x1f{seed}\x1f{pair.row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < JUDGE_FOLD


def query_text(message: str, context: Sequence[str] = ()) -> str:
    """A selector query: the message first, then the turns before it, newest first (a long
    context is truncated from the oldest end)."""
    parts = [message, *[c for c in reversed(context) if c]]
    return CONTEXT_SEP.join(p.strip() for p in parts if p.strip())


class Scenes:
    """Pairs by row number, for context and same-scene look-ups."""

    def __init__(self, pairs: Sequence[Pair]):
        self.by_row = {p.row: p for p in pairs}

    def previous(self, pair: Pair) -> Pair | None:
        return self.by_row.get(pair.row - 1)

    def context(self, pair: Pair, exchanges: int = 1) -> tuple[str, ...]:
        """The ``exchanges`` exchanges before ``pair`` (older turns first; fewer where the
        rows before are missing), or nothing."""
        turns: list[str] = []
        before = pair
        for _ in range(exchanges):
            before = self.previous(before)
            if before is None:
                break
            turns[:0] = [before.anchor, before.response]
        return tuple(turns)

    def neighbours(self, pair: Pair, radius: int = SCENE_RADIUS) -> list[Pair]:
        return [self.by_row[r] for r in range(pair.row - radius, pair.row + radius + 1)
                if r != pair.row and r in self.by_row]


def same_scene(a: int, b: int, radius: int = SCENE_RADIUS) -> bool:
    return abs(a - b) <= radius
