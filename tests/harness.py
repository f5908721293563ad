"""Helpers shared by the hostile-input, isolation and outage tests: settings with overrides,
a message sent through the frontend core and its answer, and generators that record their
prompts or play a model that obeys a prompt injection."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from bots.core import FrontendCore, Immediate, Incoming
from bots.formatting import format_reply
from engine.generation import FakeGenerator, Generated, GenerationJob, Generator
from engine.worker import Worker
from persona.pack import Persona


def make_settings(redis_url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings without .env and tokens (a fresh object: cached properties are not copied);
    frontends do not stream unless asked (as in conftest's ``settings``). Overrides are named
    like the environment variables, in lower case (``user_rate_limit=0`` sets
    ``settings.frontend.user_rate_limit``), as everywhere `Settings` is built."""
    values: dict[str, Any] = {"redis_url": redis_url, "key_prefix": prefix,
                              "telegram_token": None, "discord_token": None,
                              "worker_metrics_port": 0, "stream_replies": False, **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def worker_settings(name: str = "test-worker", **fields: Any) -> Settings:
    """A test worker's settings: the shipped defaults without .env, except that it reads in
    short blocks (quick to stop), does not wait to fill a micro-batch, and leaves every message
    to the generator — the pack's differentials and topics would answer "is it lupus?", "I
    cough" or "how's Wilson?" themselves; their tests turn them on (``differentials=True``,
    ``topics=True``)."""
    values: dict[str, Any] = {"read_block_ms": 50, "batch_wait_ms": 0,
                              "differentials": False, "topics": False, **fields}
    return Settings(_env_file=None, worker_name=name,  # type: ignore[call-arg]
                    worker_metrics_port=0, **values)


async def ask(core: FrontendCore, queue: QueueClient, user: str, text: str,
              conversation: str | None = None, chat: str = "", speaker: str = "",
              timeout_s: float = 15.0) -> str:
    """What the user sees: the immediate line, or the reply once a worker answered."""
    outcome = await core.handle(Incoming(user=user, conversation=conversation or f"t:u:{user}",
                                         text=text, speaker=speaker, chat=chat))
    if isinstance(outcome, Immediate):
        return outcome.text
    return format_reply(await queue.wait_reply(outcome.id, timeout_s))


class CapturingGenerator(FakeGenerator):
    """The fake generator (which keeps every job it was given in ``jobs``), optionally with
    another tokenizer."""

    def __init__(self, tokenizer: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def prompts_for(self, marker: str) -> list[str]:
        return [job.prompt for job in self.jobs if marker in job.message]


class ObedientGenerator(CapturingGenerator):
    """Plays a model that falls for prompt injection: for a message containing a key of
    ``script`` it "generates" that value (a callable gets the job, e.g. to print the system
    prompt it finds in its own prompt); other messages get the fake diagnosis."""

    def __init__(self, script: dict[str, str | Callable[[GenerationJob], str]], **kwargs: Any):
        super().__init__(**kwargs)
        self.script = script

    def generate(self, jobs: Sequence[GenerationJob], *stream: Any) -> list[Generated]:
        normal = super().generate(jobs, *stream)
        out = []
        for job, default in zip(jobs, normal, strict=True):
            raw = next((v for k, v in self.script.items() if k in job.message), None)
            if raw is None:
                out.append(default)
                continue
            text = raw(job) if callable(raw) else raw
            out.append(Generated(text, len(text.split()), True, 0.0))
        return out


def system_prompt_in(job: GenerationJob) -> str:
    """The system prompt as it stands in a FakeChatTokenizer prompt (what a leaking model
    would print)."""
    match = re.search(r"<system>(.*?)\n<", job.prompt, re.DOTALL)
    assert match, "no system turn in the prompt"
    return match.group(1)


@contextlib.asynccontextmanager
async def running_worker(redis: aioredis.Redis, keys: Keys, persona: Persona,
                         generator: Generator, name: str = "test-worker",
                         **options: Any) -> AsyncIterator[Worker]:
    """A worker serving in the background until the block ends."""
    worker = Worker(redis, keys, generator, persona,
                    worker_settings(name, **options))
    task = asyncio.create_task(worker.run(), name=name)
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 15)


async def expected_replies(generator: FakeGenerator, text: str, adapter: str = "house",
                           candidates: int = 2) -> set[str]:
    """The replies the fake generator could give to the request with this text (one per
    candidate the worker drew for it)."""
    found = {FakeGenerator.reply_for(job.message, adapter, job.seed)
             for job in generator.jobs if job.message == text and job.adapter == adapter}
    assert found, f"no request with text {text!r} was generated for"
    return found


def join_while_decoding(engine: Any, long_jobs: Sequence[GenerationJob],
                        late_jobs: Sequence[GenerationJob]
                        ) -> tuple[dict[str, list[Generated]], dict[str, float]]:
    """Start ``long_jobs`` on a joining engine, send ``late_jobs`` once those decode; each
    call's results and the monotonic time it returned, by "long" and "late"."""
    results: dict[str, list[Generated]] = {}
    finished_at: dict[str, float] = {}

    def run(name: str, jobs: Sequence[GenerationJob]) -> None:
        results[name] = engine.generate(jobs)
        finished_at[name] = time.monotonic()

    steps_before = engine.steps
    first = threading.Thread(target=run, args=("long", long_jobs))
    first.start()
    while engine.steps < steps_before + 3:  # the long rows are decoding
        time.sleep(0.005)
    run("late", late_jobs)
    first.join(120)
    return results, finished_at
