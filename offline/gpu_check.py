"""``drhouse gpu-check``: the GPU paths measured in one short run (under 8 minutes on one GPU).

For each precision — nf4 4-bit (bitsandbytes, double quant, bf16 compute) and bf16 without
quantization — the embedded model with the House adapter:

- batched generation at 1, 16 and 64 rows with mixed adapters (House and ``__base__``
  alternating): tokens/s, and batch invariance (the share of rows whose greedy text in the
  batch equals their text alone);
- 50 LoRA training steps on the prepared train split (QLoRA on the 4-bit model): tokens/s and
  the loss of the first and last ten steps.

It prints one table and writes JSON (``--json``). Without CUDA it refuses (exit 2) and
measures nothing. The GPU machines of this project have torch, transformers, peft and
accelerate but not bitsandbytes, and no network: build its wheel where there is one
(``pip download bitsandbytes==0.45.5 --no-deps -d wheels/``), carry ``wheels/`` with the
checkout and install it there (``pip install --no-index wheels/bitsandbytes-*.whl``);
``deploy/gpu-check.sh`` does that when the folder is present. Without bitsandbytes the nf4 rows
say so and the bf16 rows still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROWS = (1, 16, 64)
MAX_NEW_TOKENS = 32
INVARIANCE_ROWS = 4  # rows of each batch also generated alone


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--steps", type=int, default=50, help="training steps per precision")


def cuda_problem() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def run(args: argparse.Namespace) -> int:
    problem = cuda_problem()
    if problem:
        print(f"drhouse gpu-check: {problem}; run it on a GPU machine. Nothing was measured.")
        return 2
    import torch

    from base.config import Settings

    settings = Settings()
    records = _train_records(settings)
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0),
                               "torch": torch.__version__, "precisions": {}}
    for precision in ("nf4", "bf16"):
        if precision == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            results["precisions"][precision] = {
                "skipped": "bitsandbytes is not installed (see deploy/gpu-check.sh)"}
            continue
        results["precisions"][precision] = _measure(settings, precision == "nf4", records,
                                                    args.steps)
        torch.cuda.empty_cache()
    _print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def _train_records(settings: Any) -> list[dict[str, Any]]:
    from engine.runtime import ensure_prepared
    from persona.dialogue import load_split

    try:
        return load_split(ensure_prepared(settings), "train", limit=4000)
    except FileNotFoundError as exc:
        print(f"training rows skipped: {exc}")
        return []


def _measure(settings: Any, four_bit: bool, records: list[dict[str, Any]],
             steps: int) -> dict[str, Any]:
    import torch

    from engine.generation import GenerationJob, HFGenerator
    from engine.model_loading import load_model
    from persona.pack import load_persona
    from persona.prompt import render_prompt

    persona = load_persona(settings.generation.persona)
    started = time.perf_counter()
    loaded = load_model(settings.model.base_model, settings.model.adapter_paths, "cuda", "bfloat16",
                        settings.model.cache_dir, load_in_4bit=four_bit)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 1)}
    generator = HFGenerator(loaded, persona.other_speakers)
    controls = persona.controls.merged({"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0,
                                        "candidates": 1})
    messages = [r["anchor"] for r in records[:64]] or [f"Symptom number {i}?" for i in range(64)]
    for rows in ROWS:
        jobs = [GenerationJob(render_prompt(loaded.tokenizer, persona, [],
                                            messages[i % len(messages)]),
                              "house" if i % 2 == 0 else "__base__", controls, i)
                for i in range(rows)]
        generator.generate(jobs[:1])  # warm-up
        t0 = time.perf_counter()
        batch = generator.generate(jobs)
        elapsed = time.perf_counter() - t0
        alone = [generator.generate([job])[0] for job in jobs[:INVARIANCE_ROWS]]
        same = sum(a.text == b.text for a, b in zip(alone, batch, strict=False))
        out[f"rows_{rows}"] = {
            "tokens_per_s": round(sum(g.tokens for g in batch) / elapsed, 1),
            "batch_s": round(elapsed, 2),
            "invariant": f"{same}/{len(alone)}"}
    if records and steps:
        out["training"] = _train_steps(loaded, records, steps, four_bit, torch.device("cuda"))
    del generator, loaded
    return out


def _train_steps(loaded: Any, records: list[dict[str, Any]], steps: int, four_bit: bool,
                 device: Any, batch_size: int = 16) -> dict[str, Any]:
    """``steps`` LoRA steps of ``batch_size`` prompt–completion pairs, loss on the completion
    only (a fresh adapter beside the loaded ones). ``device`` is CUDA in the check; the CPU
    runs it in the tests."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else \
        loaded.model
    if four_bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj"], task_type="CAUSAL_LM"),
                           adapter_name="gpu-check")
    model.train()
    tokenizer = loaded.tokenizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses, tokens = [], 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [records[(step * batch_size + i) % len(records)] for i in range(batch_size)]
        ids, labels = [], []
        for r in batch:
            prompt = tokenizer.apply_chat_template(r["prompt"], tokenize=False,
                                                   add_generation_prompt=True) \
                if isinstance(r["prompt"], list) else str(r["prompt"])
            completion = r["completion"][0]["content"] if isinstance(r["completion"], list) \
                else str(r["completion"])
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-384:]
            c = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"][:64]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += int(mask.sum())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    first, last = losses[:10], losses[-10:]
    return {"steps": steps, "tokens_per_s": round(tokens / elapsed, 1),
            "loss_first10": round(statistics.mean(first), 3),
            "loss_last10": round(statistics.mean(last), 3),
            "loss_went_down": statistics.mean(last) < statistics.mean(first)}


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"drhouse gpu-check on {results['gpu']} (torch {results['torch']})")
    for column in ("precision", "rows", "tokens/s", "batch invariant", "train tokens/s",
                   "loss first → last 10"):
        table.add_column(column)
    for precision, figures in results["precisions"].items():
        if "skipped" in figures:
            table.add_row(precision, "–", figures["skipped"], "", "", "")
            continue
        training = figures.get("training", {})
        for rows in ROWS:
            row = figures[f"rows_{rows}"]
            table.add_row(precision, str(rows), str(row["tokens_per_s"]), row["invariant"],
                          str(training.get("tokens_per_s", "–")) if rows == 1 else "",
                          (f"{training['loss_first10']} → {training['loss_last10']}"
                           if training and rows == 1 else ""))
    Console().print(table)
