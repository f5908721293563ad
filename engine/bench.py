"""``drhouse bench`` — benchmarks, not tests: they print tables and ratios, never assert.

- ``bench batching``: C concurrent conversations through Redis against the real embedded
  model, micro-batching on (B=C) versus off (B=1), same prompts, seeds and token limits:
  aggregate generated tokens/s, p50/p95 reply latency and the batched/sequential ratio; one
  run per ``--dtypes`` entry, each mode ``--rounds`` times (interleaved, the median round is
  reported), with or without the system-prompt prefix cache, on the base model or an adapter.
- ``bench queue``: frontend → Redis → worker → frontend round trips with a generator that
  returns at once: p50/p99 overhead in ms (one request in flight) and requests/s (many).
- ``bench serve``: the House adapter behind a worker, per ``--engines`` entry (continuous,
  batched): one reply alone, then ``--levels`` concurrent conversations (each sends
  ``--messages`` messages, the next once the reply is in — or, open loop with
  ``--arrival-gap-s G``, at seeded exponential gaps of mean G seconds whether or not the reply
  is in, the worker keeping each conversation's order) while a prober sends ``/reset`` in
  another conversation every 0.3 s: aggregate tokens/s, reply latency p50/p95, time to the
  first streamed text p50/p95, ``/reset`` latency p50/p95. ``--json`` writes
  ``{"serve": {"engine": …, "alone_p50_ms": …, "c1": {…}, "c16": {…}, "by_engine": {…}}}``.
- ``bench peer``: ``serve`` for the continuous engine and, in the same run, llama.cpp
  (`engine/peer_llama.py`, run with ``--peer-python``, the environment ``make bench-peer``
  builds) on the very GGUF file the embedded model comes from, the same rendered prompts and
  token limit, one request at a time: our aggregate tokens/s ÷ its single-stream tokens/s.
  ``--json`` adds ``peer`` and ``ratio_vs_peer`` beside ``serve``.
- ``bench decode``: the llama.cpp engine's decode step alone, on the adapter's lane as it
  serves: median ms of one ``llama_decode`` of R rows (``--rows``) and of a 512-token prefill.
- ``bench precision`` (training, registered by ``cli/bench.py`` because ``engine/`` does not
  import ``offline/``): fp32 vs bf16-autocast LoRA training steps, tokens/s.
- ``bench all``: batching and queue. ``--json PATH`` writes ``{"batching": {...}, "queue": {...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_PROMPTS = [
    "Do I need surgery?",
    "My head hurts every morning.",
    "Is it lupus?",
    "Can I take painkillers with beer?",
    "Why are you so rude to your patients?",
    "I have a rash on my arm that won't go away and it itches at night.",
    "What's wrong with me?",
    "Should I trust my doctor?",
    "I've been coughing blood for a week.",
    "My son won't stop sneezing.",
    "Is coffee bad for my heart?",
    "I feel tired all the time, even after sleeping ten hours.",
    "Do you ever admit you're wrong?",
    "My girlfriend says I snore. Is that serious?",
    "Can stress make my hair fall out?",
    "Why does my knee click when I climb stairs?",
]


def configure(parser: argparse.ArgumentParser, name: str,
              more: tuple[str, ...] = ()) -> None:
    """The serving benchmarks' options; ``more``: further benchmark names that the caller
    (``cli.bench``: ``precision``) runs itself."""
    parser.add_argument("which", choices=["batching", "queue", "serve", "peer", "decode", "all",
                                          *more],
                        nargs="?", default="all")
    parser.add_argument("--peer-python", type=Path, default=None,
                        help="for 'peer': the Python that has llama_cpp (make bench-peer)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--conversations", type=int, default=16,
                        help="concurrent conversations for 'batching' (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens per reply for 'batching' (default 32)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated dtypes to compare, e.g. float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each mode for 'batching' (and of each precision for "
                             "'precision'); the median is reported")
    parser.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the system prompt's keys/values (default: PREFIX_CACHE)")
    parser.add_argument("--adapter", default="",
                        help="load the configured adapter of this name and send every request "
                             "to it (default: the base model alone)")
    parser.add_argument("--requests", type=int, default=1000,
                        help="round trips for 'queue' (default 1000)")
    parser.add_argument("--engines", default=None,
                        help="engines for 'serve' and 'peer' (continuous, batched, llamacpp, "
                             "openai: the server at INFERENCE_URL), comma-separated; the first "
                             "is reported at the top level (default: LOCAL_ENGINE)")
    parser.add_argument("--levels", default="1,4,16",
                        help="concurrent conversations for 'serve' (default 1,4,16)")
    parser.add_argument("--messages", type=int, default=2,
                        help="messages per conversation for 'serve' (default 2)")
    parser.add_argument("--arrival-gap-s", type=float, default=0.0,
                        help="open loop for 'serve' and 'peer': each conversation sends its "
                             "messages at exponential gaps of this mean (seconds), not waiting "
                             "for replies; 0 (default): the next once the reply is in")
    parser.add_argument("--candidates", type=int, default=1,
                        help="candidates per reply for 'serve' (default 1)")
    parser.add_argument("--rows", default="1,4,16,32",
                        help="rows per decode step for 'decode' (default 1,4,16,32)")
    parser.add_argument("--mode", choices=["generated", "hybrid", "canon"], default=None,
                        help="reply mode for 'serve' and 'peer' (default: REPLY_MODE); hybrid "
                             "and canon need the selector and the data set")


def run(args: argparse.Namespace) -> int:
    from base.config import Settings
    from base.logging_setup import setup_logging

    # The benchmarks time the model: half their messages are complaints or chat the pack's
    # differentials and topics would answer without it.
    settings = Settings().with_overrides(differentials=False, topics=False)
    if args.prefix_cache is not None:
        settings = settings.with_overrides(prefix_cache=args.prefix_cache)
    setup_logging(settings.with_overrides(log_level="WARNING"))
    results: dict[str, Any] = {}
    if args.which in ("batching", "all"):
        results["batching"] = asyncio.run(bench_batching(
            settings, args.conversations, args.max_new_tokens,
            [d.strip() for d in args.dtypes.split(",") if d.strip()], args.adapter, args.rounds))
    if args.which in ("queue", "all"):
        results["queue"] = asyncio.run(bench_queue(settings, args.requests))
    if args.which == "peer":
        if args.peer_python is None or not args.peer_python.exists():
            print("drhouse bench peer: --peer-python must name the Python of an environment "
                  "with llama-cpp-python (`make bench-peer` builds one)", file=sys.stderr)
            return 2
        results.update(asyncio.run(bench_peer(settings, args)))
    if args.which == "decode":
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
        if not rows or min(rows) < 1 or max(rows) > 255:
            print("drhouse bench decode: --rows takes row counts from 1 to 255, e.g. 1,16,32",
                  file=sys.stderr)
            return 2
        results["decode"] = bench_decode(settings, rows,
                                         args.adapter or settings.model.default_adapter,
                                         args.rounds)
    if args.which == "serve":
        results["serve"] = asyncio.run(bench_serve(
            settings, engines_of(args, settings),
            [int(c) for c in args.levels.split(",") if c.strip()], args.messages,
            args.max_new_tokens, args.candidates, args.adapter or settings.model.default_adapter,
            args.mode or settings.reply_choice.mode, arrival_gap_s=args.arrival_gap_s))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 0


def engines_of(args: argparse.Namespace, settings: Any) -> list[str]:
    """``--engines`` as a list, or the configured engine."""
    named = [e.strip() for e in (args.engines or "").split(",") if e.strip()]
    return named or [settings.model.local_engine]


def _console() -> Any:
    """Rich's console, wide enough for the tables when the output is a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _round(redis: Any, keys: Any, generator: Any, persona: Any, batch_size: int,
                 requests: list[Any], batch_wait_ms: int = 0) -> dict[str, float]:
    """Send all ``requests`` at once to a fresh worker; time every reply."""
    from base.config import Settings
    from base.queue_client import QueueClient
    from engine.worker import Worker

    queue = QueueClient(redis, keys, "bench", max_queue_depth=10**6)
    await queue.setup()
    worker = Worker(redis, keys, generator, persona,
                    Settings(worker_name=f"bench-{batch_size}", batch_size=batch_size,
                             batch_wait_ms=batch_wait_ms, read_block_ms=20,
                             differentials=False, topics=False))
    stop = asyncio.Event()
    reader = asyncio.create_task(queue.run_reader(stop=stop, block_ms=20))
    serving = asyncio.create_task(worker.run())
    started = time.perf_counter()

    async def one(request: Any) -> tuple[float, int]:
        sent = time.perf_counter()
        reply = await queue.ask(request, timeout_s=3600)
        return (time.perf_counter() - sent) * 1000, reply.tokens

    outcomes = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - started
    worker.stop.set()
    stop.set()
    await asyncio.gather(serving, reader)
    latencies = [ms for ms, _ in outcomes]
    tokens = sum(t for _, t in outcomes)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95)}


