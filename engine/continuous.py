"""Continuous batching: one running batch that rows join and leave at every decode step.

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
import queue
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from base.keys import BASE_VARIANT
from engine.generation import Generated, GenerationJob, OnText, PerRowSampler, PrefixCache
from engine.model_loading import plain_copy
from persona.postprocess import speaker_tag_pattern, split_sentences

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """One ``generate()`` call: its rows finish independently; it returns when all have."""

    jobs: Sequence[GenerationJob]
    on_text: OnText | None
    stream_rows: frozenset[int]
    stop: threading.Event
    results: list[Generated | None]
    left: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    prefilled: bool = False


@dataclass(eq=False)
class _Lane:
    """Rows that run on one model: their cache and attention mask (``[rows, positions]``)."""

    model: Any
    prefix: PrefixCache
    per_row_adapters: bool  # the peft model: each row names its adapter
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))

    def clear(self) -> None:
        self.rows, self.cache = [], None
        self.mask = torch.zeros((0, 0), dtype=torch.long)


@dataclass(eq=False)
class _Row:
    call: _Call
    index: int  # the job's index in its call
    prompt: list[int]  # the whole prompt's ids (for the penalties)
    adapter: str
    sampler: PerRowSampler
    tokens: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # real (unpadded) positions in the cache
    finished: bool = False  # ended by EOS or a stop, not cut off at max_new_tokens
    logits: Any = None  # the scores its next token is picked from


class ContinuousGenerator:
    """The in-process engine with iteration-level scheduling (see the module docstring)."""

    joins = True  # concurrent generate() calls share one running batch

    def __init__(self, loaded: Any, speakers: Sequence[str] = (), shared_prefix: str = "",
                 max_rows: int = 32, merge_adapters: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapters = list(loaded.adapters)
        self.tag = speaker_tag_pattern(speakers)
        self.eos = set(loaded.eos_token_ids)
        self.max_rows = max_rows
        self.steps = 0  # decode steps run, all lanes (for tests and benchmarks)
        self.most_rows = 0  # the most rows running at once
        self.merged = bool(merge_adapters and self.adapters)
        self._lanes = self._make_lanes(shared_prefix)
        self._incoming: queue.Queue[_Call | None] = queue.Queue()
        self._calls: list[_Call] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
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

    # ---- the caller's side -----------------------------------------------------------------

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = (), stop: threading.Event | None = None
                 ) -> list[Generated]:
        """Generate every job (blocking); ``stop`` ends this call's rows at their next step
        (their text so far is returned, not finished)."""
        if not jobs:
            return []
        call = _Call(jobs, on_text, frozenset(stream_rows), stop or threading.Event(),
                     [None] * len(jobs), len(jobs))
        with self._lock:
            self._calls.append(call)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
        self._incoming.put(call)
        while not call.done.wait(1.0):
            if self._thread is None or not self._thread.is_alive():  # it failed: say so
                call.error = call.error or RuntimeError("the engine thread stopped")
                break
        with self._lock:
            self._calls.remove(call)
        if call.error is not None:
            raise call.error
        return [r for r in call.results if r is not None]

    def cancel(self) -> None:
        """Stop every call in flight at its next step (the worker gave up on them)."""
        with self._lock:
            for call in self._calls:
                call.stop.set()

    def close(self) -> None:
        """End the engine thread (calls in flight finish first)."""
        if self._thread is not None and self._thread.is_alive():
            self._incoming.put(None)
            self._thread.join(30)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode(), self._adapter_hooks():
                self._serve()
        except Exception as exc:  # a bug, not a bad request: fail what waits; the next
            log.exception("the engine stopped")  # generate() starts a fresh thread
            for lane in self._lanes.values():
                lane.clear()
            with self._lock:
                for call in self._calls:
                    if not call.done.is_set():
                        call.error = exc
                        call.done.set()
            while True:
                try:
                    self._incoming.get_nowait()
                except queue.Empty:
                    break

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

    def _running(self) -> int:
        return sum(len(lane.rows) for lane in self._lanes.values())

    def _serve(self) -> None:
        backlog: list[_Call] = []  # calls waiting for room (max_rows)
        closing = False
        while True:
            if not self._running() and not backlog:
                backlog.append(self._incoming.get())  # type: ignore[arg-type]
            while True:
                try:
                    backlog.append(self._incoming.get_nowait())  # type: ignore[arg-type]
                except queue.Empty:
                    break
            if None in backlog:
                closing = True
                backlog = [c for c in backlog if c is not None]
                for call in self._calls:
                    call.stop.set()
            admitted: list[_Call] = []
            running = self._running()
            while backlog and ((not running and not admitted)
                               or running + sum(len(c.jobs) for c in admitted)
                               + len(backlog[0].jobs) <= self.max_rows):
                admitted.append(backlog.pop(0))
            self._admit(admitted)
            if not self._running():
                if closing and not backlog:
                    return
                continue
            for lane in self._lanes.values():
                if not lane.rows:
                    continue
                try:
                    self._decode(lane)
                except Exception as exc:
                    log.exception("decode step failed")
                    for call in {id(r.call): r.call for r in lane.rows}.values():
                        self._fail(call, exc)
                    lane.clear()
            self.most_rows = max(self.most_rows, self._running())

    def _admit(self, calls: list[_Call]) -> None:
        """Prefill the calls that arrived together, one forward per lane; if that fails, each
        call once more alone, so only a call that fails by itself gets the error."""
        for group in ([calls] if len(calls) > 1 else []) + [[c] for c in calls]:
            group = [c for c in group if not c.prefilled and not c.done.is_set()]
            if not group:
                continue
            owners = [(call, index) for call in group for index in range(len(call.jobs))]
            by_lane: dict[int, list[tuple[_Call, int]]] = {}
            for call, index in owners:
                by_lane.setdefault(id(self._lane(call.jobs[index].adapter)), []).append(
                    (call, index))
            try:
                prefilled = [(lane, self._prefill(lane, items))
                             for lane in self._lanes.values()
                             if (items := by_lane.get(id(lane)))]
            except Exception as exc:
                log.exception("prefill of %d calls failed", len(group))
                if len(group) == 1:
                    self._fail(group[0], exc)
                continue
            for call in group:
                call.prefilled = True
            for lane, (joining, cache, mask) in prefilled:
                alive = [i for i, row in enumerate(joining) if self._step_row(row)]
                if alive:
                    if len(alive) < len(joining):
                        cache, mask = self._select(cache, mask, alive)
                    self._join(lane, cache, mask)
                    lane.rows += [joining[i] for i in alive]

    def _forward(self, lane: _Lane, adapters: Sequence[str], **inputs: Any) -> Any:
        if lane.per_row_adapters:
            self._names[:] = adapters
        return lane.model(use_cache=True, **inputs)

    def _prefill(self, lane: _Lane, owners: Sequence[tuple[_Call, int]]
                 ) -> tuple[list[_Row], Any, torch.Tensor]:
        """Run the rows' prompts in one forward (after the cached prefix, laid out as
        ``[prefix][padding][rest]``, or left-padded whole) and take each row's scores."""
        jobs = [call.jobs[index] for call, index in owners]
        adapters = [j.adapter if j.adapter in self.adapters else BASE_VARIANT for j in jobs]
        prompts = self.tokenizer([j.prompt for j in jobs], add_special_tokens=False)["input_ids"]
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
            row = _Row(call, index, list(prompt), adapter,
                       PerRowSampler([job.controls], [job.seed]), length=len(prompt))
            row.logits = out.logits[i : i + 1, -1, :]
            rows.append(row)
        return rows, out.past_key_values, mask

    def _step_row(self, row: _Row) -> bool:
        """Pick the row's next token from its logits; False when it ended (and left)."""
        from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        controls = row.call.jobs[row.index].controls
        scores = row.logits.float()
        seen = torch.tensor([row.prompt + row.tokens])
        if controls.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(controls.repetition_penalty)(seen, scores)
        if controls.no_repeat_ngram_size > 0:
            scores = NoRepeatNGramLogitsProcessor(controls.no_repeat_ngram_size)(seen, scores)
        token = int(torch.argmax(row.sampler(seen, scores), dim=-1))
        if token in self.eos or row.call.stop.is_set():
            row.finished = token in self.eos
            self._leave(row)
            return False
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if self.tag.search(text) or len(split_sentences(text + " x")) > controls.sentence_cap + 1:
            row.finished = True  # stopped early, as RowStops does: the reply is complete
            self._leave(row)
            return False
        if len(row.tokens) >= controls.max_new_tokens:
            self._leave(row)  # cut off: its last sentence may be a fragment
            return False
        if row.call.on_text is not None and row.index in row.call.stream_rows:
            row.call.on_text(row.index, text)
        return True

    def _leave(self, row: _Row) -> None:
        call = row.call
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        call.results[row.index] = Generated(text, len(row.tokens), row.finished,
                                            (time.perf_counter() - call.started) * 1000)
        call.left -= 1
        if call.left == 0:
            call.done.set()

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

    def _join(self, lane: _Lane, cache: Any, mask: torch.Tensor) -> None:
        """Add prefilled rows to a lane: whichever side is shorter is padded on the left."""
        from transformers import DynamicCache

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

    def _fail(self, call: _Call, exc: BaseException) -> None:
        """End a call with an error; its rows leave their lanes."""
        for lane in self._lanes.values():
            keep = [i for i, r in enumerate(lane.rows) if r.call is not call]
            if len(keep) < len(lane.rows) and lane.cache is not None:
                lane.rows = [lane.rows[i] for i in keep]
                lane.cache, lane.mask = self._select(lane.cache, lane.mask, keep)
        if not call.done.is_set():
            call.error = exc
            call.done.set()


def _pad_left(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """Zeros before the sequence axis (-2) up to ``total`` positions."""
    missing = total - tensor.shape[-2]
    if missing <= 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))
