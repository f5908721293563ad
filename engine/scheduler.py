"""Iteration-level scheduling (continuous batching), whatever runs the model.

``generate(jobs)`` may be called from several threads at once (the worker calls it once per
micro-batch and reads the next while one generates). The calls go to one engine thread that
keeps one running batch: the calls that arrived together are prefilled, their rows join the
batch at the next decode step, a row leaves the moment it stops (end of text, another
speaker's tag, past the sentence cap, its token limit) and a call returns when its last row
has, so a short reply never waits for a long one.

Rows run in lanes (one per model or adapter context); a subclass says how a lane prefills,
joins, steps and drops rows: `engine.continuous.ContinuousGenerator` on a PyTorch model,
`engine.llamacpp_engine.LlamaCppGenerator` on llama.cpp. Choosing a row's next token (per-row
sampling and seed, repetition penalty and no-repeat n-grams over its own tokens, stops) is
the same for both, here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.generation import Generated, GenerationJob, OnText, PerRowSampler
from engine.penalties import RowPenalties
from persona.postprocess import speaker_tag_pattern, split_sentences

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
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
    _ids: list[list[int]] | None = None

    def prompt_ids(self, tokenizer: Any) -> list[list[int]]:
        """Each job's prompt as token ids, tokenised once (admission asks at every step)."""
        if self._ids is None:
            self._ids = tokenizer([j.prompt for j in self.jobs],
                                  add_special_tokens=False)["input_ids"]
        return self._ids


@dataclass(eq=False)
class SideJob:
    """Other work on the engine's model (the listener's scoring), run by the engine thread
    between two decode steps: on a CPU it then never runs beside a step on the same cores."""

    work: Callable[[], Any]
    idle: bool = False  # run only while no row runs and nothing else waits
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except Exception as exc:
            self.error = exc
        self.done.set()


@dataclass(eq=False)
class Row:
    call: Call
    index: int  # the job's index in its call
    prompt: list[int]  # the whole prompt's ids (for the penalties)
    adapter: str
    sampler: PerRowSampler
    tokens: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # real (unpadded) positions in the cache
    finished: bool = False  # ended by EOS or a stop, not cut off at max_new_tokens
    logits: Any = None  # the scores its next token is picked from ([1, vocab])
    slot: int = -1  # where the lane keeps its cache (llama.cpp: the sequence id)
    penalties: RowPenalties | None = None  # made at its first step, from the prompt


