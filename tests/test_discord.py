"""The Discord frontend: message flows through dpytest (the real discord.py client with a fake
gateway and HTTP backend), slash commands through mocked Interaction objects; real Redis and a
worker with the deterministic generator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import discord
import discord.ext.test as dpytest
import pytest
import redis.asyncio as aioredis
from discord.ext.test import backend, callbacks
from discord.ext.test import factories as facts
from harness import expected_replies

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from bots.conversations import conversation_id
from bots.discord_frontend import SLASH_COMMANDS, DiscordFrontend
from bots.platforms import DISCORD_ID as FRONTEND_ID
from bots.splitting import DISCORD_LIMIT
from engine.generation import FakeGenerator
from engine.worker import Worker
from persona.pack import Persona

Factory = Callable[..., Awaitable[DiscordFrontend]]


class Sent:
    """What the bot sent: messages (from dpytest), their payloads, typing calls."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.typing: list[int] = []

    async def next(self, timeout: float = 15.0) -> discord.Message:
        """The next message the bot sent (dpytest's queue is polled: it outlives loops)."""
        deadline = time.monotonic() + timeout
        while dpytest.runner.sent_queue.empty():
            if time.monotonic() > deadline:
                raise TimeoutError("the bot sent nothing")
            await asyncio.sleep(0.01)
        return dpytest.runner.sent_queue.get_nowait()

    async def nothing(self, delay_s: float = 0.4) -> bool:
        await dpytest.run_all_events()
        await asyncio.sleep(delay_s)
        return dpytest.runner.sent_queue.empty()


@pytest.fixture
async def start_bot(settings: Settings, redis: aioredis.Redis, keys: Keys, persona: Persona,
                    ) -> AsyncIterator[tuple[Factory, Sent]]:
    """Configure dpytest around a DiscordFrontend (with optional setting overrides) and run
    its reply reader; dpytest's queues are emptied after the test."""
    sent = Sent()
    running: list[asyncio.Task[None]] = []

    async def start(**overrides: Any) -> DiscordFrontend:
        bot_settings = settings.with_overrides(**{"discord_token": "not-used", **overrides})
        queue = QueueClient(redis, keys, FRONTEND_ID)
        await queue.setup()
        frontend = DiscordFrontend(bot_settings, persona, queue, keys, reader_block_ms=100)
        await frontend.client._async_setup_hook()
        # dpytest resolves "<@id>" mentions from the guild's cached members, which needs the
        # members intent; the real bot does without (Discord sends the mentioned users).
        state = frontend.client._connection
        state._intents.members = True
        state.member_cache_flags = discord.MemberCacheFlags.from_intents(state._intents)
        dpytest.configure(frontend.client, members=["Ann", "Bob"])
        http = frontend.client.http
        original = http.send_message

        async def spy(channel_id: int, *, params: Any) -> Any:
            channel = frontend.client.get_channel(channel_id)  # noqa: F841 (dpytest reads it)
            sent.payloads.append(dict(params.payload))
            return await original(channel_id, params=params)

        http.send_message = spy  # type: ignore[method-assign]

        async def typing(channel: Any) -> None:
            sent.typing.append(channel.id)

        callbacks.set_callback(typing, "send_typing")
        running.append(asyncio.create_task(frontend.serve_replies()))
        return frontend

    yield start, sent
    for task in running:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    await dpytest.empty_queue()


@pytest.fixture
async def bot(fake_worker: Worker, start_bot: tuple[Factory, Sent]) -> DiscordFrontend:
    return await start_bot[0]()


@pytest.fixture
def sent(start_bot: tuple[Factory, Sent]) -> Sent:
    return start_bot[1]


def channel_and_members() -> tuple[discord.TextChannel, discord.Member, discord.Member]:
    config = dpytest.get_config()
    return config.channels[0], config.members[0], config.members[1]


