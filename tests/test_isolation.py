"""Isolation between users and chats, with real Redis, two workers and the frontend core.

Every message carries a secret naming its conversation; the workers' generators record every
prompt. A prompt may contain only secrets of its own conversation (and must contain them: the
history works). /reset clears one conversation; /forget leaves nothing about the user in
Redis, checked key by key with SCAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
import redis.asyncio as aioredis
from harness import CapturingGenerator, ask, make_settings, running_worker

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from bots.conversations import conversation_id
from bots.core import FrontendCore
from persona.pack import Persona

SECRET = re.compile(r"secret-(\w+)-(\w+)-(\d+)")


@pytest.fixture
def core(settings: Settings, prefix: str, persona: Persona, queue: QueueClient,
         keys: Keys) -> FrontendCore:
    return FrontendCore(make_settings(settings.redis.url, prefix, user_rate_limit=0), persona,
                        queue, keys)


def owner(text: str) -> tuple[str, str]:
    match = SECRET.search(text)
    assert match, text
    return match.group(1), match.group(2)


async def test_parallel_users_never_see_each_others_history(
        core: FrontendCore, queue: QueueClient, redis: aioredis.Redis, keys: Keys,
        persona: Persona) -> None:
    """40 users, each in a private chat and in one of two groups (history per user), three
    rounds, all at once, through two workers batching up to 8 requests each."""
    generators = [CapturingGenerator(), CapturingGenerator()]
    users = [f"u{i}" for i in range(40)]

    async def talk(user: str) -> None:
        group = f"g{int(user[1:]) % 2}"
        scopes = {"dm": conversation_id("t", user),
                  group: conversation_id("t", user, chat=group, private=False)}
        for round_ in range(3):
            for scope, conversation in scopes.items():
                await ask(core, queue, user, f"secret-{user}-{scope}-{round_} hurts",
                          conversation=conversation, chat="" if scope == "dm" else scope)

    async with contextlib.AsyncExitStack() as stack:
        for i, generator in enumerate(generators):
            await stack.enter_async_context(running_worker(
                redis, keys, persona, generator, name=f"iso-worker-{i}", batch_size=8,
                history_token_budget=10_000))
        await asyncio.gather(*(talk(user) for user in users))

    jobs = [job for g in generators for job in g.jobs]
    assert len(jobs) == 40 * 2 * 3 * persona.controls.candidates
    assert all(g.calls for g in generators), "both workers served"
    assert max(n for g in generators for n in g.calls) > persona.controls.candidates, \
        "requests of different users shared a batch"
    for job in jobs:
        user, scope = owner(job.message)
        round_ = int(SECRET.search(job.message).group(3))  # type: ignore[union-attr]
        seen = {(m.group(1), m.group(2)) for m in SECRET.finditer(job.prompt)}
        assert seen == {(user, scope)}, f"{user}/{scope} saw {seen - {(user, scope)}}"
        rounds = {int(m.group(3)) for m in SECRET.finditer(job.prompt)}
        assert rounds == set(range(round_ + 1)), "the conversation's own history is there"


async def test_shared_group_history_stays_in_its_chat(
        core: FrontendCore, queue: QueueClient, redis: aioredis.Redis, keys: Keys,
        persona: Persona) -> None:
    """GROUP_HISTORY=shared: people in one chat share a history (with their names), another
    chat never sees it, and a private chat with the same user stays apart."""
    generator = CapturingGenerator()
    g1 = conversation_id("t", "a", chat="g1", private=False, shared=True)
    g2 = conversation_id("t", "c", chat="g2", private=False, shared=True)
    async with running_worker(redis, keys, persona, generator):
        await ask(core, queue, "a", "secret-a-g1-0", conversation=g1, chat="g1", speaker="Ann")
        await ask(core, queue, "b", "secret-b-g1-0", conversation=g1, chat="g1", speaker="Bob")
        await ask(core, queue, "c", "secret-c-g2-0", conversation=g2, chat="g2", speaker="Cy")
        await ask(core, queue, "a", "secret-a-dm-0", conversation=conversation_id("t", "a"))
    bob = generator.prompts_for("secret-b-g1-0")[0]
    assert "secret-a-g1-0" in bob and "Ann says:" in bob and "Bob says:" in bob
    cy = generator.prompts_for("secret-c-g2-0")[0]
    assert set(SECRET.findall(cy)) == {("c", "g2", "0")}
    dm = generator.prompts_for("secret-a-dm-0")[0]
    assert set(SECRET.findall(dm)) == {("a", "dm", "0")}


async def test_reset_clears_only_that_conversation(
        core: FrontendCore, queue: QueueClient, redis: aioredis.Redis, keys: Keys,
        persona: Persona, fake_worker) -> None:  # type: ignore[no-untyped-def]
    dm, group = conversation_id("t", "r"), conversation_id("t", "r", chat="g", private=False)
    other = conversation_id("t", "s")
    for conversation, user in ((dm, "r"), (group, "r"), (other, "s")):
        await ask(core, queue, user, "hello", conversation=conversation)
    assert await ask(core, queue, "r", "/reset", conversation=dm) == persona.line("reset")
    assert await redis.llen(keys.history(dm)) == 0
    assert await redis.llen(keys.history(group)) == 2
    assert await redis.llen(keys.history(other)) == 2


async def dump_everything(redis: aioredis.Redis, prefix: str) -> dict[str, str]:
    """Every key of this test's prefix with its whole content, as text."""
    out: dict[str, str] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        kind = await redis.type(key)
        if kind == "string":
            value = await redis.get(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = await redis.smembers(key)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await redis.xrange(key)
        else:
            value = kind
        out[key] = repr(value)
    return out


async def test_forget_removes_everything_about_the_user(
        core: FrontendCore, queue: QueueClient, redis: aioredis.Redis, keys: Keys,
        persona: Persona, prefix: str, fake_worker) -> None:  # type: ignore[no-untyped-def]
    """The user talks privately, in a group (own history) and in a shared group with someone
    else, retries once; after /forget no key names the user and no value holds their id or
    words, while the other person's turns in the shared chat stay."""
    user, other = "777001", "888002"
    dm = conversation_id("t", user)
    group = conversation_id("t", user, chat="g1", private=False)
    shared = conversation_id("t", user, chat="g2", private=False, shared=True)
    await ask(core, queue, user, "zebraword one", conversation=dm)
    await ask(core, queue, user, "zebraword two", conversation=group, chat="g1")
    await ask(core, queue, other, "lionword hello", conversation=shared, chat="g2",
              speaker="Olga")
    await ask(core, queue, user, "zebraword three", conversation=shared, chat="g2",
              speaker="Zed")
    await ask(core, queue, user, "/retry", conversation=dm)
    before = await dump_everything(redis, prefix)
    assert any(user in key for key in before), "the test would prove nothing"
    assert any("zebraword" in value for value in before.values())

    assert await ask(core, queue, user, "/forget", conversation=dm) == persona.line("forget")

    after = await dump_everything(redis, prefix)
    after.pop(keys.requests)  # see the next test
    leftovers = {k: v for k, v in after.items()
                 if user in k or user in v or "zebraword" in v or "Zed" in v}
    assert not leftovers, f"still stored about the user: {sorted(leftovers)}"
    shared_turns = await redis.lrange(keys.history(shared), 0, -1)
    assert len(shared_turns) == 2 and "lionword" in shared_turns[0]


async def test_answered_requests_leave_the_request_stream(
        core: FrontendCore, queue: QueueClient, redis: aioredis.Redis, keys: Keys,
        fake_worker) -> None:  # type: ignore[no-untyped-def]
    """What /forget cannot reach: a message's text in the request stream after its answer."""
    await ask(core, queue, "999003", "zebraword private words")
    await ask(core, queue, "999003", "/forget")
    assert not [f for _, f in await redis.xrange(keys.requests) if "zebraword" in f["data"]]


async def test_shared_group_history_retry_reset_and_forget_act_on_your_own_turns(
        redis, keys, persona, queue, settings) -> None:  # type: ignore[no-untyped-def]
    """Before: in a shared channel B's /retry regenerated A's exchange and stored it as B's
    (so A's /forget left A's words behind), and anyone could /reset the whole channel."""
    import json

    from harness import make_settings, running_worker

    from bots.core import FrontendCore, Incoming
    from engine.generation import FakeGenerator

    core = FrontendCore(make_settings(settings.redis.url, settings.redis.key_prefix,
                                      admin_ids="admin"), persona, queue, keys)
    channel = "t:c:500"

    async def say(user: str, text: str) -> str:
        outcome = await core.handle(Incoming(user=user, conversation=channel, text=text,
                                             speaker=user.upper(), chat="500", shared=True))
        if hasattr(outcome, "kind"):
            return (await queue.wait_reply(outcome.id, 10)).text or ""
        return outcome.text

    async def contents() -> list[tuple[str, str]]:
        return [(t.get("user", "house"), t["content"]) for t in
                map(json.loads, await redis.lrange(keys.history(channel), 0, -1))]

    async with running_worker(redis, keys, persona, FakeGenerator()):
        await say("ann", "my knee hurts")
        assert await say("bob", "/retry") == persona.line("retry_nothing")
        assert [u for u, _ in await contents()] == ["ann", "house"]  # Ann's turn stays Ann's
        await say("bob", "my elbow hurts")
        assert await say("bob", "/retry") != persona.line("retry_nothing")  # his own: fine
        assert await say("ann", "/reset") == persona.line("reset_own")
        assert [c for u, c in await contents() if u != "house"] == ["my elbow hurts"]
        await say("ann", "still my knee")
        await say("ann", "/forget")
        assert all("knee" not in c for _, c in await contents())
        assert await say("admin", "/reset") == persona.line("reset")
        assert await contents() == []
