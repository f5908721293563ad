"""The worker's output side: a batch's generations made into replies (candidates cleaned,
the reply choice, /compare variants) and, while rows generate, the partial events that stream
a reply's text so far to its frontend."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import redis.asyncio as aioredis

from base.keys import HYBRID_VARIANT, Keys
from base.metrics import WorkerMetrics
from base.protocol import Reply, Request, Variant
from base.redis_conn import REDIS_DOWN
from engine.generation import Generated, GenerationJob
from engine.listener import Listener
from engine.task import Task
from persona.canon import CanonPool
from persona.pack import Controls, Persona
from persona.postprocess import reply_candidate
from persona.reply_choice import (
    CANON,
    GENERATED,
    Candidate,
    CanonScores,
    pick,
    sure_canon,
)
from persona.reply_choice import Listener as ReplyListener

PARTIAL_EVERY_S = 0.3  # at most one partial event per streamed reply in this time


@contextlib.contextmanager
def _timed_choice(task: Task) -> Iterator[None]:
    """Add the time the block takes to ``task.choice_s`` (house_reply_choice_seconds)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        task.choice_s += time.perf_counter() - started


class ReplyBuilder:
    """Replies from a batch's outputs, as the worker and the evaluation choose them."""

    def __init__(self, persona: Persona, defaults: Controls, worker: str, default_adapter: str,
                 canon_candidates: int, metrics: WorkerMetrics,
                 scorer: Callable[[Sequence[str]], Sequence[float]] | None = None,
                 canon: CanonPool | None = None, listener: Listener | None = None,
                 shortlist: int = 10, listener_weight: float = 1.0,
                 others: Callable[[Task], int] | None = None, busy_requests: int = 0,
                 busy_shortlist: int = 0, sure_fit: float | None = None,
                 sure_cosine: float | None = None):
        self.persona = persona
        self.defaults = defaults
        self.worker = worker
        self.default_adapter = default_adapter
        self.canon_candidates = canon_candidates
        self.metrics = metrics
        self.scorer = scorer
        self.canon = canon
        self.listener = listener
        self.shortlist = shortlist
        self.listener_weight = listener_weight
        # Under load the listener does less: with ``others(task)`` other requests in hand it
        # re-ranks only ``busy_shortlist`` lines, and none from ``busy_requests`` on (0: never)
        self.others = others
        self.busy_requests = busy_requests
        self.busy_shortlist = busy_shortlist
        # a hybrid reply is the best canon line, nothing generated, when its fit reaches
        # ``sure_fit`` (with the listener) or ``sure_cosine`` (without); None: never
        self.sure_fit = sure_fit
        self.sure_cosine = sure_cosine

    def generated_candidates(self, task: Task, variant: int, outputs: list[Generated]
                             ) -> list[Candidate]:
        controls = task.controls or self.defaults
        n = controls.candidates
        candidates = []
        for r in task.rows[variant * n : (variant + 1) * n]:
            text = reply_candidate(outputs[r].text, outputs[r].finished,
                                   self.persona.other_speakers, controls.sentence_cap,
                                   self.persona.system_prompt)
            candidates.append(Candidate(text, GENERATED, source=r))
        return candidates

    def _choosing(self, task: Task) -> tuple[ReplyListener | None, int]:
        """The listener (None: the selector's cosine alone) and shortlist of ``task``'s reply
        choice, decided once per task: a hybrid reply's two steps (`sure_canon`, `pick`) must
        score on one scale, whatever the load in between."""
        if task.scores is None:
            task.scores = CanonScores()
            others = self.others(task) if self.others is not None else 0
            busy = bool(self.busy_requests) and others >= self.busy_requests
            task.listens = self.listener is not None and bool(task.prompt) and not busy
            task.shortlist = self.shortlist
            if self.listener is not None and task.prompt and busy:
                self.metrics.listener_skipped.inc()  # the selector's cosine alone
            elif task.listens and others and self.busy_shortlist:
                task.shortlist = min(self.shortlist, self.busy_shortlist)
        if not task.listens or self.listener is None:
            return None, task.shortlist
        prompt, scorer = task.prompt, self.listener

        def listener(texts: Sequence[str]) -> Sequence[float]:
            return scorer.pmi(prompt, texts)
        return listener, task.shortlist

    def pick(self, task: Task, generated: list[Candidate], mode: str) -> Candidate | None:
        controls = task.controls or self.defaults
        with _timed_choice(task):
            listener, shortlist = self._choosing(task)
            return pick(mode, task.text, generated, self.canon, self.scorer,
                        self.canon_candidates, task.context, task.heard, task.mentioned,
                        controls.sentence_cap, listener, shortlist, self.listener_weight,
                        task.scores)

    def sure_canon(self, task: Task) -> Reply | None:
        """A hybrid request's reply before anything is generated, when the best canon line is
        sure to win (`persona.reply_choice.sure_canon`; HYBRID_SURE_FIT with the listener,
        HYBRID_SURE_COSINE without); None: generate."""
        if self.canon is None:
            return None
        controls = task.controls or self.defaults
        with _timed_choice(task):
            listener, shortlist = self._choosing(task)
            assert task.scores is not None
            winner = sure_canon(task.text, self.canon, self.sure_fit, self.sure_cosine,
                                task.scores, self.canon_candidates, task.context, task.heard,
                                task.mentioned, controls.sentence_cap, listener, shortlist,
                                self.listener_weight)
        if winner is None:
            return None
        task.canon_row = winner.row
        self.metrics.winners.labels(CANON).inc()
        self.metrics.canon_first.inc()
        return self.reply(task.request, text=winner.text, tokens=0, generation_ms=0.0,
                          won=CANON)

    def make_reply(self, task: Task, jobs: list[GenerationJob],
                   outputs: list[Generated]) -> Reply:
        request = task.request
        if not outputs and (task.rows or task.mode != CANON):
            return self.reply(request, error=self.persona.line("timeout"))
        variants = []
        won = GENERATED
        for v, name in enumerate(task.variants):
            if name == HYBRID_VARIANT and task.answer is not None:  # the bot's answer
                kind, text = task.answer
                variants.append(Variant(name=name, text=text, won=kind))
                continue
            if name == HYBRID_VARIANT:
                default = task.variants.index(self.default_adapter)
                winner = self.pick(task, self.generated_candidates(task, default, outputs),
                                   HYBRID_VARIANT)
            elif request.kind == "compare" or task.mode != CANON:
                mode = GENERATED if request.kind == "compare" else task.mode
                winner = self.pick(task, self.generated_candidates(task, v, outputs), mode)
            else:
                winner = self.pick(task, [], CANON)
            text = winner.text if winner is not None else self.persona.line("fallback")
            out = outputs[winner.source] if winner is not None and winner.kind == GENERATED \
                else None
            if name != HYBRID_VARIANT and request.kind != "compare" and winner is not None:
                won = winner.kind
                task.canon_row = winner.row
            variants.append(Variant(name=name, text=text, tokens=out.tokens if out else 0,
                                    ms=round(out.ms, 1) if out else 0.0,
                                    won=winner.kind if winner is not None else None))
        if request.kind == "compare":
            return self.reply(request, variants=variants)
        self.metrics.winners.labels(won).inc()
        return self.reply(request, text=variants[0].text, tokens=variants[0].tokens,
                          generation_ms=variants[0].ms, won=won)

    def reply(self, request: Request, **fields) -> Reply:  # type: ignore[no-untyped-def]
        return Reply(id=request.id, conversation=request.conversation, worker=self.worker,
                     kind=request.kind, route=request.route,
                     queued_ms=round(max(0.0, time.time() - request.created_at) * 1000, 1),
                     **fields)


