"""Retrieve-and-refine data: the prepared splits with a few of House's real exchanges for each
message in its prompt (`persona.prompt.examples_message`), found by the response selector.

An example is never the pair itself nor a pair of the same scene (rows within
`persona.dialogue.SCENE_RADIUS`), so the model learns to borrow phrasing, not to copy the
answer. The output directory has the layout of ``drhouse data prepare``, so ``drhouse train
--data-dir`` trains on it and ``--eval-only`` measures an adapter on it::

    drhouse selector refine-data --out data/refine --examples 3
    drhouse train --config offline/train_config.yaml --eval-only \\
        --init-adapter models/house-smollm2 --data-dir data/refine --max-eval-samples 300
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from persona.canon import CACHE_DIR, CanonPool
from persona.dialogue import SPLITS, query_text, read_pairs, same_scene

log = logging.getLogger(__name__)


def write_refine_data(data_dir: Path, out: Path, selector: Any, examples: int = 3,
                      persona_name: str = "house", splits: tuple[str, ...] = SPLITS,
                      cache_dir: Path | None = CACHE_DIR) -> dict[str, int]:
    """Write ``out/<split>.jsonl`` with examples in every prompt; the examples come from the
    canon pool (train split, judge fold out)."""
    from persona.pack import load_persona
    from persona.prompt import build_messages

    persona = load_persona(persona_name)
    pool = CanonPool.from_data(data_dir, selector, cache_dir, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        pairs = read_pairs(data_dir, (split,))
        vectors = selector.encode([query_text(p.anchor) for p in pairs], progress=True)
        scores = vectors @ pool.matrix.T
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for pair, row in zip(pairs, scores, strict=True):
                chosen: list[tuple[str, str]] = []
                for i in (-row).argsort()[: 8 * examples + 32]:
                    line = pool.lines[int(i)]
                    if same_scene(line.row, pair.row) or not line.anchor:
                        continue
                    chosen.append((line.anchor, line.text))
                    if len(chosen) == examples:
                        break
                record = {"id": pair.id, "anchor": pair.anchor, "response": pair.response,
                          "examples": chosen,
                          "prompt": build_messages(persona, [], pair.anchor, examples=chosen),
                          "completion": [{"role": "assistant", "content": pair.response}]}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[split] = len(pairs)
        log.info("wrote %s (%d pairs)", path, len(pairs))
    return counts