class RowScheduler:
    """The engine thread and the row life cycle; lanes are the subclass's (see module doc).

    A lane has ``rows`` (a list of `Row`). Subclasses implement `_lane`, `_prefill`, `_join`,
    `_decode` and `_drop`, and set ``self._lanes`` (a dict of lanes)."""

    joins = True  # concurrent generate() calls share one running batch
    prefill_in_step = False  # True: `_prefill` only prepares; the next `_decode` runs it

    def __init__(self, tokenizer: Any, eos_ids: Collection[int], adapters: Sequence[str],
                 speakers: Sequence[str] = (), max_rows: int = 32):
        self.tokenizer = tokenizer
        self.adapters = list(adapters)
        self.tag = speaker_tag_pattern(speakers)
        self.eos = set(eos_ids)
        self.max_rows = max_rows
        self.steps = 0  # decode steps run, all lanes (for tests and benchmarks)
        self.most_rows = 0  # the most rows running at once
        self._lanes: dict[str, Any] = {}
        self._incoming: queue.Queue[Call | SideJob | None] = queue.Queue()
        self._idle: list[SideJob] = []  # side jobs that wait for an idle engine
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- what a subclass implements --------------------------------------------------------

    def _lane(self, adapter: str) -> Any:
        raise NotImplementedError

    def _prefill(self, lane: Any, owners: Sequence[tuple[Call, int]]) -> tuple[list[Row], Any]:
        """Run these (call, job index) prompts; each row's ``logits`` set. Returns the rows
        and whatever `_join` needs to add them to the lane."""
        raise NotImplementedError

    def _join(self, lane: Any, rows: list[Row], state: Any, alive: list[int]) -> None:
        """Add ``rows[i] for i in alive`` (prefilled together, ``state``) to the lane; the
        others already ended and are dropped."""
        raise NotImplementedError

    def _decode(self, lane: Any) -> None:
        """One step for every row of the lane (`_step_row` each); rows that ended leave."""
        raise NotImplementedError

    def _drop(self, lane: Any, keep: list[int]) -> None:
        """Keep only these rows of the lane (the others' call failed)."""
        raise NotImplementedError

    def _fits(self, running: int, admitted: Sequence[Call], call: Call) -> bool:
        """Whether ``call`` may join now (room by rows; a lane may also count its cache)."""
        return running + sum(len(c.jobs) for c in admitted) + len(call.jobs) <= self.max_rows

    def _engine_context(self) -> AbstractContextManager[Any]:
        """Entered once around the engine thread's life."""
        return nullcontext()

    def _reset_lanes(self) -> None:
        for lane in self._lanes.values():
            self._drop(lane, [])

    # ---- the caller's side -----------------------------------------------------------------

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = (), stop: threading.Event | None = None
                 ) -> list[Generated]:
        """Generate every job (blocking); ``stop`` ends this call's rows at their next step
        (their text so far is returned, not finished).

        More jobs than ``max_rows`` go to the engine as several calls of at most that many
        rows (a reply's candidates stay together where they fit), so no call can be larger
        than the running batch may be; they run side by side as room allows."""
        if not jobs:
            return []
        stop = stop or threading.Event()
        calls = [Call(part, _shifted(on_text, start),
                      frozenset(r - start for r in stream_rows if start <= r < start + len(part)),
                      stop, [None] * len(part), len(part))
                 for start, part in _parts(jobs, self.max_rows)]
        with self._lock:
            self._calls.extend(calls)
        try:
            for call in calls:
                self._submit(call)
            for call in calls:
                self._wait(call)
        finally:
            with self._lock:
                for call in calls:
                    self._calls.remove(call)
        for call in calls:
            if call.error is not None:
                raise call.error
        return [r for call in calls for r in call.results if r is not None]

    def run_on_engine(self, work: Callable[[], Any], when_idle: bool = False) -> Any:
        """``work()`` on the engine thread, between two decode steps (blocking); with
        ``when_idle`` only while it has no rows and nothing else waits: background work that
        never delays a request by more than itself."""
        if threading.current_thread() is self._thread:
            return work()
        job = SideJob(work, idle=when_idle)
        self._submit(job)
        self._wait(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _submit(self, item: Call | SideJob) -> None:
        """Hand ``item`` to the engine thread, starting the thread if needed."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
        self._incoming.put(item)

    def _wait(self, item: Call | SideJob) -> None:
        """Wait until the engine thread is done with ``item`` (submitted first)."""
        while not item.done.wait(1.0):
            if self._thread is None or not self._thread.is_alive():  # it failed: say so
                item.error = item.error or RuntimeError("the engine thread stopped")
                break

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
            with torch.inference_mode(), self._engine_context():
                self._serve()
        except Exception as exc:  # a bug, not a bad request: fail what waits; the next
            log.exception("the engine stopped")  # generate() starts a fresh thread
            self._reset_lanes()
            with self._lock:
                for call in self._calls:
                    if not call.done.is_set():
                        call.error = exc
                        call.done.set()
            while True:
                try:
                    item = self._incoming.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, SideJob):
                    item.error = exc
                    item.done.set()
            self._fail_idle(exc)

    def _fail_idle(self, exc: BaseException) -> None:
        """End the side jobs that waited for an idle engine with ``exc``."""
        idle, self._idle = self._idle, []
        for job in idle:
            job.error = exc
            job.done.set()

    def _running(self) -> int:
        return sum(len(lane.rows) for lane in self._lanes.values())

    def _serve(self) -> None:
        backlog: list[Call] = []  # calls waiting for room
        closing = False
        while True:
            if not self._running() and not backlog:
                self._take(self._next_when_idle(), backlog)
            while True:
                try:
                    self._take(self._incoming.get_nowait(), backlog)
                except queue.Empty:
                    break
            if None in backlog:
                closing = True
                backlog = [c for c in backlog if c is not None]
                for call in self._calls:
                    call.stop.set()
            admitted: list[Call] = []
            running = self._running()
            while backlog and ((not running and not admitted)
                               or self._fits(running, admitted, backlog[0])):
                admitted.append(backlog.pop(0))
            self._admit(admitted)
            if not self._running():
                if closing and not backlog:
                    self._fail_idle(RuntimeError("the engine closed"))
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
                    self._drop(lane, [])
            self.most_rows = max(self.most_rows, self._running())

    def _next_when_idle(self) -> Call | SideJob | None:
        """The next item handed in; until one comes, the idle side jobs run one by one."""
        while self._idle:
            try:
                return self._incoming.get_nowait()
            except queue.Empty:
                self._idle.pop(0).run()
        return self._incoming.get()

    def _take(self, item: Call | SideJob | None, backlog: list[Any]) -> None:
        """A side job runs now (an idle one waits for an idle engine); a call (or None,
        closing) joins the backlog."""
        if isinstance(item, SideJob) and item.idle:
            self._idle.append(item)
        elif isinstance(item, SideJob):
            item.run()
        else:
            backlog.append(item)

    def _admit(self, calls: list[Call]) -> None:
        """Prefill the calls that arrived together, one pass per lane; if that fails, each
        call once more alone, so only a call that fails by itself gets the error."""
        for group in ([calls] if len(calls) > 1 else []) + [[c] for c in calls]:
            group = [c for c in group if not c.prefilled and not c.done.is_set()]
            if not group:
                continue
            owners = [(call, index) for call in group for index in range(len(call.jobs))]
            by_lane: dict[int, list[tuple[Call, int]]] = {}
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
            for lane, (joining, state) in prefilled:
                if self.prefill_in_step:  # the rows pick their first token after it runs
                    self._join(lane, joining, state, list(range(len(joining))))
                    continue
                alive = [i for i, row in enumerate(joining) if self._step_row(row)]
                self._join(lane, joining, state, alive)

    def _step_row(self, row: Row) -> bool:
        """Pick the row's next token from its logits; False when it ended (and left)."""
        controls = row.call.jobs[row.index].controls
        if row.penalties is None:
            row.penalties = RowPenalties(row.prompt, controls.repetition_penalty,
                                         controls.no_repeat_ngram_size)
        token = int(row.sampler.choose(row.penalties(row.logits.float()))[0])
        if token in self.eos or row.call.stop.is_set():
            row.finished = token in self.eos
            self._leave(row)
            return False
        row.tokens.append(token)
        row.penalties.push(token)
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

    def _leave(self, row: Row) -> None:
        call = row.call
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        call.results[row.index] = Generated(text, len(row.tokens), row.finished,
                                            (time.perf_counter() - call.started) * 1000)
        call.left -= 1
        if call.left == 0:
            call.done.set()

    def _fail(self, call: Call, exc: BaseException) -> None:
        """End a call with an error; its rows leave their lanes."""
        for lane in self._lanes.values():
            keep = [i for i, r in enumerate(lane.rows) if r.call is not call]
            if len(keep) < len(lane.rows):
                self._drop(lane, keep)
        if not call.done.is_set():
            call.error = exc
            call.done.set()


def _parts(jobs: Sequence[GenerationJob], size: int
           ) -> list[tuple[int, Sequence[GenerationJob]]]:
    """``jobs`` in runs of at most ``size``, each with the index of its first job; a run ends
    where a prompt's jobs (a reply's candidates, side by side) end when one fits."""
    parts: list[tuple[int, Sequence[GenerationJob]]] = []
    start = 0
    while start < len(jobs):
        end = min(start + size, len(jobs))
        if end < len(jobs):
            cut = end
            while cut > start and jobs[cut].prompt == jobs[cut - 1].prompt:
                cut -= 1
            if cut > start:  # else one prompt's jobs outnumber the rows: split them
                end = cut
        parts.append((start, jobs[start:end]))
        start = end
    return parts


def _shifted(on_text: OnText | None, offset: int) -> OnText | None:
    """``on_text`` for a part of a call's jobs: its rows are numbered within the whole."""
    if on_text is None or offset == 0:
        return on_text
    return lambda row, text: on_text(row + offset, text)
