"""Outages, bounded in time: Redis restarted (and killed) under a running worker and two
running frontends — the frontend core with its reply reader, and the Telegram frontend
against the fake Bot API — and the worker down while users keep writing.

Redis here is a server of the test's own (tests/private_redis.py: deploy/redis.conf, AOF on,
a temp dir, a free port); the shared Redis on 6379 is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_telegram import FakeTelegram
from harness import make_settings, running_worker
from private_redis import PrivateRedis

from base.keys import Keys
from base.protocol import Reply, Request
from base.queue_client import QueueClient
from base.redis_conn import make_client
from bots.core import FrontendCore, Immediate, Incoming
from bots.platforms import TELEGRAM_ID as FRONTEND_ID
from bots.telegram_frontend import TelegramFrontend
from engine.generation import FakeGenerator
from persona.pack import Persona

pytestmark = pytest.mark.timeout(300)


@dataclass
class Frontend:
    """The frontend core with its reply reader; counts every reply it delivers."""

    core: FrontendCore
    queue: QueueClient
    reader: asyncio.Task[None]
    stop: asyncio.Event
    delivered: Counter[str] = field(default_factory=Counter)

    async def send(self, user: str, text: str) -> Immediate | Request:
        return await self.core.handle(Incoming(user=user, conversation=f"o:u:{user}",
                                               text=text))


@contextlib.asynccontextmanager
async def core_frontend(url: str, keys: Keys, persona: Persona,
                        name: str = "outage-frontend") -> AsyncIterator[Frontend]:
    client = make_client(url)
    queue = QueueClient(client, keys, name)
    await queue.setup()
    stop = asyncio.Event()
    settings = make_settings(url, keys.prefix, user_rate_limit=0)
    frontend = Frontend(FrontendCore(settings, persona, queue, keys), queue,
                        asyncio.create_task(asyncio.sleep(0)), stop)

    async def deliver(reply: Reply) -> None:
        frontend.delivered[reply.id] += 1

    frontend.reader = asyncio.create_task(queue.run_reader(deliver, block_ms=100, stop=stop))
    try:
        yield frontend
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(frontend.reader, 10)
        await client.aclose()


@contextlib.asynccontextmanager
async def telegram_frontend(url: str, keys: Keys, persona: Persona,
                            tg: FakeTelegram) -> AsyncIterator[tuple[TelegramFrontend,
                                                                     asyncio.Task[None]]]:
    client = make_client(url)
    settings = make_settings(url, keys.prefix, user_rate_limit=0, telegram_token=tg.token,
                             telegram_api_url=tg.api_url, telegram_poll_timeout_s=1)
    queue = QueueClient(client, keys, FRONTEND_ID)
    await queue.setup()
    bot = TelegramFrontend(settings, persona, queue, keys, reader_block_ms=100)
    task = asyncio.create_task(bot.serve(), name="telegram")
    await asyncio.wait_for(bot.ready.wait(), 30)
    try:
        yield bot, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 30)
        await client.aclose()


async def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path / "redis").start()
    yield redis
    redis.close()


async def test_redis_restart_and_crash_under_traffic(server: PrivateRedis, persona: Persona,
                                                    prefix: str) -> None:
    """Requests in flight when Redis stops are answered after it is back, exactly once;
    while it is down both frontends answer with the outage line; no task dies. Then the
    same with kill -9 (after a second of quiet, so the AOF's fsync-every-second has run)."""
    keys = Keys(prefix)
    worker_redis = make_client(server.url)
    generator = FakeGenerator(delay_s=0.3)
    async with (FakeTelegram() as tg,
                running_worker(worker_redis, keys, persona, generator, name="outage-worker",
                               batch_size=4, claim_idle_ms=2000) as worker,
                core_frontend(server.url, keys, persona) as front,
                telegram_frontend(server.url, keys, persona, tg) as (_bot, bot_task)):
        worker_task = next(t for t in asyncio.all_tasks() if t.get_name() == "outage-worker")
        tasks = {"worker": worker_task, "reader": front.reader, "telegram": bot_task}
        acknowledged: list[str] = []

        async def traffic(n: int, tag: str) -> None:
            for i in range(n):
                outcome = await front.send(f"{tag}{i % 7}", f"{tag} message {i}")
                if isinstance(outcome, Request):
                    acknowledged.append(outcome.id)

        for k, (phase, stop_redis) in enumerate((("restart", server.stop),
                                                 ("crash", server.kill))):
            before, down = 100 + 10 * k, 101 + 10 * k
            # Fill the queue: with a 0.3 s generation per batch of 4, most wait in Redis.
            await traffic(24, phase)
            tg.private_text(before, f"{phase}: before")
            # Queued once the bot shows "typing…" for it.
            await tg.wait_for(lambda c=before: any(a["chat_id"] == c for a in tg.actions),
                              timeout=20)
            assert len(acknowledged) == 24 * (k + 1)
            if phase == "crash":
                await asyncio.sleep(1.5)  # the AOF is fsynced once a second
            stop_redis()
            # Down: both frontends answer at once with the outage line; nothing is queued.
            for i in range(3):
                outcome = await asyncio.wait_for(front.send("down", f"{phase} down {i}"), 15)
                assert outcome == Immediate(persona.line("outage"))
            tg.private_text(down, f"{phase}: while down")
            await tg.wait_for(lambda c=down: [m["text"] for m in tg.sent_to(c)]
                              == [persona.line("outage")], timeout=20)
            await asyncio.sleep(1.0)
            for name, task in tasks.items():
                assert not task.done(), f"{name} died during the outage"
            server.start()
            # Back: every acknowledged request is answered, exactly once.
            await wait_until(lambda: set(acknowledged) <= set(front.delivered), 60,
                             f"the replies after the {phase}")
            [answer] = await tg.wait_sent(1, chat_id=before, timeout=30)
            assert answer["text"].startswith("Diagnosis ")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        assert all(count == 1 for count in front.delivered.values())
        assert set(front.delivered) == set(acknowledged)
        # Both frontends work afterwards.
        outcome = await front.send("after", "after the outages")
        assert isinstance(outcome, Request)
        await wait_until(lambda: outcome.id in front.delivered, 30, "a reply after")
        tg.private_text(102, "after the outages")
        [reply] = await tg.wait_sent(1, chat_id=102, timeout=30)
        assert reply["text"].startswith("Diagnosis ")
        for name, task in tasks.items():
            assert not task.done(), f"{name} died"
        assert worker.replies >= len(acknowledged)
    await worker_redis.aclose()


async def test_worker_down_requests_wait_and_are_answered_when_it_returns(
        server: PrivateRedis, persona: Persona, prefix: str) -> None:
    """No worker: both frontends still acknowledge each message (the "queued" line, once per
    message, as soon as the message is queued); the requests wait in the stream; a worker
    that starts later answers every one, in order within each chat."""
    keys = Keys(prefix)
    async with (FakeTelegram() as tg,
                core_frontend(server.url, keys, persona) as front,
                telegram_frontend(server.url, keys, persona, tg) as (_bot, _)):
        queued: list[Request] = []
        for i in range(6):
            outcome = await front.send(f"w{i % 2}", f"waiting {i}")
            assert isinstance(outcome, Request)
            assert await front.core.queued_notice() == persona.line("queued")
            queued.append(outcome)
        for i in range(3):
            tg.private_text(200, f"anyone there? {i}")
        await tg.wait_sent(3, chat_id=200, timeout=20)
        assert [m["text"] for m in tg.sent_to(200)] == [persona.line("queued")] * 3
        client = server.client()
        assert client.xlen(keys.requests) == 9
        await asyncio.sleep(1.0)
        assert not front.delivered

        worker_redis = make_client(server.url)
        async with running_worker(worker_redis, keys, persona, FakeGenerator(),
                                  name="late-worker"):
            await wait_until(lambda: {r.id for r in queued} <= set(front.delivered), 30,
                             "the waiting requests to be answered")
            await tg.wait_sent(6, chat_id=200, timeout=30)
            answers = [m["text"] for m in tg.sent_to(200)][3:]
            assert all(a.startswith("Diagnosis ") for a in answers)
            # In order: the history holds the three messages as they were sent.
            history = [json.loads(h) for h in client.lrange(keys.history("telegram:u:200"),
                                                             0, -1)]
            assert [t["content"] for t in history if t["role"] == "user"] == [
                f"anyone there? {i}" for i in range(3)]
            # A worker is alive now: no more "queued" line.
            front.core._alive_checked = float("-inf")
            assert await front.core.queued_notice() is None
        await worker_redis.aclose()
        assert all(count == 1 for count in front.delivered.values())


@pytest.mark.parametrize("where", [
    "history", "generate", "finish"])
async def test_worker_survives_redis_dying_mid_batch(where: str, server: PrivateRedis,
                                                     persona: Persona, prefix: str) -> None:
    """Redis stops at a chosen point inside a batch (while the worker loads a history, while
    it generates, or as it writes the replies): the worker task lives on, and after Redis is
    back every request is answered exactly once."""
    keys = Keys(prefix)
    worker_redis = make_client(server.url)
    generator = FakeGenerator()
    async with core_frontend(server.url, keys, persona) as front:
        ids = []
        for i in range(4):
            outcome = await front.send(f"m{i}", f"mid-batch {i}")
            assert isinstance(outcome, Request)
            ids.append(outcome.id)
        async with running_worker(worker_redis, keys, persona, generator, name="mid-worker",
                                  batch_size=4, claim_idle_ms=1500) as worker:
            task = next(t for t in asyncio.all_tasks() if t.get_name() == "mid-worker")
            fired = asyncio.Event()

            def stop_once() -> None:
                if not fired.is_set():
                    fired.set()
                    server.stop()

            if where == "history":
                load = worker.history.load

                async def load_then_die(conversation: str):  # type: ignore[no-untyped-def]
                    stop_once()
                    return await load(conversation)

                worker.history.load = load_then_die  # type: ignore[method-assign]
            elif where == "generate":
                generate = generator.generate

                def generate_then_die(jobs, *stream):  # type: ignore[no-untyped-def]
                    stop_once()
                    return generate(jobs, *stream)

                generator.generate = generate_then_die  # type: ignore[method-assign]
            else:
                finish = worker.finish

                async def die_then_finish(t):  # type: ignore[no-untyped-def]
                    stop_once()
                    return await finish(t)

                worker.finish = die_then_finish  # type: ignore[method-assign]
            await asyncio.wait_for(fired.wait(), 20)
            await asyncio.sleep(1.0)
            assert not task.done(), f"the worker died: {task.exception()!r}"
            server.start()
            await wait_until(lambda: set(ids) <= set(front.delivered), 60, "the replies")
            await asyncio.sleep(0.5)
            assert all(front.delivered[i] == 1 for i in ids)
            assert not task.done()
    await worker_redis.aclose()


async def test_reply_reader_survives_redis_dying_while_it_delivers(
        server: PrivateRedis, persona: Persona, prefix: str) -> None:
    """Redis stops while the frontend hands a reply to the platform (before its XACK): the
    reader lives on, and after Redis is back the reply is not delivered a second time."""
    keys = Keys(prefix)
    client = make_client(server.url)
    queue = QueueClient(client, keys, "dying-reader")
    await queue.setup()
    delivered: Counter[str] = Counter()

    async def deliver(reply: Reply) -> None:
        delivered[reply.id] += 1
        if len(delivered) == 1:
            server.stop()

    stop = asyncio.Event()
    reader = asyncio.create_task(queue.run_reader(deliver, block_ms=100, stop=stop))
    worker_redis = make_client(server.url)
    async with running_worker(worker_redis, keys, persona, FakeGenerator(), name="w"):
        request = Request(frontend="dying-reader", conversation="o:u:1", user="1", text="hi")
        await queue.submit(request)
        await wait_until(lambda: bool(delivered), 30, "the reply")
        await asyncio.sleep(1.0)
        assert not reader.done(), f"the reader died: {reader.exception()!r}"
        server.start()
        second = Request(frontend="dying-reader", conversation="o:u:2", user="2", text="yo")
        await queue.submit(second)
        await wait_until(lambda: second.id in delivered, 30, "a reply after the restart")
        assert delivered[request.id] == 1
    stop.set()
    await asyncio.wait_for(reader, 10)
    await worker_redis.aclose()
    await client.aclose()
