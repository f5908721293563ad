"""The listener: the House model's PMI of a reply given the conversation, computed with the
prompt's keys and values shared by all replies — exactly the log-probabilities of running each
prompt + reply on its own."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from base.config import Settings
from engine.generation import FakeGenerator
from engine.listener import REPLY_END, Listener
from engine.model_loading import plain_copy
from engine.runtime import build_listener
from persona.pack import load_persona

pytestmark = pytest.mark.model

REPLIES = ["Amputate.", "It's not lupus. It's never lupus.", "Yeah.", "Take two aspirin and "
           "stop calling me."]


def one_by_one(model: Any, tokenizer: Any, prompt: str, reply: str) -> float:
    a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    b = tokenizer(reply + REPLY_END, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([a + b])).logits.float()
    logp = torch.log_softmax(logits[0], dim=-1)
    return float(sum(logp[len(a) - 1 + j, t] for j, t in enumerate(b)))


def test_shared_prompt_log_probabilities_equal_one_run_per_reply(embedded_model: Any) -> None:
    tokenizer = embedded_model.tokenizer
    model = plain_copy(embedded_model.model, embedded_model.adapters[0])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "My leg hurts."}],
                                           tokenize=False, add_generation_prompt=True)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                          add_generation_prompt=True)
    listener = Listener(model, tokenizer, empty)
    shared = listener.logprobs(prompt, REPLIES)
    system = "You are House."
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "My leg hurts."}],
        tokenize=False, add_generation_prompt=True)
    block = tokenizer.apply_chat_template([{"role": "system", "content": system}],
                                          tokenize=False)
    cached = Listener(model, tokenizer, empty, shared_prefix=block)
    assert cached.prefix.covers([tokenizer(with_system, add_special_tokens=False)["input_ids"]])
    for reply, value in zip(REPLIES, cached.logprobs(with_system, REPLIES), strict=True):
        assert value == pytest.approx(one_by_one(model, tokenizer, with_system, reply), abs=1e-3)
    for reply, value in zip(REPLIES, shared, strict=True):
        assert value == pytest.approx(one_by_one(model, tokenizer, prompt, reply), abs=1e-3)
    pmi = listener.pmi(prompt, REPLIES)
    for reply, p, c in zip(REPLIES, pmi, shared, strict=True):
        assert p == pytest.approx(c - one_by_one(model, tokenizer, empty, reply), abs=1e-3)
    assert listener.pmi(prompt, []) == []


def test_the_runtime_builds_a_listener_only_for_a_local_model_with_the_adapter(
        embedded_model: Any) -> None:
    persona = load_persona("house")

    class Local:
        loaded = embedded_model

    listener = build_listener(Settings(), Local(), persona)  # type: ignore[arg-type]
    assert listener is not None and persona.system_prompt in listener.empty_prompt
    assert listener.model is not embedded_model.model  # its own copy: no shared module
    assert build_listener(Settings(listener="none"), Local(), persona) is None  # type: ignore[arg-type]
    assert build_listener(Settings(), FakeGenerator(), persona) is None
    assert build_listener(Settings(default_adapter="other"), Local(), persona) is None  # type: ignore[arg-type]
