"""The inference worker: the serving loop that joins intake (`engine.intake`: reading the
request stream, per-conversation order, leases, stale claims, lost requests), the engine
(`engine.scheduler` and its lanes, or `engine.generation`) and output (`engine.output`:
replies and partial events), and decides each request's outcome (dead letters, control
requests answered at once, outages). Each reply is written with its ACK in one MULTI.

Outcomes per request:
- answered: reply + history + ACK in one transaction;
- error: a user-facing sentence in the reply (timeout, bad request) + ACK;
- dead letter: delivered more than ``max_deliveries`` times → copied to the dead-letter
  stream, the user gets an apology, ACK;
- deferred: Redis failed while writing → no ACK; the request stays pending and is claimed
  again (XAUTOCLAIM) after ``claim_idle_ms``;
- lost: the entry vanished from the stream (deleted by hand) → the user gets an apology,
  built from the request's envelope (`Keys.envelopes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from base.commands import HISTORY_KINDS
from base.config import Settings
from base.keys import BASE_VARIANT, HEALTH_WINDOW_S, HYBRID_VARIANT, WORKERS_GROUP, Keys
from base.metrics import WorkerMetrics
from base.protocol import ProtocolError, Reply, Request
from base.queue_client import ensure_group, queue_depth
from base.redis_conn import REDIS_DOWN
from base.signals import on_stop_signals
from engine.generation import BackendUnavailable, Generated, GenerationJob, Generator, OnText
from engine.history import HistoryStore
from engine.intake import Intake, conversation_of, needs_no_model, remove_commands, split_quick
from engine.listener import Listener
from engine.output import PartialEvents, ReplyBuilder
from engine.task import Task
from persona.canon import CanonPool
from persona.pack import Controls, Persona
from persona.prompt import Turn, clean_user_text, render_prompt
from persona.reply_choice import (
    CANON,
    DIFFERENTIAL,
    GENERATED,
    HYBRID,
    MODES,
    TOPIC,
    canned_reply,
    written_answer,
)

log = logging.getLogger(__name__)

CONTROL_LANE_BLOCK_MS = 50
# Seconds in which the messages a worker took count as in hand for the listener's load rule.
LOAD_WINDOW_S = 1.0
# Seconds between tries of a batch while the inference server is unavailable.
BACKEND_RETRY_S = 2.0

def last_exchanges(history: Sequence[Turn], exchanges: int = 1) -> list[Turn]:
    """The last ``exchanges`` exchanges before the new message (a user turn and House's
    reply each, older first); nothing when the conversation starts."""
    end = len(history)
    while len(history) - end < 2 * exchanges and end >= 2 \
            and history[end - 1].role == "assistant" and history[end - 2].role == "user":
        end -= 2
    return list(history[end:])


def selector_context(history: Sequence[Turn], exchanges: int = 1) -> tuple[str, ...]:
    """The texts of the last ``exchanges`` exchanges, as the selector was trained to read
    them."""
    return tuple(turn.content for turn in last_exchanges(history, exchanges))


class GenerationFailed(RuntimeError):
    """generate() raised (not a timeout)."""


def alone_ok(outputs: Sequence[Generated | None], tasks: Sequence[Task]) -> bool:
    """True when every remaining task's rows were generated."""
    return all(outputs[r] is not None for t in tasks for r in t.rows)


def request_seed(request: Request, controls: Controls) -> int:
    """A per-request seed: the request's own ``seed`` setting, else derived from its id, so a
    redelivered request gets the same reply."""
    if "seed" in request.settings:
        return controls.seed
    return int(hashlib.sha1(request.id.encode()).hexdigest()[:8], 16)