async def reply_to(message: discord.Message, content: str,
                   member: discord.Member) -> discord.Message:
    """``member`` replies to ``message`` (dpytest has no helper for replies)."""
    channel = message.channel
    state = backend.get_state()
    replied = facts.make_message_dict(channel, message.author, id_num=message.id,
                                      content=message.content)
    data = facts.make_message_dict(channel, member, content=content,
                                   type=discord.MessageType.reply.value)
    data["message_reference"] = {"message_id": message.id, "channel_id": channel.id,
                                 "guild_id": channel.guild.id}
    data["referenced_message"] = replied
    state.parse_message_create(data)
    await dpytest.run_all_events()
    return state._get_message(data["id"])


# ---- messages --------------------------------------------------------------------------------


async def test_mention_in_channel_is_answered_as_reply(fake_generator: FakeGenerator,
                                                       bot: DiscordFrontend, sent: Sent,
                                                       redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, _ = channel_and_members()
    asked = await dpytest.message(f"<@{bot.client.user.id}> is it lupus?", channel, ann)
    answer = await sent.next()
    assert answer.channel.id == channel.id
    assert answer.content in await expected_replies(fake_generator, "is it lupus?")
    payload = sent.payloads[-1]
    assert payload["message_reference"]["message_id"] == asked.id
    assert payload["allowed_mentions"]["parse"] == []
    assert channel.id in sent.typing
    assert len(bot.typing) == 0


async def test_dm_is_answered(fake_generator: FakeGenerator,
                              bot: DiscordFrontend, sent: Sent, redis: aioredis.Redis,
                              keys: Keys) -> None:
    _, ann, _ = channel_and_members()
    dm = await ann.create_dm()
    await dpytest.message("My hands are numb.", dm, ann)
    answer = await sent.next()
    assert answer.content in await expected_replies(fake_generator, "My hands are numb.")
    assert "message_reference" not in sent.payloads[-1]
    history = keys.history(conversation_id("discord", str(ann.id)))
    assert await redis.llen(history) == 2


async def test_channel_without_mention_stays_silent(bot: DiscordFrontend, sent: Sent,
                                                    redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, _ = channel_and_members()
    await dpytest.message("Anyone watched the game? My house flooded.", channel, ann)
    assert await sent.nothing()
    assert await redis.xlen(keys.requests) == 0


async def test_reply_to_house_and_name_are_answered(fake_generator: FakeGenerator,
                                                    bot: DiscordFrontend, sent: Sent,
                                                    redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, bob = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> my knee", channel, ann)
    answer = await sent.next()
    followup = await reply_to(answer, "And my elbow?", bob)
    second = await sent.next()
    assert second.content in await expected_replies(fake_generator, "And my elbow?")
    assert sent.payloads[-1]["message_reference"]["message_id"] == followup.id
    await dpytest.message("House, what about my ankle?", channel, bob)
    third = await sent.next()
    assert third.content in await expected_replies(fake_generator, "House, what about my ankle?")


async def test_channel_history_is_shared_with_speaker_names(
        bot: DiscordFrontend, sent: Sent, redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, bob = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> I cough", channel, ann)
    await sent.next()
    await dpytest.message(f"<@{bot.client.user.id}> I sneeze", channel, bob)
    await sent.next()
    shared = conversation_id("discord", str(ann.id), chat=str(channel.id), private=False,
                             shared=True)
    turns = [json.loads(t) for t in await redis.lrange(keys.history(shared), 0, -1)]
    assert [t.get("speaker") for t in turns if t["role"] == "user"] == [ann.display_name,
                                                                         bob.display_name]


async def test_per_user_history_setting(fake_worker: Worker, start_bot: tuple[Factory, Sent],
                                        redis: aioredis.Redis, keys: Keys) -> None:
    start, sent = start_bot
    bot = await start(discord_group_history="per_user")
    channel, ann, _ = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> I cough", channel, ann)
    await sent.next()
    own = conversation_id("discord", str(ann.id), chat=str(channel.id), private=False)
    assert await redis.llen(keys.history(own)) == 2


async def test_long_reply_is_split(bot: DiscordFrontend, sent: Sent) -> None:
    channel, ann, _ = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> everything #long", channel, ann)
    pieces = [await sent.next() for _ in range(3)]
    assert await sent.nothing()
    assert all(len(p.content) <= DISCORD_LIMIT for p in pieces)
    assert sum(len(p.content) for p in pieces) > 2 * DISCORD_LIMIT
    references = [p.get("message_reference") for p in sent.payloads[-3:]]
    assert references[0] is not None and references[1:] == [None, None]


async def test_attachment_without_text_gets_a_line(bot: DiscordFrontend, sent: Sent,
                                                   persona: Persona, tmp_path: Any) -> None:
    _, ann, _ = channel_and_members()
    scan = tmp_path / "scan.png"
    scan.write_bytes(b"not really a png")
    dm = await ann.create_dm()
    await dpytest.message("", dm, ann, attachments=[str(scan)])
    assert (await sent.next()).content == persona.line("non_text")


async def test_event_error_is_logged_and_answered_in_character(
        bot: DiscordFrontend, sent: Sent, persona: Persona, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async def broken(msg: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bot.core, "handle", broken)
    _, ann, _ = channel_and_members()
    dm = await ann.create_dm()
    await dpytest.message("Hello?", dm, ann)
    assert (await sent.next()).content == persona.line("error")
    [record] = [r for r in caplog.records if r.name == "bots.discord_frontend"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_slow_down_applies_per_user(fake_worker: Worker, start_bot: tuple[Factory, Sent],
                                          persona: Persona) -> None:
    start, sent = start_bot
    await start(user_rate_limit=1, user_rate_window_s=600)
    _, ann, _ = channel_and_members()
    dm = await ann.create_dm()
    await dpytest.message("first", dm, ann)
    await dpytest.message("second", dm, ann)
    contents = {(await sent.next()).content, (await sent.next()).content}
    assert persona.line("slow_down") in contents
    assert any(c.startswith("Diagnosis") for c in contents)


# ---- slash commands --------------------------------------------------------------------------


def interaction(member: discord.Member, channel: discord.abc.GuildChannel) -> MagicMock:
    """A mocked Interaction: who, where, and the response/follow-up methods."""
    mocked = MagicMock(spec_set=["user", "channel_id", "guild_id", "response", "followup"])
    mocked.user = member
    mocked.channel_id = channel.id
    mocked.guild_id = channel.guild.id
    mocked.response = MagicMock()
    mocked.response.defer = AsyncMock()
    mocked.response.send_message = AsyncMock()
    mocked.response.is_done = MagicMock(return_value=True)
    mocked.followup = MagicMock()
    mocked.followup.send = AsyncMock()
    return mocked


async def followups(mocked: MagicMock, count: int = 1, timeout: float = 15.0) -> list[str]:
    async with asyncio.timeout(timeout):
        while mocked.followup.send.await_count < count:
            await asyncio.sleep(0.01)
    return [c.args[0] for c in mocked.followup.send.await_args_list]


async def slash(bot: DiscordFrontend, name: str, mocked: MagicMock, **kwargs: str) -> None:
    command = bot.client.tree.get_command(name)
    assert command is not None
    await command.callback(mocked, **kwargs)  # type: ignore[call-arg]


async def test_slash_commands_are_registered(bot: DiscordFrontend) -> None:
    assert {c.name for c in bot.client.tree.get_commands()} == set(SLASH_COMMANDS)


async def test_slash_compare(fake_generator: FakeGenerator,
                             bot: DiscordFrontend, redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, _ = channel_and_members()
    mocked = interaction(ann, channel)
    await slash(bot, "compare", mocked, text="is it lupus?")
    mocked.response.defer.assert_awaited_once_with(thinking=True, ephemeral=False)
    [text] = await followups(mocked)
    base, house = text.split("\n\n")
    assert base.startswith("Base model") and house.startswith("House (fine-tuned)")
    assert base.splitlines()[1] in await expected_replies(fake_generator, "is it lupus?",
                                                           adapter="__base__")
    assert house.splitlines()[1] in await expected_replies(fake_generator, "is it lupus?")


async def test_slash_reset_forget_help(bot: DiscordFrontend, sent: Sent, persona: Persona,
                                       redis: aioredis.Redis, keys: Keys) -> None:
    channel, ann, _ = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> I itch", channel, ann)
    await sent.next()
    history = keys.history(conversation_id("discord", str(ann.id), chat=str(channel.id),
                                           private=False, shared=True))
    assert await redis.llen(history) == 2

    reset = interaction(ann, channel)
    await slash(bot, "reset", reset)
    # a shared channel: a member who is no admin clears only their own turns (all of them here)
    assert await followups(reset) == [persona.line("reset_own")]
    reset.response.defer.assert_awaited_once_with(thinking=True, ephemeral=True)
    assert await redis.exists(history) == 0

    await dpytest.message(f"<@{bot.client.user.id}> I itch again", channel, ann)
    await sent.next()
    forget = interaction(ann, channel)
    await slash(bot, "forget", forget)
    assert await followups(forget) == [persona.line("forget")]
    assert await redis.exists(keys.user_keys(str(ann.id))) == 0

    helped = interaction(ann, channel)
    await slash(bot, "help", helped)
    [text] = await followups(helped)
    assert persona.help in text and "/compare" in text


async def test_allow_list_by_guild(fake_worker: Worker, start_bot: tuple[Factory, Sent],
                                   persona: Persona) -> None:
    start, sent = start_bot
    bot = await start(allowed_users="1")
    channel, ann, _ = channel_and_members()
    await dpytest.message(f"<@{bot.client.user.id}> hello", channel, ann)
    assert (await sent.next()).content == persona.line("not_allowed")
    # The guild on the allow-list (its id exists only once dpytest is configured) lets
    # everyone in it talk to House.
    bot.settings = bot.settings.with_overrides(allowed_chats=str(channel.guild.id))
    bot.core.settings = bot.settings
    await dpytest.message(f"<@{bot.client.user.id}> hello again", channel, ann)
    assert (await sent.next()).content.startswith("Diagnosis")


async def test_a_streamed_reply_is_sent_once_and_edited_to_the_final_text(
        start_bot: tuple[Factory, Sent], redis: aioredis.Redis, keys: Keys,
        persona: Persona) -> None:
    """As on Telegram: the text so far is sent, edited at most once a second, and the final
    reply supersedes it in the same message."""
    from harness import running_worker

    factory, sent = start_bot
    generator = FakeGenerator(delay_s=3.0)
    edits: list[tuple[str, float]] = []

    async def edited(channel: Any, message: Any, fields: Any) -> None:
        edits.append((fields["params"].payload["content"], time.monotonic()))

    callbacks.set_callback(edited, "edit_message")
    async with running_worker(redis, keys, persona, generator):
        bot = await factory(stream_replies=True)
        channel, ann, _ = channel_and_members()
        await dpytest.message(f"<@{bot.client.user.id}> why is my knee swollen?", channel, ann)
        first = await sent.next(timeout=20)
        first_text = first.content
        for _ in range(400):
            if generator.jobs and not bot.streams and len(bot.outbox) == 0:
                break
            await asyncio.sleep(0.05)
    shown = edits[-1][0] if edits else first_text  # what the channel shows now
    assert shown in await expected_replies(generator, "why is my knee swollen?")
    assert first_text != shown and edits
    assert len(sent.payloads) == 1  # one message, edited
    times = [at for _, at in edits[:-1]]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))
