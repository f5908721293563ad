"""Shared fixtures: a real Redis with a key prefix of the test's own, the persona, an
in-process worker with the fast deterministic generator, and the real embedded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from harness import worker_settings

from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from engine.generation import FakeGenerator
from engine.worker import Worker
from persona.pack import Persona, load_persona

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def settings(prefix: str) -> Settings:
    """Settings for tests: this test's key prefix, no .env file, no tokens. Frontends do not
    stream (tests that read a reply's text would race its edits); the streaming tests turn
    it on."""
    return Settings(_env_file=None, redis_url=REDIS_URL, key_prefix=prefix,  # type: ignore[call-arg]
                    telegram_token=None, discord_token=None, worker_metrics_port=0,
                    stream_replies=False)


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    await client.ping()
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
def persona() -> Persona:
    return load_persona("house")


@pytest.fixture
def fake_generator() -> FakeGenerator:
    return FakeGenerator(adapters=["house"])


@pytest.fixture
async def fake_worker(redis: aioredis.Redis, keys: Keys, persona: Persona,
                      fake_generator: FakeGenerator) -> AsyncIterator[Worker]:
    """A worker with the deterministic generator, serving in the background."""
    worker = Worker(redis, keys, fake_generator, persona,
                    worker_settings("fake-worker"))
    task = asyncio.create_task(worker.run())
    yield worker
    worker.stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def queue(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[QueueClient]:
    """A frontend-side queue client with its reply reader running."""
    client = QueueClient(redis, keys, "test-frontend")
    await client.setup()
    stop = asyncio.Event()
    reader = asyncio.create_task(client.run_reader(stop=stop, block_ms=50))
    yield client
    stop.set()
    await asyncio.wait_for(reader, 5)


@pytest.fixture(scope="session")
def embedded_model() -> Iterator[object]:
    """The real SmolLM2-135M-Instruct (float32, CPU) with the shipped adapter if present.

    Loaded once per test session; tests using it carry the ``model`` marker.
    """
    from base.config import ROOT
    from engine.model_loading import load_model

    adapter = ROOT / "models" / "house-smollm2"
    adapters = {"house": str(adapter)} if (adapter / "adapter_config.json").is_file() else {}
    yield load_model("smollm2-135m", adapters, device="cpu", dtype="float32",
                     cache_dir=ROOT / ".cache" / "models")