class Worker:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        generator: Generator,
        persona: Persona,
        settings: Settings | None = None,
        metrics: WorkerMetrics | None = None,
        scorer: Callable[[Sequence[str]], Sequence[float]] | None = None,
        canon: CanonPool | None = None,
        listener: Listener | None = None,
    ):
        self.redis = redis
        self.keys = keys
        self.generator = generator
        self.persona = persona
        self.settings = settings or Settings()
        self.name = self.settings.worker.name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or WorkerMetrics()
        self.scorer = scorer
        self.canon = canon
        self.history = HistoryStore(redis, keys, self.settings.history.max_turns,
                                    self.settings.history.ttl_s)
        self.defaults = persona.controls.merged(self.settings.generation.overrides())
        self.output = ReplyBuilder(persona, self.defaults, self.name,
                                        self.settings.model.default_adapter,
                                        self.settings.reply_choice.canon_candidates, self.metrics,
                                        scorer, canon, listener,
                                        self.settings.reply_choice.canon_shortlist,
                                        self.settings.reply_choice.listener_weight,
                                        self._others_in_hand,
                                        self.settings.reply_choice.listener_busy_requests,
                                        self.settings.reply_choice.listener_busy_shortlist,
                                        self.settings.reply_choice.hybrid_sure_fit,
                                        self.settings.reply_choice.hybrid_sure_cosine)
        self.partials = PartialEvents(redis, keys, self.output,
                                      self.settings.frontend.stream_replies,
                                      self.settings.redis.stream_maxlen)
        self.stop = asyncio.Event()
        self.batches = 0
        self.replies = 0
        self._signals = 0
        self.intake = Intake(redis, keys, self.settings, self.metrics, self.name, self.stop,
                             self.joins, self._apologise)
        self._told_outage: set[str] = set()  # entries told "House is out" (server down)
        self._model_lock = threading.Lock()
        # One thread per generate() call in flight: with a generator that joins calls, each
        # request's call waits in its own thread while its rows run, and the event loop's
        # default executor (cores + 4 threads) would cap the running batch at that many.
        # Made when first needed; `run` shuts it down when it returns.
        self._callers: ThreadPoolExecutor | None = None
        self._holding: dict[str, str | None] = {}  # entry → conversation, in running batches
        self._taken: deque[tuple[float, str]] = deque()  # messages taken lately: when, whose
        self._backoff = 0.1  # seconds before the next read after a Redis failure

    # ---- lifecycle -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """First SIGTERM/SIGINT: finish the batch in flight, then exit. Second: exit now."""
        on_stop_signals(self._on_signal)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: finishing the batch in flight, then stopping", sig.name)
        self.stop.set()

    async def run(self, burst: bool = False) -> None:
        """Serve until stopped; with ``burst`` return once nothing is left to read."""
        await ensure_group(self.redis, self.keys.requests, WORKERS_GROUP)
        log.info("worker %s serving %s (batch %d)", self.name, self.keys.requests,
                 self.settings.worker.batch_size)
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        done_priming = threading.Event()
        priming = threading.Thread(target=self._prime_listener, args=(done_priming,),
                                   name="listener-prime", daemon=True)
        priming.start()
        try:
            await self._serve(burst)
        finally:
            done_priming.set()
            await asyncio.to_thread(priming.join, 10)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
                await heartbeat
                await self.redis.delete(self.keys.health(self.name))
            if self._callers is not None:  # a generation that timed out may still be ending
                self._callers.shutdown(wait=False)
                self._callers = None
        log.info("worker %s stopped after %d batches, %d replies", self.name,
                 self.batches, self.replies)

    def _prime_listener(self, stop: threading.Event) -> None:
        """Score the listener's empty-message term of every canon line while the engine is
        idle (`Listener.prime`, LISTENER_PRIME), so that later replies' PMI costs half."""
        listener = self.output.listener
        if not isinstance(listener, Listener) or self.canon is None \
                or not self.settings.reply_choice.listener_prime:
            return
        started = time.perf_counter()
        try:
            scored = listener.prime([line.text for line in self.canon.lines], stop)
        except Exception:
            log.warning("the listener stopped priming", exc_info=True)
            return
        if scored:
            log.info("listener: scored %d canon lines' empty-message terms in %.0f s", scored,
                     time.perf_counter() - started)

    @property
    def joins(self) -> bool:
        """The generator lets concurrent calls join one running batch (continuous batching)."""
        return bool(getattr(self.generator, "joins", False))

    async def _serve(self, burst: bool) -> None:
        if self.joins:
            await self._serve_continuously(burst)
            return
        while not self.stop.is_set() or self.intake.carry:
            self.metrics.beat()
            entries = await self._guarded(self.intake.read_batch(block=not burst))
            if entries is None:
                continue
            if not entries:
                if burst and not self.intake.carry:
                    return
                continue
            answered = 0
            for part in split_quick(entries):  # a /reset never waits for a chat's reply
                if part:
                    answered += await self.process_batch(part)
            if answered == 0 and self.intake.carry:
                await asyncio.sleep(0.02)  # only waiting requests: let their turn come

    async def _serve_continuously(self, burst: bool) -> None:
        """With a generator that joins calls (`engine.continuous`): read while batches run,
        and start each batch read at once, so its rows join the running batch at the next
        decode step; up to ``batch_size`` requests in flight. Past that, requests that need
        no model are still read and answered in their own batch in milliseconds; the others
        wait, carried (at most ``batch_size``)."""
        running: set[asyncio.Task[int]] = set()
        size = self.settings.worker.batch_size
        renew_at = 0.0
        while not self.stop.is_set() or self.intake.carry or running:
            self.metrics.beat()
            room = size - len(self._holding)
            if running and (self.stop.is_set() or (room <= 0 and len(self.intake.carry) >= size)):
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if room > 0:
                entries = await self._guarded(self.intake.read_batch(
                    block=not burst, size=room,
                    block_ms=CONTROL_LANE_BLOCK_MS if running else None))
            else:  # full: read on for what needs no model; the rest waits, carried
                entries = await self._guarded(self.intake.read_new(
                    size - len(self.intake.carry), None if burst else CONTROL_LANE_BLOCK_MS))
                if entries:
                    quick, rest = split_quick(entries)
                    self.intake.carry += rest
                    entries = quick
                if self.intake.carry and time.monotonic() >= renew_at:  # leased while waiting
                    renew_at = time.monotonic() + self.settings.worker.claim_idle_ms / 3000
                    await self._guarded(self.intake.renew([eid for eid, _ in self.intake.carry]))
            if entries is None:
                continue
            if not entries:
                if running:
                    if burst:
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if burst and not self.intake.carry:
                    return
                if self.intake.carry:
                    await asyncio.sleep(0.02)  # only waiting requests: let their turn come
                continue
            for part in (p for p in split_quick(entries) if p):  # /reset never waits for chats
                batch = asyncio.create_task(self._run_batch(part))
                running.add(batch)
                batch.add_done_callback(running.discard)

    async def _guarded(self, read: Awaitable[Any]) -> Any:
        """``read``'s result, or None after a Redis failure (waited out with backoff) or a
        missing consumer group (created again): the serving loop then reads again."""
        try:
            result = await read
        except REDIS_DOWN as exc:
            log.warning("Redis unavailable (%s); retrying in %.1fs", type(exc).__name__,
                        self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)
            return None
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self.redis, self.keys.requests, WORKERS_GROUP)
            return None
        self._backoff = 0.1
        return result

    async def _run_batch(self, entries: list[tuple[str, dict[str, str]]]) -> int:
        for entry_id, fields in entries:
            conversation = conversation_of(fields)
            self._holding[entry_id] = conversation
            if conversation:
                self.intake.busy[conversation] = self.intake.busy.get(conversation, 0) + 1
        try:
            return await self.process_batch(entries)
        finally:
            for entry_id, _ in entries:
                self._release(entry_id)

    def _release(self, entry_id: str) -> None:
        """The request no longer holds a place among those in flight (answered, or its batch
        ended): its conversation's next request may be read and answered."""
        if entry_id not in self._holding:
            return
        conversation = self._holding.pop(entry_id)
        if conversation:
            self.intake.busy[conversation] -= 1
            if not self.intake.busy[conversation]:
                del self.intake.busy[conversation]

    async def _heartbeat(self, every_s: float = 5.0) -> None:
        """Refresh the health key while the process lives, generation in flight included (the
        frontends read it to tell users whether a worker is there)."""
        while True:
            with contextlib.suppress(*REDIS_DOWN):
                await self.record_health()
            await asyncio.sleep(every_s)

    async def record_health(self) -> None:
        await self.redis.set(
            self.keys.health(self.name),
            json.dumps({"ts": time.time(), "batches": self.batches, "replies": self.replies}),
            ex=HEALTH_WINDOW_S,
        )

    # ---- reading ---------------------------------------------------------------------------

    async def _apologise(self, entry_id: str, envelope: str) -> None:
        try:
            request = Request.model_validate_json(envelope)
        except ValueError:
            log.error("lost request %s had a malformed envelope", entry_id)
            return
        log.error("request %s (entry %s) vanished from the stream; apologising",
                  request.id, entry_id)
        self.metrics.lost.inc()
        reply = self.reply(request, error=self.persona.line("lost"))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.replies(request.frontend), reply.dumps(),
                      maxlen=self.settings.redis.stream_maxlen, approximate=True)
            remove_commands(pipe, self.keys, entry_id, request.conversation)
            pipe.hincrby(self.keys.stats, "lost", 1)
            await pipe.execute()

    async def _tell_outage(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Once per request: a partial event with the "House is out" line (the final reply
        replaces it when the server is back); the request itself stays pending."""
        for entry_id, fields in entries:
            if entry_id in self._told_outage:
                continue
            try:
                request = Request.loads(fields)
            except ProtocolError:
                continue
            self._told_outage.add(entry_id)
            notice = self.reply(request, text=self.persona.line("outage"), partial=1)
            with contextlib.suppress(*REDIS_DOWN):
                await self.redis.xadd(self.keys.replies(request.frontend), notice.dumps(),
                                      maxlen=self.settings.redis.stream_maxlen, approximate=True)

    # ---- processing ------------------------------------------------------------------------

    async def process_batch(self, entries: list[tuple[str, dict[str, str]]]) -> int:
        """Answer a batch; returns how many requests were answered. Requests that must wait
        (an older request of their conversation is unanswered) or whose answer could not be
        written (Redis down) are carried to the next batch."""
        started = time.perf_counter()
        finished: set[str] = set()
        # The lease covers the batch and what is carried (the control lane adds what it reads).
        held = [eid for eid, _ in entries + self.intake.carry]
        try:
            async with self.intake.leased(held):
                await self._answer(entries, finished, held)
        except REDIS_DOWN as exc:
            log.warning("Redis unavailable mid-batch (%s); the batch is retried",
                        type(exc).__name__)
        except BackendUnavailable as exc:
            log.warning("inference server unavailable (%s); %d requests wait for it", exc,
                        len(entries))
            await self._tell_outage(entries)
            await asyncio.sleep(BACKEND_RETRY_S)
        self._told_outage.difference_update(finished)
        self.intake.keep_for_later(entries, finished)
        log.info("batch of %d requests answered %d in %.0f ms", len(entries), len(finished),
                 (time.perf_counter() - started) * 1000)
        return len(finished)

    async def _answer(self, entries: list[tuple[str, dict[str, str]]], finished: set[str],
                      held: list[str]) -> None:
        """Admit, prepare, generate, reply; the entry ids answered are added to ``finished``."""
        tasks = await self._admit(entries)
        if not tasks:
            return
        self.batches += 1
        self.metrics.batch_size.observe(len(tasks))
        self.metrics.queue_depth.set(await queue_depth(self.redis, self.keys))
        jobs: list[GenerationJob] = []
        for task in list(tasks):
            mark = len(jobs)
            try:
                await self.prepare(task, jobs)
            except REDIS_DOWN:
                raise
            except Exception:
                log.exception("preparing request %s failed", task.request.id)
                del jobs[mark:]
                await self._poisoned(task, "prepare failed", tasks)
                continue
            if task.reply is not None:  # answered already: it waits for no one's generation
                await self._finish_answered(task, tasks, finished)
        streams = self.partials.streamed_rows(tasks)
        if jobs and self.joins:  # the serving loop reads on meanwhile
            await self._answer_each(tasks, jobs, streams, finished)
            return
        outputs: list[Generated] = []
        if jobs:
            outputs = await self._with_control_lane(
                self._generate_isolated(tasks, jobs, streams), held)
        await self.partials.written()
        pending = [task for task in tasks if task.reply is None]
        if pending:
            replies = await self._make_replies(pending, jobs, outputs)
            for task, reply in zip(pending, replies, strict=True):
                if reply is None:
                    await self._poisoned(task, "reply failed", tasks)
                else:
                    task.reply = reply
        for task in tasks:
            await self._write(task, len(tasks), finished)

    async def _answer_each(self, tasks: list[Task], jobs: list[GenerationJob],
                           streams: dict[int, Task], finished: set[str]) -> None:
        """With a generator that joins calls (continuous batching): every request generates
        its own rows, which join the running batch, and its reply is written the moment they
        end, never after a batch-mate's longer one. A request whose generation fails is
        dead-lettered alone."""
        size = len(tasks)

        async def answer(task: Task) -> None:
            own = [jobs[r] for r in task.rows]
            streamed = {0: task} if task.rows and task.rows[0] in streams else None
            task.rows = list(range(len(own)))  # its rows, numbered in its own job list
            outputs: list[Generated] = []
            if own:
                try:
                    outputs = await self._generate(own, streamed)
                except GenerationFailed:
                    self.metrics.generation_failed()
                    await self._poisoned(task, "generation failed", tasks)
                    return
                self.metrics.generation_ok()
            await self.partials.written()
            task.reply = (await self._make_replies([task], own, outputs))[0]
            if task.reply is None:
                await self._poisoned(task, "reply failed", tasks)
                return
            await self._write(task, size, finished)

        results = await asyncio.gather(*(answer(t) for t in tasks if t.reply is None),
                                       return_exceptions=True)
        for failure in results:  # raised once every request's answer has ended
            if isinstance(failure, BaseException):
                raise failure

    async def _finish_answered(self, task: Task, tasks: list[Task], finished: set[str]
                               ) -> None:
        """Write the reply of a task answered while preparing (a control request, a sure canon
        line; the only request of its conversation in the batch) and take it out of
        ``tasks``, so it never waits for the others' generation or listening."""
        await self._write(task, len(tasks), finished)
        tasks.remove(task)

    async def _write(self, task: Task, batch_size: int, finished: set[str]) -> None:
        """Write the task's reply (`finish`); once written, its entry id joins ``finished``
        and its place among the requests in flight frees."""
        assert task.reply is not None
        task.reply.batch_size = batch_size
        if await asyncio.shield(self.finish(task)):
            finished.add(task.entry_id)
            self._release(task.entry_id)

    async def _with_control_lane(self, generation: Awaitable[list[Generated]],
                                 held: list[str]) -> list[Generated]:
        """Run the batch's generation while the control lane answers what needs no model."""
        running = asyncio.ensure_future(generation)
        lane = asyncio.create_task(self._control_lane(running, held), name="control-lane")
        try:
            return await running
        finally:
            await lane  # ends within one read (50 ms) of the generation

    async def _control_lane(self, running: asyncio.Future[Any], held: list[str]) -> None:
        """While a batch generates, read new requests and answer at once those that need no
        model (`/reset`, `/forget`, a message without words) and are their conversation's
        oldest unanswered request; the others (and a control request behind an unanswered one
        of its conversation) wait, leased, for the next batch. So a control request is
        answered in milliseconds, never behind someone else's generation."""
        while not running.done() and not self.stop.is_set():
            if len(self.intake.carry) >= self.settings.worker.batch_size:  # enough read ahead
                await asyncio.wait([running], timeout=CONTROL_LANE_BLOCK_MS / 1000)
                continue
            try:
                entries = await self.intake.read_new(self.settings.worker.batch_size,
                                               CONTROL_LANE_BLOCK_MS)
            except REDIS_DOWN:
                await asyncio.wait([running], timeout=0.5)
                continue
            if not entries:
                continue
            held.extend(eid for eid, _ in entries)
            quick = [(eid, f) for eid, f in entries if needs_no_model(f)]
            answered: set[str] = set()
            if quick:
                try:
                    await self._answer(quick, answered, held)
                except REDIS_DOWN as exc:
                    log.warning("Redis unavailable in the control lane (%s)",
                                type(exc).__name__)
            self.intake.carry += [(eid, f) for eid, f in entries
                            if eid not in answered and eid not in self.intake.dropped]

    async def _admit(self, entries: list[tuple[str, dict[str, str]]]) -> list[Task]:
        """Parse the entries, dead-letter the bad ones, and keep one request per conversation,
        the oldest unanswered one (the head of its order list)."""
        counts = await self.intake.delivery_counts([eid for eid, _ in entries])
        parsed: list[tuple[str, Request]] = []
        for (entry_id, fields), delivered in zip(entries, counts, strict=True):
            try:
                request = Request.loads(fields)
            except ProtocolError as exc:
                log.error("malformed request %s: %s", entry_id, exc)
                await self._dead_letter(entry_id, fields, None, "malformed")
                self.intake.drop(entry_id)
                continue
            if delivered > self.settings.worker.max_deliveries:
                await self._dead_letter(entry_id, fields, request, "too many deliveries")
                self.intake.drop(entry_id)
                continue
            parsed.append((entry_id, request))
        heads = await self.intake.heads([request.conversation for _, request in parsed])
        tasks: list[Task] = []
        conversations: set[str] = set()
        for (entry_id, request), head in zip(parsed, heads, strict=True):
            full = len(tasks) >= self.settings.worker.batch_size
            if full or request.conversation in conversations or (
                    head not in (None, entry_id)
                    and not await self.intake.is_next(entry_id, request.conversation)):
                continue  # carried: answered after the older request of its conversation
            conversations.add(request.conversation)
            self.metrics.queue_seconds.observe(max(0.0, time.time() - request.created_at))
            tasks.append(Task(entry_id, request))
        return tasks

    async def prepare(self, task: Task, jobs: list[GenerationJob]) -> None:
        """Answer control requests at once; add generation rows for the others."""
        request = task.request
        persona = self.persona
        if request.kind == "reset":
            if request.settings.get("scope") == "own":  # a shared group, not an admin
                await self.history.remove_turns_of(request.conversation, request.user)
                task.reply = self.reply(request, text=persona.line("reset_own"))
                return
            await self.history.reset(request.conversation)
            task.reply = self.reply(request, text=persona.line("reset"))
            return
        if request.kind == "forget":
            await self.history.forget(request.user)
            task.reply = self.reply(request, text=persona.line("forget"))
            return
        text, speaker = request.text, request.speaker
        if request.kind == "retry":
            last = await self.history.drop_last_exchange(request.conversation, request.user)
            if last is None:
                task.reply = self.reply(request, text=persona.line("retry_nothing"))
                return
            text, speaker = last
        text = clean_user_text(text, self.settings.frontend.max_message_chars)
        if not text:
            task.reply = self.reply(request, text=persona.line("empty"))
            return
        task.text, task.speaker = text, speaker
        # "???", another language, a bare "ok", a complaint or a topic the pack names: nothing
        # to generate (/compare shows the models, so only its jabs)
        canned = await self.canned(request, text)
        if canned is not None:
            kind, answer = canned
            written = kind in (DIFFERENTIAL, TOPIC)
            if written:
                self.output.metrics.winners.labels(kind).inc()
            task.reply = self.reply(request, text=answer, won=kind if written else None)
            return
        self._taken.append((time.monotonic(), request.conversation))
        self._forget_taken()
        task.controls = self.defaults.merged(request.settings)
        task.mode = self.reply_mode(request)
        if request.kind == "compare":
            wanted = request.variants or [BASE_VARIANT, *self.generator.adapters, HYBRID_VARIANT]
            hybrid = HYBRID_VARIANT in wanted and self.canon is not None
            task.variants = [v for v in wanted if v == BASE_VARIANT or v in
                             self.generator.adapters] or [BASE_VARIANT]
            if hybrid:
                if self.settings.model.default_adapter in self.generator.adapters and \
                        self.settings.model.default_adapter not in task.variants:
                    task.variants.append(self.settings.model.default_adapter)
                task.variants.append(HYBRID_VARIANT)
            if HYBRID_VARIANT in wanted:
                # what the bot answers a complaint or a topic the pack names, beside the models
                task.answer = written_answer(
                    persona, text, request_seed(request, self.defaults),
                    differentials=self.settings.reply_choice.differentials,
                    topics=self.settings.reply_choice.topics)
                if task.answer is not None and HYBRID_VARIANT not in task.variants:
                    task.variants.append(HYBRID_VARIANT)
        else:
            adapter = str(request.settings.get("adapter", self.settings.model.default_adapter))
            task.variants = [adapter if adapter in self.generator.adapters else BASE_VARIANT]
        history = [] if request.kind == "compare" else await self.history.load(
            request.conversation)
        if self.canon is not None:
            task.context = selector_context(history, self.canon.selector.context_exchanges)
            task.mentioned = " ".join(t.content for t in history if t.role == "user")
        if self.canon is not None and (task.mode != GENERATED or request.kind == "compare"):
            # the repeat window matters only where canon lines compete (one Redis read)
            task.heard = await self.history.recent_canon(request.conversation)
        prompt = render_prompt(self.generator.tokenizer, persona, history, text, speaker,
                               self.settings.history.token_budget)
        if self.output.listener is not None:
            # the listener hears the last exchanges only, as it was measured: the whole
            # history made it slower than the generation it ranks
            heard = last_exchanges(history, self.settings.reply_choice.listener_exchanges)
            task.prompt = prompt if len(heard) == len(history) else render_prompt(
                self.generator.tokenizer, persona, heard, text, speaker,
                self.settings.history.token_budget)
        if task.mode == CANON and request.kind != "compare":
            return  # House's real lines only: nothing to generate
        if task.mode == HYBRID and request.kind != "compare":
            # a canon line sure to win is the reply: nothing generated, nothing waited for
            task.reply = await asyncio.to_thread(self.output.sure_canon, task)
            if task.reply is not None:
                return
        refined = prompt
        if self.canon is not None and self.settings.reply_choice.refine_examples > 0:
            # retrieve and refine: House's real exchanges for the message in the adapter's prompt
            examples = await asyncio.to_thread(self.canon.examples, text, task.context,
                                               self.settings.reply_choice.refine_examples,
                                               task.mentioned)
            refined = render_prompt(self.generator.tokenizer, persona, history, text, speaker,
                                    self.settings.history.token_budget, examples=examples)
        seed = request_seed(request, task.controls)
        for variant in task.variants:
            if variant == HYBRID_VARIANT:
                continue
            for k in range(task.controls.candidates):
                task.rows.append(len(jobs))
                jobs.append(GenerationJob(prompt if variant == BASE_VARIANT else refined,
                                          variant, task.controls, seed + k, text))

    async def canned(self, request: Request, text: str) -> tuple[str, str] | None:
        """A reply that needs no model (`canned_reply`: a jab, or House's answer to a complaint
        or a topic the pack names — not in /compare, which shows the models), one this
        conversation has not heard: such exchanges are kept in the history like any other."""
        written = request.kind != "compare"
        kinds = dict(differentials=written and self.settings.reply_choice.differentials,
                     topics=written and self.settings.reply_choice.topics)
        seed = request_seed(request, self.defaults)
        if canned_reply(self.persona, text, seed, **kinds) is None:
            return None
        said = {t.content for t in await self.history.load(request.conversation)
                if t.role == "assistant"}
        return canned_reply(self.persona, text, seed, avoid=said, **kinds)

    def reply_mode(self, request: Request) -> str:
        """The request's ``mode`` setting, else REPLY_MODE; generated when there is no canon
        pool (no selector or data set) to draw House's lines from."""
        mode = str(request.settings.get("mode", self.settings.reply_choice.mode))
        if mode not in MODES:
            mode = self.settings.reply_choice.mode
        return GENERATED if self.canon is None else mode

    async def _poisoned(self, task: Task, reason: str, tasks: list[Task]) -> None:
        """Dead-letter one request that fails on its own (the log has the traceback); its
        batch-mates go on."""
        log.error("request %s: %s; dead-lettered alone", task.request.id, reason)
        await self._dead_letter(task.entry_id, task.request.dumps(), task.request, reason)
        self.intake.drop(task.entry_id)
        tasks.remove(task)

    async def _generate_isolated(self, tasks: list[Task], jobs: list[GenerationJob],
                                 streams: dict[int, Task] | None = None) -> list[Generated]:
        """The batch's generations; when the batched call fails, each request's rows once
        more on their own, so only a request that fails alone is dead-lettered."""
        try:
            outputs = await self._generate(jobs, streams)
            self.metrics.generation_ok()
            return outputs
        except GenerationFailed:
            pass
        outputs: list[Generated | None] = [None] * len(jobs)  # type: ignore[no-redef]
        for task in [t for t in tasks if t.rows]:
            try:
                alone = await self._generate([jobs[r] for r in task.rows])
            except GenerationFailed:
                self.metrics.generation_failed()
                await self._poisoned(task, "generation failed", tasks)
                continue
            self.metrics.generation_ok()
            if alone:  # [] = timed out: the batch's requests get the timeout line
                for r, out in zip(task.rows, alone, strict=True):
                    outputs[r] = out
        if not alone_ok(outputs, tasks):
            return []
        return [o if o is not None else Generated("", 0, True, 0.0) for o in outputs]

    def _generate_alone(self, jobs: list[GenerationJob], on_text: OnText | None = None,
                        stream_rows: Sequence[int] = (), stop: threading.Event | None = None
                        ) -> list[Generated]:
        """One generate() at a time on this model: a batch that timed out still holds the
        model until its cancelled generation has stopped. A generator that joins calls
        (continuous batching) takes them all at once and stops only the timed-out one."""
        if self.joins:
            return self.generator.generate(jobs, on_text, stream_rows,  # type: ignore[call-arg]
                                           stop=stop)
        with self._model_lock:
            if on_text is None:
                return self.generator.generate(jobs)
            return self.generator.generate(jobs, on_text, stream_rows)

    async def _generate(self, jobs: list[GenerationJob],
                        streams: dict[int, Task] | None = None) -> list[Generated]:
        started = time.perf_counter()
        on_text = None
        if streams:
            loop = asyncio.get_running_loop()

            def on_text(row: int, text: str) -> None:  # the generating thread, every step
                if self.partials.due(streams[row]):  # else no wake-up of the event loop
                    loop.call_soon_threadsafe(self.partials.heard, streams, row, text)

        stop = threading.Event()
        if self._callers is None:
            self._callers = ThreadPoolExecutor(2 * self.settings.worker.batch_size + 2,
                                               thread_name_prefix="generate")
        running = asyncio.get_running_loop().run_in_executor(self._callers, functools.partial(
            self._generate_alone, jobs, on_text, list(streams or ()), stop))
        try:
            outputs = await asyncio.wait_for(asyncio.shield(running),
                                             self.settings.worker.generation_timeout_s)
        except BackendUnavailable:
            self.metrics.errors.labels("backend").inc(len(jobs))
            raise
        except TimeoutError:
            log.error("generation of %d rows timed out; stopping it", len(jobs))
            self.metrics.errors.labels("timeout").inc(len(jobs))
            cancel = stop.set if self.joins else getattr(self.generator, "cancel", None)
            if cancel is not None:
                cancel()
                with contextlib.suppress(Exception):
                    await running  # stops at its next step: the model is free again
            return []
        except Exception as exc:
            log.exception("generation of %d rows failed", len(jobs))
            self.metrics.errors.labels("generation").inc(len(jobs))
            raise GenerationFailed(str(exc)) from exc
        elapsed = time.perf_counter() - started
        self.intake.last_generation_s = elapsed
        tokens = sum(o.tokens for o in outputs)
        self.metrics.generation_seconds.observe(elapsed)
        self.metrics.tokens.inc(tokens)
        self.metrics.tokens_per_s.set(tokens / elapsed if elapsed else 0.0)
        return outputs

    def _safe_reply(self, task: Task, jobs: list[GenerationJob],
                    outputs: list[Generated]) -> Reply | None:
        """The task's reply, or None when building it failed (that task is dead-lettered)."""
        try:
            return self.make_reply(task, jobs, outputs)
        except Exception:
            log.exception("reply for request %s failed", task.request.id)
            return None

    async def _make_replies(self, tasks: list[Task], jobs: list[GenerationJob],
                            outputs: list[Generated]) -> list[Reply | None]:
        """Post-process every task's rows; with a reranker (an encoder pass over every
        candidate) this runs off the event loop, without one it is quick string work."""
        def build() -> list[Reply | None]:
            return [self._safe_reply(task, jobs, outputs) for task in tasks]

        threaded = self.scorer is not None or self.canon is not None
        return await asyncio.to_thread(build) if threaded else build()

    def _others_in_hand(self, task: Task) -> int:
        """How many other requests this worker holds (being answered, or read and waiting),
        or how many messages of other conversations it took within the last
        ``LOAD_WINDOW_S``, whichever is more: the listener's scoring runs one reply at a time
        on the engine's thread, so with others it scores fewer lines (LISTENER_BUSY_SHORTLIST),
        and from LISTENER_BUSY_REQUESTS on it steps aside, or their replies would queue behind
        it. Each reply is written the moment it is ready, so under a steady load few requests
        are held at any instant: the other conversations' recent messages count too."""
        held = sum(self.intake.busy.values()) + len(self.intake.carry)
        own = 1 if task.request.conversation in self.intake.busy else 0
        self._forget_taken()
        recent = sum(1 for _, c in self._taken if c != task.request.conversation)
        return max(held - own, recent)

    def _forget_taken(self) -> None:
        """Drop the messages taken longer than ``LOAD_WINDOW_S`` ago."""
        since = time.monotonic() - LOAD_WINDOW_S
        while self._taken and self._taken[0][0] < since:
            self._taken.popleft()

    def make_reply(self, task: Task, jobs: list[GenerationJob],
                   outputs: list[Generated]) -> Reply:
        return self.output.make_reply(task, jobs, outputs)

    def reply(self, request: Request, **fields) -> Reply:  # type: ignore[no-untyped-def]
        return self.output.reply(request, **fields)

    async def finish(self, task: Task) -> bool:
        """Reply, history, ACK and removal of the request in one MULTI. False when Redis
        failed: the request stays pending and is retried."""
        request, reply = task.request, task.reply
        assert reply is not None
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                if (request.kind in HISTORY_KINDS and task.text and reply.text
                        and not reply.error):
                    self.history.append_commands(pipe, request.conversation, request.user,
                                                 task.speaker, task.text, reply.text)
                    pipe.set(self.keys.last_request(request.conversation), request.id,
                             ex=self.settings.history.ttl_s)
                    self.history.remember_key_commands(
                        pipe, request.user, self.keys.last_request(request.conversation))
                    if reply.won == CANON and task.canon_row is not None:
                        self.history.canon_commands(pipe, request.conversation, request.user,
                                                    task.canon_row,
                                                    self.settings.reply_choice.canon_repeat_window)
                pipe.xadd(self.keys.replies(request.frontend), reply.dumps(),
                          maxlen=self.settings.redis.stream_maxlen, approximate=True)
                remove_commands(pipe, self.keys, task.entry_id, request.conversation)
                pipe.hincrby(self.keys.stats, "errors" if reply.error else "replies", 1)
                await pipe.execute()
        except REDIS_DOWN as exc:
            log.warning("request %s deferred: Redis unavailable (%s)", request.id,
                        type(exc).__name__)
            return False
        self.replies += 1
        self.metrics.replies.labels(request.kind).inc()
        if task.choice_s and request.kind == "chat":
            self.metrics.reply_choice_seconds.observe(task.choice_s)
        if reply.error:
            self.metrics.errors.labels("reply").inc()
        log.info("request %s kind=%s chars=%d queued=%.0fms", request.id, request.kind,
                 len(request.text), reply.queued_ms)
        return True

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], request: Request | None,
                           reason: str) -> None:
        log.error("dead letter %s (%s)", entry_id, reason)
        self.metrics.dead_letters.inc()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letters, {**fields, "reason": reason, "entry": entry_id},
                      maxlen=self.settings.redis.stream_maxlen, approximate=True)
            if request is not None:
                reply = self.reply(request, error=self.persona.line("dead_letter"))
                pipe.xadd(self.keys.replies(request.frontend), reply.dumps(),
                          maxlen=self.settings.redis.stream_maxlen, approximate=True)
            remove_commands(pipe, self.keys, entry_id,
                                  request.conversation if request is not None else None)
            pipe.hincrby(self.keys.stats, "dead_letters", 1)
            await pipe.execute()


async def check_health(redis: aioredis.Redis, keys: Keys,
                       max_age_s: float = HEALTH_WINDOW_S) -> int:
    """0 when at least one worker reported within ``max_age_s``, else 1 (container health)."""
    async for key in redis.scan_iter(match=keys.health_pattern):
        raw = await redis.get(key)
        if raw and time.time() - json.loads(raw)["ts"] <= max_age_s:
            return 0
    return 1
