"""The queue and the worker with the deterministic generator: replies, history, commands,
micro-batching, dead letters, back-pressure and duplicate suppression."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from harness import worker_settings

from base.keys import WORKERS_GROUP
from base.protocol import Reply, Request
from base.queue_client import QueueClient, QueueFull
from engine.generation import FakeGenerator
from engine.worker import Worker


def chat(text: str, conversation: str = "c1", user: str = "u1", **kw) -> Request:  # type: ignore[no-untyped-def]
    return Request(frontend="test-frontend", conversation=conversation, user=user, text=text,
                   **kw)


async def test_chat_reply_and_history(fake_worker, queue, redis, keys) -> None:  # type: ignore[no-untyped-def]
    first = chat("Do I need surgery?", settings={"seed": 7, "candidates": 1})
    reply = await queue.ask(first, timeout_s=10)
    assert reply.id == first.id
    assert reply.text == FakeGenerator.reply_for("Do I need surgery?", "house", 7)
    await queue.ask(chat("And now?"), timeout_s=10)
    stored = [json.loads(t) for t in await redis.lrange(keys.history("c1"), 0, -1)]
    assert [t["role"] for t in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[0]["content"] == "Do I need surgery?"
    assert stored[2]["content"] == "And now?"
    assert await redis.lrange(keys.history("c2"), 0, -1) == []
    assert await redis.ttl(keys.history("c1")) > 0


async def test_history_reaches_the_prompt_of_its_own_conversation_only(
        fake_worker, queue, fake_generator) -> None:  # type: ignore[no-untyped-def]
    prompts: list[str] = []
    original = fake_generator.generate

    def capture(jobs, *stream):  # type: ignore[no-untyped-def]
        prompts.extend(j.prompt for j in jobs)
        return original(jobs, *stream)

    fake_generator.generate = capture
    await queue.ask(chat("my secret is pineapple", conversation="a"), timeout_s=10)
    prompts.clear()
    await queue.ask(chat("what did I say?", conversation="a"), timeout_s=10)
    assert all("pineapple" in p for p in prompts)
    prompts.clear()
    await queue.ask(chat("what did I say?", conversation="b", user="u2"), timeout_s=10)
    assert prompts and not any("pineapple" in p for p in prompts)


async def test_reset_clears_the_conversation(fake_worker, queue, redis, keys, persona) -> None:  # type: ignore[no-untyped-def]
    await queue.ask(chat("hello"), timeout_s=10)
    reply = await queue.ask(chat("", kind="reset"), timeout_s=10)
    assert reply.text == persona.line("reset")
    assert await redis.exists(keys.history("c1")) == 0


async def test_compare_answers_with_every_variant(fake_worker, queue) -> None:  # type: ignore[no-untyped-def]
    reply = await queue.ask(chat("Is it lupus?", kind="compare", settings={"seed": 3}),
                            timeout_s=10)
    assert [v.name for v in reply.variants] == ["__base__", "house"]
    assert reply.variants[0].text == FakeGenerator.reply_for("Is it lupus?", "__base__", 3)
    assert reply.variants[1].text == FakeGenerator.reply_for("Is it lupus?", "house", 3)


async def test_retry_regenerates_the_last_answer(fake_worker, queue, redis, keys) -> None:  # type: ignore[no-untyped-def]
    await queue.ask(chat("Am I dying?"), timeout_s=10)
    retry = chat("", kind="retry", settings={"seed": 99, "candidates": 1})
    reply = await queue.ask(retry, timeout_s=10)
    assert reply.text == FakeGenerator.reply_for("Am I dying?", "house", 99)
    stored = [json.loads(t) for t in await redis.lrange(keys.history("c1"), 0, -1)]
    assert len(stored) == 2 and stored[1]["content"] == reply.text


async def test_forget_deletes_the_users_keys(fake_worker, queue, redis, keys) -> None:  # type: ignore[no-untyped-def]
    await queue.ask(chat("hello", conversation="x", user="ann"), timeout_s=10)
    await queue.ask(chat("hello", conversation="y", user="bob"), timeout_s=10)
    await queue.ask(chat("", conversation="x", user="ann", kind="forget"), timeout_s=10)
    remaining = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*")]
    assert not [k for k in remaining if ":x" in k or "ann" in k]
    assert keys.history("y") in remaining


async def test_bad_input_gets_a_line_and_the_worker_keeps_serving(fake_worker, queue,
                                                                  persona) -> None:  # type: ignore[no-untyped-def]
    for text in ["", "   ", "\x00\x01\x02", "\u200b\u200f"]:
        reply = await queue.ask(chat(text), timeout_s=10)
        assert reply.text == persona.line("empty")
    huge = await queue.ask(chat("why? " * 10_000), timeout_s=10)
    assert huge.error is None and (huge.text or "").startswith("Diagnosis")
    rtl = await queue.ask(chat("שלום, אני חולה 🤒🤒🤒"), timeout_s=10)
    assert rtl.error is None and rtl.text in persona.language_jabs  # House answers in English


async def test_a_batch_runs_one_generate_call(redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    generator = FakeGenerator()
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", batch_size=8))
    requests = [chat(f"question {i}", conversation=f"c{i}", settings={"candidates": 1})
                for i in range(8)]
    for r in requests:
        await queue.submit(r)
    await worker.run(burst=True)
    assert generator.calls == [8]
    replies = await asyncio.gather(*(queue.wait_reply(r.id, 10) for r in requests))
    assert all(rep.batch_size == 8 for rep in replies)


async def test_malformed_and_overdelivered_requests_go_to_dead_letters(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    await redis.xadd(keys.requests, {"data": "not json"})
    poisoned = chat("poison")
    await queue.submit(poisoned)
    # Earlier deliveries to workers that died without acknowledging: read once, then
    # claimed twice (each claim counts as a delivery).
    await redis.xreadgroup(WORKERS_GROUP, "dead-1", {keys.requests: ">"})
    ids = [e[0] for e in await redis.xrange(keys.requests)]
    for name in ("dead-2", "dead-3"):
        await redis.xclaim(keys.requests, WORKERS_GROUP, name, 0, ids)
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", claim_idle_ms=0, max_deliveries=3))
    await worker.run(burst=True)
    reply = await queue.wait_reply(poisoned.id, 10)
    assert reply.error == persona.line("dead_letter")
    dead = await redis.xrange(keys.dead_letters)
    assert len(dead) == 2
    pending = await redis.xpending(keys.requests, WORKERS_GROUP)
    assert pending["pending"] == 0


async def test_back_pressure_refuses_when_the_queue_is_full(redis, keys) -> None:  # type: ignore[no-untyped-def]
    client = QueueClient(redis, keys, "test-frontend", max_queue_depth=3)
    await client.setup()
    for i in range(3):
        await client.submit(chat(f"m{i}"))
    with pytest.raises(QueueFull):
        await client.submit(chat("one too many"))
    # Control requests count too (before, a flood of /reset filled the stream past the depth
    # and everyone else was refused); the per-user limit keeps one user from filling it.
    with pytest.raises(QueueFull):
        await client.submit(chat("", kind="reset"))
    assert await redis.xlen(keys.requests) == 3


async def test_the_request_stream_is_never_trimmed_under_pending_requests(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """XADD MAXLEN ~ used to trim the oldest entries even when they were pending, and the
    worker then dropped them silently. Now the stream is sized by the depth limit."""
    client = QueueClient(redis, keys, "test-frontend", max_queue_depth=500, stream_maxlen=10)
    requests = [chat(f"m{i}", conversation=f"k{i}") for i in range(300)]
    for r in requests:
        await client.submit(r)
    assert await redis.xlen(keys.requests) == 300
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", batch_size=64))
    await worker.run(burst=True)
    replies = await asyncio.gather(*(queue.wait_reply(r.id, 30) for r in requests))
    assert all(rep.text.startswith("Diagnosis") for rep in replies)


async def test_a_request_deleted_from_the_stream_still_gets_an_apology(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """An operator's XDEL (or XTRIM) used to lose a request without a word: the worker skipped
    the vanished entry. Now its envelope (the request without its text) gets the user an
    apology, once, whether a worker had read it or not; answered requests leave no envelope."""
    unread, read = chat("never read", conversation="k1"), chat("read, then gone", conversation="k2")
    unread_entry = await queue.submit(unread)
    read_entry = await queue.submit(read)
    await redis.xreadgroup(WORKERS_GROUP, "dead-worker", {keys.requests: ">"}, count=2)
    await redis.xdel(keys.requests, unread_entry, read_entry)
    answered = chat("an ordinary question", conversation="k3")
    await queue.submit(answered)
    await asyncio.sleep(0.3)
    workers = [Worker(redis, keys, FakeGenerator(), persona,
                      worker_settings(f"w{i}",
                                    claim_idle_ms=200)) for i in range(2)]
    await asyncio.gather(*(w.run(burst=True) for w in workers))
    assert (await queue.wait_reply(answered.id, 10)).text
    for request in (unread, read):
        reply = await queue.wait_reply(request.id, 10)
        assert reply.error == persona.line("lost") and reply.conversation == request.conversation
    assert sum(w.metrics.lost._value.get() for w in workers) == 2  # one apology each
    assert await redis.hlen(keys.envelopes) == 0
    assert await redis.xpending(keys.requests, WORKERS_GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}
    assert not await redis.exists(keys.order("k1"), keys.order("k2"))


async def test_a_duplicate_reply_is_delivered_once(redis, keys) -> None:  # type: ignore[no-untyped-def]
    client = QueueClient(redis, keys, "dup-frontend")
    await client.setup()
    reply = Reply(id="r1", conversation="c", text="It's not lupus.")
    for _ in range(3):
        await redis.xadd(keys.replies("dup-frontend"), reply.dumps())
    delivered: list[Reply] = []

    async def deliver(r: Reply) -> None:
        delivered.append(r)

    stop = asyncio.Event()
    reader = asyncio.create_task(client.run_reader(deliver, stop=stop, block_ms=50))
    for _ in range(100):
        if await redis.xlen(keys.replies("dup-frontend")) == 0:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await reader
    assert [r.id for r in delivered] == ["r1"]


async def test_metrics_and_liveness_endpoints(redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Worker(redis, keys, FakeGenerator(), persona, worker_settings("m"))
    server = worker.metrics.serve(port, max_age_s=5)
    try:
        await queue.submit(chat("hello"))
        await worker.run(burst=True)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
        assert 'house_replies_total{kind="chat"} 1.0' in body
        assert "house_batch_size_bucket" in body
        health = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status)
        assert health == 200
        worker.metrics.last_beat -= 60
        with pytest.raises(urllib.error.HTTPError) as stalled:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz")
        assert stalled.value.code == 503
    finally:
        server.shutdown()


async def test_messages_of_one_conversation_in_one_batch_are_answered_in_order(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    generator = FakeGenerator()
    prompts: list[str] = []
    original = generator.generate

    def capture(jobs, *stream):  # type: ignore[no-untyped-def]
        prompts.extend(j.prompt for j in jobs)
        return original(jobs, *stream)

    generator.generate = capture  # type: ignore[method-assign]
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", batch_size=8))
    first = chat("first message", settings={"candidates": 1})
    second = chat("second message", settings={"candidates": 1})
    other = chat("elsewhere", conversation="c9", settings={"candidates": 1})
    for r in (first, second, other):
        await queue.submit(r)
    await worker.run(burst=True)
    assert generator.calls == [2, 1]
    first_reply = await queue.wait_reply(first.id, 10)
    await queue.wait_reply(second.id, 10)
    assert first_reply.text in prompts[-1] and "second message" in prompts[-1]
    stored = [json.loads(t)["content"] for t in await redis.lrange(keys.history("c1"), 0, -1)]
    assert stored[0] == "first message" and stored[2] == "second message"


async def test_forget_also_removes_the_users_dead_letters(redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    from engine.history import HistoryStore

    for user in ("ann", "bob"):
        await redis.xadd(keys.dead_letters, chat(f"{user} secret", user=user).dumps())
    await HistoryStore(redis, keys).forget("ann")
    left = [f["data"] for _, f in await redis.xrange(keys.dead_letters)]
    assert len(left) == 1 and "bob secret" in left[0]


def slow_scorer(texts):  # type: ignore[no-untyped-def]
    import time

    time.sleep(3.0)
    return [0.5] * len(texts)


@pytest.mark.parametrize("slow", ["generation", "reply choice"])
async def test_a_batch_longer_than_the_claim_time_is_answered_once(
        redis, keys, persona, queue, slow) -> None:  # type: ignore[no-untyped-def]
    """Two workers, a 3 s generation (or reply choice), a 1 s claim time: the worker holding
    the batch renews its lease from reading to answering, so the other never takes it over;
    each request is answered once, each turn stored once (before, both answered and the
    history got the turn twice)."""
    options = {"read_block_ms": 50, "batch_wait_ms": 0, "claim_idle_ms": 1000}
    workers = [Worker(redis, keys, FakeGenerator(delay_s=3.0 if slow == "generation" else 0),
                      persona, worker_settings(f"w{i}", **options),
                      scorer=slow_scorer if slow == "reply choice" else None)
               for i in range(2)]
    requests = [chat(f"slow question {i}", conversation=f"slow{i}") for i in range(2)]
    for r in requests:
        await queue.submit(r)
    running = [asyncio.create_task(w.run()) for w in workers]
    replies = await asyncio.gather(*(queue.wait_reply(r.id, 30) for r in requests))
    await asyncio.sleep(4.5)  # long enough for a second answer to arrive, if any
    for w in workers:
        w.stop.set()
    await asyncio.gather(*running)
    assert all(rep.text.startswith("Diagnosis") for rep in replies)
    assert await redis.hget(keys.stats, "replies") == "2"  # replies written, all workers
    assert sum(w.replies for w in workers) == 2
    for i in range(2):
        assert await redis.llen(keys.history(f"slow{i}")) == 2


async def test_a_timed_out_generation_is_stopped_before_the_next_one_starts(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """wait_for on a thread cannot stop it: before, the next batch ran a second generate on
    the same model while the timed-out one went on. Now the generation is told to stop, and
    one generate runs at a time."""
    import time

    generator = FakeGenerator(delay_s=30.0)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", batch_size=1,
                                  generation_timeout_s=0.5))
    slow, later = chat("slow one", conversation="a"), chat("next one", conversation="b")
    for r in (slow, later):
        await queue.submit(r)
    started = time.monotonic()
    await worker.run(burst=True)
    elapsed = time.monotonic() - started
    assert (await queue.wait_reply(slow.id, 5)).error == persona.line("timeout")
    assert (await queue.wait_reply(later.id, 5)).error == persona.line("timeout")
    assert generator.calls == [2, 2]  # two candidates per request, one batch each
    assert generator.most_running == 1
    assert elapsed < 10, elapsed  # each 30 s generation stopped at once, not run out


def test_row_stops_stop_every_row_once_cancelled() -> None:
    import threading

    import torch

    from engine.generation import RowStops
    from persona.pack import Controls

    cancelled = threading.Event()
    stops = RowStops(None, 3, [Controls(max_new_tokens=50)] * 2, [], cancelled)
    cancelled.set()
    assert stops(torch.zeros((2, 5), dtype=torch.long), None).tolist() == [True, True]


class PoisonGenerator(FakeGenerator):
    """Raises for any batch holding the word "poison" (a request that breaks the model)."""

    def generate(self, jobs, *stream):  # type: ignore[no-untyped-def]
        if any("poison" in job.message for job in jobs):
            self.calls.append(len(jobs))
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().generate(jobs, *stream)


async def test_a_poison_request_is_dead_lettered_alone_and_its_batch_mates_answered(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, PoisonGenerator(), persona,
                    worker_settings("w", batch_size=8))
    innocent = [chat(f"fine question {i}", conversation=f"ok{i}") for i in range(3)]
    poison = chat("poison pill", conversation="bad")
    for r in [innocent[0], poison, *innocent[1:]]:
        await queue.submit(r)
    await worker.run(burst=True)
    for r in innocent:
        reply = await queue.wait_reply(r.id, 10)
        assert reply.error is None and reply.text.startswith("Diagnosis"), reply
    assert (await queue.wait_reply(poison.id, 10)).error == persona.line("dead_letter")
    dead = await redis.xrange(keys.dead_letters)
    assert [f["reason"] for _, f in dead] == ["generation failed"]
    assert worker.metrics.alive(60)  # one poison request does not fail the health check


async def test_a_request_that_breaks_reply_building_is_dead_lettered_alone(
        redis, keys, persona, queue, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w"))
    original = worker.make_reply

    def make_reply(task, jobs, outputs):  # type: ignore[no-untyped-def]
        if "boom" in task.text:
            raise ValueError("unexpected")
        return original(task, jobs, outputs)

    monkeypatch.setattr(worker, "make_reply", make_reply)
    good, bad = chat("good", conversation="g"), chat("boom", conversation="b")
    for r in (good, bad):
        await queue.submit(r)
    await worker.run(burst=True)  # returns: the worker survived
    assert (await queue.wait_reply(good.id, 10)).text.startswith("Diagnosis")
    assert (await queue.wait_reply(bad.id, 10)).error == persona.line("dead_letter")


async def test_healthz_fails_after_consecutive_generation_failures(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, PoisonGenerator(), persona,
                    worker_settings("w", batch_size=1))
    for i in range(3):
        await queue.submit(chat(f"poison {i}", conversation=f"p{i}"))
    await worker.run(burst=True)
    assert not worker.metrics.alive(60)
    await queue.submit(chat("fine now?", conversation="f"))
    await worker.run(burst=True)
    assert worker.metrics.alive(60)


async def test_one_busy_conversation_does_not_starve_the_others(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """Before: carried requests of one conversation filled every batch (only one of them can
    be answered per batch), no new request was read, and everyone else waited."""
    generator = FakeGenerator()
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w", batch_size=4))
    busy = [chat(f"busy {i}", conversation="busy", settings={"candidates": 1})
            for i in range(12)]
    for r in busy:
        await queue.submit(r)
    # One batch reads four of the busy conversation's requests: one answered, three carried.
    await worker.process_batch(await worker.intake.read_batch(block=False))
    others = [chat(f"other {i}", conversation=f"o{i}", settings={"candidates": 1})
              for i in range(3)]
    for r in others:
        await queue.submit(r)
    await worker.process_batch(await worker.intake.read_batch(block=False))
    second = {job.message for job in generator.jobs[1:]}
    assert {r.text for r in others} <= second, second
    await worker.run(burst=True)
    answers = await asyncio.gather(*(queue.wait_reply(r.id, 10) for r in busy + others))
    assert all(a.text.startswith("Diagnosis") for a in answers)
    turns = await redis.lrange(keys.history("busy"), 0, -1)
    assert [json.loads(t)["content"] for t in turns[::2]] == [r.text for r in busy]  # in order


def test_a_worker_refuses_timings_that_would_answer_twice(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before, any CLAIM_IDLE_MS and GENERATION_TIMEOUT_S were taken; a claim time shorter
    than a lease renewal's round trip hands a live batch to a second worker."""
    import os
    import subprocess
    import sys

    from base.config import Settings

    assert Settings(_env_file=None).lease_problem() is None  # type: ignore[call-arg]
    assert "CLAIM_IDLE_MS" in (Settings(_env_file=None, claim_idle_ms=200)  # type: ignore[call-arg]
                               .lease_problem() or "")
    too_long = Settings(_env_file=None, generation_timeout_s=300, reply_timeout_s=120)  # type: ignore[call-arg]
    assert "GENERATION_TIMEOUT_S" in (too_long.lease_problem() or "")
    run = subprocess.run([sys.executable, "-m", "cli.main", "worker", "--fake", "--burst"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "CLAIM_IDLE_MS": "200",
                              "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert run.returncode == 2
    assert "CLAIM_IDLE_MS=200 is too short" in run.stderr and "Traceback" not in run.stderr


async def test_control_requests_are_answered_while_a_batch_generates(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """Before, a /reset waited for the whole generation in front of it (16 s in a scripted
    Telegram session). Now requests that need no model are answered while a batch runs,
    and still after the earlier requests of their own conversation."""
    generator = FakeGenerator(delay_s=3.0)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("w"))
    running = asyncio.create_task(worker.run())
    slow = chat("a long question", conversation="a")
    await queue.submit(slow)
    for _ in range(200):  # until its generation runs
        if generator.jobs:
            break
        await asyncio.sleep(0.01)
    arrived: list[str] = []

    async def answer(request: Request) -> Reply:
        await queue.submit(request)
        reply = await queue.wait_reply(request.id, 20)
        arrived.append(request.conversation + ":" + request.kind)
        return reply

    others = [chat("", conversation="b", kind="reset"), chat("???", conversation="c"),
              chat("", conversation="a", kind="reset"), chat("next question", conversation="d")]
    replies = await asyncio.gather(answer(slow), *(answer(r) for r in others))
    worker.stop.set()
    await running
    assert replies[1].text == persona.line("reset") and replies[2].text in persona.jabs
    assert set(arrived[:2]) == {"b:reset", "c:chat"}  # before the running generation ended
    assert arrived.index("a:chat") < arrived.index("a:reset")  # its conversation's order
    assert replies[3].text == persona.line("reset") and replies[4].text.startswith("Diagnosis")


@pytest.mark.parametrize("streaming", [True, False])
async def test_partial_events_come_in_order_before_the_final_reply(
        redis, keys, persona, streaming) -> None:  # type: ignore[no-untyped-def]
    """The worker publishes the streamed row's text so far (numbered, at most every 0.3 s,
    cleaned as a candidate is) and then the final reply; STREAM_REPLIES off publishes none."""
    client = QueueClient(redis, keys, "quiet-frontend")  # nobody reads its replies
    await client.setup()
    request = Request(frontend="quiet-frontend", conversation="s", user="u", text="Why me?")
    await client.submit(request)
    worker = Worker(redis, keys, FakeGenerator(delay_s=2.0), persona,
                    worker_settings("w",
                                  stream_replies=streaming))
    await worker.run(burst=True)
    events = [Reply.loads(f) for _, f in await redis.xrange(keys.replies("quiet-frontend"))]
    assert all(e.id == request.id for e in events)
    final = events[-1]
    assert final.partial is None and final.text
    partials = events[:-1]
    if not streaming:
        assert partials == []
        return
    assert [p.partial for p in partials] == list(range(1, len(partials) + 1))
    assert partials and all(len(p.text.split()) >= 2 for p in partials)
    assert all(a.text != b.text for a, b in itertools.pairwise(partials))


async def test_a_request_read_but_never_received_does_not_stall_its_conversation(
        redis, keys, persona, queue) -> None:  # type: ignore[no-untyped-def]
    """When Redis dies while answering an XREADGROUP, the entries it handed out sit in this
    worker's pending list though the worker never got them; their conversation's later
    requests, carried, filled every batch, so the stale claim never ran and the conversation
    stalled for good (seen in the outage test once the worker read during generations)."""
    first, second = chat("older", conversation="k"), chat("newer", conversation="k")
    for r in (first, second):
        await queue.submit(r)
    worker = Worker(redis, keys, FakeGenerator(), persona,
                    worker_settings("w", batch_size=1,
                                  claim_idle_ms=200))
    entries = await worker.intake.read_new(2, None)  # both pending for "w" ...
    worker.intake.carry = entries[1:]  # ... but only the newer one reached the worker
    await asyncio.wait_for(worker.run(burst=True), 10)
    for request in (first, second):
        assert (await queue.wait_reply(request.id, 5)).text.startswith("Diagnosis")
