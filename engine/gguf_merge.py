"""The House model as one GGUF file: the embedded model with the adapter merged into its weights
(``LLAMACPP_LORA=merged``), for the llama.cpp engine's House lane.

Applying a LoRA at run time adds two small float32 products and a sum to every projection of
every decode; on 2 cores that cost 40 % more per 32-row step and per prefill than the same
step without it (docs/engine.md). Merged, the House lane costs what the base lane does.

Each projection the adapter touches is dequantised (``W``, as transformers dequantises the file)
and written as ``W + (alpha / r) · B·A`` in float32, with ``B`` of the query and key rows in
llama.cpp's order (`engine.gguf_lora.lora_tensors`); every other tensor and all the metadata
are copied as they are. llama.cpp's quantiser then re-encodes the file as the engine's weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.gguf_lora import AdapterConversionError, adapter_digest, lora_tensors

MERGE_VERSION = 1


def merge_adapter(adapter_dir: Path, base_gguf: Path, out: Path) -> Path:
    """Write ``base_gguf`` with the PEFT adapter in ``adapter_dir`` merged in to ``out``."""
    import gguf

    config, loras = lora_tensors(adapter_dir, base_gguf)
    scale = float(config["lora_alpha"]) / float(config["r"])
    reader = gguf.GGUFReader(str(base_gguf))
    writer = gguf.GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer's own
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    merged: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        a, b = loras.get(tensor.name + ".lora_a"), loras.get(tensor.name + ".lora_b")
        if a is None or b is None:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                                   tensor.data.nbytes, tensor.tensor_type)
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if weight.shape != (b.shape[0], a.shape[1]):
            raise AdapterConversionError(f"{tensor.name}: the adapter's {b.shape[0]}x"
                                         f"{a.shape[1]} does not fit {weight.shape}")
        merged[tensor.name] = weight + scale * (b @ a)
        writer.add_tensor_info(tensor.name, weight.shape, np.dtype(np.float32), weight.nbytes)
    if 2 * len(merged) != len(loras):
        raise AdapterConversionError(f"{adapter_dir}: some adapter tensors have no weight in "
                                     f"{base_gguf.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        data = merged.get(tensor.name, tensor.data)
        writer.write_tensor_data(np.ascontiguousarray(data), tensor_endianess=reader.endianess)
    writer.close()
    return out


def merged_key(adapter_dir: Path, base_gguf: Path) -> str:
    """What a merged file is made from: the adapter, the model, this merge's version."""
    return f"{adapter_digest(adapter_dir, base_gguf)}-m{MERGE_VERSION}"
