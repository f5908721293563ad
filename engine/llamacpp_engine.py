"""Continuous batching on llama.cpp (``LOCAL_ENGINE=llamacpp``): many sequences in one
``llama_decode`` per step, through llama-cpp-python's low-level API.

The scheduling, sampling and stops are `engine.scheduler.RowScheduler`'s, as for the PyTorch
engine; this module runs its lanes. A lane is one llama.cpp context on the shared model
weights, with one adapter's LoRA applied at run time (the House adapter converted to a GGUF
LoRA by `engine.gguf_lora`) or none for the base rows of ``/compare``. Each row is a
sequence of the context's key/value cache (one cache for all, ``kv_unified``); the persona's
system block is computed once per lane as sequence 0 and shared with every row
(``llama_memory_seq_cp`` shares the cells, nothing is copied). A row that ends keeps its
cells (its prompt and reply) while no one needs its sequence or cells: a conversation's next
prompt starts with the last one and that reply, so it computes only what is new after the
longest such start (the kept row's sequence becomes the new row's). Kept rows give way, oldest
first, to a row that needs a sequence or cells; rows are admitted while their prompts and
token limits fit the cache (``LLAMACPP_KV_TOKENS``) and ``MAX_RUNNING_ROWS``. A joining row's
prompt runs in the running rows' next step, one ``llama_decode`` for both.

Each adapter's lane runs its own GGUF with the adapter merged in (``LLAMACPP_LORA=merged``,
`engine.gguf_merge`) or the base GGUF with the GGUF LoRA applied at run time (``runtime``).
Weights (``LLAMACPP_WEIGHTS``): ``auto`` is bf16 where the CPU and this llama.cpp build have
native bf16 and no AMX, else q8_0 (8-bit blocks); every file is re-encoded once by llama.cpp's
quantiser and cached; ``source`` keeps the embedded file's own Q4_1. Scores are not bit-identical to
the row alone: llama.cpp's kernels change with the number of tokens in a decode (from about
64), so unlike the PyTorch engine a sampled row's text may differ from its text alone;
docs/engine.md has the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base.keys import BASE_VARIANT
from engine.generation import PerRowSampler
from engine.gguf_lora import written_once
from engine.model_loading import EMBEDDED_MODELS, ModelLoadError, find_embedded_gguf
from engine.scheduler import Call, Row, RowScheduler

log = logging.getLogger(__name__)

PREFIX_SEQ = 0  # the sequence that holds the persona's system block in every lane
KEEP_MIN_TOKENS = 8  # a row that ends keeps its cells when it has this many past the block
FTYPES = {"q8_0": 7, "bf16": 32, "f16": 1, "f32": 0}  # LLAMACPP_WEIGHTS -> llama_ftype


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError("LOCAL_ENGINE=llamacpp needs llama-cpp-python: make install builds "
                             "it for this CPU") from exc
    return llama_cpp


_log_callback: Any = None  # kept alive: llama.cpp calls it for every log line


def _route_logs(llama: Any) -> None:
    """llama.cpp's own log lines go to this logger at debug level (they are many)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama.llama_log_callback
    def forward(level: int, text: bytes, user_data: Any) -> None:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _log_callback = forward
    llama.llama_log_set(_log_callback, ctypes.c_void_p(0))


def weights_kind(weights: str) -> str:
    """``auto``: bf16 where the CPU has native bf16 (AVX512-BF16) and llama.cpp was built to
    use it (the Docker image's portable AVX2 build is not), else q8_0 — and q8_0 where the
    build uses AMX: on the Intel Xeon (Sapphire Rapids) VM measured, unpacked q8_0 decoded
    faster than bf16 at 1 to 32 rows (12.9 / 61.2 against 16.7 / 76.0 ms at 1 / 16 rows),
    while on AMD Zen 4 bf16 was the faster (docs/engine.md)."""
    if weights != "auto":
        return weights
    from engine.model_loading import cpu_has_bf16

    built = _llama().llama_print_system_info().decode()
    native = "AVX512_BF16 = 1" in built and "AMX_INT8 = 1" not in built
    return "bf16" if native and cpu_has_bf16() else "q8_0"


