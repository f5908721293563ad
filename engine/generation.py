"""Batched generation: one `generate()` call for a whole micro-batch.

Each row carries its own adapter (peft's ``adapter_names``), its own sampling settings and
its own seed. Sampling happens in `PerRowSampler`, a logits processor with one
``torch.Generator`` per row that leaves a single allowed token, so the rest of ``generate``
runs greedily: a row gets the same text in a batch as it would alone with the same seed.

Every prompt starts with the same persona system block, so `PrefixCache` keeps its keys and
values (one copy per adapter: LoRA changes them) and a batch only runs the part after it.

`FakeGenerator` is a fast deterministic stand-in with the same interface, for tests and the
queue benchmark.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from base.keys import BASE_VARIANT
from persona.pack import Controls
from persona.postprocess import speaker_tag_pattern, split_sentences


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    adapter: str
    controls: Controls
    seed: int
    message: str = ""


@dataclass(frozen=True)
class Generated:
    text: str
    tokens: int
    finished: bool
    ms: float


class BackendUnavailable(RuntimeError):
    """The model's server cannot be reached (``GENERATION_BACKEND=openai``): the requests stay
    pending and are tried again; nothing is answered or dead-lettered for it."""


# Called from the generating thread with (job index, the row's text so far) at decode steps.
OnText = Callable[[int, str], None]


class Generator(Protocol):
    """What the worker needs from a model."""

    tokenizer: Any
    adapters: list[str]

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = ()) -> list[Generated]:
        """Generate every job; ``on_text`` hears the text so far of the ``stream_rows``."""
        ...

    # Optional: ``cancel()`` makes a generate() in flight stop at its next step (the worker
    # calls it when a batch timed out, so the model is free for the next one).


class PerRowSampler:
    """Temperature + top-p sampling with a generator per row; temperature 0 is greedy.

    Sampling looks at the ``top_k`` most likely tokens only (as transformers' default top-k
    of 50 does), which keeps the per-row work tiny next to the model's forward pass.
    """

    def __init__(self, controls: Sequence[Controls], seeds: Sequence[int], top_k: int = 64):
        self.temperatures = torch.tensor([max(c.temperature, 1e-5) for c in controls])
        self.greedy = [c.temperature <= 1e-5 for c in controls]
        self.top_ps = torch.tensor([c.top_p for c in controls])
        self.top_k = top_k
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(seed))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = self.choose(scores)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return out

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's token (the one `__call__` leaves allowed)."""
        k = min(self.top_k, scores.shape[-1])
        top_logits, top_ids = torch.topk(scores.detach().float().cpu(), k, dim=-1)
        probs = torch.softmax(top_logits / self.temperatures[:, None], dim=-1)
        keep = torch.cumsum(probs, dim=-1) - probs < self.top_ps[:, None]
        keep[:, 0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for row in range(scores.shape[0]):
            if self.greedy[row]:
                chosen[row] = top_ids[row, 0]
            else:
                pick = torch.multinomial(probs[row], 1, generator=self.generators[row])
                chosen[row] = top_ids[row, pick]
        return chosen


class RowStops:
    """Per-row stopping: each row's own token limit, an other-speaker tag, or a sentence past
    the cap; every row once ``cancelled`` is set (the worker gave up on the batch). Returns
    one bool per row (transformers' StoppingCriteria contract)."""

    def __init__(self, tokenizer: Any, prompt_len: int, controls: Sequence[Controls],
                 speakers: Sequence[str], cancelled: threading.Event | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 stream_rows: Collection[int] = ()):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.limits = torch.tensor([c.max_new_tokens for c in controls])
        self.caps = [c.sentence_cap for c in controls]
        self.tag = speaker_tag_pattern(speakers)
        self.cancelled = cancelled
        self.on_text = on_text
        self.stream_rows = set(stream_rows) if on_text is not None else set()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.cancelled is not None and self.cancelled.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_len
        done = (self.limits <= generated).to(input_ids.device)
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :],
                                            skip_special_tokens=True)
        for row, text in enumerate(texts):
            if done[row]:
                continue
            if self.tag.search(text) or len(split_sentences(text + " x")) > self.caps[row] + 1:
                done[row] = True
            elif row in self.stream_rows and self.on_text is not None:
                self.on_text(row, text)  # the texts are decoded anyway, for the stops
        return done


