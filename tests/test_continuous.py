"""The continuous-batching engine on the real embedded model: rows that join and leave a
running batch get the text they get alone, a short request is answered before a long one
that started first, one timed-out call stops alone, and the worker serves through it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from harness import join_while_decoding, worker_settings

from base.protocol import Reply, Request
from engine.continuous import ContinuousGenerator
from engine.generation import GenerationJob, HFGenerator
from engine.worker import Worker
from persona.prompt import render_prompt, system_block

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

QUESTIONS = ["Do I need surgery?", "Is it lupus?", "Why are you so rude?",
             "My head hurts every morning and my left hand goes numb when I type."]


@pytest.fixture(scope="module", params=[False, True], ids=["per-row-lora", "merged"])
def engine(embedded_model, persona, request):  # type: ignore[no-untyped-def]
    generator = ContinuousGenerator(embedded_model, persona.other_speakers,
                                    shared_prefix=system_block(embedded_model.tokenizer,
                                                               persona),
                                    merge_adapters=request.param)
    yield generator
    generator.close()


def jobs_for(engine, persona, tokens: int, adapters, start: int = 0):  # type: ignore[no-untyped-def]
    controls = persona.controls.merged({"max_new_tokens": tokens, "sentence_cap": 10})
    return [GenerationJob(render_prompt(engine.tokenizer, persona, [], q), adapter, controls,
                          start + i, q)
            for i, (q, adapter) in enumerate(zip(QUESTIONS, adapters, strict=False))]


def test_rows_joining_a_running_batch_get_their_text_alone(engine, persona,  # type: ignore[no-untyped-def]
                                                           embedded_model) -> None:
    variants = [*embedded_model.adapters, "__base__"]
    long_jobs = jobs_for(engine, persona, 40, [variants[0], variants[-1]])
    late_jobs = jobs_for(engine, persona, 8, [variants[-1], variants[0]], start=10)
    alone = [engine.generate([j])[0] for j in long_jobs + late_jobs]
    # The old micro-batch engine gives the same text for a row alone.
    plain = HFGenerator(embedded_model, persona.other_speakers)
    assert [plain.generate([j])[0].text for j in long_jobs[:1]] == [alone[0].text]

    results, finished_at = join_while_decoding(engine, long_jobs, late_jobs)
    assert [g.text for g in results["long"] + results["late"]] == [g.text for g in alone]
    assert engine.most_rows >= 3  # they ran in one batch
    assert finished_at["late"] < finished_at["long"]  # the short ones left first


def test_a_stopped_call_ends_alone(engine, persona) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    stopped_jobs = jobs_for(engine, persona, 60, ["__base__"])
    other_jobs = jobs_for(engine, persona, 12, ["__base__"], start=5)
    expected = engine.generate(other_jobs)[0].text
    out: dict[str, list] = {}  # type: ignore[type-arg]
    thread = threading.Thread(target=lambda: out.setdefault(
        "stopped", engine.generate(stopped_jobs, stop=stop)))
    thread.start()
    time.sleep(0.5)
    stop.set()
    assert engine.generate(other_jobs)[0].text == expected
    thread.join(60)
    assert out["stopped"][0].finished is False and out["stopped"][0].tokens < 60


def long_and_short() -> tuple[Request, Request]:
    """A request of up to 48 new tokens and one of 4, in two conversations."""
    long = Request(frontend="test-frontend", conversation="long", user="a",
                   text=QUESTIONS[3], settings={"max_new_tokens": 48, "sentence_cap": 10,
                                                "candidates": 1, "seed": 1})
    short = Request(frontend="test-frontend", conversation="short", user="b",
                    text=QUESTIONS[1], settings={"max_new_tokens": 4, "candidates": 1,
                                                 "seed": 2})
    return long, short


async def test_the_worker_answers_a_short_request_before_a_long_one_that_started_first(
        engine, persona, redis, keys, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, engine, persona,
                    worker_settings("cb", reply_mode="generated"))
    running = asyncio.create_task(worker.run())
    long, short = long_and_short()
    await queue.submit(long)
    steps = engine.steps
    while engine.steps < steps + 2:
        await asyncio.sleep(0.01)
    await queue.submit(short)
    order: list[str] = []

    async def wait(request: Request) -> None:
        await queue.wait_reply(request.id, 120)
        order.append(request.conversation)

    await asyncio.gather(wait(long), wait(short))
    worker.stop.set()
    await running
    assert order == ["short", "long"]


async def test_requests_read_together_are_each_answered_when_their_own_rows_end(
        engine, persona, redis, keys, queue) -> None:  # type: ignore[no-untyped-def]
    """Two requests read in one batch: the short one's reply is written while the long one
    still generates, not when the batch's longest row ends."""
    worker = Worker(redis, keys, engine, persona,
                    worker_settings("cb", reply_mode="generated", stream_replies=False))
    long, short = long_and_short()
    for request in (long, short):
        await queue.submit(request)
    serving = asyncio.create_task(worker.run(burst=True))
    heard: list[Reply] = []

    async def wait(request: Request) -> None:
        heard.append(await queue.wait_reply(request.id, 120))

    await asyncio.gather(wait(long), wait(short))
    await serving
    assert [r.conversation for r in heard] == ["short", "long"]
    assert [r.batch_size for r in heard] == [2, 2]  # read in one batch, written apart


def test_a_call_with_more_rows_than_the_batch_is_answered_in_parts(embedded_model,
                                                                  persona) -> None:
    """Ten rows through an engine that runs four at once (replies of 3, 3, 3 and 1
    candidates, as eval and a full micro-batch send them): the call goes to the engine in
    parts of whole replies, and every row gets its text alone, streamed rows numbered within
    the whole call."""
    small = ContinuousGenerator(embedded_model, persona.other_speakers, max_rows=4)
    try:
        replies = jobs_for(small, persona, 6, ["house"] * 4)
        jobs = [job for job in replies[:3] for _ in range(3)] + replies[3:]
        streamed: dict[int, str] = {}
        out = small.generate(jobs, lambda row, text: streamed.__setitem__(row, text), {0, 9})
        assert len(out) == 10 and small.most_rows <= 4
        alone = [small.generate([job])[0].text for job in replies]
        assert [g.text for g in out] == [alone[i // 3] for i in range(9)] + [alone[3]]
        assert set(streamed) == {0, 9}
    finally:
        small.close()


def test_a_failing_engine_thread_fails_its_calls_and_the_next_call_starts_afresh(
        embedded_model, persona, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bug in the engine loop used to leave every caller waiting forever (and the worker's
    timeout path waited for the stopped generation). Now the calls in flight get the error
    and the next call starts a new engine thread."""
    engine = ContinuousGenerator(embedded_model, persona.other_speakers)
    jobs = jobs_for(engine, persona, 4, ["__base__"])
    original = engine._admit

    def broken(calls):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in the scheduler")

    monkeypatch.setattr(engine, "_admit", broken)
    with pytest.raises(RuntimeError, match="a bug in the scheduler"):
        engine.generate(jobs)
    monkeypatch.setattr(engine, "_admit", original)
    assert engine.generate(jobs)[0].tokens > 0
    engine.close()