async def bench_batching(settings: Any, conversations: int, max_new_tokens: int,
                         dtypes: list[str], adapter: str = "", repeats: int = 3,
                         ) -> dict[str, Any]:
    from rich.table import Table

    from base.keys import Keys
    from base.logging_setup import redis_for
    from base.protocol import Request
    from engine.generation import HFGenerator
    from engine.model_loading import load_model
    from persona.pack import load_persona
    from persona.prompt import system_block

    persona = load_persona(settings.generation.persona)
    # Fixed seeds and token limits; the sentence cap is lifted so every row generates the same
    # amount of text in both modes.
    overrides = {"max_new_tokens": max_new_tokens, "sentence_cap": 10, "candidates": 1}

    adapters = {adapter: settings.model.adapter_paths[adapter]} if adapter else {}

    def requests(tag: str) -> list[Request]:
        return [Request(frontend="bench", conversation=f"bench:{tag}:{i}", user=f"u{i}",
                        text=BENCH_PROMPTS[i % len(BENCH_PROMPTS)],
                        settings={**overrides, "seed": i, "adapter": adapter or "base"})
                for i in range(conversations)]

    redis = await redis_for(settings)
    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    per_dtype: dict[str, Any] = {}
    table = Table(title=f"micro-batching: {conversations} conversations, "
                        f"{max_new_tokens} new tokens each, adapter {adapter or 'none'}, "
                        f"prefix cache {'on' if settings.model.prefix_cache else 'off'}")
    for column in ("dtype", "mode", "tokens", "wall s", "tokens/s", "p50 ms", "p95 ms",
                   "tokens/s by round"):
        table.add_column(column, justify="right")
    try:
        for dtype in dtypes:
            loaded = await asyncio.to_thread(load_model, settings.model.base_model, adapters, "cpu",
                                             dtype, settings.model.cache_dir)
            prefix = system_block(loaded.tokenizer, persona) if settings.model.prefix_cache else ""
            generator = HFGenerator(loaded, persona.other_speakers, shared_prefix=prefix)
            rounds: dict[str, list[dict[str, float]]] = {"sequential": [], "batched": []}
            for _ in range(repeats):
                for mode, batch in (("sequential", 1), ("batched", conversations)):
                    rounds[mode].append(await _round(redis, keys, generator, persona, batch,
                                                     requests(f"{mode}{len(rounds[mode])}")))
            runs = {}
            for mode, batch in (("sequential", 1), ("batched", conversations)):
                # The median round by throughput: one slow round (a noisy neighbour) is ignored.
                ordered = sorted(rounds[mode], key=lambda r: r["tokens_per_s"])
                runs[mode] = {**ordered[len(ordered) // 2],
                              "rounds_tokens_per_s": [round(r["tokens_per_s"], 2)
                                                      for r in rounds[mode]]}
                r = runs[mode]
                table.add_row(dtype, f"{mode} (B={batch})", str(r["tokens"]), f"{r['wall_s']:.1f}",
                              f"{r['tokens_per_s']:.1f}", f"{r['p50_ms']:.0f}",
                              f"{r['p95_ms']:.0f}",
                              " ".join(f"{t:.1f}" for t in r["rounds_tokens_per_s"]))
            ratio = runs["batched"]["tokens_per_s"] / runs["sequential"]["tokens_per_s"]
            per_dtype[dtype] = {"ratio": ratio, "batched": runs["batched"],
                                "sequential": runs["sequential"]}
            del generator, loaded
    finally:
        async for key in redis.scan_iter(match=keys.all_pattern):
            await redis.delete(key)
        await redis.aclose()
    _console().print(table)
    best = max(per_dtype, key=lambda d: per_dtype[d]["batched"]["tokens_per_s"])
    for dtype, figures in per_dtype.items():
        print(f"{dtype}: batched/sequential = {figures['ratio']:.2f}x")
    chosen = per_dtype[best]
    return {
        "conversations": conversations,
        "max_new_tokens": max_new_tokens,
        "adapter": adapter or None,
        "prefix_cache": settings.model.prefix_cache,
        "rounds": repeats,
        "dtype": best,
        "ratio": chosen["ratio"],
        "batched_tokens_per_s": chosen["batched"]["tokens_per_s"],
        "sequential_tokens_per_s": chosen["sequential"]["tokens_per_s"],
        "batched_p50_ms": chosen["batched"]["p50_ms"],
        "batched_p95_ms": chosen["batched"]["p95_ms"],
        "sequential_p50_ms": chosen["sequential"]["p50_ms"],
        "sequential_p95_ms": chosen["sequential"]["p95_ms"],
        "by_dtype": per_dtype,
    }


async def bench_queue(settings: Any, n: int) -> dict[str, Any]:
    from rich.table import Table

    from base.keys import Keys
    from base.logging_setup import redis_for
    from base.protocol import Request
    from base.queue_client import QueueClient
    from engine.generation import FakeGenerator
    from engine.worker import Worker
    from persona.pack import load_persona

    persona = load_persona(settings.generation.persona)
    redis = await redis_for(settings)
    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    generator = FakeGenerator()
    queue = QueueClient(redis, keys, "bench", max_queue_depth=10**6)
    await queue.setup()
    worker = Worker(redis, keys, generator, persona,
                    settings.with_overrides(worker_name="bench-queue"))
    stop = asyncio.Event()
    reader = asyncio.create_task(queue.run_reader(stop=stop, block_ms=1000))
    serving = asyncio.create_task(worker.run())

    def request(i: int) -> Request:
        return Request(frontend="bench", conversation=f"q:{i % 50}", user=f"u{i % 50}",
                       text=BENCH_PROMPTS[i % len(BENCH_PROMPTS)], settings={"candidates": 1})

    try:
        for i in range(20):  # warm-up
            await queue.ask(request(i))
        latencies = []
        for i in range(n):
            sent = time.perf_counter()
            await queue.ask(request(i))
            latencies.append((time.perf_counter() - sent) * 1000)
        in_flight = 64
        started = time.perf_counter()
        for start in range(0, n, in_flight):
            await asyncio.gather(*(queue.ask(request(i))
                                   for i in range(start, min(n, start + in_flight))))
        rps = n / (time.perf_counter() - started)
    finally:
        await _stop_serving(worker, stop, serving, reader, redis, keys)
        await redis.aclose()
    figures = {"requests": n, "p50_ms": percentile(latencies, 50),
               "p99_ms": percentile(latencies, 99), "mean_ms": statistics.fmean(latencies),
               "requests_per_s": rps, "in_flight": in_flight}
    table = Table(title=f"queue round trip, instant generator, {n} requests")
    for column in ("p50 ms", "p99 ms", "mean ms", f"requests/s ({in_flight} in flight)"):
        table.add_column(column, justify="right")
    table.add_row(f"{figures['p50_ms']:.2f}", f"{figures['p99_ms']:.2f}",
                  f"{figures['mean_ms']:.2f}", f"{rps:.0f}")
    _console().print(table)
    return figures


def bench_decode(settings: Any, rows: list[int], adapter: str, rounds: int = 3,
                 steps: int = 12, prompt_tokens: int = 60, prefill_tokens: int = 512
                 ) -> dict[str, Any]:
    """The llama.cpp engine's step alone, on ``adapter``'s lane as the worker runs it
    (LLAMACPP_WEIGHTS, LLAMACPP_LORA): the median ms of one ``llama_decode`` of R rows of
    one token each (each row a ``prompt_tokens`` prompt after the persona block), and of
    one ``prefill_tokens`` prefill; ``rounds`` times each, interleaved. What a scheduler
    step cannot beat: R rows cost ``ms(R)``, so a reply's latency among R running rows is at
    least ``ms(R) / ms(1)`` times its latency alone."""
    from rich.table import Table

    from engine.llamacpp_engine import (
        PREFIX_SEQ,
        build_llamacpp_generator,
        settle_torch_threads,
        weights_kind,
    )
    from engine.model_loading import load_model
    from persona.pack import load_persona
    from persona.prompt import system_block

    persona = load_persona(settings.generation.persona)
    settle_torch_threads(settings, "llamacpp")
    loaded = load_model(settings.model.base_model,
                        {adapter: settings.model.adapter_paths[adapter]}, "cpu",
                        settings.model.dtype, settings.model.cache_dir)
    engine = build_llamacpp_generator(
        settings.with_overrides(max_running_rows=max(rows)), loaded, persona.other_speakers,
        system_block(loaded.tokenizer, persona))
    try:
        lane = engine._lane(adapter)
        memory = engine.llama.llama_get_memory(lane.ctx)
        start = lane.prefix_len
        vocab = engine.n_vocab

        def clear(seqs: range) -> None:
            for seq in seqs:
                engine.llama.llama_memory_seq_rm(memory, seq, -1, -1)

        def fresh(seqs: range) -> None:  # empty rows on the persona's block, as served
            clear(seqs)
            for seq in seqs if start else ():
                engine.llama.llama_memory_seq_cp(memory, PREFIX_SEQ, seq, -1, -1)

        def token(i: int) -> int:
            return 1000 + (i * 7919) % (vocab - 2000)

        def decode_ms(r: int) -> float:
            seqs = range(1, r + 1)
            fresh(seqs)
            engine.run_chunked(lane, [(token(p + s), start + p, s, p == prompt_tokens - 1)
                                      for s in seqs for p in range(prompt_tokens)])
            times = []
            for k in range(steps):  # each step one token of every row (≤ max_running_rows)
                position = start + prompt_tokens + k
                began = time.perf_counter()
                engine.run_batch(lane, [(token(k + s), position, s, True) for s in seqs])
                times.append((time.perf_counter() - began) * 1000)
            clear(seqs)
            return statistics.median(times)

        def prefill_ms() -> float:
            fresh(range(1, 2))
            began = time.perf_counter()
            engine.run_chunked(lane, [(token(p), start + p, 1, p == prefill_tokens - 1)
                                      for p in range(prefill_tokens)])
            took = (time.perf_counter() - began) * 1000
            clear(range(1, 2))
            return took

        runs: dict[str, list[float]] = {f"r{r}": [] for r in rows}
        runs["prefill"] = []
        for _ in range(rounds):
            for r in rows:
                runs[f"r{r}"].append(decode_ms(r))
            runs["prefill"].append(prefill_ms())
    finally:
        engine.close()
    ms = {name: statistics.median(v) for name, v in runs.items()}
    one = ms[f"r{rows[0]}"]
    table = Table(title=f"llama.cpp decode step, {adapter} lane, "
                        f"{weights_kind(settings.model.llamacpp_weights)} weights, "
                        f"LoRA {settings.model.llamacpp_lora}; median of {rounds} rounds")
    for column in ("rows", "ms per step", "tokens/s", f"x rows={rows[0]}"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r), f"{ms[f'r{r}']:.1f}", f"{1000 * r / ms[f'r{r}']:.0f}",
                      f"{ms[f'r{r}'] / one:.2f}")
    table.add_row(f"prefill {prefill_tokens}", f"{ms['prefill']:.0f}",
                  f"{1000 * prefill_tokens / ms['prefill']:.0f}", "")
    _console().print(table)
    return {"adapter": adapter, "weights": weights_kind(settings.model.llamacpp_weights),
            "lora": settings.model.llamacpp_lora, "rounds": rounds, "steps": steps,
            "prompt_tokens": prompt_tokens, "ms": ms, "runs": runs,
            "prefill_tokens": prefill_tokens}


