"""Generation through an OpenAI-compatible server (``GENERATION_BACKEND=openai``): vLLM,
llama.cpp's server, Ollama or any other that speaks ``/v1/completions``.

The worker builds the prompt exactly as for the local engine (persona, history, chat
template) and sends the rendered text; each row's adapter is a model name on the server
(``ADAPTER_MODELS``: vLLM serves LoRA adapters as models), with the row's sampling settings,
seed. Every row of every call is in flight at once, so the server batches them. Rows are
always read as server-sent events, so each stops where a local row stops — at another
speaker's tag or past the sentence cap (OpenAI-style servers take at most four stop strings;
closing the stream ends the row on the server) — and the text so far of the rows the worker
streams goes to ``on_text``. Post-processing, the echo guard, candidates and the rerank then
run in the worker as for local rows.

Failures: each row is retried with backoff on a connection error, a timeout or a 5xx (a
row cut off mid-stream starts again); after ``BREAKER_FAILURES`` failed attempts in a row the
circuit opens and calls fail at once with `BackendUnavailable` for ``BREAKER_COOLDOWN_S``; the
worker then keeps the requests pending (carried, leased) and tries again, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from base.keys import BASE_VARIANT
from engine.generation import BackendUnavailable, Generated, GenerationJob, OnText
from persona.postprocess import speaker_tag_pattern, split_sentences

log = logging.getLogger(__name__)

RETRIES = 3  # attempts per row before it counts as a failure of the server
BACKOFF_S = (0.5, 1.0, 2.0)
BREAKER_FAILURES = 3  # rows failed in a row that open the circuit
BREAKER_COOLDOWN_S = 5.0
CONNECT_TIMEOUT_S = 5.0


def parse_adapter_models(spec: str) -> dict[str, str]:
    """``house=house,__base__=HuggingFaceTB/SmolLM2-135M-Instruct`` → {adapter: served model}."""
    models: dict[str, str] = {}
    for item in spec.replace(";", ",").split(","):
        name, sep, model = item.strip().partition("=")
        if not item.strip():
            continue
        if not sep or not name.strip() or not model.strip():
            raise ValueError(f"ADAPTER_MODELS item {item.strip()!r} is not of the form "
                             "adapter=model")
        models[name.strip()] = model.strip()
    if BASE_VARIANT not in models:
        raise ValueError(f"ADAPTER_MODELS needs {BASE_VARIANT}=<the served base model>")
    return models


class CircuitBreaker:
    """Opens after ``failures`` failed rows in a row; while open, calls fail at once; the
    first call after ``cooldown_s`` tries the server again (half-open)."""

    def __init__(self, failures: int = BREAKER_FAILURES, cooldown_s: float = BREAKER_COOLDOWN_S):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._failed = 0
        self._opened_at: float | None = None
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        with self._lock:
            return (self._opened_at is not None
                    and time.monotonic() - self._opened_at < self.cooldown_s)

    def success(self) -> None:
        with self._lock:
            self._failed, self._opened_at = 0, None

    def failure(self) -> None:
        with self._lock:
            self._failed += 1
            if self._failed >= self.failures:
                self._opened_at = time.monotonic()


class AdapterGate:
    """Lets rows of one served model at a time reach the server: vLLM's CPU build (0.32.0)
    applies a LoRA adapter to every row of a batch that mixes it with base-model rows (a
    `/compare` base row answered with the House adapter; found by the tests). Rows of the
    model in use enter at once; a row of another model waits until they are done, and while
    it waits no new row of the model in use enters, so neither side starves; when the gate
    comes free, the model that just had it goes after the others that waited."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._model: str | None = None
        self._last: str | None = None  # the model that had the gate before it came free
        self._active = 0
        self._waiting: dict[str, int] = {}

    def _may_enter(self, model: str) -> bool:
        others_wait = any(n for m, n in self._waiting.items() if m != model)
        if self._model is None:
            return not (others_wait and model == self._last)
        return self._model == model and not others_wait

    def acquire(self, model: str) -> None:
        with self._cond:
            self._waiting[model] = self._waiting.get(model, 0) + 1
            while not self._may_enter(model):
                self._cond.wait()
            self._waiting[model] -= 1
            self._model = model
            self._active += 1

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._last, self._model = self._model, None
                self._cond.notify_all()