class PartialEvents:
    """The text so far of streamed rows, published as numbered partial events on the
    frontend's reply stream (the final reply, written after them, supersedes them)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, replies: ReplyBuilder, enabled: bool,
                 stream_maxlen: int):
        self.redis = redis
        self.keys = keys
        self.replies = replies
        self.enabled = enabled
        self.stream_maxlen = stream_maxlen
        self._writes: set[asyncio.Task[None]] = set()

    def streamed_rows(self, tasks: list[Task]) -> dict[int, Task]:
        """The row each streamed reply shows while it generates: its first candidate."""
        if not self.enabled:
            return {}
        return {task.rows[0]: task for task in tasks
                if task.rows and task.reply is None and task.request.kind in ("chat", "retry")}

    @staticmethod
    def due(task: Task) -> bool:
        """Whether the task's next partial event may go out (``PARTIAL_EVERY_S`` since its
        last); asked on the generating thread at every step, so that the text of a step in
        between never wakes the event loop."""
        return time.monotonic() - task.partial_at >= PARTIAL_EVERY_S

    def heard(self, streams: dict[int, Task], row: int, text: str) -> None:
        """A streamed row's text so far (on the event loop): published as a partial event at
        most every ``PARTIAL_EVERY_S``, cleaned as a candidate is, from two words on."""
        task = streams[row]
        if not self.due(task):
            return
        now = time.monotonic()
        controls = task.controls or self.replies.defaults
        persona = self.replies.persona
        shown = reply_candidate(text, True, persona.other_speakers, controls.sentence_cap,
                                persona.system_prompt)
        if len(shown.split()) < 2 or shown == task.partial_text:
            return
        task.partials += 1
        task.partial_text, task.partial_at = shown, now
        event = self.replies.reply(task.request, text=shown, partial=task.partials)
        write = asyncio.create_task(self._publish(task.request.frontend, event))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _publish(self, frontend: str, event: Reply) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            await self.redis.xadd(self.keys.replies(frontend), event.dumps(),
                                  maxlen=self.stream_maxlen, approximate=True)

    async def written(self) -> None:
        """Partial events go out before the final reply that supersedes them."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
