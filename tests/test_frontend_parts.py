"""What the chat frontends share: trigger rules, the typing indicator, the per-chat outbox."""

from __future__ import annotations

import asyncio

import pytest

from bots.outbox import ChatOutbox
from bots.triggers import Reason, Triggers
from bots.typing_indicator import TypingIndicator

TG = Triggers(["House", "Dr. House"], "DrHouseBot", ["@DrHouseBot"])


@pytest.mark.parametrize(("text", "private", "mentioned", "replied", "expected"), [
    ("anything at all", True, False, False, Reason.PRIVATE),
    ("/help@SomeOtherBot", True, False, False, None),
    ("/help", False, False, False, Reason.COMMAND),
    ("/compare@drhousebot is it lupus", False, False, False, Reason.COMMAND),
    ("/help@SomeOtherBot", False, False, False, None),
    ("@DrHouseBot hi", False, True, False, Reason.MENTION),
    ("really?", False, False, True, Reason.REPLY),
    ("House, is it lupus?", False, False, False, Reason.NAME),
    ("What would Dr. House say", False, False, False, Reason.NAME),
    ("ask house", False, False, False, None),  # lowercase: "my house", not him
    ("the greenhouse and the Houses", False, False, False, None),
    ("@House_fan_club hello", False, False, False, None),
    ("just chatting", False, False, False, None),
])
def test_trigger_reason(text: str, private: bool, mentioned: bool, replied: bool,
                        expected: Reason | None) -> None:
    assert TG.reason(text, private=private, mentioned=mentioned,
                     replied_to_bot=replied) == expected


def test_clean_removes_the_account_mention_but_not_the_name() -> None:
    assert TG.clean("@DrHouseBot is it lupus?") == "is it lupus?"
    assert TG.clean("hey @drhousebot, is it lupus?") == "hey , is it lupus?"
    assert TG.clean("House, is it lupus?") == "House, is it lupus?"
    assert TG.clean("@DrHouseBotFan hi") == "@DrHouseBotFan hi"
    discord = Triggers(["House"], "", ["<@42>", "<@!42>"])
    assert discord.clean("<@!42> my knee") == "my knee"


async def test_typing_one_action_per_chat_until_done() -> None:
    sent: list[str] = []
    refreshed = asyncio.Event()

    async def send(chat: str) -> None:
        sent.append(chat)
        if sent.count("a") >= 2:
            refreshed.set()

    typing: TypingIndicator[str] = TypingIndicator(send, interval_s=0.01, timeout_s=60)
    typing.start("r1", "a")
    typing.start("r2", "a")  # same chat: no second immediate action
    await asyncio.sleep(0)
    assert sent == ["a"]
    runner = asyncio.create_task(typing.run())
    await asyncio.wait_for(refreshed.wait(), 10)
    assert typing.targets() == {"a"}
    assert typing.done("r1") is not None
    assert typing.targets() == {"a"}
    assert typing.done("r2") is not None
    assert typing.targets() == set() and len(typing) == 0
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_typing_reply_before_start_and_timeout() -> None:
    async def send(chat: str) -> None:
        return None

    typing: TypingIndicator[str] = TypingIndicator(send, interval_s=1, timeout_s=0)
    assert typing.done("fast") is None  # the reply came before the handler called start
    typing.start("fast", "a")
    assert len(typing) == 0
    typing.start("slow", "b")
    assert typing.targets() == set()  # timeout 0: expired at once
    assert typing.done("slow") is None


async def test_typing_failures_are_swallowed() -> None:
    async def send(chat: str) -> None:
        raise RuntimeError("network down")

    typing: TypingIndicator[str] = TypingIndicator(send)
    typing.start("r", "a")
    await asyncio.sleep(0.01)  # the failing action ran and was logged, not raised
    assert typing.done("r") is not None


async def test_outbox_keeps_order_per_chat_and_survives_failures() -> None:
    log: list[str] = []
    gate = asyncio.Event()

    async def slow_first() -> None:
        await gate.wait()
        log.append("a1")

    async def failing() -> None:
        raise RuntimeError("send failed")

    def record(name: str):  # type: ignore[no-untyped-def]
        async def send() -> None:
            log.append(name)
        return send

    class Blocked(Exception):
        pass

    async def blocked() -> None:
        raise Blocked("bot was blocked")

    outbox = ChatOutbox(lambda exc: "undeliverable" if isinstance(exc, Blocked) else "retry")
    first = outbox.submit("a", slow_first)
    failed = outbox.submit("a", failing)
    gone = outbox.submit("a", blocked)
    last = outbox.submit("a", record("a2"))
    other = outbox.submit("b", record("b1"))
    assert await other == "sent"
    assert log == ["b1"], "chat b must not wait for chat a"
    gate.set()
    await outbox.drain()
    assert log == ["b1", "a1", "a2"]
    # a failed send is not a success: the reader leaves its reply pending, or drops it
    assert [t.result() for t in (first, failed, gone, last)] == [
        "sent", "retry", "undeliverable", "sent"]
    assert len(outbox) == 0


