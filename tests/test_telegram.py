"""The Telegram frontend: the real python-telegram-bot Application against a local fake Bot
API server (tests/fake_telegram.py), real Redis and a worker with the deterministic
generator, so every reply can be predicted from its request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from fake_telegram import FakeTelegram
from harness import expected_replies, running_worker, worker_settings

from base.commands import COMMANDS
from base.config import Settings
from base.keys import Keys
from base.protocol import Reply
from base.queue_client import MAX_SEND_ATTEMPTS, QueueClient
from bots.conversations import conversation_id
from bots.platforms import TELEGRAM_ID as FRONTEND_ID
from bots.splitting import TELEGRAM_LIMIT
from bots.telegram_frontend import TelegramFrontend, TypingFriendlyRateLimiter
from engine.generation import FakeGenerator, HFGenerator
from engine.worker import Worker
from persona.pack import Persona

BOT = FakeTelegram.username
Factory = Callable[..., Awaitable[TelegramFrontend]]


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def start_bot(settings: Settings, redis: aioredis.Redis, keys: Keys, persona: Persona,
                    tg: FakeTelegram) -> AsyncIterator[Factory]:
    """Start the frontend (with optional setting overrides); stopped after the test."""
    running: list[asyncio.Task[None]] = []

    async def start(**overrides: Any) -> TelegramFrontend:
        bot_settings = settings.with_overrides(**{
            "telegram_token": tg.token, "telegram_api_url": tg.api_url,
            "telegram_poll_timeout_s": 1, **overrides})
        queue = QueueClient(redis, keys, FRONTEND_ID)
        await queue.setup()
        frontend = TelegramFrontend(bot_settings, persona, queue, keys, reader_block_ms=100)
        task = asyncio.create_task(frontend.serve())
        running.append(task)
        ready = asyncio.create_task(frontend.ready.wait())
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert frontend.ready.is_set(), "the frontend did not start"
        return frontend

    yield start
    for task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def bot(fake_worker: Worker, start_bot: Factory) -> TelegramFrontend:
    return await start_bot()


async def first_bot_message(tg: FakeTelegram, chat_id: int, count: int = 1,
                            timeout: float = 15.0) -> dict[str, Any]:
    """The ``count``-th message the bot sent to the chat, once it is there."""
    return (await tg.wait_sent(count, chat_id=chat_id, timeout=timeout))[count - 1]


# ---- private chats ---------------------------------------------------------------------------


async def test_private_message_is_answered_with_typing(fake_generator: FakeGenerator,
                                                       bot: TelegramFrontend, tg: FakeTelegram,
                                                       redis: aioredis.Redis, keys: Keys) -> None:
    tg.private_text(1, "My leg hurts when I walk.")
    sent = await first_bot_message(tg, 1)
    assert sent["text"] in await expected_replies(fake_generator, "My leg hurts when I walk.")
    assert sent["reply_to"] is None and sent["parse_mode"] is None
    await tg.wait_for(lambda: any(a["chat_id"] == 1 and a["action"] == "typing"
                                  for a in tg.actions))
    assert len(bot.typing) == 0, "typing must stop once the reply is delivered"
    history = await redis.lrange(keys.history(conversation_id("telegram", "1")), 0, -1)
    assert len(history) == 2
    assert [c["command"] for c in tg.commands] == [c.name for c in COMMANDS]


async def test_start_and_unknown_command_answer_at_once(bot: TelegramFrontend, tg: FakeTelegram,
                                                        persona: Persona,
                                                        redis: aioredis.Redis, keys: Keys) -> None:
    tg.private_text(2, "/start")
    tg.private_text(2, "/frobnicate")
    first, second = await tg.wait_sent(2, chat_id=2)
    assert persona.disclaimer in first["text"]
    assert second["text"] == persona.line("unknown_command")
    assert await redis.xlen(keys.requests) == 0


# ---- groups ----------------------------------------------------------------------------------


async def test_group_without_mention_stays_silent(bot: TelegramFrontend, tg: FakeTelegram,
                                                  redis: aioredis.Redis, keys: Keys) -> None:
    tg.group_text(-100, 5, "My house is on fire and the greenhouse too.")
    tg.group_text(-100, 5, "Anyone seen @SomeOtherBot?")
    tg.group_text(-100, 5, "/help@SomeOtherBot")
    await tg.settle()
    assert tg.sent == []
    assert await redis.xlen(keys.requests) == 0


async def test_group_mention_and_reply_are_answered_as_replies(fake_generator: FakeGenerator,
        bot: TelegramFrontend, tg: FakeTelegram, redis: aioredis.Redis, keys: Keys) -> None:
    asked = tg.group_text(-100, 5, f"@{BOT} is it lupus?", first_name="Ann")
    answer = await first_bot_message(tg, -100)
    assert answer["reply_to"] == asked["message_id"]
    assert answer["text"] in await expected_replies(fake_generator, "is it lupus?")

    followup = tg.group_text(-100, 6, "Are you sure?", first_name="Bob",
                             reply_to=answer["message_id"])
    second = await first_bot_message(tg, -100, 2)
    assert second["reply_to"] == followup["message_id"]
    assert second["text"] in await expected_replies(fake_generator, "Are you sure?")

    named = tg.group_text(-100, 5, "House, what about sarcoidosis?", first_name="Ann")
    third = await first_bot_message(tg, -100, 3)
    assert third["reply_to"] == named["message_id"]

    # Per-user history within the group by default: Ann has two exchanges, Bob one.
    ann = conversation_id("telegram", "5", chat="-100", private=False)
    bob = conversation_id("telegram", "6", chat="-100", private=False)
    assert await redis.llen(keys.history(ann)) == 4
    assert await redis.llen(keys.history(bob)) == 2


async def test_forum_topic_reply_stays_in_topic(bot: TelegramFrontend, tg: FakeTelegram,
                                                redis: aioredis.Redis, keys: Keys) -> None:
    asked = tg.group_text(-200, 5, f"@{BOT} cough for three weeks", thread=77)
    answer = await first_bot_message(tg, -200)
    assert answer["message_thread_id"] == 77
    assert answer["reply_to"] == asked["message_id"]
    assert any(a.get("message_thread_id") == 77 for a in tg.actions)
    topic = conversation_id("telegram", "5", chat="-200", thread="77", private=False)
    assert await redis.llen(keys.history(topic)) == 2


async def test_shared_group_history_names_speakers(fake_worker: Worker, start_bot: Factory,
                                                   tg: FakeTelegram, redis: aioredis.Redis,
                                                   keys: Keys) -> None:
    await start_bot(group_history="shared")
    tg.group_text(-300, 5, f"@{BOT} my knee hurts", first_name="Ann")
    await tg.wait_sent(1, chat_id=-300)
    tg.group_text(-300, 6, f"@{BOT} mine too", first_name="Bob")
    await tg.wait_sent(2, chat_id=-300)
    shared = conversation_id("telegram", "5", chat="-300", private=False, shared=True)
    turns = await redis.lrange(keys.history(shared), 0, -1)
    assert len(turns) == 4
    assert '"speaker": "Ann"' in turns[0] and '"speaker": "Bob"' in turns[2]


# ---- commands --------------------------------------------------------------------------------


async def test_compare_shows_base_and_adapter(fake_generator: FakeGenerator,
                                              bot: TelegramFrontend, tg: FakeTelegram,
                                              redis: aioredis.Redis, keys: Keys) -> None:
    tg.private_text(3, "/compare is it lupus?")
    sent = await first_bot_message(tg, 3)
    base, house = sent["text"].split("\n\n")
    assert base.startswith("Base model")
    assert base.splitlines()[1] in await expected_replies(fake_generator, "is it lupus?",
                                                           adapter="__base__")
    assert house.startswith("House (fine-tuned)")
    assert house.splitlines()[1] in await expected_replies(fake_generator, "is it lupus?")


async def test_compare_as_reply_compares_the_replied_message(fake_generator: FakeGenerator,
        bot: TelegramFrontend, tg: FakeTelegram, redis: aioredis.Redis, keys: Keys) -> None:
    original = tg.group_text(-400, 5, "My skin turned orange.")
    command = tg.group_text(-400, 6, f"/compare@{BOT}", reply_to=original["message_id"])
    sent = await first_bot_message(tg, -400)
    assert sent["reply_to"] == command["message_id"]
    assert "Base model" in sent["text"] and "House (fine-tuned)" in sent["text"]
    await expected_replies(fake_generator, "My skin turned orange.", adapter="__base__")


async def test_reset_clears_the_conversation(bot: TelegramFrontend, tg: FakeTelegram,
                                             persona: Persona, redis: aioredis.Redis,
                                             keys: Keys) -> None:
    history = keys.history(conversation_id("telegram", "4"))
    tg.private_text(4, "I see spots.")
    await tg.wait_sent(1, chat_id=4)
    assert await redis.llen(history) == 2
    tg.private_text(4, "/reset")
    reset = await first_bot_message(tg, 4, 2)
    assert reset["text"] == persona.line("reset")
    assert await redis.exists(history) == 0


async def test_forget_deletes_everything_about_the_user(
        bot: TelegramFrontend, tg: FakeTelegram, persona: Persona, redis: aioredis.Redis,
        keys: Keys) -> None:
    tg.private_text(8, "I keep fainting.")
    tg.group_text(-500, 8, f"@{BOT} and my hands shake")
    await tg.wait_sent(1, chat_id=8)
    await tg.wait_sent(1, chat_id=-500)
    assert await redis.scard(keys.user_keys("8")) >= 2
    tg.private_text(8, "/forget")
    forget = await first_bot_message(tg, 8, 2)
    assert forget["text"] == persona.line("forget")
    assert await redis.exists(keys.user_keys("8")) == 0
    assert await redis.exists(keys.history(conversation_id("telegram", "8"))) == 0
    group = conversation_id("telegram", "8", chat="-500", private=False)
    assert await redis.exists(keys.history(group)) == 0


# ---- long replies, media, edits, channels ----------------------------------------------------


async def test_long_reply_is_split_in_order(bot: TelegramFrontend, tg: FakeTelegram) -> None:
    asked = tg.group_text(-600, 5, f"@{BOT} tell me everything #long")
    pieces = await tg.wait_sent(2, chat_id=-600)
    await tg.settle()
    pieces = tg.sent_to(-600)
    assert len(pieces) == 2
    assert all(len(p["text"]) <= TELEGRAM_LIMIT for p in pieces)
    assert sum(len(p["text"]) for p in pieces) > TELEGRAM_LIMIT
    assert pieces[0]["reply_to"] == asked["message_id"] and pieces[1]["reply_to"] is None
    assert pieces[0]["text"].endswith(".") and pieces[1]["text"].startswith("It is a long")


async def test_stickers_get_a_line_only_when_addressed(bot: TelegramFrontend, tg: FakeTelegram,
                                                       persona: Persona) -> None:
    tg.sticker(9, 9)
    assert (await first_bot_message(tg, 9))["text"] == persona.line("non_text")

    tg.sticker(-700, 9, kind="supergroup")
    asked = tg.group_text(-700, 9, f"@{BOT} hello")
    answer = await first_bot_message(tg, -700)
    assert answer["reply_to"] == asked["message_id"], "the unaddressed sticker got an answer"
    tg.sticker(-700, 9, kind="supergroup", reply_to=answer["message_id"])
    assert (await first_bot_message(tg, -700, 2))["text"] == persona.line("non_text")


async def test_a_flood_of_stickers_counts_against_the_user_limit(
        fake_worker: Worker, start_bot: Factory, tg: FakeTelegram, persona: Persona) -> None:
    await start_bot(user_rate_limit=2, user_rate_window_s=600)
    for _ in range(5):
        tg.sticker(19, 19)
    await tg.wait_sent(2, chat_id=19)
    await tg.settle()
    assert [m["text"] for m in tg.sent_to(19)] == [persona.line("non_text")] * 2


async def test_edits_and_channel_posts_are_ignored(bot: TelegramFrontend, tg: FakeTelegram,
                                                   redis: aioredis.Redis, keys: Keys) -> None:
    tg.private_text(10, "Edited: it was my left leg.", edited=True)
    tg.channel_post(-800, f"@{BOT} House, diagnose the channel")
    await tg.settle()
    assert tg.sent == []
    assert await redis.xlen(keys.requests) == 0


# ---- limits and failures ---------------------------------------------------------------------


async def test_retry_after_429_is_retried(fake_generator: FakeGenerator,
                                          bot: TelegramFrontend, tg: FakeTelegram,
                                          redis: aioredis.Redis, keys: Keys) -> None:
    tg.fail_next("sendMessage", times=1, retry_after=1)
    tg.private_text(11, "Is it contagious?")
    sent = await first_bot_message(tg, 11)
    assert tg.rejected["sendMessage"] == 1
    assert sent["text"] in await expected_replies(fake_generator, "Is it contagious?")
    await tg.settle()
    assert len(tg.sent_to(11)) == 1


async def test_burst_is_throttled_without_losing_allowed_messages(fake_generator: FakeGenerator,
        fake_worker: Worker, start_bot: Factory, tg: FakeTelegram, persona: Persona,
        redis: aioredis.Redis, keys: Keys) -> None:
    await start_bot(user_rate_limit=5, user_rate_window_s=600)
    texts = [f"Symptom number {i}." for i in range(50)]
    for text in texts:
        tg.private_text(12, text)
    sent = await tg.wait_sent(50, chat_id=12, timeout=60)
    await tg.settle()
    sent = [m["text"] for m in tg.sent_to(12)]
    assert len(sent) == 50
    assert sent.count(persona.line("slow_down")) == 45
    for text in texts[:5]:  # the first five are within the limit: each answered exactly once
        answers = await expected_replies(fake_generator, text)
        assert sum(s in answers for s in sent) == 1, text
    assert {job.message for job in fake_generator.jobs} == set(texts[:5])


async def test_allow_list(fake_worker: Worker, start_bot: Factory, tg: FakeTelegram,
                          persona: Persona) -> None:
    await start_bot(allowed_users="13")
    tg.private_text(14, "Let me in.")
    assert (await first_bot_message(tg, 14))["text"] == persona.line("not_allowed")
    tg.private_text(13, "I'm on the list.")
    assert (await first_bot_message(tg, 13))["text"].startswith("Diagnosis")


async def test_handler_error_is_logged_and_answered_in_character(
        bot: TelegramFrontend, tg: FakeTelegram, persona: Persona,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(msg: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bot.core, "handle", broken)
    with caplog.at_level(logging.ERROR, logger="bots.telegram_frontend"):
        tg.private_text(15, "Hello?")
        sent = await first_bot_message(tg, 15)
    assert sent["text"] == persona.line("error")
    assert "boom" not in sent["text"]
    [record] = [r for r in caplog.records if r.name == "bots.telegram_frontend"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_no_reply_in_time_tells_the_user(start_bot: Factory, tg: FakeTelegram,
                                               persona: Persona) -> None:
    # No worker runs: the user is told the request waits in the queue; typing stops after
    # the reply timeout.
    bot = await start_bot(reply_timeout_s=0.3, typing_interval_s=0.05)
    tg.private_text(18, "Hello? Anyone?")
    assert (await first_bot_message(tg, 18))["text"] == persona.line("queued")
    await tg.wait_sent(2, chat_id=18)
    assert tg.sent_to(18)[1]["text"] == persona.line("timeout")
    assert len(bot.typing) == 0


async def test_fake_server_accepts_json_and_form_bodies(tg: FakeTelegram) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        url = f"{tg.api_url}{tg.token}/sendMessage"
        async with http.post(url, json={"chat_id": 21, "text": "42",
                                        "reply_parameters": {"message_id": 7}}) as response:
            assert (await response.json())["ok"] is True
        async with http.post(url, data={"chat_id": "21", "text": "007"}) as response:
            assert (await response.json())["result"]["text"] == "007"
        async with http.post(f"{tg.api_url}wrong/getMe") as response:
            assert response.status == 401
    first, second = tg.sent_to(21)
    assert first["text"] == "42" and first["reply_to"] == 7
    assert second["text"] == "007"


async def test_chat_actions_never_wait_for_rate_budget() -> None:
    limiter = TypingFriendlyRateLimiter(overall_max_rate=1, overall_time_period=60,
                                        group_max_rate=1, group_time_period=60)
    calls: list[str] = []

    async def call(endpoint: str) -> bool:
        calls.append(endpoint)
        return True

    for _ in range(3):
        await limiter.process_request(call, ("sendChatAction",), {}, "sendChatAction",
                                      {"chat_id": -1}, None)
    assert calls == ["sendChatAction"] and limiter.dropped_actions == 2
    # Messages still go through the group limiter (one a minute here): the first one passes.
    await limiter.process_request(call, ("sendMessage",), {}, "sendMessage", {"chat_id": -1},
                                  None)
    assert calls[-1] == "sendMessage"


async def test_restarted_frontend_delivers_pending_replies(start_bot: Factory, tg: FakeTelegram,
                                                           redis: aioredis.Redis,
                                                           keys: Keys) -> None:
    # A reply written while no Telegram frontend ran (e.g. during a restart).
    reply = Reply(id="r-pending", conversation="telegram:u:16", text="You waited. Good.",
                  route={"chat": 16, "reply_to": None, "thread": None})
    await redis.xadd(keys.replies(FRONTEND_ID), reply.dumps())
    await start_bot()
    sent = await first_bot_message(tg, 16)
    assert sent["text"] == "You waited. Good."


# ---- the real model --------------------------------------------------------------------------


@pytest.mark.model
async def test_private_message_through_the_embedded_model(
        embedded_model: Any, start_bot: Factory, tg: FakeTelegram, redis: aioredis.Redis,
        keys: Keys, persona: Persona) -> None:
    generator = HFGenerator(embedded_model, persona.other_speakers)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("model-worker",
                                  gen_max_new_tokens=16, gen_candidates=1))
    serving = asyncio.create_task(worker.run())
    try:
        await start_bot()
        tg.private_text(17, "Doctor, I have a headache and a fever.")
        sent = await first_bot_message(tg, 17, timeout=300)
    finally:
        worker.stop.set()
        await asyncio.wait_for(serving, 120)
    assert sent["text"].strip()
    assert "Traceback" not in sent["text"]
    assert len(sent["text"]) <= TELEGRAM_LIMIT


@pytest.mark.parametrize("secret", [None, "short-secret"])
async def test_webhook_mode_refuses_to_start_without_a_long_secret(
        settings: Settings, redis: aioredis.Redis, secret: str | None, capsys,
        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Forged updates could /forget a victim or pass the allow-list: no secret, no webhook."""
    from bots.platforms import run, serve_platform

    fields = {"telegram_token": "1:x", "telegram_webhook_url": "https://bot.example.org/telegram",
              "telegram_webhook_secret": secret}
    webhook = settings.with_overrides(**fields)
    with pytest.raises(ValueError, match="at least 32 characters"):
        await serve_platform("telegram", webhook, redis)
    monkeypatch.setenv("TELEGRAM_TOKEN", "1:x")
    monkeypatch.setenv("TELEGRAM_WEBHOOK_URL", "https://bot.example.org/t")
    if secret:
        monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", secret)
    else:
        monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET", raising=False)
    assert run(argparse.Namespace(action="telegram")) == 2
    assert "TELEGRAM_WEBHOOK_SECRET of at least 32 characters" in capsys.readouterr().out
    ok = settings.with_overrides(**{**fields, "telegram_webhook_secret": "s" * 32})
    assert ok.telegram.webhook_problem() is None


