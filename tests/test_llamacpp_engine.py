"""The llama.cpp engine on the real embedded GGUF and the shipped House adapter (converted to
a GGUF LoRA): it is the same model as the PyTorch one, rows join a running batch and a short
request leaves before a long one, base and House rows run side by side, the key/value budget
makes calls wait instead of failing, and the worker serves through it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import join_while_decoding, worker_settings

from base.protocol import Request
from engine.generation import GenerationJob
from engine.worker import Worker
from persona.prompt import render_prompt, system_block

llama_cpp = pytest.importorskip("llama_cpp", reason="make install builds llama-cpp-python")

from engine.gguf_lora import convert_adapter  # noqa: E402
from engine.llamacpp_engine import build_llamacpp_generator  # noqa: E402
from engine.model_loading import find_embedded_gguf  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

QUESTIONS = ["Do I need surgery?", "Is it lupus?", "Why are you so rude?",
             "My head hurts every morning and my left hand goes numb when I type."]


def make_engine(embedded_model, persona, **fields):  # type: ignore[no-untyped-def]
    settings = worker_settings("llama", **fields)
    return build_llamacpp_generator(settings, embedded_model, persona.other_speakers,
                                    system_block(embedded_model.tokenizer, persona))


@pytest.fixture(scope="module")
def engine(embedded_model, persona):  # type: ignore[no-untyped-def]
    if "house" not in embedded_model.adapters:
        pytest.skip("the House adapter is not in models/")
    generator = make_engine(embedded_model, persona)
    yield generator
    generator.close()


def jobs_for(engine, persona, tokens: int, adapters, start: int = 0,  # type: ignore[no-untyped-def]
             **controls):
    merged = persona.controls.merged({"max_new_tokens": tokens, "sentence_cap": 10, **controls})
    return [GenerationJob(render_prompt(engine.tokenizer, persona, [], q), adapter, merged,
                          start + i, q)
            for i, (q, adapter) in enumerate(zip(QUESTIONS, adapters, strict=False))]


def first_scores(engine, job):  # type: ignore[no-untyped-def]
    """The scores of a job's first token, from a prefill of its lane."""
    from engine.scheduler import Call

    lane = engine._lane(job.adapter)
    call = Call([job], None, frozenset(), threading.Event(), [None], 1)
    rows, prompts = engine._prefill(lane, [(call, 0)])
    engine._run_rows(lane, [prompts], [])
    for row in rows:
        engine._release(lane, row, keep=True)
    return torch.log_softmax(rows[0].logits.float().flatten(), -1)


def long_batch_running(engine, persona, tokens: int  # type: ignore[no-untyped-def]
                       ) -> tuple[threading.Thread, dict[str, float]]:
    """A greedy base-model row of ``tokens`` (it rambles) generating on another thread, three
    steps in; ``done["long"]`` is when it ended."""
    long_jobs = jobs_for(engine, persona, tokens, ["__base__"], temperature=0.0)[:1]
    done: dict[str, float] = {}
    runner = threading.Thread(target=lambda: (engine.generate(long_jobs),
                                              done.setdefault("long", time.monotonic())))
    steps = engine.steps
    runner.start()
    while engine.steps < steps + 3 and runner.is_alive():
        time.sleep(0.005)
    return runner, done


