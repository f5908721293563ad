"""The exact speed-ups ``drhouse train`` applies on top of TRL's SFTTrainer, each a named class.

None of them changes what is learned: each removes work whose result is thrown away or
recomputed. The tests check the ones that could change a number (the shared-prefix loss and
gradients equal the full forward's; evaluation gives the same loss twice).

- :class:`SharedPrefixSFTTrainer`: the persona system prompt every sequence starts with runs
  once per batch instead of once per sequence (about 60 of ~90 tokens: roughly a third of the
  compute per step).
- :class:`CompactLMHead`: TRL's fused LM head scores only the positions that carry a label on
  the CPU too (about 80% of each sequence is prompt; scoring it took ~40% of a step).
- :class:`FrozenLinearCast`: under bf16 autocast the frozen decoder weights are stored in bf16,
  so autocast does not copy every fp32 weight to bf16 on every matmul.
"""

from __future__ import annotations

from typing import Any

import torch
import trl.trainer.utils as trl_utils
from trl import SFTTrainer


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest token prefix every sequence shares."""
    if not sequences:
        return []
    prefix = list(sequences[0])
    for seq in sequences[1:]:
        n = 0
        for a, b in zip(prefix, seq, strict=False):
            if a != b:
                break
            n += 1
        prefix = prefix[:n]
    return prefix


class SharedPrefixSFTTrainer(SFTTrainer):
    """SFTTrainer that runs the prompt prefix every sequence shares once per batch.

    Saves: the forward and backward of the shared persona system prompt (about 60 of each
    sequence's ~90 tokens) for every sequence but one in each batch, about a third of the
    compute of a step.

    Every training sequence starts with the same persona system prompt. The prefix is encoded
    once (batch 1), its key/value cache is repeated across the batch, and only the rest of each
    sequence runs through the model. Causal attention makes this exact: prefix positions never
    see later tokens, so the loss equals the full forward's (a test checks it). Gradients reach
    the LoRA weights through the shared prefix too. Batches that do not start with the prefix
    (or a trainer whose :meth:`set_shared_prefix` was not called) take the normal path.

    Evaluation batches also come in a fixed order by length (:meth:`_get_eval_sampler`); that
    is for determinism, not speed: with ``group_by_length`` the Trainer groups eval batches at
    random too, and the eval loss is a mean of batch means, so the same weights scored up to
    0.013 apart on the same 400 pairs.
    """

    prefix_ids: torch.Tensor | None = None

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        if eval_dataset is None or "input_ids" not in eval_dataset.column_names:
            return super()._get_eval_sampler(eval_dataset)
        lengths = [len(ids) for ids in eval_dataset["input_ids"]]
        return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))

    def set_shared_prefix(self, sample: int = 256) -> int:
        """Find the prefix the first ``sample`` train sequences share, stopping before the first
        token the loss covers; returns its length (under 2: none, the normal path everywhere)."""
        rows = self.train_dataset.select(range(min(sample, len(self.train_dataset))))
        prefix = common_prefix([list(r) for r in rows["input_ids"]])
        labels = rows["labels"] if "labels" in rows.column_names else None
        if labels is not None:  # never share a token the loss covers
            first_label = min(
                next((i for i, x in enumerate(lab) if x != -100), len(lab)) for lab in labels
            )
            prefix = prefix[: max(0, first_label - 1)]
        self.prefix_ids = torch.tensor(prefix, dtype=torch.long) if len(prefix) > 1 else None
        return len(prefix)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        prefix = self.prefix_ids
        ids = inputs["input_ids"]
        n = 0 if prefix is None else prefix.numel()
        if (
            n
            and ids.size(1) > n + 1
            and "attention_mask" in inputs
            and torch.equal(ids[:, :n], prefix.to(ids.device).expand(ids.size(0), -1))
        ):
            cache = model(input_ids=ids[:1, :n], use_cache=True,
                          logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(ids.size(0))
            inputs = {
                **inputs,
                "input_ids": ids[:, n:],
                "labels": inputs["labels"][:, n:],
                "past_key_values": cache,
            }
            inputs.pop("position_ids", None)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class CompactLMHead:
    """Makes TRL's fused LM head score only the positions that have a label, on every device.

    Saves: the LM head (a 49k-word vocabulary) over the prompt positions, about 40% of a CPU
    training step here.

    TRL scores just the labelled positions on CUDA/XPU and every position elsewhere, to keep
    tile shapes static for graph compilers. Eager CPU training gains nothing from static
    shapes, and about 80% of each sequence is prompt (no label). The loss is the same; only the
    wasted work goes. :meth:`install` wraps TRL's device test once per process (a second call
    does nothing; if TRL no longer has the hook, nothing changes and it returns False).
    """

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, device: Any) -> bool:
        return device.type == "cpu" or bool(self.original(device))

    @classmethod
    def install(cls) -> bool:
        original = getattr(trl_utils, "_use_triton", None)
        if original is None:
            return False
        if not isinstance(original, cls):
            trl_utils._use_triton = cls(original)
        return True


class FrozenLinearCast:
    """Stores the decoder's frozen linear weights in ``dtype`` (bf16 under bf16 autocast).

    Saves: the fp32 → bf16 copy autocast makes of every frozen weight on every matmul of every
    step (and half of those weights' memory). The products are the same, since autocast would
    have cast them to bf16 anyway. Embeddings, norms and the tied LM head stay fp32, so the
    residual stream and the loss are computed exactly as with fp32 weights under autocast.
    """

    def __init__(self, dtype: Any = torch.bfloat16) -> None:
        self.dtype = dtype

    def apply(self, model: Any) -> int:
        """Cast in place; returns how many linear layers were cast."""
        count = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.to(self.dtype)
                count += 1
        return count