async def test_a_reply_survives_four_429s_and_is_sent_exactly_once(
        fake_generator: FakeGenerator, fake_worker: Worker, start_bot: Factory,
        tg: FakeTelegram) -> None:
    """Before, the reply was acknowledged when it was handed to the outbox: 429s past
    TELEGRAM_MAX_RETRIES lost it for good. Now it stays pending and is sent again."""
    bot = await start_bot(telegram_max_retries=1)
    bot.queue.retry_after_s = 0.3
    tg.fail_next("sendMessage", times=4, retry_after=1)
    tg.private_text(31, "Is it contagious?")
    sent = await first_bot_message(tg, 31, timeout=40)
    await tg.settle(1.0)
    assert tg.rejected["sendMessage"] == 4
    assert len(tg.sent_to(31)) == 1
    assert sent["text"] in await expected_replies(fake_generator, "Is it contagious?")


async def test_a_reply_queued_when_the_frontend_stops_is_sent_after_the_restart_once(
        fake_generator: FakeGenerator, fake_worker: Worker, settings: Settings,
        redis: aioredis.Redis, keys: Keys, persona: Persona, tg: FakeTelegram) -> None:
    async def start() -> tuple[TelegramFrontend, asyncio.Task[None]]:
        bot_settings = settings.with_overrides(
            telegram_token=tg.token, telegram_api_url=tg.api_url, telegram_poll_timeout_s=1,
            telegram_max_retries=0)
        queue = QueueClient(redis, keys, FRONTEND_ID)
        await queue.setup()
        frontend = TelegramFrontend(bot_settings, persona, queue, keys, reader_block_ms=100)
        task = asyncio.create_task(frontend.serve())
        await asyncio.wait_for(frontend.ready.wait(), 30)
        return frontend, task

    first, task = await start()
    first.queue.retry_after_s = 60  # no second try before the restart
    tg.fail_next("sendMessage", times=1, retry_after=1)
    tg.private_text(32, "Do I need surgery?")
    await tg.wait_for(lambda: tg.rejected["sendMessage"] == 1, timeout=20)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert tg.sent_to(32) == []
    pending = await redis.xpending(keys.replies(FRONTEND_ID), "frontend")
    assert pending["pending"] == 1  # not acknowledged: the chat never got it
    _, again = await start()
    try:
        await tg.wait_sent(1, chat_id=32, timeout=20)
        await tg.settle(1.0)
        assert len(tg.sent_to(32)) == 1
        assert (await redis.xpending(keys.replies(FRONTEND_ID), "frontend"))["pending"] == 0
    finally:
        again.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(again, 30)


