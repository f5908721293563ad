"""The frontends' side of the queue: submit requests, read replies from their own stream.

A frontend instance has an id; its replies arrive on ``<prefix>:replies:<id>``, read through
a consumer group so a restarted frontend still gets the replies it had not delivered. A
reply whose request id was already answered is dropped (workers deliver at least once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine.keys import FRONTEND_GROUP, WORKERS_GROUP, Keys
from engine.protocol import FIELD, ProtocolError, Reply, Request
from engine.redis_conn import REDIS_DOWN

log = logging.getLogger(__name__)

ANSWERED_TTL_S = 24 * 3600
ORDER_TTL_S = 24 * 3600

# XADD the request and append its entry id to the conversation's order list, atomically.
_SUBMIT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[2], id)
redis.call('EXPIRE', KEYS[2], ARGV[4])
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

    async def setup(self) -> None:
        await ensure_group(self.redis, self.keys.requests, WORKERS_GROUP)
        await ensure_group(self.redis, self.reply_stream, FRONTEND_GROUP)

    async def submit(self, request: Request) -> str:
        """Add a request to the stream; raises QueueFull or QueueUnavailable."""
        try:
            if request.kind in ("chat", "compare", "retry"):
                depth = await queue_depth(self.redis, self.keys)
                if depth >= self.max_queue_depth:
                    raise QueueFull(f"{depth} requests waiting")
            return await self._submit(
                keys=[self.keys.requests, self.keys.order(request.conversation)],
                args=[self.stream_maxlen, FIELD, request.dumps()[FIELD], ORDER_TTL_S])
        except REDIS_DOWN as exc:
            raise QueueUnavailable(str(exc)) from exc

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

    async def run_reader(self, deliver: Callable[[Reply], Awaitable[None]] | None = None,
                         block_ms: int = 1000, stop: asyncio.Event | None = None) -> None:
        """Read replies until ``stop`` is set; each new reply goes to its waiter, else to
        ``deliver``. Survives Redis outages (retries with backoff)."""
        stop = stop or asyncio.Event()
        backoff = 0.1
        pending_first = True  # first re-read what this consumer got but did not ack
        while not stop.is_set():
            try:
                streams = await self.redis.xreadgroup(
                    FRONTEND_GROUP, self.frontend_id, {self.reply_stream: "0" if pending_first
                                                       else ">"},
                    count=100, block=None if pending_first else block_ms,
                )
                entries = streams[0][1] if streams else []
                if pending_first and not entries:
                    pending_first = False
                for entry_id, fields in entries:
                    await self._handle(entry_id, fields, deliver)
                backoff = 0.1
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self.setup()
                    continue
                raise
            except REDIS_DOWN as exc:
                # Also while handling a reply: what was read but not acknowledged is read
                # again once Redis is back (the answered key keeps it from a second delivery).
                log.warning("reply reader: Redis unavailable (%s); retrying in %.1fs",
                            type(exc).__name__, backoff)
                pending_first = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _handle(self, entry_id: str, fields: dict[str, str],
                      deliver: Callable[[Reply], Awaitable[None]] | None) -> None:
        try:
            reply = Reply.loads(fields)
        except ProtocolError:
            log.error("dropping malformed reply %s", entry_id)
            await self.redis.xack(self.reply_stream, FRONTEND_GROUP, entry_id)
            return
        first = await self.redis.set(self.keys.answered(reply.id), "1", nx=True,
                                     ex=ANSWERED_TTL_S)
        if first:
            waiter = self._waiters.get(reply.id)
            try:
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
                elif deliver is not None:
                    await deliver(reply)
                else:
                    self._arrived[reply.id] = reply
                    while len(self._arrived) > 1000:
                        self._arrived.pop(next(iter(self._arrived)))
            except Exception:
                log.exception("delivering reply %s failed", reply.id)
        else:
            log.info("duplicate reply %s dropped", reply.id)
        await self.redis.xack(self.reply_stream, FRONTEND_GROUP, entry_id)
        await self.redis.xdel(self.reply_stream, entry_id)
