"""The OpenAI-compatible backend against a real server: vLLM's CPU build serving the embedded
model and the shipped House adapter on loopback (its environment: `make vllm-env`).

A chat reply, a `/compare` (base and House), a streamed reply, and the server killed in the
middle of a request: the request waits, is tried again when the server is back, and is
answered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import worker_settings

from base.config import ROOT
from base.keys import Keys
from base.protocol import Reply, Request
from base.queue_client import QueueClient
from engine.generation import BackendUnavailable, GenerationJob
from engine.model_loading import load_tokenizer, resolve_source
from engine.openai_backend import CircuitBreaker, OpenAIGenerator, parse_adapter_models
from engine.worker import Worker
from persona.pack import Persona

VLLM_PYTHON = ROOT / ".cache" / "vllm-venv" / "bin" / "python"
SERVED_BASE = "smollm2-135m"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """`vllm serve` on loopback, started and stopped by the tests."""

    def __init__(self, model_dir: str, port: int, log_path: Path):
        self.model_dir, self.port, self.log_path = model_dir, port, log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", self.model_dir, "--served-model-name", SERVED_BASE,
                   "--enable-lora", "--lora-modules", f"house={ROOT / 'models' / 'house-smollm2'}",
                   "--max-lora-rank", "16", "--max-model-len", "1024",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}); see "
                                   f"{self.log_path}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S} s; see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    assert VLLM_PYTHON.exists(), "vLLM's environment is missing: run `make vllm-env`"
    model_dir = resolve_source(SERVED_BASE, ROOT / ".cache" / "models")
    server = VLLMServer(model_dir, _free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return load_tokenizer(SERVED_BASE, ROOT / ".cache" / "models")


def generator_for(server: VLLMServer, tokenizer: object, persona: Persona,
                  breaker: CircuitBreaker | None = None) -> OpenAIGenerator:
    return OpenAIGenerator(server.url, parse_adapter_models(
        f"house=house,__base__={SERVED_BASE}"), tokenizer, persona.other_speakers,
        timeout_s=120, breaker=breaker)


def chat(text: str, conversation: str = "c1", **kw) -> Request:  # type: ignore[no-untyped-def]
    return Request(frontend="test-frontend", conversation=conversation, user="u1", text=text,
                   **kw)


@contextlib.asynccontextmanager
async def serving(worker: Worker):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_chat_reply_and_a_compare_through_vllm(
        vllm_server, tokenizer, persona, redis, keys, queue) -> None:  # type: ignore[no-untyped-def]
    generator = generator_for(vllm_server, tokenizer, persona)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("openai", reply_mode="generated", stream_replies=False))
    async with serving(worker):
        reply = await queue.ask(chat("Do I need surgery?", settings={"seed": 1}), 180)
        assert reply.error is None and reply.text.strip(), reply
        assert reply.tokens > 0
        compare = await queue.ask(chat("Can I take painkillers with beer?", kind="compare",
                                       conversation="c2", settings={"seed": 2}), 180)
    names = [v.name for v in compare.variants]
    assert names[:2] == ["__base__", "house"], names
    assert all(v.text.strip() for v in compare.variants[:2]), compare.variants
    generator.close()


async def test_adapter_and_seed_reach_the_server(vllm_server, tokenizer, persona) -> None:  # type: ignore[no-untyped-def]
    """Sampled rows: one seed twice gives one text, another seed another text (the seed
    reaches the server); greedy rows: the House adapter's text is not the base model's (vLLM
    applies the LoRA, and not to the base row beside it)."""
    generator = generator_for(vllm_server, tokenizer, persona)
    sampled = persona.controls.merged({"max_new_tokens": 24, "temperature": 1.0,
                                       "top_p": 1.0, "sentence_cap": 20})
    greedy = persona.controls.merged({"max_new_tokens": 24, "temperature": 0.0})
    prompt = "<|im_start|>user\nWhat is wrong with me?<|im_end|>\n<|im_start|>assistant\n"
    jobs = [GenerationJob(prompt, "house", sampled, 5), GenerationJob(prompt, "house", sampled, 5),
            GenerationJob(prompt, "house", sampled, 6),
            GenerationJob(prompt, "house", greedy, 0), GenerationJob(prompt, "__base__", greedy, 0)]
    seeded, again, other, house, base = await asyncio.to_thread(generator.generate, jobs)
    assert seeded.text == again.text and seeded.text.strip()
    assert other.text != seeded.text
    assert house.text.strip() and house.text != base.text
    generator.close()


async def test_a_streamed_reply_through_vllm(vllm_server, tokenizer, persona, redis,  # type: ignore[no-untyped-def]
                                            keys) -> None:
    generator = generator_for(vllm_server, tokenizer, persona)
    queue = QueueClient(redis, keys, "test-frontend")
    await queue.setup()
    partials: list[Reply] = []

    async def heard(reply: Reply) -> None:
        partials.append(reply)

    queue.on_partial = heard
    reader = asyncio.create_task(queue.run_reader(block_ms=50))
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("openai-stream", reply_mode="generated",
                                    stream_replies=True, gen_candidates=1,
                                    gen_max_new_tokens=48, gen_sentence_cap=3))
    try:
        async with serving(worker):
            request = chat("Tell me what you think of Wilson and his ties.",
                           settings={"seed": 4, "temperature": 0.0})
            reply = await queue.ask(request, 180)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert reply.partial is None and reply.text.strip()
    mine = [p for p in partials if p.id == request.id]
    assert mine, f"no partial event arrived before the final reply {reply.text!r}"
    assert [p.partial for p in mine] == sorted(p.partial for p in mine)
    generator.close()


async def test_the_server_killed_mid_request_loses_nothing(
        vllm_server, tokenizer, persona, redis, keys: Keys, queue) -> None:  # type: ignore[no-untyped-def]
    """The server dies while a request is being answered: the request waits (the user is told
    House is out), is tried again when the server is back, and is answered exactly once."""
    told: list[Reply] = []

    async def heard(reply: Reply) -> None:
        told.append(reply)

    queue.on_partial = heard
    breaker = CircuitBreaker(failures=1, cooldown_s=1.0)
    generator = generator_for(vllm_server, tokenizer, persona, breaker)
    worker = Worker(redis, keys, generator, persona,
                    worker_settings("openai-chaos", reply_mode="generated",
                                    stream_replies=False, gen_candidates=1,
                                    gen_max_new_tokens=256, generation_timeout_s=110))
    async with serving(worker):
        request = chat("Describe every symptom of lupus, one by one, at length.",
                       settings={"seed": 6, "temperature": 0.0, "sentence_cap": 50})
        waiting = asyncio.create_task(queue.ask(request, 400))
        await asyncio.sleep(0.5)  # the request is in flight at the server
        await asyncio.to_thread(vllm_server.kill)
        with pytest.raises(BackendUnavailable):
            await asyncio.to_thread(generator.generate, [GenerationJob(
                "x", "house", persona.controls, 1)])
        await asyncio.sleep(3)
        assert not waiting.done(), "answered while the server was down"
        assert [r.text for r in told if r.id == request.id] == [persona.line("outage")]
        await asyncio.to_thread(vllm_server.start)
        reply = await waiting
    assert reply.error is None and reply.text.strip()
    stats = await redis.hgetall(keys.stats)
    assert stats.get("replies") == "1" and "errors" not in stats, stats  # answered once
    assert "dead_letters" not in stats and await redis.xlen(keys.dead_letters) == 0
    generator.close()


def test_adapter_models_and_the_breaker() -> None:
    assert parse_adapter_models("house=house, __base__=HuggingFaceTB/SmolLM2-135M-Instruct") == {
        "house": "house", "__base__": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    with pytest.raises(ValueError, match="__base__"):
        parse_adapter_models("house=house")
    with pytest.raises(ValueError, match="adapter=model"):
        parse_adapter_models("house")
    breaker = CircuitBreaker(failures=2, cooldown_s=0.2)
    breaker.failure()
    assert not breaker.open
    breaker.failure()
    assert breaker.open
    time.sleep(0.25)
    assert not breaker.open  # half-open: the next call tries the server
    breaker.success()
    assert not breaker.open


def test_the_adapter_gate_lets_one_model_in_at_a_time_without_starving_either() -> None:
    from engine.openai_backend import AdapterGate

    gate, entered = AdapterGate(), []

    def enter(model: str) -> None:
        gate.acquire(model)
        entered.append(model)

    def waiting(model: str) -> None:  # until the thread waits at the gate (load: no sleeps)
        deadline = time.monotonic() + 10
        while gate._waiting.get(model, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)

    gate.acquire("house")
    base = threading.Thread(target=enter, args=("__base__",))
    base.start()
    waiting("__base__")
    late_house = threading.Thread(target=enter, args=("house",))
    late_house.start()
    waiting("house")
    assert entered == []  # base waits for the house row; the later house row waits for base
    gate.release()
    base.join(2)
    assert entered == ["__base__"]
    gate.release()
    late_house.join(2)
    assert entered == ["__base__", "house"]
    gate.release()
