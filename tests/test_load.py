"""Load: 500 private conversations × 4 messages from the fake Telegram server, through one
real Telegram frontend (python-telegram-bot) and two workers with a fast generator, on the
real Redis. Every message is answered exactly once, each chat gets its answers in the order
of its messages and each prompt holds the chat's earlier messages in order, the frontend's
bookkeeping drains to nothing and Redis keeps bounded histories.

Each chat sends its four messages at once (a burst, the hard case for ordering). The
throughput is printed (a benchmark figure, not an assertion):
``pytest -q -s tests/test_load.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from fake_telegram import FakeTelegram
from harness import CapturingGenerator, make_settings, running_worker

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from base.redis_conn import make_client
from bots.platforms import TELEGRAM_ID as FRONTEND_ID
from bots.telegram_frontend import TelegramFrontend
from engine.generation import Generated, GenerationJob
from persona.pack import Persona

CHATS = 500
MESSAGES = 4
FIRST_CHAT = 10_000

pytestmark = pytest.mark.timeout(600)


class TaggingGenerator(CapturingGenerator):
    """Instant replies that name the message they answer, so order can be checked."""

    def generate(self, jobs: Sequence[GenerationJob], *stream: Any) -> list[Generated]:
        super().generate(jobs)  # not streamed: its replies are not the fake's
        return [Generated(f"I have seen {job.message} and I answer it.", 3, True, 0.0)
                for job in jobs]


def message_text(chat: int, k: int) -> str:
    return f"chat{chat} says m{k}"


async def test_500_conversations_of_4_messages(settings: Settings, prefix: str,
                                               keys: Keys, redis: aioredis.Redis,
                                               persona: Persona) -> None:
    bot_settings: Settings
    generators = [TaggingGenerator(), TaggingGenerator()]
    clients = [make_client(settings.redis.url) for _ in range(3)]
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with FakeTelegram() as tg, contextlib.AsyncExitStack() as stack:
        bot_settings = make_settings(
            settings.redis.url, prefix, telegram_token=tg.token, telegram_api_url=tg.api_url,
            telegram_poll_timeout_s=1, user_rate_limit=0, max_queue_depth=100_000,
            telegram_overall_rate=100_000.0, reply_timeout_s=300.0)
        for i, generator in enumerate(generators):
            await stack.enter_async_context(running_worker(
                clients[i], keys, persona, generator, name=f"load-worker-{i}", batch_size=16))
        queue = QueueClient(clients[2], keys, FRONTEND_ID, bot_settings.redis.max_queue_depth)
        await queue.setup()
        bot = TelegramFrontend(bot_settings, persona, queue, keys, reader_block_ms=200)
        serving = asyncio.create_task(bot.serve(), name="telegram")
        await asyncio.wait_for(bot.ready.wait(), 30)

        started = time.perf_counter()
        for chat in range(FIRST_CHAT, FIRST_CHAT + CHATS):
            for k in range(MESSAGES):
                tg.private_text(chat, message_text(chat, k))
        await tg.wait_sent(CHATS * MESSAGES, timeout=500)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        assert len(tg.sent) == CHATS * MESSAGES
        drained = (len(bot.typing), len(bot.outbox), len(queue._waiters), len(queue._arrived))

        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 30)
    rss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for client in clients:
        await client.aclose()

    # Exactly once, in order, per chat.
    disorder = []
    for chat in range(FIRST_CHAT, FIRST_CHAT + CHATS):
        got = [m["text"] for m in tg.sent_to(chat)]
        want = [f"I have seen {message_text(chat, k)} and I answer it." for k in range(MESSAGES)]
        assert sorted(got) == sorted(want), f"chat {chat}: {got}"
        if got != want:
            disorder.append(chat)
    # Each prompt holds exactly the chat's earlier messages, in order.
    jobs = {job.message: job.prompt for g in generators for job in g.jobs}
    assert len(jobs) == CHATS * MESSAGES
    stale = []
    for chat in range(FIRST_CHAT, FIRST_CHAT + CHATS):
        for k in range(MESSAGES):
            prompt = jobs[message_text(chat, k)]
            seen = [j for j in range(MESSAGES) if message_text(chat, j) in prompt]
            if seen != list(range(k + 1)):
                stale.append((chat, k, seen))
    per_worker = [sum(1 for j in g.jobs) // persona.controls.candidates for g in generators]
    batches = [len(g.calls) for g in generators]
    print(f"\nload: {CHATS * MESSAGES} messages from {CHATS} chats answered in {elapsed:.1f} s "
          f"= {CHATS * MESSAGES / elapsed:.0f} messages/s (one Telegram frontend, two "
          f"in-process workers, instant generator); requests per worker {per_worker}, "
          f"batches {batches}; peak RSS of the test process {rss_before_kb / 1024:.0f} → "
          f"{rss_after_kb / 1024:.0f} MiB")
    assert all(per_worker), "both workers served"

    # Bounded: the frontend holds nothing once all is answered; Redis holds four exchanges per
    # chat and no undelivered reply.
    assert drained == (0, 0, 0, 0)
    assert await redis.xlen(keys.replies(FRONTEND_ID)) == 0
    lengths = {await redis.llen(keys.history(f"telegram:u:{chat}"))
               for chat in range(FIRST_CHAT, FIRST_CHAT + CHATS)}
    assert lengths == {2 * MESSAGES}

    # Per-chat order: the workers answer only the oldest unanswered request of a
    # conversation, so each chat's replies come in the order of its messages and each prompt
    # holds exactly the earlier messages of its chat.
    assert not disorder, (
        f"{len(disorder)} of {CHATS} chats answered out of order, e.g. "
        f"{[[m['text'][-3:-1] for m in tg.sent_to(c)] for c in disorder[:3]]}")
    assert not stale, f"prompts without exactly the earlier messages, e.g. {stale[:3]}"