def repacks_weights(repack: str) -> bool:
    """Whether llama.cpp may repack the weights at load into its "extra" buffer types (AMX
    tiles where the build uses AMX, interleaved blocks elsewhere). ``auto``: not where this
    build uses AMX — on the Intel Xeon (Sapphire Rapids) VMs of this project the AMX path
    segfaults in the first ``llama_decode`` (q8_0 and Q4_1 alike; llama.cpp issue #20824,
    open), while the same weights unpacked run (docs/engine.md)."""
    if repack != "auto":
        return repack == "on"
    return "AMX_INT8 = 1" not in _llama().llama_print_system_info().decode()


def encoded(source: Path, weights: str, cache_dir: Path) -> Path:
    """``source`` re-encoded as ``weights`` by llama.cpp's quantiser (made on first use, cached
    in ``cache_dir``), or ``source`` itself for ``LLAMACPP_WEIGHTS=source``."""
    weights = weights_kind(weights)
    if weights == "source":
        return source
    stat = source.stat()
    key = hashlib.sha1(f"{source.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    out = cache_dir / f"{source.stem}-{weights}-{key[:10]}.gguf"
    return written_once(out, lambda tmp: _quantize(source, tmp, FTYPES[weights]))


def merged_encoded(adapter_dir: Path, source: Path, weights: str, cache_dir: Path) -> Path:
    """The adapter merged into ``source`` and re-encoded as ``weights`` (``source``: the type
    the model ships as), made on first use and cached in ``cache_dir``. The float32 merge in
    between (457 MB for SmolLM2-135M) lives in a scratch folder only while it is encoded; the
    file's name carries the merge's key (the adapter's and the model's digest)."""
    from engine.gguf_merge import merge_adapter, merged_key

    weights = weights_kind(weights)
    out = cache_dir / f"{source.stem}-{adapter_dir.name}-{merged_key(adapter_dir, source)}-" \
                      f"{weights}.gguf"

    def merge_and_quantize(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="merge-") as scratch:
            merged = Path(scratch) / "merged-f32.gguf"
            merge_adapter(adapter_dir, source, merged)
            _quantize(merged, tmp, FTYPES[weights] if weights != "source" else _file_type(source))

    return written_once(out, merge_and_quantize)


def _quantize(source: Path, out: Path, ftype: int) -> None:
    llama = _llama()
    _route_logs(llama)
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize, params.nthread = True, os.cpu_count() or 1
    log.info("re-encoding %s as llama_ftype %d in %s (first start only)", source.name, ftype,
             out.name)
    if llama.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise ModelLoadError(f"llama.cpp could not re-encode {source} (llama_ftype {ftype})")


def _file_type(gguf_file: Path | None) -> int:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).get_field("general.file_type")
    if field is None:
        raise ModelLoadError(f"{gguf_file} does not say its weights' type")
    return int(field.contents())  # type: ignore[arg-type]


@dataclass(eq=False)
class _Prompts:
    """The prompts of rows admitted together, run with the lane's next decode step."""

    rows: list[Row]
    items: list[tuple[int, int, int, bool]]  # (token, position, sequence, wants scores)
    copies: list[tuple[Row, Row]]  # (row that computes a prompt, a row with the same prompt)


@dataclass(eq=False)
class _Lane:
    """One llama.cpp context (one adapter) and the rows that run on it."""

    adapter: str
    ctx: Any
    batch: Any
    capacity: int  # key/value cells
    batch_tokens: int  # most tokens one llama_decode of this context takes
    prefix_len: int = 0
    rows: list[Row] = field(default_factory=list)
    free_slots: list[int] = field(default_factory=list)
    reserved: dict[int, int] = field(default_factory=dict)  # slot -> cells it may use
    kept: dict[int, list[int]] = field(default_factory=dict)  # ended rows: slot -> its tokens
    joining: list[_Prompts] = field(default_factory=list)  # to run with the next step

    def kept_cells(self) -> int:
        """Cells the kept rows hold beside the persona's block."""
        return sum(len(tokens) - self.prefix_len for tokens in self.kept.values())

    def longest_kept(self, prompt: list[int]) -> tuple[int, int] | None:
        """The kept row whose tokens start ``prompt`` furthest, at least ``KEEP_MIN_TOKENS``
        past the persona's block (every prompt shares the turn's opening tokens with every
        kept row), and how far (always short of the prompt's last token, whose scores the
        row needs)."""
        best: tuple[int, int] | None = None
        for slot, tokens in self.kept.items():
            n, most = 0, min(len(tokens), len(prompt) - 1)
            while n < most and tokens[n] == prompt[n]:
                n += 1
            if n >= self.prefix_len + KEEP_MIN_TOKENS and n > (best[1] if best else 0):
                best = (slot, n)
        return best


