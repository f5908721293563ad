"""A PEFT LoRA adapter as a GGUF LoRA file, for llama.cpp (``LOCAL_ENGINE=llamacpp``).

llama.cpp applies a LoRA adapter at run time on top of the quantised base weights, so the
House model in llama.cpp is the very GGUF the embedded model comes from plus the adapter's
low-rank product: the same model transformers runs after dequantising that file.

The tensor names follow llama.cpp's: ``blk.{layer}.attn_q.weight.lora_a`` and ``…lora_b``.
PEFT's ``lora_A`` ([rank, in]) and ``lora_B`` ([out, rank]) are written as they are (GGUF
reverses the axes, which is the layout llama.cpp checks for). The GGUF conversion of a llama
model permutes the rows of the query and key projections for llama.cpp's rotary layout
(transformers undoes it when it loads the file), so ``lora_B`` of those two is permuted the
same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

# PEFT module (under model.layers.N.) -> llama.cpp tensor (under blk.N.)
MODULE_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")
CONVERSION_VERSION = 1


class AdapterConversionError(RuntimeError):
    """The adapter cannot be written as a GGUF LoRA (an unknown module, DoRA, another arch)."""


def _base_shape(base_gguf: Path) -> tuple[str, int, int]:
    """(architecture, attention heads, key/value heads) from the base GGUF's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(base_gguf))

    def field(name: str) -> object:
        value = reader.get_field(name)
        if value is None:
            raise AdapterConversionError(f"{base_gguf.name} has no {name}")
        return value.contents()

    arch = str(field("general.architecture"))
    heads = int(field(f"{arch}.attention.head_count"))  # type: ignore[arg-type]
    kv = reader.get_field(f"{arch}.attention.head_count_kv")
    return arch, heads, int(kv.contents()) if kv is not None else heads


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's conversion gives a llama query/key projection."""
    shape = rows.shape
    return (rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def lora_tensors(adapter_dir: Path, base_gguf: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The adapter's config and its tensors under llama.cpp's names (``….weight.lora_a`` /
    ``lora_b``, float32, ``lora_b`` of the query and key projections permuted)."""
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("use_rslora") or config.get("modules_to_save"):
        raise AdapterConversionError(f"{adapter_dir}: DoRA, rsLoRA and saved modules have no "
                                     "GGUF LoRA form")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterConversionError(f"{adapter_dir}: per-module ranks are not supported")
    arch, heads, kv_heads = _base_shape(base_gguf)
    if arch != "llama":
        raise AdapterConversionError(f"{base_gguf.name} is a {arch} model; only llama is mapped")
    out: dict[str, np.ndarray] = {}
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key in sorted(tensors):
        match = _KEY.search(key)
        if match is None or match.group(2) not in MODULE_NAMES:
            raise AdapterConversionError(f"{adapter_dir}: no llama.cpp tensor for {key}")
        layer, module, side = match.groups()
        data = tensors[key].astype(np.float32)
        if side == "B" and module == "self_attn.q_proj":
            data = _permute(data, heads)
        elif side == "B" and module == "self_attn.k_proj":
            data = _permute(data, kv_heads)
        out[f"blk.{layer}.{MODULE_NAMES[module]}.weight.lora_{side.lower()}"] = \
            np.ascontiguousarray(data)
    return config, out


def convert_adapter(adapter_dir: Path, base_gguf: Path, out: Path) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` as a GGUF LoRA for ``base_gguf`` to ``out``."""
    import gguf

    config, tensors = lora_tensors(adapter_dir, base_gguf)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def adapter_digest(adapter_dir: Path, base_gguf: Path) -> str:
    """A key of the adapter's weights and config and the base file's name (a retrained
    adapter gets new converted files)."""
    digest = hashlib.sha1()
    digest.update(f"{CONVERSION_VERSION}:{base_gguf.name}".encode())
    digest.update((adapter_dir / "adapter_config.json").read_bytes())
    with (adapter_dir / "adapter_model.safetensors").open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def written_once(path: Path, write: Callable[[Path], object]) -> Path:
    """``path``, made by ``write(temporary path)`` and renamed into place when missing (so a
    crash mid-write never leaves a half file under the cached name)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            write(tmp)
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def cached_adapter_gguf(adapter_dir: Path, base_gguf: Path, cache_dir: Path) -> Path:
    """The adapter's GGUF in ``cache_dir``, written on first use."""
    path = cache_dir / f"lora-{adapter_dir.name}-{adapter_digest(adapter_dir, base_gguf)}.gguf"
    return written_once(path, lambda tmp: convert_adapter(adapter_dir, base_gguf, tmp))