class OpenAIGenerator:
    """The `Generator` the worker uses with ``GENERATION_BACKEND=openai``. Calls from several
    threads run at once (``joins``), as the continuous engine's do."""

    joins = True
    engine_name = "openai"

    def __init__(self, url: str, adapter_models: dict[str, str], tokenizer: Any,
                 speakers: Sequence[str] = (), api_key: str | None = None,
                 timeout_s: float = 120.0, max_in_flight: int = 64,
                 breaker: CircuitBreaker | None = None, separate_adapters: bool = True):
        self.url = url.rstrip("/")
        self.models = dict(adapter_models)
        self.adapters = [name for name in self.models if name != BASE_VARIANT]
        self.tokenizer = tokenizer
        self.tag = speaker_tag_pattern(speakers)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=max_in_flight))
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="openai-row")
        self.breaker = breaker or CircuitBreaker()
        self.gate = AdapterGate() if separate_adapters else None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def model_for(self, adapter: str) -> str:
        return self.models.get(adapter, self.models[BASE_VARIANT])

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = (),
                 stop: threading.Event | None = None) -> list[Generated]:
        """Every job at once; raises `BackendUnavailable` when the server cannot be reached
        (the circuit is open, or a row failed every retry)."""
        if self.breaker.open:
            raise BackendUnavailable(f"{self.url} is failing; the circuit is open")
        stop = stop or threading.Event()
        streamed = set(stream_rows) if on_text is not None else set()
        futures = [self.pool.submit(self._row, i, job, on_text if i in streamed else None, stop)
                   for i, job in enumerate(jobs)]
        return [f.result() for f in futures]

    def _row(self, index: int, job: GenerationJob, on_text: OnText | None,
             stop: threading.Event) -> Generated:
        body = self._body(job)
        error: Exception | None = None
        for attempt in range(RETRIES):
            if stop.is_set():
                return Generated("", 0, False, 0.0)
            started = time.perf_counter()
            if self.gate is not None:
                self.gate.acquire(body["model"])
            try:
                text, tokens, finished = self._streamed(body, index, job, on_text, stop)
            except (httpx.TransportError, ServerError) as exc:
                error = exc
                log.warning("inference server: %s (attempt %d of %d)", exc, attempt + 1,
                            RETRIES)
                time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                continue
            finally:
                if self.gate is not None:
                    self.gate.release()
            self.breaker.success()
            return Generated(text, tokens, finished, (time.perf_counter() - started) * 1000)
        self.breaker.failure()
        raise BackendUnavailable(f"{self.url}: {error}")

    def _body(self, job: GenerationJob) -> dict[str, Any]:
        c = job.controls
        return {
            "model": self.model_for(job.adapter), "prompt": job.prompt,
            "max_tokens": c.max_new_tokens, "temperature": c.temperature, "top_p": c.top_p,
            "seed": job.seed, "stream": True, "stream_options": {"include_usage": True},
            # vLLM and llama.cpp's server take these beside the OpenAI fields.
            "repetition_penalty": c.repetition_penalty, "repeat_penalty": c.repetition_penalty,
        }

    def _done(self, text: str, job: GenerationJob) -> bool:
        """The local engine's stops: another speaker's tag, or a sentence past the cap."""
        return bool(self.tag.search(text)) or (
            len(split_sentences(text + " x")) > job.controls.sentence_cap + 1)

    def _streamed(self, body: dict[str, Any], index: int, job: GenerationJob,
                  on_text: OnText | None, stop: threading.Event) -> tuple[str, int, bool]:
        text, tokens, finish = "", 0, None
        with self.client.stream("POST", f"{self.url}/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if stop.is_set():
                    break
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if event.get("usage"):
                    tokens = int(event["usage"].get("completion_tokens") or tokens)
                for choice in event.get("choices") or ():
                    piece = choice.get("text") or ""
                    if piece:
                        text += piece
                        if on_text is not None:
                            on_text(index, text)
                    finish = choice.get("finish_reason") or finish
                if finish is None and self._done(text, job):
                    finish = "stop"  # ours: leaving the stream ends the row on the server
                    break
        if finish is None and not stop.is_set():
            raise ServerError("the stream ended without a finish reason")
        return text, tokens or self._count(text), finish == "stop"

    def _count(self, text: str) -> int:
        """Tokens of a row the server did not count (it was left before its usage event)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


class ServerError(RuntimeError):
    """A 5xx from the server, or a stream cut off: worth a retry."""


def _check(response: httpx.Response) -> None:
    if response.status_code >= 500:
        raise ServerError(f"HTTP {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise ValueError(f"the inference server refused the request: HTTP "
                         f"{response.status_code}: {response.text[:300]}")


def build_openai_generator(settings: Any, speakers: Sequence[str]) -> OpenAIGenerator:
    """The backend from the settings; the tokenizer (for the prompt and the history budget)
    is the base model's, loaded alone."""
    from engine.model_loading import load_tokenizer

    key = settings.inference.api_key.get_secret_value() if settings.inference.api_key else None
    return OpenAIGenerator(
        settings.inference.url, parse_adapter_models(settings.inference.adapter_models),
        load_tokenizer(settings.model.base_model, settings.model.cache_dir), speakers, key,
        settings.worker.generation_timeout_s, settings.inference.max_in_flight,
        separate_adapters=settings.inference.separate_adapters)
