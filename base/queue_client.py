"""The frontends' side of the queue: submit requests, read replies from their own stream.

A frontend instance has an id; its replies arrive on ``<prefix>:replies:<id>``, read through
a consumer group so a restarted frontend still gets the replies it had not delivered.

A reply is acknowledged only once the chat has it: ``deliver`` may hand back the send's task
(`bots.outbox`), whose outcome decides. ``sent`` marks the request answered (a second reply to
it, from a worker that answered twice, is dropped) and acknowledges; ``undeliverable`` (bot
blocked, chat gone) is dropped with a log line and counted; ``retry`` leaves the reply pending,
and the reader sends it again after ``retry_after_s`` (a restarted frontend reads its pending
replies first), up to ``MAX_SEND_ATTEMPTS`` times; ``wait`` (the chat's backlog of sends is
full, `bots.outbox`) leaves it pending too, but is no failed send and never uses up those
attempts — a group behind its rate limit for minutes loses nothing. A reply that was sent
while Redis failed before its acknowledgement is acknowledged later without a second send. So
a reply reaches its chat at least once, and twice only when the frontend process dies between
the send and the acknowledgement, or a send failed after the platform took part of a long
reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from base.keys import FRONTEND_GROUP, WORKERS_GROUP, Keys
from base.protocol import FIELD, ProtocolError, Reply, Request
from base.redis_conn import REDIS_DOWN

log = logging.getLogger(__name__)

ANSWERED_TTL_S = 24 * 3600
ORDER_TTL_S = 24 * 3600
MAX_SEND_ATTEMPTS = 8
SENT, UNDELIVERABLE, RETRY, WAIT = "sent", "undeliverable", "retry", "wait"

# XADD the request and append its entry id to the conversation's order list, atomically, unless
# the stream already holds ARGV[1] unanswered requests. The request stream is never trimmed
# (MAXLEN would drop pending requests without a reply or a dead letter): its size is the
# queue depth, and past the limit requests are refused instead. The request's envelope (its
# address without the text) is kept beside it until a worker answers it.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[2], id)
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], id, ARGV[5])
return id
"""


class QueueFull(Exception):
    """More unanswered requests wait than the configured limit (back-pressure)."""


class QueueUnavailable(Exception):
    """Redis cannot be reached right now."""


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create a consumer group (and its stream) if it does not exist yet."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def queue_depth(redis: aioredis.Redis, keys: Keys) -> int:
    """Requests not yet answered. Workers delete a request from the stream when they answer
    it, so this is the stream's length."""
    return int(await redis.xlen(keys.requests))