async def test_outbox_bounds_a_chats_backlog_and_typing_bounds_its_requests(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import bots.typing_indicator as typing_module
    from bots.typing_indicator import TypingIndicator

    gate = asyncio.Event()

    async def stuck() -> None:
        await gate.wait()

    told: list[str] = []
    held_back: list[int] = []

    def notice(chat: str):  # type: ignore[no-untyped-def]
        async def send() -> None:
            told.append(chat)
        return send

    outbox = ChatOutbox(max_per_chat=3, notice=notice, on_full=lambda: held_back.append(1))
    queued = [outbox.submit("group", stuck) for _ in range(3)]
    refused = outbox.submit("group", stuck)
    assert await refused == "wait" and outbox.refused == 1  # the reply stays in Redis
    assert await outbox.submit("group", stuck) == "wait" and len(held_back) == 2
    assert await outbox.submit("other", lambda: asyncio.sleep(0)) == "sent"
    gate.set()
    assert [await t for t in queued] == ["sent"] * 3
    await asyncio.sleep(0)
    assert told == ["group"]  # told once, after what was already queued for it
    assert await outbox.submit("group", lambda: asyncio.sleep(0)) == "sent"  # room again

    monkeypatch.setattr(typing_module, "MAX_PENDING", 5)

    async def send(target: str) -> None:
        return None

    typing = TypingIndicator(send, interval_s=60)
    for i in range(8):
        typing.start(f"r{i}", f"chat{i % 2}")
    assert len(typing) == 5 and typing.done("r0") is None and typing.done("r7") is not None
    for i in range(3, 7):
        typing.done(f"r{i}")
    assert len(typing) == 0 and typing.targets() == set()


async def test_the_console_rewrites_a_streamed_reply_in_place(
        redis, keys, persona, settings) -> None:  # type: ignore[no-untyped-def]
    """On a terminal the text so far is printed and rewritten on its line as it grows; the
    final reply replaces it. Piped (not a terminal) only the final reply is printed."""
    import io

    from harness import running_worker

    from base.queue_client import QueueClient
    from bots.console import ConsoleFrontend
    from engine.generation import FakeGenerator

    generator = FakeGenerator(delay_s=2.0)
    outputs = {}
    async with running_worker(redis, keys, persona, generator):
        for interactive in (True, False):
            out = io.StringIO()
            queue = QueueClient(redis, keys, f"console-{interactive}")
            await queue.setup()
            console = ConsoleFrontend(settings.with_overrides(stream_replies=True),
                                      persona, queue, keys, stdin=io.StringIO("Why me?\n"),
                                      stdout=out, interactive=interactive)
            console.out.width = 10_000
            await console.run()
            outputs[interactive] = out.getvalue()
    streamed = outputs[True]
    assert "\r\x1b[K" in streamed
    before, after = streamed.rsplit("\r\x1b[K", 1)
    assert "House: Diagnosis" in before and after.startswith("House: Diagnosis")
    assert "\r" not in outputs[False] and outputs[False].count("Diagnosis") == 1


async def test_a_scripted_console_chat_is_not_rate_limited(
        redis, keys, persona, settings) -> None:  # type: ignore[no-untyped-def]
    """The console waits for each reply before it reads the next line, so the per-user limit
    of chat platforms (here 2 a window) does not cut a piped conversation short."""
    import io

    from harness import running_worker

    from base.queue_client import QueueClient
    from bots.console import ConsoleFrontend
    from engine.generation import FakeGenerator

    queue = QueueClient(redis, keys, "console-script")
    await queue.setup()
    out = io.StringIO()
    lines = "".join(f"question {i}?\n" for i in range(5))
    console = ConsoleFrontend(settings.with_overrides(user_rate_limit=2), persona, queue, keys,
                              stdin=io.StringIO(lines), stdout=out, interactive=False)
    async with running_worker(redis, keys, persona, FakeGenerator()):
        await asyncio.wait_for(console.run(), 20)
    assert out.getvalue().count("Diagnosis") == 5
    assert persona.line("slow_down") not in out.getvalue()


async def test_the_console_waits_for_a_worker_that_is_still_starting(
        redis, keys, persona, settings) -> None:  # type: ignore[no-untyped-def]
    """`make run` on a fresh machine: the first question is typed while the worker is still
    loading the model and House's lines (over REPLY_TIMEOUT_S the first time). It used to get
    the timeout line; it now waits for the worker to start."""
    import io

    from harness import running_worker

    from base.queue_client import QueueClient
    from bots.console import ConsoleFrontend
    from engine.generation import FakeGenerator

    queue = QueueClient(redis, keys, "console-start")
    await queue.setup()
    out = io.StringIO()
    console = ConsoleFrontend(settings.with_overrides(reply_timeout_s=0.5), persona,
                              queue, keys, stdin=io.StringIO("Do I need surgery?\n"), stdout=out,
                              interactive=False)
    chatting = asyncio.create_task(console.run())
    await asyncio.sleep(1.2)  # two reply timeouts with no worker
    async with running_worker(redis, keys, persona, FakeGenerator()):
        await asyncio.wait_for(chatting, 10)
    assert out.getvalue().startswith("Diagnosis")
    assert persona.line("timeout") not in out.getvalue()
