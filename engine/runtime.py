"""Building the long-running pieces from `Settings`: the model, the reranker, the canon pool, a
worker. Logging, keys and the Redis connection (what frontends need too, without torch) live
in `base.logging_setup`; they are re-exported here for the worker's callers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import torch

from base.config import Settings
from base.keys import BASE_VARIANT
from base.logging_setup import SecretMaskingFilter, keys_for, redis_for, setup_logging
from base.metrics import WorkerMetrics
from engine.continuous import ContinuousGenerator
from engine.generation import FakeGenerator, Generator, HFGenerator
from engine.listener import Listener
from engine.model_loading import LoadedModel, fast_dtype, load_model, plain_copy
from engine.worker import Worker
from persona.pack import Persona, load_persona
from persona.prompt import system_block

if TYPE_CHECKING:
    from persona.canon import CanonPool

log = logging.getLogger(__name__)

__all__ = ["SecretMaskingFilter", "build_canon", "build_generator", "build_scorer",
           "build_worker", "ensure_prepared", "keys_for", "local_engine", "redis_for",
           "setup_logging"]


def build_generator(settings: Settings, persona: Persona, fake: bool = False,
                    fake_delay_ms: int = 0) -> Generator:
    """The real model with its adapters, or the fast fake for tests and benchmarks."""
    model = settings.model
    if fake:
        return FakeGenerator(delay_s=fake_delay_ms / 1000, adapters=list(model.adapter_paths))
    if settings.inference.backend == "openai":
        from engine.openai_backend import build_openai_generator

        return build_openai_generator(settings, persona.other_speakers)
    from engine.llamacpp_engine import settle_torch_threads

    settle_torch_threads(settings)
    loaded = load_model(model.base_model, model.adapter_paths, model.device, model.dtype,
                        model.cache_dir, model.load_in_4bit)
    return local_engine(settings, loaded, persona)


def local_engine(settings: Settings, loaded: LoadedModel, persona: Persona,
                 name: str | None = None) -> Generator:
    """The engine ``name`` (default ``LOCAL_ENGINE``) on a loaded model; ``auto`` is llama.cpp
    where it can run this model (`llamacpp_can_run`), else the continuous engine."""
    model = settings.model
    name = name or model.local_engine
    prefix = system_block(loaded.tokenizer, persona) if model.prefix_cache else ""
    if name in ("auto", "llamacpp"):
        from engine.gguf_lora import AdapterConversionError
        from engine.llamacpp_engine import build_llamacpp_generator, llamacpp_can_run

        why_not = llamacpp_can_run(settings, loaded.device)
        if name == "llamacpp" or why_not is None:
            try:
                return build_llamacpp_generator(settings, loaded, persona.other_speakers,
                                                prefix)
            except AdapterConversionError as exc:
                if name == "llamacpp":
                    raise
                why_not = str(exc)
        log.info("LOCAL_ENGINE=auto: the continuous engine (%s)", why_not)
        name = "continuous"
    if name == "continuous":
        merge = model.merge_adapters and loaded.device.type == "cpu" and not model.load_in_4bit
        return ContinuousGenerator(loaded, persona.other_speakers, shared_prefix=prefix,
                                   max_rows=model.max_running_rows, merge_adapters=merge)
    return HFGenerator(loaded, persona.other_speakers, shared_prefix=prefix)


def build_scorer(settings: Settings) -> Callable[[Sequence[str]], Sequence[float]] | None:
    """The candidate reranker (RERANKER): the persona classifier's P(House), or none. A
    missing classifier is logged and leaves the worker without a reranker."""
    if settings.generation.reranker != "persona":
        return None
    from persona.classifier import ClassifierError, load_scorer

    try:
        return load_scorer().score
    except ClassifierError as exc:
        log.warning("persona reranker off: %s", exc)
        return None


def ensure_prepared(settings: Settings) -> Path:
    """The prepared data directory, preparing it from ``HOUSE_DATA`` when it is missing (a few
    seconds; the canon pool needs it)."""
    from persona.data import DataError, PrepareConfig, prepare

    choice = settings.reply_choice
    if not (choice.data_dir / "train.jsonl").is_file():
        log.info("no prepared data in %s: preparing it from %s", choice.data_dir,
                 choice.house_data)
        try:
            prepare(PrepareConfig(input=choice.house_data, out=choice.data_dir,
                                  persona=settings.generation.persona))
        except DataError as exc:
            raise FileNotFoundError(str(exc)) from exc
    return choice.data_dir


def build_canon(settings: Settings) -> CanonPool | None:
    """House's real lines and the response selector, for the canon and hybrid modes; None
    (logged, the worker then answers in generated mode) when the selector or the data set
    is missing. Generated mode needs them only for retrieve and refine (REFINE_EXAMPLES)."""
    if settings.reply_choice.mode == "generated" and settings.reply_choice.refine_examples <= 0:
        return None
    from persona.canon import CanonPool
    from persona.selector import Selector, SelectorError

    try:
        selector = Selector.load(settings.reply_choice.selector_dir)
        # the first start embeds the pool for minutes on a CPU: show it
        return CanonPool.from_data(ensure_prepared(settings), selector, progress=True,
                                   anchor_weight=settings.reply_choice.canon_anchor_weight,
                                   length_weight=settings.reply_choice.canon_length_weight,
                                   person_weight=settings.reply_choice.canon_person_weight)
    except (SelectorError, FileNotFoundError) as exc:
        log.warning("REPLY_MODE=%s needs House's lines and the selector; answering in "
                    "generated mode: %s", settings.reply_choice.mode, exc)
        return None


def build_listener(settings: Settings, generator: Generator, persona: Persona
                   ) -> Listener | None:
    """The House model as a listener (LISTENER=pmi) on a local model: on llama.cpp its own
    context on the engine's weights, on PyTorch its own plain copy of the model with the
    default adapter merged, so it never shares a module with the engine's thread. None for a
    served model (GENERATION_BACKEND=openai), the fake, or LISTENER=none."""
    loaded = getattr(generator, "loaded", None)
    if loaded is None or settings.reply_choice.mode == "generated":
        return None
    return listener_for(settings, loaded, persona, generator)


def listener_for(settings: Settings, loaded: LoadedModel, persona: Persona,
                 generator: Generator | None = None) -> Listener | None:
    """The listener on a loaded model, or on ``generator``'s llama.cpp weights when it is the
    llama.cpp engine (see :func:`build_listener`); None with LISTENER=none or without the
    default adapter."""
    if settings.reply_choice.listener != "pmi":
        return None
    adapter = settings.model.default_adapter
    if adapter not in loaded.adapters:
        log.warning("listener off: adapter %s is not loaded", adapter)
        return None
    empty = loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": ""}],
        tokenize=False, add_generation_prompt=True)
    tokens = settings.reply_choice.listener_tokens
    listener: Listener
    if getattr(generator, "engine_name", "") == "llamacpp":
        from engine.llamacpp_listener import LlamaCppListener

        listener = LlamaCppListener(generator, adapter, empty,  # type: ignore[arg-type]
                                    max_reply_tokens=tokens)
        gguf, lora = generator.files.get(adapter, generator.files[BASE_VARIANT])  # type: ignore[union-attr]
        scored_by = f"llama.cpp {gguf.name} {lora.name if lora else ''} " \
                    f"repack={generator.repack}"  # type: ignore[union-attr]
    else:
        model = plain_copy(loaded.model, adapter)
        if loaded.dtype == torch.float32:  # it need not match float32 bit for bit: bf16 if fast
            model = model.to(fast_dtype(loaded.device))
        listener = Listener(model, loaded.tokenizer, empty,
                            system_block(loaded.tokenizer, persona)
                            if settings.model.prefix_cache else "", max_reply_tokens=tokens)
        weights = Path(settings.model.adapter_paths[adapter]) / "adapter_model.safetensors"
        stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
        scored_by = f"torch {settings.model.base_model} {weights} {stamp} " \
                    f"{next(model.parameters()).dtype}"
    if settings.reply_choice.listener_prime:
        key = hashlib.sha1(f"{scored_by}|{empty}|{tokens}".encode()).hexdigest()[:16]
        held = listener.keep_prior(settings.model.cache_dir / "listener" / f"empty-{key}.json")
        log.info("listener: %d canon lines' empty-message terms already scored", held)
    return listener


async def build_worker(settings: Settings, redis: aioredis.Redis, fake: bool = False,
                       metrics: WorkerMetrics | None = None, fake_delay_ms: int = 0) -> Worker:
    persona = load_persona(settings.generation.persona)
    generator = await asyncio.to_thread(build_generator, settings, persona, fake, fake_delay_ms)
    scorer = None if fake else await asyncio.to_thread(build_scorer, settings)
    canon = None if fake else await asyncio.to_thread(build_canon, settings)
    listener = None if fake or canon is None else await asyncio.to_thread(
        build_listener, settings, generator, persona)
    return Worker(redis, keys_for(settings), generator, persona, settings,
                  metrics, scorer, canon, listener)
