"""Continuous batching on a PyTorch model: one running batch that rows join and leave at every
decode step (the scheduling is `engine.scheduler.RowScheduler`'s; this module runs its lanes).

`HFGenerator` runs one ``generate()`` per micro-batch: a request that arrives meanwhile waits
for the whole batch, and every row rides along until the longest ends. `ContinuousGenerator`
keeps one batch running in its own thread instead. ``generate(jobs)`` may be called from
several threads at once (the worker calls it once per micro-batch, and reads the next
micro-batch while one generates): each call's rows are prefilled alone (on top of the
persona's cached system block) and join the running batch at the next step; a row leaves the
moment it stops, and a call returns when its last row has.

transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``,
4.57) does not fit: it takes one generation config for all requests (no per-row temperature,
top-p or seed), passes no ``adapter_names`` (no per-row LoRA) and has no per-row stops.

A row gets the same text here as it does alone (same seed: `PerRowSampler`, per-row
repetition penalty and no-repeat n-grams over its own tokens): the batch is left-padded and
the padding masked, positions are per row. The key/value cache is laid out again only when a
row joins or leaves (one copy), not at every step; rows are admitted up to ``max_rows``.

With ``merge_adapters`` (a float model on the CPU) each adapter gets its own copy of the
model with the LoRA weights merged in, and the rows of each adapter run as their own lane: a
step costs a plain forward instead of peft's per-row LoRA path (which computes every
adapter's low-rank product for the whole batch and masks it). A row always runs on its
adapter's lane, so its text does not depend on who else is in the batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from base.keys import BASE_VARIANT
from engine.generation import PerRowSampler, PrefixCache
from engine.model_loading import plain_copy
from engine.scheduler import Call, Row, RowScheduler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Lane:
    """Rows that run on one model: their cache and attention mask (``[rows, positions]``)."""

    model: Any
    prefix: PrefixCache
    per_row_adapters: bool  # the peft model: each row names its adapter
    rows: list[Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))

    def clear(self) -> None:
        self.rows, self.cache = [], None
        self.mask = torch.zeros((0, 0), dtype=torch.long)


class ContinuousGenerator(RowScheduler):
    """The in-process engine with iteration-level scheduling (see the module docstring)."""

    engine_name = "continuous"

    def __init__(self, loaded: Any, speakers: Sequence[str] = (), shared_prefix: str = "",
                 max_rows: int = 32, merge_adapters: bool = False):
        super().__init__(loaded.tokenizer, loaded.eos_token_ids, loaded.adapters, speakers,
                         max_rows)
        self.loaded = loaded
        self.model = loaded.model
        self.merged = bool(merge_adapters and self.adapters)
        self._lanes = self._make_lanes(shared_prefix)
        self._names: list[str] = []  # each forward's adapter per row (see _adapter_hooks)

    def _make_lanes(self, shared_prefix: str) -> dict[str, _Lane]:
        """One lane with per-row adapters, or (merged) one plain model per adapter."""
        if not self.merged:
            return {"": _Lane(self.model, PrefixCache(self.model, self.tokenizer, shared_prefix,
                                                      self.adapters), bool(self.adapters))}
        lanes = {}
        for name in [*self.adapters, BASE_VARIANT]:
            plain = plain_copy(self.model, name)
            lanes[name] = _Lane(plain, PrefixCache(plain, self.tokenizer, shared_prefix, []),
                                False)
        return lanes

    def _lane(self, adapter: str) -> _Lane:
        return self._lanes[adapter] if self.merged else self._lanes[""]

    def _engine_context(self) -> contextlib.AbstractContextManager[Any]:
        return self._adapter_hooks()

    @contextlib.contextmanager
    def _adapter_hooks(self) -> Iterator[None]:
        """peft's per-row adapter hooks, installed once for the engine's life with a list
        each forward refills (``self._names``). Installing them per forward, as a plain
        ``model(adapter_names=…)`` call does, walks every module: ~15 ms a step here."""
        lane = self._lanes.get("")
        if lane is None or not lane.per_row_adapters:
            yield
            return
        if lane.prefix.ids:
            for adapter in [*self.adapters, BASE_VARIANT]:
                lane.prefix.batch_cache([adapter])  # computed before the hooks take over
        with self.model._enable_peft_forward_hooks(adapter_names=self._names):
            yield

    def _forward(self, lane: _Lane, adapters: Sequence[str], **inputs: Any) -> Any:
        if lane.per_row_adapters:
            self._names[:] = adapters
        return lane.model(use_cache=True, **inputs)

    def _prefill(self, lane: _Lane, owners: Sequence[tuple[Call, int]]
                 ) -> tuple[list[Row], Any]:
        """Run the rows' prompts in one forward (after the cached prefix, laid out as
        ``[prefix][padding][rest]``, or left-padded whole) and take each row's scores."""
        jobs = [call.jobs[index] for call, index in owners]
        adapters = [j.adapter if j.adapter in self.adapters else BASE_VARIANT for j in jobs]
        prompts = [call.prompt_ids(self.tokenizer)[index] for call, index in owners]
        start, past = 0, None
        if lane.prefix.covers(prompts):
            start = len(lane.prefix.ids)
            past = lane.prefix.batch_cache(adapters if lane.per_row_adapters
                                           else [BASE_VARIANT] * len(jobs))
        width = max(len(p) - start for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids, positions, rest_mask = [], [], []
        for prompt in prompts:
            rest = prompt[start:]
            gap = width - len(rest)
            ids.append([pad] * gap + rest)
            positions.append([0] * gap + list(range(start, len(prompt))))
            rest_mask.append([0] * gap + [1] * len(rest))
        mask = torch.cat([torch.ones((len(jobs), start), dtype=torch.long),
                          torch.tensor(rest_mask)], dim=1)
        device = self.loaded.device
        out = self._forward(lane, adapters, input_ids=torch.tensor(ids, device=device),
                            attention_mask=mask.to(device),
                            position_ids=torch.tensor(positions, device=device),
                            past_key_values=past, logits_to_keep=1)
        rows = []
        for i, ((call, index), job, prompt, adapter) in enumerate(zip(owners, jobs, prompts,
                                                                       adapters, strict=True)):
            row = Row(call, index, list(prompt), adapter,
                      PerRowSampler([job.controls], [job.seed]), length=len(prompt))
            row.logits = out.logits[i : i + 1, -1, :]
            rows.append(row)
        return rows, (out.past_key_values, mask)

    def _join(self, lane: _Lane, rows: list[Row], state: Any, alive: list[int]) -> None:
        """Add the rows that did not end at once; whichever side's cache is shorter is padded
        on the left."""
        from transformers import DynamicCache

        if not alive:
            return
        cache, mask = state
        if len(alive) < len(rows):
            cache, mask = self._select(cache, mask, alive)
        lane.rows += [rows[i] for i in alive]
        if lane.cache is None or lane.mask.shape[0] == 0:
            lane.cache, lane.mask = cache, mask
            return
        width, length = lane.mask.shape[1], mask.shape[1]
        total = max(width, length)
        joined = DynamicCache()
        for layer_index, (old, new) in enumerate(zip(lane.cache.layers, cache.layers,
                                                     strict=True)):
            keys = torch.cat([_pad_left(old.keys, total), _pad_left(new.keys, total)])
            values = torch.cat([_pad_left(old.values, total), _pad_left(new.values, total)])
            joined.update(keys, values, layer_index)
        lane.cache = joined
        lane.mask = torch.cat([torch.nn.functional.pad(lane.mask, (total - width, 0)),
                               torch.nn.functional.pad(mask, (total - length, 0))])

    def _decode(self, lane: _Lane) -> None:
        """One step for every row of the lane; rows that ended leave it."""
        rows = lane.rows
        device = self.loaded.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        positions = torch.tensor([[r.length] for r in rows], device=device)
        lane.mask = torch.cat([lane.mask, torch.ones((len(rows), 1), dtype=lane.mask.dtype)],
                              dim=1)
        out = self._forward(lane, [r.adapter for r in rows], input_ids=ids,
                            attention_mask=lane.mask.to(device), position_ids=positions,
                            past_key_values=lane.cache)
        self.steps += 1
        keep = []
        for i, row in enumerate(rows):
            row.length += 1
            row.logits = out.logits[i : i + 1, -1, :]
            if self._step_row(row):
                keep.append(i)
        lane.cache = out.past_key_values
        if len(keep) < len(rows):
            lane.rows = [rows[i] for i in keep]
            lane.cache, lane.mask = self._select(lane.cache, lane.mask, keep)

    def _drop(self, lane: _Lane, keep: list[int]) -> None:
        if not keep:
            lane.clear()
            return
        lane.rows = [lane.rows[i] for i in keep]
        if lane.cache is not None:
            lane.cache, lane.mask = self._select(lane.cache, lane.mask, keep)

    def _select(self, cache: Any, mask: torch.Tensor, keep: list[int]
                ) -> tuple[Any, torch.Tensor]:
        """Keep only these rows, and drop the left columns that are padding for all."""
        from transformers import DynamicCache

        if not keep:
            return None, torch.zeros((0, 0), dtype=torch.long)
        index = torch.tensor(keep)
        mask = mask[index]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        mask = mask[:, first:]
        selected = DynamicCache()
        device_index = index.to(self.loaded.device)
        for layer_index, layer in enumerate(cache.layers):
            selected.update(layer.keys[device_index, :, first:],
                            layer.values[device_index, :, first:], layer_index)
        return selected, mask


def _pad_left(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """Zeros before the sequence axis (-2) up to ``total`` positions."""
    missing = total - tensor.shape[-2]
    if missing <= 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))