class PrefixCache:
    """Keys and values of a prompt prefix that every request shares (the persona's system
    block), computed once per adapter and handed to ``generate()`` as its starting cache.

    Rows are laid out as ``[prefix][left padding][rest of the prompt]``; the padding is masked
    and positions come from the attention mask, so a row sees exactly the prompt it would see
    without the cache. A prompt whose tokens do not start with the prefix's tokens (another
    template, a different persona) is generated without it.
    """

    def __init__(self, model: Any, tokenizer: Any, text: str, adapters: Sequence[str]):
        self.model = model
        self.adapters = list(adapters)
        self.ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        self._layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def covers(self, rows: Sequence[Sequence[int]]) -> bool:
        n = len(self.ids)
        return n > 0 and all(len(row) > n and list(row[:n]) == self.ids for row in rows)

    def _for_adapter(self, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if adapter not in self._layers:
            kwargs = {"adapter_names": [adapter]} if self.adapters else {}
            ids = torch.tensor([self.ids], device=self.model.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
            self._layers[adapter] = [(layer.keys, layer.values)
                                     for layer in out.past_key_values.layers]
        return self._layers[adapter]

    def batch_cache(self, adapters: Sequence[str]) -> Any:
        """A fresh ``DynamicCache`` holding the prefix for each row's adapter."""
        from transformers import DynamicCache

        per_row = [self._for_adapter(a) for a in adapters]
        cache = DynamicCache()
        for layer in range(len(per_row[0])):
            keys = torch.cat([row[layer][0] for row in per_row])
            values = torch.cat([row[layer][1] for row in per_row])
            cache.update(keys, values, layer)
        return cache


class HFGenerator:
    """Batched generation with a transformers model (plain or PEFT with named adapters).

    ``shared_prefix`` is the text every prompt starts with (`persona.prompt.system_block`);
    its keys and values are computed once instead of in every batch.
    """

    engine_name = "batched"

    def __init__(self, loaded: Any, speakers: Sequence[str] = (), shared_prefix: str = ""):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapters = list(loaded.adapters)
        self.speakers = list(speakers)
        self.prefix = PrefixCache(self.model, self.tokenizer, shared_prefix, self.adapters)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the generate() in flight at its next decode step."""
        self.cancelled.set()

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = ()) -> list[Generated]:
        """Generate for all jobs; rows sharing penalty settings share one generate() call.
        ``on_text(job index, text so far)`` is called at each decode step for the
        ``stream_rows``, from this thread."""
        self.cancelled.clear()
        results: list[Generated | None] = [None] * len(jobs)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job.controls.repetition_penalty, job.controls.no_repeat_ngram_size)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            local = [k for k, i in enumerate(indices) if i in set(stream_rows)]
            heard = (None if on_text is None or not local else
                     lambda row, text, indices=indices: on_text(indices[row], text))
            for i, gen in zip(indices, self._generate_group([jobs[i] for i in indices],
                                                            heard, local), strict=True):
                results[i] = gen
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _generate_group(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                        stream_rows: Collection[int] = ()) -> list[Generated]:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        started = time.perf_counter()
        tok = self.tokenizer
        controls = [j.controls for j in jobs]
        adapters = [j.adapter if j.adapter in self.adapters else BASE_VARIANT for j in jobs]
        kwargs: dict[str, Any] = {}
        if self.adapters:
            kwargs["adapter_names"] = adapters
        rows = tok([j.prompt for j in jobs], add_special_tokens=False)["input_ids"]
        if self.prefix.covers(rows):
            enc = self._after_prefix(rows)
            kwargs["past_key_values"] = self.prefix.batch_cache(adapters)
        else:
            enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        enc = {k: v.to(self.loaded.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        first = controls[0]
        out = self.model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max(c.max_new_tokens for c in controls),
            repetition_penalty=first.repetition_penalty,
            no_repeat_ngram_size=first.no_repeat_ngram_size,
            logits_processor=LogitsProcessorList(
                [PerRowSampler(controls, [j.seed for j in jobs])]
            ),
            stopping_criteria=StoppingCriteriaList(
                [RowStops(tok, prompt_len, controls, self.speakers, self.cancelled,
                          on_text, stream_rows)]
            ),
            eos_token_id=self.loaded.eos_token_ids or None,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        eos = set(self.loaded.eos_token_ids)
        results = []
        for row, job in enumerate(jobs):
            ids = out[row, prompt_len:].tolist()
            n, finished = len(ids), False
            for k, token in enumerate(ids):
                if token in eos:
                    n, finished = k, True
                    break
            ids = ids[:n]
            text = tok.decode(ids, skip_special_tokens=True)
            stopped_early = n < job.controls.max_new_tokens
            results.append(Generated(text, len(ids), finished or stopped_early, elapsed_ms))
        return results

    def _after_prefix(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """``[prefix][padding][rest]`` rows and their attention mask."""
        n = len(self.prefix.ids)
        width = max(len(row) for row in rows) - n
        pad = self.tokenizer.pad_token_id
        ids, mask = [], []
        for row in rows:
            rest = list(row[n:])
            gap = width - len(rest)
            ids.append(self.prefix.ids + [pad] * gap + rest)
            mask.append([1] * n + [0] * gap + [1] * len(rest))
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class FakeChatTokenizer:
    """A tokenizer stand-in for the fake generator: one token per word."""

    def apply_chat_template(self, conversation: Any, tokenize: bool = False,
                            add_generation_prompt: bool = False, **_: Any) -> Any:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in conversation)
        if add_generation_prompt:
            text += "<assistant>"
        return text.split() if tokenize else text


class FakeGenerator:
    """Deterministic, model-free replies: ``Diagnosis <digest> from <adapter>.``

    The digest hashes the request's message and seed, so tests can predict a reply. A message
    containing ``#long`` gets three very long sentences (for reply-splitting tests).
    """

    def __init__(self, delay_s: float = 0.0, adapters: Sequence[str] = ("house",)):
        self.tokenizer = FakeChatTokenizer()
        self.adapters = list(adapters)
        self.delay_s = delay_s
        self.calls: list[int] = []  # batch sizes, one per generate() call
        self.jobs: list[GenerationJob] = []  # every job seen, for tests to inspect
        self.cancelled = threading.Event()
        self.running = 0  # generate() calls in flight right now
        self.most_running = 0  # the most ever in flight at once

    def cancel(self) -> None:
        self.cancelled.set()

    @staticmethod
    def reply_for(message: str, adapter: str, seed: int = 0) -> str:
        digest = hashlib.sha1(f"{message}|{seed}".encode()).hexdigest()[:8]
        return f"Diagnosis {digest} from {adapter}."

    def generate(self, jobs: Sequence[GenerationJob], on_text: OnText | None = None,
                 stream_rows: Collection[int] = ()) -> list[Generated]:
        """With a delay and ``on_text``, the streamed rows' words arrive one at a time over
        the delay, as a model's would."""
        self.calls.append(len(jobs))
        self.jobs.extend(jobs)
        self.cancelled.clear()
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        texts = [self.text_for(job) for job in jobs]
        try:
            streamed = [r for r in stream_rows if on_text is not None and r < len(jobs)]
            steps = max((len(texts[r].split()) for r in streamed), default=0)
            for step in range(1, steps + 1):
                if self.delay_s and self.cancelled.wait(self.delay_s / (steps + 1)):
                    break
                for r in streamed:
                    words = texts[r].split()
                    if step < len(words):
                        on_text(r, " ".join(words[:step]))  # type: ignore[misc]
            if self.delay_s:
                self.cancelled.wait(self.delay_s / (steps + 1))
        finally:
            self.running -= 1
        return [Generated(text, len(text.split()), True, self.delay_s * 1000) for text in texts]

    def text_for(self, job: GenerationJob) -> str:
        if "#long" in job.message:
            return " ".join(("It is a long and " + "very " * 350 + "long story.")
                            for _ in range(3))
        return self.reply_for(job.message, job.adapter, job.seed)