class QueueClient:
    def __init__(self, redis: aioredis.Redis, keys: Keys, frontend_id: str,
                 max_queue_depth: int = 200, stream_maxlen: int = 10_000):
        self.redis = redis
        self.keys = keys
        self.frontend_id = frontend_id
        self.max_queue_depth = max_queue_depth
        self.stream_maxlen = stream_maxlen
        self.reply_stream = keys.replies(frontend_id)
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._arrived: dict[str, Reply] = {}  # replies that came before anyone waited
        self._submit = redis.register_script(_SUBMIT)
        self._inflight: set[str] = set()  # reply ids whose send has not ended
        self._attempts: dict[str, int] = {}  # failed sends per reply id
        self._unacked: dict[str, str] = {}  # sent (or dropped), acknowledgement not written
        self._settling: set[asyncio.Task[None]] = set()
        self.undeliverable = 0  # replies dropped because their chat can never get them
        self.retry_after_s = 5.0
        # Partial events (streamed text so far) go here; None ignores them. They are
        # acknowledged at once: the final reply that follows is the one kept until sent.
        self.on_partial: Callable[[Reply], Awaitable[Any]] | None = None

    async def setup(self) -> None:
        await ensure_group(self.redis, self.keys.requests, WORKERS_GROUP)
        await ensure_group(self.redis, self.reply_stream, FRONTEND_GROUP)

    async def submit(self, request: Request) -> str:
        """Add a request to the stream; raises QueueFull (``max_queue_depth`` requests of any
        kind wait: the per-user limit keeps one user from filling it) or QueueUnavailable."""
        try:
            entry = await self._submit(
                keys=[self.keys.requests, self.keys.order(request.conversation),
                      self.keys.envelopes],
                args=[self.max_queue_depth, FIELD, request.dumps()[FIELD], ORDER_TTL_S,
                      request.envelope()])
        except REDIS_DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc
        if entry is None:
            raise QueueFull(f"{self.max_queue_depth} requests waiting")
        return str(entry)

    async def ask(self, request: Request, timeout_s: float = 120.0) -> Reply:
        """Submit and wait for the reply (needs `run_reader` running)."""
        await self.submit(request)
        return await self.wait_reply(request.id, timeout_s)

    async def wait_reply(self, request_id: str, timeout_s: float = 120.0) -> Reply:
        """Wait for the reply to an already submitted request (needs `run_reader`)."""
        if request_id in self._arrived:
            return self._arrived.pop(request_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiters.pop(request_id, None)

    async def run_reader(self, deliver: Callable[[Reply], Awaitable[Any]] | None = None,
                         block_ms: int = 1000, stop: asyncio.Event | None = None) -> None:
        """Read replies until ``stop`` is set; each new reply goes to its waiter, else to
        ``deliver``. Pending replies (unsent, or from before a restart) are read again every
        ``retry_after_s``. Survives Redis outages (retries with backoff)."""
        stop = stop or asyncio.Event()
        backoff = 0.1
        next_scan = 0.0  # first re-read what this consumer got but did not ack
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if loop.time() >= next_scan:
                    await self._scan_pending(deliver)
                    next_scan = loop.time() + self.retry_after_s
                streams = await self.redis.xreadgroup(
                    FRONTEND_GROUP, self.frontend_id, {self.reply_stream: ">"}, count=100,
                    block=min(block_ms, int(self.retry_after_s * 1000)))
                for entry_id, fields in streams[0][1] if streams else []:
                    await self._handle(entry_id, fields, deliver)
                backoff = 0.1
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self.setup()
                    continue
                raise
            except REDIS_DOWN as exc:
                # Also while handling a reply: what was read but not acknowledged is read
                # again once Redis is back.
                log.warning("reply reader: Redis unavailable (%s); retrying in %.1fs",
                            type(exc).__name__, backoff)
                next_scan = 0.0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _scan_pending(self, deliver: Callable[[Reply], Awaitable[Any]] | None) -> None:
        """Hand this consumer's pending replies (not being sent right now) over again."""
        start = "0"
        while True:
            streams = await self.redis.xreadgroup(FRONTEND_GROUP, self.frontend_id,
                                                  {self.reply_stream: start}, count=100)
            entries = streams[0][1] if streams else []
            if not entries:
                return
            for entry_id, fields in entries:
                await self._handle(entry_id, fields, deliver)
            start = entries[-1][0]

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait for the acknowledgements of sends that ended (at shutdown, after the outbox
        drained), so a reply sent just before a restart is not sent again."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=timeout_s)

    async def _handle(self, entry_id: str, fields: dict[str, str],
                      deliver: Callable[[Reply], Awaitable[Any]] | None) -> None:
        if not fields:  # deleted while pending
            await self.redis.xack(self.reply_stream, FRONTEND_GROUP, entry_id)
            return
        try:
            reply = Reply.loads(fields)
        except ProtocolError:
            log.error("dropping malformed reply %s", entry_id)
            await self._remove(entry_id)
            return
        if reply.partial is not None:  # the text so far: shown if the frontend can, not kept
            if self.on_partial is not None:
                try:
                    await self.on_partial(reply)
                except Exception:
                    log.exception("showing partial reply %s failed", reply.id)
            await self._remove(entry_id)
            return
        if reply.id in self._inflight:
            return  # its send is still running; left pending
        if reply.id in self._unacked:  # sent, but Redis failed before the acknowledgement
            await self._settle(entry_id, reply.id, self._unacked[reply.id])
            return
        if await self.redis.exists(self.keys.answered(reply.id)):
            log.info("duplicate reply %s dropped", reply.id)
            await self._remove(entry_id)
            return
        waiter = self._waiters.get(reply.id)
        if (waiter is not None and not waiter.done()) or deliver is None:
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
            else:
                self._arrived[reply.id] = reply
                while len(self._arrived) > 1000:
                    self._arrived.pop(next(iter(self._arrived)))
            await self._settle(entry_id, reply.id, SENT)
            return
        try:
            sending = await deliver(reply)
        except Exception:
            log.exception("delivering reply %s failed", reply.id)
            sending = RETRY
        if isinstance(sending, asyncio.Future):
            self._inflight.add(reply.id)
            sending.add_done_callback(
                lambda done: self._spawn(self._finished(entry_id, reply.id, done)))
        else:
            await self._settle(entry_id, reply.id,
                               sending if sending in (UNDELIVERABLE, RETRY, WAIT) else SENT)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _finished(self, entry_id: str, reply_id: str, done: asyncio.Future[Any]) -> None:
        self._inflight.discard(reply_id)
        outcome = RETRY if done.cancelled() or done.exception() else done.result()
        try:
            await self._settle(entry_id, reply_id, outcome)
        except REDIS_DOWN as exc:
            log.warning("reply %s: could not acknowledge (%s); it stays pending", reply_id,
                        type(exc).__name__)

    async def _settle(self, entry_id: str, reply_id: str, outcome: str) -> None:
        if outcome == WAIT:
            return  # not sent yet, not a failure: pending until the chat has room
        if outcome == RETRY:
            self._attempts[reply_id] = self._attempts.get(reply_id, 0) + 1
            if self._attempts[reply_id] < MAX_SEND_ATTEMPTS:
                return  # pending: sent again at the next scan
            log.error("reply %s: %d sends failed; dropped", reply_id, MAX_SEND_ATTEMPTS)
            outcome = UNDELIVERABLE
        self._attempts.pop(reply_id, None)
        if outcome == UNDELIVERABLE and reply_id not in self._unacked:
            self.undeliverable += 1
        self._unacked[reply_id] = outcome
        while len(self._unacked) > 10_000:
            self._unacked.pop(next(iter(self._unacked)))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.answered(reply_id), outcome, ex=ANSWERED_TTL_S)
            pipe.xack(self.reply_stream, FRONTEND_GROUP, entry_id)
            pipe.xdel(self.reply_stream, entry_id)
            await pipe.execute()
        self._unacked.pop(reply_id, None)

    async def _remove(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
            pipe.xack(self.reply_stream, FRONTEND_GROUP, entry_id)
            pipe.xdel(self.reply_stream, entry_id)
            await pipe.execute()