class LlamaCppGenerator(RowScheduler):
    """The llama.cpp engine (see the module docstring)."""

    engine_name = "llamacpp"
    prefill_in_step = True  # joining rows' prompts run in the next step's llama_decode

    def __init__(self, loaded: Any, lanes: dict[str, tuple[Path, Path | None]],
                 speakers: Sequence[str] = (), shared_prefix: str = "", max_rows: int = 32,
                 kv_tokens: int = 8192, threads: int = 0, batch_tokens: int = 2048,
                 repack: bool = True):
        """``lanes``: for each adapter and for ``__base__``, the GGUF it runs and the GGUF
        LoRA applied on it at run time (None for a merged file or the base)."""
        super().__init__(loaded.tokenizer, loaded.eos_token_ids,
                         [name for name in lanes if name != BASE_VARIANT], speakers, max_rows)
        self.loaded = loaded  # the PyTorch model too: the listener and the tokenizer use it
        self.llama = _llama()
        _route_logs(self.llama)
        self.llama.llama_backend_init()
        self.files = lanes
        self.threads = threads or os.cpu_count() or 1
        self.batch_tokens = max(batch_tokens, max_rows)
        self.repack = repack  # llama.cpp's extra buffer types for the weights (`repacks_weights`)
        self.prompt_tokens = 0  # prompt tokens computed (after the persona block), for tests
        self._models: dict[Path, Any] = {}
        self._loras: dict[Path, Any] = {}
        self._contexts: list[_Lane] = []  # every context made, freed by close()
        self._lanes: dict[str, _Lane] = {}
        try:
            for gguf, lora in lanes.values():
                self._load(gguf, lora)
            first = self._models[lanes[BASE_VARIANT][0]]
            self.n_vocab = self.llama.llama_vocab_n_tokens(self.llama.llama_model_get_vocab(first))
            self.prefix_ids = (self.tokenizer(shared_prefix, add_special_tokens=False)
                               ["input_ids"] if shared_prefix else [])
            self._lanes = {name: self._make_lane(name, kv_tokens) for name in lanes}
        except Exception:
            self.close()
            raise

    def _load(self, gguf: Path, lora: Path | None) -> None:
        llama = self.llama
        if gguf not in self._models:
            params = llama.llama_model_default_params()
            params.n_gpu_layers = 0
            params.use_extra_bufts = self.repack
            model = llama.llama_model_load_from_file(str(gguf).encode(), params)
            if not model:
                raise ModelLoadError(f"llama.cpp could not load {gguf}")
            self._models[gguf] = model
        if lora is not None and lora not in self._loras:
            adapter = llama.llama_adapter_lora_init(self._models[gguf], str(lora).encode())
            if not adapter:
                raise ModelLoadError(f"llama.cpp could not load the adapter {lora}")
            self._loras[lora] = adapter

    def _make_lane(self, adapter: str, kv_tokens: int) -> _Lane:
        return self.make_context(adapter, kv_tokens, self.max_rows, self.batch_tokens)

    def make_context(self, adapter: str, kv_tokens: int, sequences: int, batch_tokens: int,
                     shared_by: int = 1) -> _Lane:
        """A context on ``adapter``'s weights (shared with every context on them), room
        for ``sequences`` rows beside the persona's block (sequence 0, computed here); a token
        of its batch may belong to up to ``shared_by`` sequences."""
        llama = self.llama
        params = llama.llama_context_default_params()
        params.n_ctx = kv_tokens
        params.n_batch = batch_tokens
        params.n_ubatch = min(512, batch_tokens)
        params.n_seq_max = sequences + 1
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True
        params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        gguf, lora = self.files.get(adapter, self.files[BASE_VARIANT])
        ctx = llama.llama_init_from_model(self._models[gguf], params)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not make a context of {kv_tokens} tokens")
        if lora is not None:
            loras = (llama.llama_adapter_lora_p_ctypes * 1)(self._loras[lora])
            scales = (ctypes.c_float * 1)(1.0)
            if llama.llama_set_adapters_lora(ctx, loras, 1, scales) != 0:
                raise ModelLoadError(f"llama.cpp could not apply the {adapter} adapter")
        lane = _Lane(adapter, ctx, llama.llama_batch_init(batch_tokens, 0, shared_by),
                     llama.llama_n_ctx(ctx), batch_tokens,
                     free_slots=list(range(1, sequences + 1)))
        if self.prefix_ids:
            self.run_batch(lane, [(t, p, PREFIX_SEQ, False)
                                  for p, t in enumerate(self.prefix_ids)])
            lane.prefix_len = len(self.prefix_ids)
        self._contexts.append(lane)
        return lane

    def _lane(self, adapter: str) -> _Lane:
        return self._lanes.get(adapter, self._lanes[BASE_VARIANT])

    @contextlib.contextmanager
    def _engine_context(self) -> Iterator[None]:
        """The engine samples with one torch thread: llama.cpp's threads have the cores. torch's
        setting is the process's, so this holds for every thread from here on; what matters
        more is that torch made no team of threads before (`settle_torch_threads`)."""
        torch.set_num_threads(1)
        yield

    # ---- llama.cpp calls -------------------------------------------------------------------

    def run_batch(self, lane: _Lane, items: Sequence[tuple[int, int, int | Sequence[int], bool]]
                  ) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants scores) items, at most
        the lane's ``batch_tokens`` (`run_chunked` splits more); a token of several sequences
        (up to the lane's ``shared_by``) names them all. It always runs on the engine
        thread (called from another, it waits for a turn there): llama.cpp's OpenMP gives each
        calling thread its own team of threads, and once two such threads lived, every decode
        took twice as long — one row 26-28 ms against 13-14 on the Xeon VM, both for the engine
        thread and for the thread that had made the contexts (docs/engine.md)."""
        if threading.current_thread() is not self._thread:
            return self.run_on_engine(lambda: self.run_batch(lane, items))
        if len(items) > lane.batch_tokens:
            raise ValueError(f"{len(items)} tokens in one decode of a {lane.batch_tokens}-token "
                             "batch")
        batch = lane.batch
        batch.n_tokens = len(items)
        for i, (token, position, seq, wants) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = position
            seqs = (seq,) if isinstance(seq, int) else seq
            batch.n_seq_id[i] = len(seqs)
            for k, one in enumerate(seqs):
                batch.seq_id[i][k] = one
            batch.logits[i] = wants
        status = self.llama.llama_decode(lane.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (1: no room in the key/value "
                               "cache)")

    def run_chunked(self, lane: _Lane, items: Sequence[tuple[int, int, int, bool]]) -> int:
        """``items`` in as many decodes as the lane's batch needs; returns the last item's
        index in the last decode (where its scores are read)."""
        size = lane.batch_tokens
        for first in range(0, len(items), size):
            self.run_batch(lane, items[first : first + size])
        return (len(items) - 1) % size

    def _scores(self, lane: _Lane, index: int) -> torch.Tensor:
        pointer = self.llama.llama_get_logits_ith(lane.ctx, index)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
                                )[None]

    def _release(self, lane: _Lane, row: Row, keep: bool = False) -> None:
        """Give the row's sequence back; ``keep``: its cells stay, kept for a prompt that
        starts with its tokens (a row that ended well, not one whose decode failed)."""
        if row.slot < 0:
            return
        lane.reserved.pop(row.slot, None)
        cells = (row.prompt + row.tokens)[: row.length]  # the last sampled token has no cell
        if keep and len(cells) - lane.prefix_len >= KEEP_MIN_TOKENS:
            lane.kept[row.slot] = cells
        else:
            self.free_sequence(lane, row.slot)
        row.slot = -1

    def free_sequence(self, lane: _Lane, slot: int) -> None:
        """Give ``slot``'s cells back and the sequence to the free ones (kept or not)."""
        lane.kept.pop(slot, None)
        self.llama.llama_memory_seq_rm(self.llama.llama_get_memory(lane.ctx), slot, -1, -1)
        lane.free_slots.append(slot)

    def _forget_oldest(self, lane: _Lane) -> bool:
        """Free the longest-kept row's sequence and cells; False when none is kept."""
        if not lane.kept:
            return False
        self.free_sequence(lane, next(iter(lane.kept)))
        return True

    def _reset_lanes(self) -> None:
        super()._reset_lanes()
        for lane in self._lanes.values():
            while self._forget_oldest(lane):
                pass

    # ---- the scheduler's lane operations ---------------------------------------------------

    def _cells(self, call: Call, index: int) -> int:
        """Key/value cells the job may use beside the shared persona block."""
        ids = call.prompt_ids(self.tokenizer)[index]
        shared = self.prefix_ids and ids[: len(self.prefix_ids)] == self.prefix_ids
        return (len(ids) - (len(self.prefix_ids) if shared else 0)
                + call.jobs[index].controls.max_new_tokens)

    def _fits(self, running: int, admitted: Sequence[Call], call: Call) -> bool:
        if not super()._fits(running, admitted, call):
            return False
        needs: dict[str, int] = {}
        for waiting in [*admitted, call]:
            for index, job in enumerate(waiting.jobs):
                name = self._lane(job.adapter).adapter
                needs[name] = needs.get(name, 0) + self._cells(waiting, index)
        used = {name: lane.prefix_len + sum(lane.reserved.values()) + needs.get(name, 0)
                for name, lane in self._lanes.items()}
        if any(used[name] > lane.capacity for name, lane in self._lanes.items()):
            return False  # it waits for running rows; the kept ones stay until it can join
        for name, lane in self._lanes.items():
            while used[name] + lane.kept_cells() > lane.capacity:
                self._forget_oldest(lane)  # kept rows give way to a new one
        return True

    def _prefill(self, lane: _Lane, owners: Sequence[tuple[Call, int]]) -> tuple[list[Row], Any]:
        """Every row's prompt after the shared system block (or after the longest start a
        kept row holds), to run with the lane's next step (`_decode`). Rows with the same
        prompt (a reply's candidates) compute it once: the others get its cells
        (``llama_memory_seq_cp``) and its scores."""
        memory = self.llama.llama_get_memory(lane.ctx)
        rows: list[Row] = []
        items: list[tuple[int, int, int, bool]] = []
        computed: dict[tuple[int, ...], Row] = {}
        copies: list[tuple[Row, Row]] = []  # (row that computes the prompt, row that shares it)
        try:
            for call, index in owners:
                job = call.jobs[index]
                prompt = call.prompt_ids(self.tokenizer)[index]
                key = tuple(prompt)
                kept = None if key in computed else lane.longest_kept(prompt)
                if kept is not None:  # its cells hold the start of this prompt
                    slot, start = kept
                    del lane.kept[slot]
                    self.llama.llama_memory_seq_rm(memory, slot, start, -1)
                else:
                    if not lane.free_slots:
                        self._forget_oldest(lane)
                    if not lane.free_slots:
                        raise RuntimeError("no free sequence in the llama.cpp context")
                    slot = lane.free_slots.pop(0)
                row = Row(call, index, list(prompt), lane.adapter,
                          PerRowSampler([job.controls], [job.seed]), length=len(prompt),
                          slot=slot)
                rows.append(row)
                lane.reserved[row.slot] = self._cells(call, index)
                same = computed.setdefault(key, row)
                if same is not row:
                    copies.append((same, row))
                    continue
                if kept is None:
                    start = 0
                    if lane.prefix_len and prompt[: lane.prefix_len] == self.prefix_ids:
                        self.llama.llama_memory_seq_cp(memory, PREFIX_SEQ, row.slot, -1, -1)
                        start = lane.prefix_len
                if start == len(prompt):  # nothing after the block: score its last token
                    start -= 1
                    self.llama.llama_memory_seq_rm(memory, row.slot, start, -1)
                items += [(prompt[p], p, row.slot, p == len(prompt) - 1)
                          for p in range(start, len(prompt))]
            while (lane.prefix_len + sum(lane.reserved.values()) + lane.kept_cells()
                   > lane.capacity and self._forget_oldest(lane)):
                pass  # a call admitted into an idle engine: the kept rows make room
            self.prompt_tokens += len(items)
        except Exception:
            for row in rows:
                self._release(lane, row)
            raise
        return rows, _Prompts(rows, items, copies)

    def _run_rows(self, lane: _Lane, prompts: Sequence[_Prompts], steps: Sequence[Row]) -> None:
        """The prompts (their rows' ``logits`` set, same-prompt rows given the cells) and one
        step of ``steps`` (each row's last token), in one ``llama_decode`` when they fit the
        lane's batch, else the prompts in chunks first."""
        items = [item for group in prompts for item in group.items]
        stepping = [(r.tokens[-1], r.length, r.slot, True) for r in steps]
        together = len(items) + len(stepping) <= lane.batch_tokens
        chunks = ([items + stepping] if together else
                  [items[i : i + lane.batch_tokens] for i in range(0, len(items),
                                                                   lane.batch_tokens)])
        by_slot = {row.slot: row for group in prompts for row in group.rows}
        for chunk in chunks:
            if not chunk:
                continue
            self.run_batch(lane, chunk)
            for i, (_, _, seq, wants) in enumerate(chunk):
                if wants and seq in by_slot:  # a prompt's last token (a step's row is not there)
                    by_slot[seq].logits = self._scores(lane, i)
        if not together and stepping:
            self.run_batch(lane, stepping)
        offset = len(items) if together else 0
        for i, row in enumerate(steps):
            row.logits = self._scores(lane, offset + i)
        memory = self.llama.llama_get_memory(lane.ctx)
        for group in prompts:
            for source, row in group.copies:
                self.llama.llama_memory_seq_cp(memory, source.slot, row.slot, -1, -1)
                row.logits = source.logits.clone()

    def _join(self, lane: _Lane, rows: list[Row], state: Any, alive: list[int]) -> None:
        """The rows join now; their prompts (``state``) run with the next step."""
        lane.rows += rows
        lane.joining.append(state)

    def _decode(self, lane: _Lane) -> None:
        """One step of the running rows and the joining rows' prompts, in one decode (a
        joining row then picks its first token). If that decode fails, each joining call's
        prompt runs once more alone, so only a prompt that fails by itself fails its call."""
        prompts, lane.joining = lane.joining, []
        joining = {id(row) for group in prompts for row in group.rows}
        running = [row for row in lane.rows if id(row) not in joining]
        try:
            self._run_rows(lane, prompts, running)
        except Exception:
            if not prompts:
                raise
            log.exception("a step with %d joining prompts failed; each alone", len(prompts))
            self._clear_attempt(lane, prompts, running)
            for group in prompts:
                try:
                    self._run_rows(lane, [group], [])
                except Exception as exc:
                    self._clear_attempt(lane, [group], [])
                    for call in {id(r.call): r.call for r in group.rows}.values():
                        self._fail(call, exc)
            running = [row for row in running if row in lane.rows]
            self._run_rows(lane, [], running)
        if running:
            self.steps += 1
        # a row that shared another call's prompt, and that call failed before it ran
        orphans = {id(r.call): r.call for r in lane.rows if id(r) in joining and r.logits is None}
        for call in orphans.values():
            self._fail(call, RuntimeError("the prompt this request shared did not run"))
        keep = []
        for i, row in enumerate(lane.rows):
            if id(row) not in joining:
                row.length += 1
            if self._step_row(row):
                keep.append(i)
        if len(keep) < len(lane.rows):
            self._drop(lane, keep, ended=True)

    def _clear_attempt(self, lane: _Lane, prompts: Sequence[_Prompts], steps: Sequence[Row]
                       ) -> None:
        """Remove the cells a failed decode may have left: the prompts' (from their first
        position) and the step's."""
        memory = self.llama.llama_get_memory(lane.ctx)
        first: dict[int, int] = {row.slot: row.length for row in steps}
        for group in prompts:
            for _, position, seq, _ in group.items:
                first[seq] = min(position, first.get(seq, position))
        for seq, position in first.items():
            self.llama.llama_memory_seq_rm(memory, seq, position, -1)

    def _drop(self, lane: _Lane, keep: list[int], ended: bool = False) -> None:
        """Keep only these rows; ``ended``: the others ended well (their cells are kept)."""
        staying = set(keep)
        leaving = [row for i, row in enumerate(lane.rows) if i not in staying]
        self._unjoin(lane, leaving)
        for row in leaving:
            self._release(lane, row, keep=ended)
        lane.rows = [lane.rows[i] for i in keep]

    @staticmethod
    def _unjoin(lane: _Lane, leaving: Sequence[Row]) -> None:
        """Take rows that leave before their prompt ran (their call failed in another lane)
        out of the prompts still to run, so no cells are written for a freed sequence."""
        slots = {row.slot for row in leaving}
        gone = {id(row) for row in leaving}
        kept = []
        for group in lane.joining:
            group.rows = [r for r in group.rows if id(r) not in gone]
            group.items = [item for item in group.items if item[2] not in slots]
            group.copies = [(a, b) for a, b in group.copies if id(a) not in gone
                            and id(b) not in gone]
            if group.rows:
                kept.append(group)
        lane.joining = kept

    def close(self) -> None:
        super().close()
        for lane in self._contexts:
            self.llama.llama_batch_free(lane.batch)
            self.llama.llama_free(lane.ctx)
        self._lanes, self._contexts = {}, []
        for lora in self._loras.values():
            self.llama.llama_adapter_lora_free(lora)
        for model in self._models.values():
            self.llama.llama_model_free(model)
        self._loras, self._models = {}, {}


def settle_torch_threads(settings: Any, engine: str | None = None) -> None:
    """Set torch's threads before a model loads: one where the llama.cpp engine will serve
    (``engine``, default ``LOCAL_ENGINE``), else ``TORCH_THREADS`` when set. torch and
    llama.cpp share one OpenMP runtime, and a team of torch's threads made on another thread
    (loading the model on two threads was enough) put it in its throttled mode beside the
    engine's team: llama.cpp's barriers between ops then sleep and wake, and every decode took
    twice as long — one row 30 against 14 ms in serving, one conversation 27 against 51
    tokens/s on the Xeon VM (docs/engine.md). The selector and the classifier then run on one
    thread too."""
    from engine.model_loading import pick_device

    model = settings.model
    if (engine or model.local_engine) in ("auto", "llamacpp") \
            and llamacpp_can_run(settings, pick_device(model.device)) is None:
        torch.set_num_threads(1)
    elif model.torch_threads:
        torch.set_num_threads(model.torch_threads)


def llamacpp_can_run(settings: Any, device: torch.device) -> str | None:
    """Why the llama.cpp engine cannot run this model on ``device`` (where the model loads),
    or None when it can."""
    import importlib.util

    model = settings.model
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if model.base_model not in EMBEDDED_MODELS:
        return f"{model.base_model} is not an embedded GGUF model"
    if device.type != "cpu" or model.load_in_4bit:
        return f"the model runs on {device.type}"
    return None


def build_llamacpp_generator(settings: Any, loaded: Any, speakers: Sequence[str],
                             shared_prefix: str) -> LlamaCppGenerator:
    """The llama.cpp engine for these settings, on the adapters ``loaded`` has: each adapter
    merged into its own file (``LLAMACPP_LORA=merged``) or applied at run time on the base's."""
    from engine.gguf_lora import cached_adapter_gguf

    model = settings.model
    if model.base_model not in EMBEDDED_MODELS:
        raise ModelLoadError(f"LOCAL_ENGINE=llamacpp runs the embedded GGUF models "
                             f"({', '.join(EMBEDDED_MODELS)}), not {model.base_model!r}")
    source = find_embedded_gguf(model.base_model)
    weights = model.llamacpp_weights
    base = encoded(source, weights, model.cache_dir)
    lanes: dict[str, tuple[Path, Path | None]] = {BASE_VARIANT: (base, None)}
    for name in loaded.adapters:
        adapter = Path(model.adapter_paths[name])
        if model.llamacpp_lora == "merged":
            lanes[name] = (merged_encoded(adapter, source, weights, model.cache_dir), None)
        else:
            lanes[name] = (base, cached_adapter_gguf(adapter, source, model.cache_dir))
    repack = repacks_weights(model.llamacpp_repack)
    log.info("llama.cpp engine: %s weights%s, adapters %s", weights_kind(weights),
             "" if repack else " (not repacked)", model.llamacpp_lora)
    return LlamaCppGenerator(loaded, lanes, speakers, shared_prefix,
                             max_rows=model.max_running_rows,
                             kv_tokens=model.llamacpp_kv_tokens,
                             threads=model.torch_threads, repack=repack)