async def test_a_reply_to_a_chat_that_blocked_the_bot_is_dropped_not_retried(
        fake_worker: Worker, start_bot: Factory, tg: FakeTelegram, redis: aioredis.Redis,
        keys: Keys) -> None:
    bot = await start_bot()
    bot.queue.retry_after_s = 0.2
    tg.forbid_next("sendMessage")
    tg.private_text(33, "hello?")
    await tg.wait_for(lambda: bot.queue.undeliverable == 1, timeout=20)
    await asyncio.sleep(1.0)
    assert tg.calls["sendMessage"] == 1  # never sent again
    assert (await redis.xpending(keys.replies(FRONTEND_ID), "frontend"))["pending"] == 0


async def test_an_update_delivered_twice_is_answered_once(bot: TelegramFrontend,
                                                          tg: FakeTelegram) -> None:
    """A poll or webhook retry delivers the same message again (same chat and message id)."""
    message = tg.private_text(34, "Is it lupus?")
    tg.inject({"message": message})
    await tg.wait_sent(1, chat_id=34, timeout=15)
    await tg.settle(1.0)
    assert len(tg.sent_to(34)) == 1


async def test_a_chat_with_a_full_backlog_is_told_once_and_loses_nothing(
        start_bot: Factory, tg: FakeTelegram, redis: aioredis.Redis, keys: Keys,
        persona: Persona) -> None:
    """A group behind its send limit used to grow the frontend's memory without a word. Now
    a chat holds at most ``max_per_chat`` sends; the rest wait in Redis, the chat is told once
    why, the metric counts each held-back reply, and every reply still arrives once — even
    one refused more often than a reply may fail (MAX_SEND_ATTEMPTS): a wait is no failure."""
    bot = await start_bot(telegram_max_retries=3)
    bot.outbox.max_per_chat = 2
    bot.queue.retry_after_s = 0.2
    tg.fail_next("sendMessage", times=1, retry_after=4)  # the chat's first send stalls 4 s
    texts = [f"Answer number {i}." for i in range(5)]
    for i, text in enumerate(texts):
        reply = Reply(id=f"backlog-{i}", conversation="c", text=text, route={"chat": 35})
        await redis.xadd(keys.replies(FRONTEND_ID), reply.dumps())
    await tg.wait_sent(len(texts) + 1, chat_id=35, timeout=40)
    await tg.settle(1.0)
    sent = [m["text"] for m in tg.sent_to(35)]
    assert sent.count(persona.line("backlog")) == 1
    assert sorted(t for t in sent if t != persona.line("backlog")) == texts
    assert bot.core.metrics.backlog_full.labels(FRONTEND_ID)._value.get() > MAX_SEND_ATTEMPTS
    assert bot.queue.undeliverable == 0
    assert (await redis.xpending(keys.replies(FRONTEND_ID), "frontend"))["pending"] == 0


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_streamed_reply_is_sent_once_and_edited_to_the_final_text(
        streaming: bool, redis: aioredis.Redis, keys: Keys, persona: Persona,
        start_bot: Factory, tg: FakeTelegram) -> None:
    """While the reply generates, its text so far is sent and then edited (at most once a
    second in a private chat); the final reply supersedes it in the same message. With
    STREAM_REPLIES off nothing changes: one message, no edits."""
    generator = FakeGenerator(delay_s=3.0)
    async with running_worker(redis, keys, persona, generator):
        bot = await start_bot(stream_replies=streaming)
        tg.private_text(36, "Why does my knee hurt?")
        await tg.wait_sent(1, chat_id=36, timeout=20)
        await tg.wait_for(lambda: len(generator.jobs) > 0 and not bot.streams, timeout=20)
        await bot.queue.settle()
        await tg.settle(1.5)
    sent = tg.sent_to(36)
    assert len(sent) == 1 and tg.calls["sendMessage"] == 1
    shown = tg.shown(36, sent[0]["message_id"])
    assert shown in await expected_replies(generator, "Why does my knee hurt?")
    edits = [e for e in tg.edits if e["chat_id"] == 36]
    if streaming:
        assert sent[0]["text"] != shown and edits  # the text so far, then edited
        partial_edits = [e["at"] for e in edits[:-1]]
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(partial_edits))
    else:
        assert sent[0]["text"] == shown and edits == []
