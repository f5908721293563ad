"""The worker's intake: reading the request stream for one consumer of the ``workers`` group.

What it owns: which entries to take next (claimed stale requests first, then new ones, at
most one carried request per conversation), requests carried to a later batch because an
older one of their conversation is unanswered or running, leases (XCLAIM to ourselves while
a batch runs), delivery counts (for dead letters), per-conversation order (the order lists),
and requests whose entry vanished from the stream. The worker (`engine.worker`) decides what
to do with what it reads; the engine generates; `engine.output` builds the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from base.commands import CHAT, CONTROL_KINDS
from base.config import Settings
from base.keys import WORKERS_GROUP, Keys
from base.metrics import WorkerMetrics
from base.protocol import ProtocolError, Request
from base.redis_conn import REDIS_DOWN
from persona.reply_choice import needs_jab

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]

# Of the entry ids in ARGV, those whose entry is gone from the stream: envelopes removed and
# returned (id, envelope, ...). Atomic, so two workers never apologise for the same request,
# and an entry still in the stream is never taken for lost.
_TAKE_LOST = """
local lost = {}
for i = 1, #ARGV do
  local id = ARGV[i]
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    local envelope = redis.call('HGET', KEYS[2], id)
    if envelope then
      redis.call('HDEL', KEYS[2], id)
      table.insert(lost, id)
      table.insert(lost, envelope)
    end
  end
end
return lost
"""


def conversation_of(fields: dict[str, str]) -> str | None:
    try:
        return Request.loads(fields).conversation
    except ProtocolError:
        return None


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def needs_no_model(fields: dict[str, str]) -> bool:
    """A request answered without the model: /reset, /forget, a message the pack's jabs
    answer (no words, another language, a bare "ok": `persona.reply_choice.jab_kind`)."""
    try:
        request = Request.loads(fields)
    except ProtocolError:
        return True  # dead-lettered at once
    # What gets a jab in its raw text gets one after cleaning too: prepare() jabs it.
    return request.kind in CONTROL_KINDS or (request.kind == CHAT
                                             and needs_jab(request.text))


def split_quick(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """The entries that need no model, and the others."""
    quick: list[Entry] = []
    rest: list[Entry] = []
    for entry in entries:
        (quick if needs_no_model(entry[1]) else rest).append(entry)
    return quick, rest


def remove_commands(pipe: aioredis.client.Pipeline, keys: Keys, entry_id: str,
                    conversation: str | None) -> None:
    """ACK and delete an answered request (its text leaves Redis with it) and take it off its
    conversation's order list."""
    pipe.xack(keys.requests, WORKERS_GROUP, entry_id)
    pipe.xdel(keys.requests, entry_id)
    pipe.hdel(keys.envelopes, entry_id)
    if conversation is not None:
        pipe.lrem(keys.order(conversation), 1, entry_id)