async def bench_serve(settings: Any, engines: list[str], levels: list[int], messages: int,
                      max_new_tokens: int, candidates: int, adapter: str,
                      mode: str = "generated", loaded: Any = None,
                      arrival_gap_s: float = 0.0) -> dict[str, Any]:
    """The engines behind a real worker and queue, replies streamed (see the module doc);
    ``loaded``: the model with ``adapter``, when the caller has it already; ``arrival_gap_s``
    > 0: open loop (messages at exponential gaps of that mean, not waiting for replies)."""
    from rich.table import Table

    from base.logging_setup import redis_for
    from engine.llamacpp_engine import settle_torch_threads
    from engine.model_loading import load_model
    from engine.runtime import build_canon, build_scorer, listener_for, local_engine
    from persona.pack import load_persona

    persona = load_persona(settings.generation.persona)
    if loaded is None:
        settle_torch_threads(settings, engines[0])  # the first engine's (see its doc)
        loaded = await asyncio.to_thread(load_model, settings.model.base_model,
                                         {adapter: settings.model.adapter_paths[adapter]}, "cpu",
                                         settings.model.dtype, settings.model.cache_dir)
    chosen_settings = settings.with_overrides(reply_mode=mode)
    scorer = await asyncio.to_thread(build_scorer, chosen_settings)
    canon = await asyncio.to_thread(build_canon, chosen_settings)
    if mode != "generated" and canon is None:
        mode = "generated"  # build_canon logged why
    controls = {"max_new_tokens": max_new_tokens, "candidates": candidates}
    redis = await redis_for(settings)
    by_engine: dict[str, Any] = {}
    table = Table(title=f"serving: adapter {adapter}, {max_new_tokens} new tokens at most, "
                        f"{candidates} candidate(s), replies streamed, {mode} mode, "
                        + (f"open loop (a message every {arrival_gap_s:g} s on average "
                           "per conversation)" if arrival_gap_s > 0 else "closed loop"))
    for column in ("engine", "conversations", "replies", "replies/s", "tokens/s",
                   "all talking tokens/s", "p50 ms", "p95 ms",
                   "first text p50 ms", "p95 ms", "/reset p50 ms", "p95 ms",
                   "no listener", "choosing ms", "share"):
        table.add_column(column, justify="right")
    try:
        for engine in engines:
            generator: Any
            if engine == "openai":  # the server at INFERENCE_URL (ADAPTER_MODELS)
                from engine.openai_backend import build_openai_generator

                generator = build_openai_generator(settings, persona.other_speakers)
            else:
                generator = await asyncio.to_thread(local_engine, settings, loaded, persona,
                                                    engine)
            engine = getattr(generator, "engine_name", engine)  # "auto" runs one of the others
            # as build_worker: the listener re-ranks canon lines on a local model
            listener = (await asyncio.to_thread(listener_for, chosen_settings, loaded, persona,
                                                generator)
                        if canon is not None and engine != "openai" else None)
            if listener is not None and mode != "generated" \
                    and settings.reply_choice.listener_prime:
                await asyncio.to_thread(_prime, listener, canon)
            figures = await _bench_engine(redis, generator, persona, settings, engine,
                                          controls, levels, messages, mode, scorer, canon,
                                          listener, arrival_gap_s)
            close = getattr(generator, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
            for level in levels:
                f = figures[f"c{level}"]
                table.add_row(engine, str(level), str(f["replies"]), f"{f['replies_per_s']:.2f}",
                              f"{f['tokens_per_s']:.1f}",
                              f"{f['all_active_tokens_per_s']:.1f}",
                              f"{f['p50_ms']:.0f}", f"{f['p95_ms']:.0f}",
                              f"{f['ttft_p50_ms']:.0f}", f"{f['ttft_p95_ms']:.0f}",
                              f"{f['control_p50_ms']:.0f}", f"{f['control_p95_ms']:.0f}",
                              f"{f['listener_skipped']}/{f['replies']}" if listener else "–",
                              f"{f['choice_mean_ms']:.0f}", f"{f['choice_share']:.0%}")
            by_engine[engine] = figures
    finally:
        await redis.aclose()
    _console().print(table)
    for engine, figures in by_engine.items():
        print(f"{engine}: one reply alone p50 {figures['alone_p50_ms']:.0f} ms")
    chosen = next(iter(by_engine))
    return {"engine": chosen, **by_engine[chosen], "by_engine": by_engine, "mode": mode,
            "arrival_gap_s": arrival_gap_s, "max_new_tokens": max_new_tokens,
            "candidates": candidates, "adapter": adapter}


def _prime(listener: Any, canon: Any) -> None:
    """The listener primed as a running worker's is once its engine has been idle a while
    (LISTENER_PRIME): every canon line's empty-message term scored, before anything is timed
    (the first run on a machine only; the terms are kept in MODEL_CACHE_DIR)."""
    from tqdm import tqdm

    texts = [line.text for line in canon.lines]
    with tqdm(total=len(texts), desc="listener: canon lines' empty-message terms",
              unit="line") as bar:
        bar.update(len(texts) - sum(1 for t in texts if t not in listener.primed))
        listener.prime(texts, progress=bar.update, chunk=16)  # nothing waits: larger turns


async def _bench_engine(redis: Any, generator: Any, persona: Any, settings: Any, engine: str,
                        controls: dict[str, int], levels: list[int], messages: int,
                        mode: str, scorer: Any, canon: Any, listener: Any = None,
                        arrival_gap_s: float = 0.0) -> dict[str, Any]:
    from base.keys import Keys
    from base.protocol import Reply, Request
    from base.queue_client import QueueClient
    from engine.worker import LOAD_WINDOW_S, Worker

    keys = Keys(f"bench-{uuid.uuid4().hex[:8]}")
    queue = QueueClient(redis, keys, "bench", max_queue_depth=10**6)
    await queue.setup()
    first_text: dict[str, float] = {}

    async def heard(reply: Reply) -> None:
        first_text.setdefault(reply.id, time.perf_counter())

    queue.on_partial = heard
    worker = Worker(redis, keys, generator, persona, settings.with_overrides(
        worker_name=f"bench-{engine}", read_block_ms=20, reply_mode=mode),
        scorer=scorer, canon=canon, listener=listener)
    stop = asyncio.Event()
    reader = asyncio.create_task(queue.run_reader(stop=stop, block_ms=20))
    serving = asyncio.create_task(worker.run())
    counter = iter(range(10**9))

    async def ask(conversation: str, text: str, kind: str = "chat"
                  ) -> tuple[float, float | None, int]:
        request = Request(frontend="bench", conversation=conversation, user=conversation,
                          kind=kind, text=text, settings={**controls, "seed": next(counter)})
        sent = time.perf_counter()
        reply = await queue.ask(request, timeout_s=3600)
        done = time.perf_counter()
        # the first text a user sees: the first partial, or the reply when none came before it
        heard_at = first_text.pop(request.id, done)
        return (done - sent) * 1000, (heard_at - sent) * 1000, reply.tokens

    try:
        await ask("warm", BENCH_PROMPTS[0])
        alone = []
        for i in range(3):  # alone: nothing else running, nor lately (the listener's rule)
            await asyncio.sleep(LOAD_WINDOW_S)
            alone.append((await ask(f"alone{i}", BENCH_PROMPTS[i]))[0])
        figures: dict[str, Any] = {"alone_p50_ms": percentile(alone, 50)}
        skipped = worker.metrics.listener_skipped._value
        for level in levels:
            await asyncio.sleep(LOAD_WINDOW_S)  # the level before is not this one's load
            before = skipped.get()
            chosen_before = _totals(worker.metrics.reply_choice_seconds)
            f = figures[f"c{level}"] = await _serve_level(
                ask, level, messages, lambda: worker.metrics.tokens._value.get(),
                arrival_gap_s)
            # replies chosen without the listener: it steps aside under load
            f["listener_skipped"] = int(skipped.get() - before)
            # the reply choice's share of the replies' time (issue 13: at most 15 %)
            count, seconds = (a - b for a, b in zip(
                _totals(worker.metrics.reply_choice_seconds), chosen_before, strict=True))
            f["choice_mean_ms"] = seconds * 1000 / count if count else 0.0
            f["choice_share"] = seconds * 1000 / f["latency_sum_ms"] if f["replies"] else 0.0
        return figures
    finally:
        await _stop_serving(worker, stop, serving, reader, redis, keys)


def _totals(histogram: Any) -> tuple[float, float]:
    """How many observations a prometheus Histogram holds and their sum."""
    values = {sample.name: sample.value for metric in histogram.collect()
              for sample in metric.samples}
    return (next(v for k, v in values.items() if k.endswith("_count")),
            next(v for k, v in values.items() if k.endswith("_sum")))


async def _stop_serving(worker: Any, stop: asyncio.Event, serving: asyncio.Task[Any],
                        reader: asyncio.Task[Any], redis: Any, keys: Any) -> None:
    """Stop a benchmark's worker and reply reader, and delete its keys."""
    worker.stop.set()
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.gather(serving, reader)
    async for key in redis.scan_iter(match=keys.all_pattern):
        await redis.delete(key)


async def _serve_level(ask: Any, level: int, messages: int, generated: Any,
                       arrival_gap_s: float = 0.0) -> dict[str, float]:
    """``level`` conversations of ``messages`` messages each, and a /reset prober; tokens/s
    counts every token generated (all candidates; a reply that is a line from the series
    carries none of its own), over the whole run and (``all_active_tokens_per_s``) until the
    first conversation has its last reply — the part of the run with every conversation still
    talking, without the tail where the batch empties. Closed loop, or open loop with
    ``arrival_gap_s`` > 0: a conversation's messages leave at seeded exponential gaps of that
    mean, and a reply's latency counts from when its message left (waiting behind the
    conversation's earlier messages included). ``replies_per_s`` counts the conversations'
    replies (a hybrid reply answered by a canon line before anything is generated carries no
    tokens, so tokens/s alone undersells it)."""
    latencies: list[float] = []
    ttfts: list[float] = []
    controls: list[float] = []
    done = asyncio.Event()
    first_done: tuple[float, float] | None = None  # when and at what count one conversation ended

    async def message(i: int, k: int) -> None:
        ms, ttft, _ = await ask(f"c{level}:{i}", BENCH_PROMPTS[(i + k * 7) % len(BENCH_PROMPTS)])
        latencies.append(ms)
        if ttft is not None:
            ttfts.append(ttft)

    async def conversation(i: int) -> None:
        nonlocal first_done
        if arrival_gap_s <= 0:
            for k in range(messages):
                await message(i, k)
        else:
            gaps = random.Random(level * 1000 + i)
            sent = []
            for k in range(messages):
                await asyncio.sleep(gaps.expovariate(1 / arrival_gap_s))
                sent.append(asyncio.create_task(message(i, k)))
            await asyncio.gather(*sent)
        if first_done is None:
            first_done = (time.perf_counter(), generated())

    async def prober() -> None:
        while not done.is_set():
            ms, _, _ = await ask(f"probe{level}", "", kind="reset")
            controls.append(ms)
            await asyncio.sleep(0.3)

    probing = asyncio.create_task(prober())
    tokens_before = generated()
    started = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(level)))
    wall = time.perf_counter() - started
    done.set()
    await probing
    tokens = int(generated() - tokens_before)
    assert first_done is not None
    window = first_done[0] - started
    return {"replies": len(latencies), "tokens": tokens, "wall_s": wall,
            "replies_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "all_active_tokens_per_s": (first_done[1] - tokens_before) / window,
            "all_active_s": window, "latency_sum_ms": sum(latencies),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "ttft_p50_ms": percentile(ttfts, 50), "ttft_p95_ms": percentile(ttfts, 95),
            "control_p50_ms": percentile(controls, 50), "control_p95_ms": percentile(controls, 95)}