def near_best(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """``ours``' most likely token is one ``theirs`` rates within 0.2 nats of its best (the
    8-bit re-encoding may swap two nearly tied tokens: 0.08 nats apart in one of our runs)."""
    return bool(theirs[ours.argmax()] >= theirs.max() - 0.2)


@pytest.mark.parametrize("lora", ["merged", "runtime"])
def test_the_house_lane_is_the_pytorch_house_model(engine, embedded_model, persona, lora
                                                   ) -> None:
    """The House lane, with the adapter merged into its own GGUF (the default) or as a GGUF
    LoRA applied at run time (lora_B of the query and key projections permuted as the GGUF
    conversion permutes their weights), is the model transformers runs: the same most likely
    first token (or one tied with it) and log-probabilities within the weights' re-encoding;
    the base lane differs from House as PyTorch's base does."""
    from engine.model_loading import plain_copy

    # merged copies: the shared model may carry another engine's per-row adapter hooks
    house_model = plain_copy(embedded_model.model, "house")
    base_model = plain_copy(embedded_model.model, "__base__")
    lane_engine = engine if lora == "merged" else make_engine(embedded_model, persona,
                                                              llamacpp_lora=lora)
    for question in QUESTIONS[:3]:
        job = jobs_for(engine, persona, 1, ["house"])[0]
        job = GenerationJob(render_prompt(engine.tokenizer, persona, [], question), "house",
                            job.controls, 0, question)
        ids = torch.tensor([embedded_model.tokenizer(job.prompt,
                                                     add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            house = torch.log_softmax(house_model(input_ids=ids).logits[0, -1].float(), -1)
            base = torch.log_softmax(base_model(input_ids=ids).logits[0, -1].float(), -1)
        ours_house = first_scores(lane_engine, job)
        ours_base = first_scores(lane_engine, GenerationJob(job.prompt, "__base__",
                                                            job.controls, 0))
        top = torch.topk(house, 20).indices
        assert near_best(ours_house, house) and near_best(house, ours_house)
        assert (ours_house[top] - house[top]).abs().max() < 0.5
        base_top = torch.topk(base, 20).indices
        assert near_best(ours_base, base) and near_best(base, ours_base)
        assert (ours_base[base_top] - base[base_top]).abs().max() < 0.5
        assert (house[top] - base[top]).abs().max() > 1.0  # the adapter matters here
    if lane_engine is not engine:
        lane_engine.close()


def test_the_adapter_gguf_permutes_only_query_and_key(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from base.config import ROOT

    adapter = ROOT / "models" / "house-smollm2"
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("the House adapter is not in models/")
    out = convert_adapter(adapter, find_embedded_gguf("smollm2-135m"), tmp_path / "a.gguf")
    written = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0."
    v_b = peft[prefix + "self_attn.v_proj.lora_B.weight"].astype(np.float32)
    q_b = peft[prefix + "self_attn.q_proj.lora_B.weight"].astype(np.float32)
    assert np.array_equal(written["blk.0.attn_v.weight.lora_b"], v_b)
    assert not np.array_equal(written["blk.0.attn_q.weight.lora_b"], q_b)
    assert np.array_equal(np.sort(written["blk.0.attn_q.weight.lora_b"], axis=None),
                          np.sort(q_b, axis=None))  # the same rows, reordered
    assert len(written) == len(peft)


def test_the_merged_gguf_adds_the_adapter_to_the_projections_only(tmp_path: Path) -> None:
    import gguf

    from base.config import ROOT
    from engine.gguf_lora import lora_tensors
    from engine.gguf_merge import merge_adapter

    adapter = ROOT / "models" / "house-smollm2"
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("the House adapter is not in models/")
    source = find_embedded_gguf("smollm2-135m")
    out = merge_adapter(adapter, source, tmp_path / "m.gguf")
    before = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    config, loras = lora_tensors(adapter, source)
    assert after.keys() == before.keys()
    name = "blk.3.attn_q.weight"
    weight = gguf.quants.dequantize(before[name].data, before[name].tensor_type)
    delta = config["lora_alpha"] / config["r"] * (loras[name + ".lora_b"] @ loras[name + ".lora_a"])
    assert np.allclose(np.asarray(after[name].data), weight + delta, atol=1e-6)
    assert np.abs(delta).max() > 1e-3  # the adapter changes it
    untouched = "blk.3.attn_norm.weight"
    assert np.array_equal(np.asarray(after[untouched].data), np.asarray(before[untouched].data))
    assert after["token_embd.weight"].tensor_type == before["token_embd.weight"].tensor_type


def test_the_merged_lane_is_cached_encoded_without_its_float32_merge(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import engine.gguf_merge
    from base.config import ROOT
    from engine.llamacpp_engine import merged_encoded

    adapter = ROOT / "models" / "house-smollm2"
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("the House adapter is not in models/")
    source = find_embedded_gguf("smollm2-135m")
    out = merged_encoded(adapter, source, "q8_0", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no float32 merge left behind
    assert out.stat().st_size < source.stat().st_size * 2

    def no_merge(*_):  # type: ignore[no-untyped-def]
        raise AssertionError("merged again")

    monkeypatch.setattr(engine.gguf_merge, "merge_adapter", no_merge)
    assert merged_encoded(adapter, source, "q8_0", tmp_path) == out  # a later start reads it


@pytest.mark.parametrize(("built", "weights", "repacks"), [
    ("AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 0", "q8_0", True),
    ("AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0", "bf16", True),  # AMD Zen 4
    ("AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1", "q8_0", False),  # Sapphire Rapids
])
def test_auto_weights_and_repacking_follow_the_build(built: str, weights: str, repacks: bool,
                                                     monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where llama.cpp uses AMX its repacked weights segfaulted in the first decode on this
    project's Xeon VMs, and unpacked q8_0 decoded faster than bf16 there."""
    import engine.llamacpp_engine as module
    import engine.model_loading

    class Built:
        @staticmethod
        def llama_print_system_info() -> bytes:
            return built.encode()

    monkeypatch.setattr(module, "_llama", lambda: Built)
    monkeypatch.setattr(engine.model_loading, "cpu_has_bf16", lambda: "BF16 = 1" in built)
    assert module.weights_kind("auto") == weights
    assert module.repacks_weights("auto") is repacks
    assert module.repacks_weights("on") is True and module.repacks_weights("off") is False
    assert module.weights_kind("f32") == "f32"


def test_every_decode_runs_on_the_engine_thread(engine, persona, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's decodes run on one thread whoever calls (a second thread with its own
    OpenMP team made every decode twice as slow), and torch keeps one thread where llama.cpp
    serves (a team of torch's threads did the same)."""
    import engine.llamacpp_engine as module

    where: list[str] = []
    original = engine.llama

    class Watched:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(original, name)

        @staticmethod
        def llama_decode(ctx, batch):  # type: ignore[no-untyped-def]
            where.append(threading.current_thread().name)
            return original.llama_decode(ctx, batch)

    monkeypatch.setattr(engine, "llama", Watched())
    first_scores(engine, jobs_for(engine, persona, 4, ["house"])[0])  # from this thread
    engine.generate(jobs_for(engine, persona, 4, ["house", "__base__"]))
    assert where and set(where) == {"engine"}

    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    module.settle_torch_threads(worker_settings("w", torch_threads=2))
    module.settle_torch_threads(worker_settings("w", torch_threads=2), "continuous")
    assert threads == [1, 2]


def test_rows_join_a_running_batch_and_a_short_one_leaves_first(engine, persona) -> None:
    long_jobs = jobs_for(engine, persona, 48, ["house", "__base__"], temperature=0.0)
    late_jobs = jobs_for(engine, persona, 4, ["__base__", "house"], start=10)
    results, finished_at = join_while_decoding(engine, long_jobs, late_jobs)
    assert all(g.tokens > 0 for g in results["long"] + results["late"])
    assert all(g.tokens <= 4 for g in results["late"])
    assert engine.most_rows >= 3  # they ran in one batch
    assert finished_at["late"] < finished_at["long"]
    # greedy: the House and base rows of one call differ, and a row alone is reproducible
    assert results["long"][0].text != results["long"][1].text
    again = engine.generate(long_jobs[:1])[0].text
    assert engine.generate(long_jobs[:1])[0].text == again


def test_the_candidates_of_one_reply_compute_their_prompt_once(engine, persona) -> None:
    import dataclasses

    job = jobs_for(engine, persona, 12, ["house"], temperature=0.0)[0]
    job = dataclasses.replace(  # a prompt no other test sent: nothing kept starts it
        job, prompt=render_prompt(engine.tokenizer, persona, [], "Twins, doctor?"))
    twin = dataclasses.replace(job)
    ids = engine.tokenizer(job.prompt, add_special_tokens=False)["input_ids"]
    before = engine.prompt_tokens
    first, second = engine.generate([job, twin])
    assert engine.prompt_tokens - before == len(ids) - len(engine.prefix_ids)
    assert first.tokens > 0 and first.text == second.text  # the same cells and scores
    others = [dataclasses.replace(job, prompt=render_prompt(engine.tokenizer, persona, [], q))
              for q in ("Triplets, doctor?", "Quadruplets, then?")]
    tails = sum(len(engine.tokenizer(o.prompt, add_special_tokens=False)["input_ids"])
                - len(engine.prefix_ids) for o in others)
    before = engine.prompt_tokens
    engine.generate(others)  # other prompts are computed each for itself
    assert engine.prompt_tokens - before == tails


def test_a_conversations_next_prompt_computes_only_what_is_new(engine, embedded_model,
                                                               persona) -> None:
    """A row that ended keeps its cells: the conversation's next prompt (the last one, the
    reply, the new message) computes only the tokens after the longest kept start, with the
    scores a fresh engine gives it."""
    import dataclasses

    from persona.prompt import Turn

    question = "Is my liver failing, doctor?"
    job = dataclasses.replace(jobs_for(engine, persona, 8, ["house"], temperature=0.0)[0],
                              prompt=render_prompt(engine.tokenizer, persona, [], question))
    reply = engine.generate([job])[0].text
    follow = dataclasses.replace(job, prompt=render_prompt(
        engine.tokenizer, persona, [Turn("user", question), Turn("assistant", reply)],
        "And my kidneys?"))
    first = engine.tokenizer(job.prompt, add_special_tokens=False)["input_ids"]
    second = engine.tokenizer(follow.prompt, add_special_tokens=False)["input_ids"]
    assert second[: len(first)] == first
    before = engine.prompt_tokens
    reused = first_scores(engine, follow)
    assert 0 < engine.prompt_tokens - before <= len(second) - len(first)
    fresh_engine = make_engine(embedded_model, persona)
    try:
        fresh = first_scores(fresh_engine, follow)
        assert fresh_engine.prompt_tokens == len(second) - len(engine.prefix_ids)
    finally:
        fresh_engine.close()
    assert near_best(reused, fresh)
    top = fresh.topk(20).indices
    assert torch.allclose(reused[top], fresh[top], atol=0.5)


def test_a_prompt_that_fails_in_a_step_fails_only_its_call(embedded_model, persona) -> None:
    """A joining call's prompt runs in the running rows' step; when that decode fails, each
    prompt runs once more alone: only the call whose prompt fails by itself gets the error,
    and the running rows go on."""
    engine = make_engine(embedded_model, persona)
    try:
        long_job = jobs_for(engine, persona, 48, ["house"] * 4, temperature=0.9)[3]
        bad_job = dataclasses.replace(long_job, prompt=render_prompt(
            engine.tokenizer, persona, [], "Zyzzyva quixotically?"), seed=5)
        long_ids = set(engine.tokenizer(long_job.prompt, add_special_tokens=False)["input_ids"])
        poison = next(t for t in engine.tokenizer(bad_job.prompt, add_special_tokens=False)
                      ["input_ids"] if t not in long_ids)
        real = engine.run_batch

        def run_batch(lane, items):  # type: ignore[no-untyped-def]
            if lane.adapter == "house" and any(token == poison for token, *_ in items):
                raise RuntimeError("poisoned prompt")
            real(lane, items)

        engine.run_batch = run_batch  # type: ignore[method-assign]
        results: list = []  # type: ignore[type-arg]
        first = threading.Thread(target=lambda: results.extend(engine.generate([long_job])))
        first.start()
        deadline = time.monotonic() + 60
        while engine.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert first.is_alive()  # the long row is decoding
        with pytest.raises(RuntimeError, match="poisoned"):  # its base row leaves with it
            engine.generate([bad_job, dataclasses.replace(bad_job, adapter="__base__")])
        first.join(120)
        assert len(results) == 1 and results[0].tokens > 3
        assert all(not lane.reserved and not lane.joining for lane in engine._lanes.values())
        engine.run_batch = real  # type: ignore[method-assign]
        again = engine.generate([long_job, bad_job, dataclasses.replace(bad_job,
                                                                       adapter="__base__")])
        assert all(g.tokens > 0 for g in again)  # the lanes are sound
    finally:
        engine.close()


def test_calls_wait_for_room_in_the_key_value_cache(embedded_model, persona) -> None:
    """Four calls of 96 tokens each in a 256-cell cache: at most two rows run at once, and
    every call is answered (none fails for want of cells)."""
    small = make_engine(embedded_model, persona, llamacpp_kv_tokens=256)
    try:
        jobs = jobs_for(small, persona, 96, ["house"] * 4)
        out: list = []  # type: ignore[type-arg]
        threads = [threading.Thread(target=lambda j=j: out.extend(small.generate([j])))
                   for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(out) == 4 and all(g.tokens > 0 for g in out)
        assert small.most_rows <= 2
    finally:
        small.close()


def test_a_call_with_more_rows_than_the_batch_is_answered_in_parts(embedded_model,
                                                                  persona) -> None:
    """Ten rows through an engine that runs four at once (four replies of 3, 3, 3 and 1
    candidates, as eval and a full micro-batch send them): every row answered, never more
    than four running, streamed rows numbered within the whole call. Before, the llama.cpp
    engine failed the whole call with "no free sequence". (Each row's text equal to its text
    alone is tested on the batch-invariant PyTorch engine, tests/test_continuous.py: here a
    near-tie, such as "No." then the end against "No. It's a virus.", may fall either way
    with the rows beside it.)"""
    small = make_engine(embedded_model, persona, max_running_rows=4)
    try:
        replies = jobs_for(small, persona, 8, ["house"] * 4, temperature=0.0)
        jobs = [job for job in replies[:3] for _ in range(3)] + replies[3:]
        streamed: dict[int, str] = {}
        out = small.generate(jobs, lambda row, text: streamed.__setitem__(row, text), {0, 9})
        assert len(out) == 10 and small.most_rows <= 4
        assert all(g.tokens > 0 and g.text for g in out)
        assert set(streamed) == {0, 9}
    finally:
        small.close()


async def test_the_worker_serves_through_it(engine, persona, redis, keys, queue) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(redis, keys, engine, persona, worker_settings("llama-worker",
                                                                  reply_mode="generated"))
    running = asyncio.create_task(worker.run())
    requests = [Request(frontend="test-frontend", conversation=f"c{i}", user=f"u{i}", text=q,
                        settings={"max_new_tokens": 24, "candidates": 1, "seed": i})
                for i, q in enumerate(QUESTIONS)]
    for request in requests:
        await queue.submit(request)
    replies = [await queue.wait_reply(r.id, 120) for r in requests]
    worker.stop.set()
    await running
    assert all(reply is not None and reply.text for reply in replies)


def test_its_listener_scores_replies_as_the_pytorch_listener_does(engine, embedded_model,
                                                                  persona) -> None:
    """The llama.cpp listener (the engine's weights, its own context): log P(reply | prompt)
    within the 8-bit weights' error of PyTorch's, and the same order of the replies."""
    from engine.listener import Listener
    from engine.llamacpp_listener import LlamaCppListener
    from engine.model_loading import plain_copy

    replies = ["Amputate.", "It's not lupus. It's never lupus.", "Yeah.",
               "Take two aspirin and stop calling me."]
    tokenizer = embedded_model.tokenizer
    empty = render_prompt(tokenizer, persona, [], "")
    prompt = render_prompt(tokenizer, persona, [], "Is it lupus?")
    ours = LlamaCppListener(engine, "house", empty)
    theirs = Listener(plain_copy(embedded_model.model, "house"), tokenizer, empty)
    mine, reference = ours.logprobs(prompt, replies), theirs.logprobs(prompt, replies)
    for a, b in zip(mine, reference, strict=True):
        assert a == pytest.approx(b, abs=1.0)
    assert np.argsort(mine).tolist() == np.argsort(reference).tolist()
    assert ours.logprobs(prompt, replies) == mine  # the context is left clean
    alone = ours.logprobs(empty, replies)  # both terms in one engine turn: the same PMI
    assert ours.pmi(prompt, replies) == [c - e for c, e in zip(mine, alone, strict=True)]
    # a conversation longer than the listener's decode batch runs in chunks
    from persona.prompt import Turn

    history = [Turn("user" if i % 2 == 0 else "assistant",
                    "My left knee hurts when it rains and the pain goes up to my hip. " * 3)
               for i in range(8)]
    long_prompt = render_prompt(tokenizer, persona, history, "Is it lupus?", "", 4096)
    shipped = LlamaCppListener(engine, "house", empty, max_reply_tokens=24)  # LISTENER_TOKENS
    assert len(tokenizer(long_prompt)["input_ids"]) > shipped.context.batch_tokens
    long_mine = shipped.logprobs(long_prompt, replies[:2])
    long_reference = theirs.logprobs(long_prompt, replies[:2])
    assert long_mine == pytest.approx(long_reference, abs=1.0)


def test_the_listener_computes_only_what_is_new_in_a_conversations_prompt(
        engine, embedded_model, persona) -> None:
    """A scored prompt keeps its cells: the empty-message prompt is computed once, the same
    prompt again costs nothing, and a conversation's next prompt (its history the last prompt
    plus a reply and a new message) computes only its new tokens, with the scores of a fresh
    listener (within the 8-bit weights' error, as a kept row's are)."""
    from engine.llamacpp_listener import LlamaCppListener
    from persona.prompt import Turn

    tokenizer = embedded_model.tokenizer

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    empty = render_prompt(tokenizer, persona, [], "")
    replies = ["It's not lupus.", "Yeah.", "Take two aspirin and stop calling me."]
    ours = LlamaCppListener(engine, "house", empty, max_reply_tokens=24)
    first = render_prompt(tokenizer, persona, [], "My knee hurts when it rains.")
    ours.pmi(first, replies)
    before = ours.prompt_tokens
    assert ours.pmi(first, replies[:1]) == ours.pmi(first, replies[:1])
    assert ours.pmi(first, ["Something new to say."])  # its empty-message term too
    assert ours.prompt_tokens == before
    history = [Turn("user", "My knee hurts when it rains."),
               Turn("assistant", "So does everyone's. Move somewhere dry.")]
    second = render_prompt(tokenizer, persona, history, "It hurts in the sun too.")
    decodes: list[int] = []
    run_batch = engine.run_batch
    engine.run_batch = lambda lane, items: (decodes.append(len(items)),  # type: ignore[method-assign]
                                            run_batch(lane, items))
    try:
        mine = ours.logprobs(second, replies)
    finally:
        del engine.run_batch
    assert 0 < ours.prompt_tokens - before < tokens(second) - tokens(first) + 8
    assert len(decodes) == 1  # the new turn and the replies in one decode
    fresh = LlamaCppListener(engine, "house", empty, max_reply_tokens=24)
    assert mine == pytest.approx(fresh.logprobs(second, replies), abs=0.5)
    assert fresh.prompt_tokens == tokens(second) - len(engine.prefix_ids)


def test_listener_scoring_runs_on_the_engine_thread_between_steps(engine, embedded_model,
                                                                  persona) -> None:
    """While a long batch decodes, the listener's scoring runs on the engine's thread (never
    beside a decode step on the same cores) and returns before the batch ends."""
    from engine.llamacpp_listener import LlamaCppListener

    tokenizer = embedded_model.tokenizer
    ours = LlamaCppListener(engine, "house", render_prompt(tokenizer, persona, [], ""))
    prompt = render_prompt(tokenizer, persona, [], "Is it lupus?")
    alone = ours.logprobs(prompt, ["Yeah."])
    threads: list[str] = []
    running: list[bool] = []
    original = ours._score

    def score(*args):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        running.append("long" not in done and bool(engine._running()))
        return original(*args)

    ours._score = score  # type: ignore[method-assign]
    runner, done = long_batch_running(engine, persona, 64)
    scored = ours.logprobs(prompt, ["Yeah."])
    done["scored"] = time.monotonic()
    runner.join(120)
    assert threads == ["engine"]
    assert running == [True]  # between two steps of the running batch
    assert done["scored"] < done["long"]
    assert scored == pytest.approx(alone, abs=0.5)  # its own context: the batch is untouched


def test_priming_waits_for_an_idle_engine_and_is_kept_for_the_next_start(
        engine, embedded_model, persona, tmp_path: Path) -> None:
    """`Listener.prime` scores the lines' empty-message terms only while the engine has no
    rows (a running batch never waits for it), the same terms `pmi` would compute, written
    to its file; a listener started later reads them and computes no empty-message term."""
    from engine.llamacpp_listener import LlamaCppListener

    tokenizer = embedded_model.tokenizer
    empty = render_prompt(tokenizer, persona, [], "")
    lines = ["It's not lupus.", "Everybody lies.", "Take two aspirin and stop calling me.",
             "Yeah.", "You're boring me."]
    ours = LlamaCppListener(engine, "house", empty, max_reply_tokens=24)
    assert ours.keep_prior(tmp_path / "empty.json") == 0
    running: list[int] = []
    original = ours._logprobs

    def logprobs(prompt, replies):  # type: ignore[no-untyped-def]
        running.append(engine._running())
        return original(prompt, replies)

    ours._logprobs = logprobs  # type: ignore[method-assign]
    runner, done = long_batch_running(engine, persona, 48)
    assert ours.prime(lines, chunk=2) == len(lines)
    runner.join(120)
    assert running == [0, 0, 0] and done["long"]  # three turns, none beside a running row
    ours._logprobs = original  # type: ignore[method-assign]
    assert set(ours.primed) == set(lines)
    assert ours.prime(lines) == 0  # nothing left to score
    expected = ours.logprobs(empty, lines)
    later = LlamaCppListener(engine, "house", empty, max_reply_tokens=24)
    assert later.keep_prior(tmp_path / "empty.json") == len(lines)

    def no_empty(prompt, replies):  # type: ignore[no-untyped-def]
        assert prompt != empty, "an empty-message term was computed"
        return original(prompt, replies)

    later._logprobs = no_empty  # type: ignore[method-assign]
    prompt = render_prompt(tokenizer, persona, [], "Is it lupus?")
    conditional = later.logprobs(prompt, lines)
    assert later.pmi(prompt, lines) == pytest.approx(
        [c - e for c, e in zip(conditional, expected, strict=True)], abs=0.5)


def test_bench_decode_times_the_lane_the_worker_serves(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A benchmark prints figures, it asserts none: here only that it runs and says what."""
    import json

    from cli.main import main

    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--rows", "1,3", "--rounds", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["decode"]
    assert set(figures["ms"]) == {"r1", "r3", "prefill"} and figures["adapter"] == "house"
    assert "llama.cpp decode step, house lane" in capsys.readouterr().out
    assert main(["bench", "decode", "--rows", "0,4"]) == 2