class Intake:
    """One worker's reading of the request stream (see the module docstring).

    ``stop``: the worker's stop event (stopping, nothing new is taken); ``joins``: the engine
    takes calls while others run (no short wait to fill a batch); ``apologise(entry_id,
    envelope)``: what to do with a request whose entry vanished."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: Settings,
                 metrics: WorkerMetrics, name: str, stop: asyncio.Event, joins: bool,
                 apologise: Callable[[str, str], Awaitable[None]]):
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.metrics = metrics
        self.name = name
        self.stop = stop
        self.joins = joins
        self.apologise = apologise
        # Requests whose conversation already had a request in the same batch: they wait for
        # the next batch so they see the earlier reply in their history (per-chat order).
        self.carry: list[Entry] = []
        self.dropped: dict[str, None] = {}  # entries dead-lettered lately: never carried
        self.busy: dict[str, int] = {}  # conversations with a request in a running batch
        self.last_generation_s = 0.0  # the last batch's generation time (the short wait)
        self._take_lost = redis.register_script(_TAKE_LOST)
        self._next_sweep = 0.0

    def drop(self, entry_id: str) -> None:
        """Never carry this entry again (it was dead-lettered)."""
        self.dropped[entry_id] = None
        while len(self.dropped) > 10_000:
            del self.dropped[next(iter(self.dropped))]

    def keep_for_later(self, entries: list[Entry], answered: set[str]) -> None:
        """Carry the entries of a batch that were not answered (and not dropped)."""
        carried = {eid for eid, _ in self.carry}
        self.carry += [(eid, f) for eid, f in entries
                       if eid not in answered and eid not in carried and eid not in self.dropped]

    async def renew(self, entry_ids: list[str]) -> None:
        """Still ours: reset their idle time so no other worker claims them."""
        if entry_ids:
            await self.redis.xclaim(self.keys.requests, WORKERS_GROUP, self.name, 0,
                                    entry_ids, justid=True)

    async def read_batch(self, block: bool = True, size: int | None = None,
                         block_ms: int | None = None) -> list[Entry]:
        """Claimed stale requests first, then new ones, up to ``size`` (``batch_size``);
        ``block_ms`` overrides how long to wait for new ones."""
        size = self.settings.worker.batch_size if size is None else size
        entries, self.carry = self._carry_heads(size)
        if entries or self.carry:
            await self.renew([eid for eid, _ in entries + self.carry])
        if self.stop.is_set():  # stopping: finish what was already read, take nothing new
            return entries
        # Always look for stale requests, even when carried ones fill the batch: a request
        # this worker was handed but never received (Redis died mid-reply) may be what they
        # wait for. What does not fit is carried.
        entries += await self.claim_stale(max(size - len(entries), 1))
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = (time.monotonic()
                                + max(self.settings.worker.claim_idle_ms / 1000, 1.0))
            await self.answer_lost()
        if len(entries) < size:
            wait = self.settings.worker.read_block_ms if block_ms is None else block_ms
            entries += await self.read_new(size - len(entries),
                                           wait if block and not entries else None)
        # A busy conversation's backlog takes one place in a batch: read past it (a few
        # batches' worth at most) so other conversations fill the rest.
        for _ in range(3):
            if len({conversation_of(f) for _, f in entries}) >= size or len(entries) < size:
                break
            more = await self.read_new(size, None)
            if not more:
                break
            entries += more
        # Under load a short wait fills the batch; it costs little next to a generate().
        # (Not with continuous batching: what arrives later joins the running batch anyway.)
        wait_ms = 0 if self.joins else self.settings.worker.batch_wait_ms
        if (entries and len(entries) < size and wait_ms
                and self.last_generation_s * 1000 > 10 * wait_ms):
            await asyncio.sleep(wait_ms / 1000)
            entries += await self.read_new(size - len(entries), None)
        return entries

    def _carry_heads(self, size: int) -> tuple[list[Entry], list[Entry]]:
        """At most one carried request per conversation (only its oldest can be answered in
        a batch), so one busy conversation's backlog never fills the batch and starves the
        others: the rest of the batch is read from the stream."""
        taken: list[Entry] = []
        kept: list[Entry] = []
        seen: set[str] = set()
        # Oldest first: carried entries come from several batches (and the control lane), and
        # only a conversation's oldest can be its next.
        for entry in sorted(self.carry, key=lambda e: _stream_order(e[0])):
            conversation = conversation_of(entry[1])
            if len(taken) < size and (conversation is None or (conversation not in seen
                                      and conversation not in self.busy)):
                taken.append(entry)
                if conversation is not None:
                    seen.add(conversation)
            else:
                kept.append(entry)
        return taken, kept

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        streams = await self.redis.xreadgroup(WORKERS_GROUP, self.name,
                                              {self.keys.requests: ">"}, count=count,
                                              block=block_ms)
        return list(streams[0][1]) if streams else []

    async def claim_stale(self, count: int) -> list[Entry]:
        """Take over requests another (dead) worker held longer than ``claim_idle_ms``."""
        result = await self.redis.xautoclaim(self.keys.requests, WORKERS_GROUP, self.name,
                                             min_idle_time=self.settings.worker.claim_idle_ms,
                                             start_id="0-0", count=count)
        claimed = [(eid, fields) for eid, fields in result[1] if fields]
        if claimed:
            self.metrics.claimed.inc(len(claimed))
            log.warning("claimed %d stale requests", len(claimed))
        return claimed

    async def answer_lost(self) -> int:
        """Apologise for requests whose entry vanished from the stream (an operator's XDEL or
        XTRIM) at least ``claim_idle_ms`` ago; returns how many."""
        seconds, micros = await self.redis.time()
        before_ms = int(seconds * 1000 + micros // 1000) - self.settings.worker.claim_idle_ms
        old = [eid async for eid, _ in self.redis.hscan_iter(self.keys.envelopes)
               if int(eid.split("-", 1)[0]) < before_ms]
        found = 0
        for start in range(0, len(old), 100):
            taken = await self._take_lost(keys=[self.keys.requests, self.keys.envelopes],
                                          args=old[start:start + 100])
            for entry_id, envelope in zip(taken[::2], taken[1::2], strict=True):
                found += 1
                await self.apologise(entry_id, envelope)
        return found

    async def delivery_counts(self, entry_ids: list[str]) -> list[int]:
        """How many times each entry was delivered (XPENDING), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.keys.requests, WORKERS_GROUP, min=entry_id,
                                    max=entry_id, count=1)
            infos = await pipe.execute()
        return [int(info[0]["times_delivered"]) if info else 1 for info in infos]

    async def heads(self, conversations: list[str]) -> list[str | None]:
        """Each conversation's oldest unanswered request (the head of its order list)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for conversation in conversations:
                pipe.lindex(self.keys.order(conversation), 0)
            return list(await pipe.execute())

    async def is_next(self, entry_id: str, conversation: str) -> bool:
        """True when ``entry_id`` is its conversation's oldest unanswered request. A head whose
        request no longer exists (trimmed from the stream) is dropped from the list."""
        key = self.keys.order(conversation)
        for _ in range(16):
            head = await self.redis.lindex(key, 0)
            if head is None or head == entry_id:
                return True
            if await self.redis.xrange(self.keys.requests, head, head, count=1):
                return False
            await self.redis.lrem(key, 1, head)
        return False

    @contextlib.asynccontextmanager
    async def leased(self, entry_ids: list[str]) -> AsyncIterator[None]:
        """Renew the lease on a batch's requests while the block runs (see `_renew_lease`)."""
        renewal = asyncio.create_task(self._renew_lease(entry_ids), name="lease")
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    async def _renew_lease(self, entry_ids: list[str]) -> None:
        """XCLAIM to ourselves every third of CLAIM_IDLE_MS from reading to answering, so a
        generation (or a canon choice) longer than the claim time is not taken over by
        another worker and answered twice."""
        every_s = max(self.settings.worker.claim_idle_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(*REDIS_DOWN):
                await self.renew(entry_ids)