async def bench_peer(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``serve`` (the first of ``--engines``, default LOCAL_ENGINE) and llama.cpp on the same
    prompts, in one run."""
    from rich.table import Table

    from engine.llamacpp_engine import repacks_weights, settle_torch_threads
    from engine.model_loading import find_embedded_gguf, load_model
    from persona.pack import load_persona
    from persona.prompt import render_prompt

    levels = sorted({1, 16, *[int(c) for c in args.levels.split(",") if c.strip()]})
    adapter = args.adapter or settings.model.default_adapter
    settle_torch_threads(settings, engines_of(args, settings)[0])
    loaded = await asyncio.to_thread(load_model, settings.model.base_model,
                                     {adapter: settings.model.adapter_paths[adapter]}, "cpu",
                                     settings.model.dtype, settings.model.cache_dir)
    serve = await bench_serve(settings, engines_of(args, settings), levels, args.messages,
                              args.max_new_tokens, args.candidates, adapter,
                              args.mode or settings.reply_choice.mode, loaded,
                              args.arrival_gap_s)
    persona = load_persona(settings.generation.persona)
    tokenizer = loaded.tokenizer
    controls = persona.controls
    spec = {"gguf": str(find_embedded_gguf(settings.model.base_model)), "threads": 2,
            "repack": repacks_weights(settings.model.llamacpp_repack),
            "max_tokens": args.max_new_tokens, "temperature": controls.temperature,
            "top_p": controls.top_p, "repeat_penalty": controls.repetition_penalty,
            "prompts": [render_prompt(tokenizer, persona, [], p) for p in BENCH_PROMPTS]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    script = Path(__file__).with_name("peer_llama.py")
    done = await asyncio.to_thread(subprocess.run, [str(args.peer_python), str(script), f.name],
                                   capture_output=True, text=True, timeout=1800)
    Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {done.stderr[-2000:]}")
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    latencies = [r["ms"] for r in peer["replies"]]
    peer_wall_s = peer["tokens"] / peer["tokens_per_s"]
    peer_figures = {"tokens_per_s": peer["tokens_per_s"], "tokens": peer["tokens"],
                    "replies_per_s": len(latencies) / peer_wall_s,
                    "p50_ms": percentile(latencies, 50),
                    "ttft_p50_ms": percentile([r["ttft_ms"] for r in peer["replies"]], 50),
                    "threads": peer["threads"], "gguf": Path(spec["gguf"]).name,
                    "repacked": peer["repack"],
                    "samples": [r["text"] for r in peer["replies"][:3]]}
    ratio = serve["c16"]["tokens_per_s"] / peer["tokens_per_s"]
    ratio_all_active = serve["c16"]["all_active_tokens_per_s"] / peer["tokens_per_s"]
    replies_ratio = serve["c16"]["replies_per_s"] / peer_figures["replies_per_s"]
    table = Table(title=f"ours ({serve['engine']} engine, {adapter} adapter) vs llama.cpp "
                        "(base GGUF, one request at a time, 2 threads)")
    for column in ("engine", "replies/s", "tokens/s", "reply p50 ms", "first text p50 ms"):
        table.add_column(column, justify="right")
    for name, f in (("ours, 1 conversation", serve["c1"]),
                    ("ours, 16 conversations", serve["c16"]),
                    ("llama.cpp, one stream", peer_figures)):
        table.add_row(name, f"{f['replies_per_s']:.2f}", f"{f['tokens_per_s']:.1f}",
                      f"{f['p50_ms']:.0f}", f"{f['ttft_p50_ms']:.0f}")
    _console().print(table)
    print(f"ours at 16 conversations / llama.cpp single stream = {ratio:.2f}x (the whole "
          f"run; {ratio_all_active:.2f}x while all 16 were talking); replies/s "
          f"{replies_ratio:.2f}x")
    if serve.get("mode") != "generated":
        print("tokens/s counts generated tokens: a hybrid or canon reply that is a line from "
              "the series has none (--mode generated measures the engine)")
    return {"serve": serve, "peer": peer_figures, "ratio_vs_peer": ratio,
            "ratio_all_active_vs_peer": ratio_all_active, "replies_ratio_vs_peer": replies_ratio}
