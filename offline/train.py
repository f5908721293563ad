"""``drhouse train``: the House LoRA adapter, trained with TRL's SFTTrainer on the prepared data.

The records are prompt–completion conversations (``drhouse data prepare``): the prompt is the
persona system prompt plus the anchor, built by :func:`persona.prompt.build_messages`, and the
tokenizer's chat template renders it with the generation prompt exactly as serving does
(:func:`persona.prompt.render_prompt`). The loss covers House's reply only (completion-only
loss): the prompt tokens are masked with -100, so the model learns to answer, not to echo.

Exact commands (defaults in ``offline/train_config.yaml``; any flag overrides the YAML)::

    drhouse data prepare
    drhouse train            # the shipped adapter: see models/house-smollm2/report/command.txt
    drhouse train --max-steps 20 --output-dir runs/smoke --adapter-dir runs/smoke/adapter
    drhouse train --resume   # continue from the last checkpoint in --output-dir
    drhouse train --eval-only --init-adapter models/house-smollm2   # base vs adapter eval loss
    drhouse train --measure-precision 3 --torch-threads 1           # bf16 autocast vs fp32

Training uses a cosine schedule with warm-up, evaluates on the validation split every
``eval_steps``, stops early when the eval loss stops improving, keeps checkpoints (``--resume``
continues from the last one), groups batches by length, and accumulates gradients. On CUDA the
base is loaded in 4 bits (QLoRA) unless ``--qlora off``. On a CPU with native bf16 it trains
under bf16 autocast. At the end it writes the adapter in float16 and a report folder:
``metrics.json``, ``loss.png``, ``command.txt``. On a shared CPU ``--torch-threads 1`` is much
faster than two threads fighting other processes (see the README). The speed-ups (shared-prefix
forward, compact LM head, bf16 frozen weights) are in :mod:`offline.train_speedups`, the
callbacks in :mod:`offline.train_callbacks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from base.config import ROOT
from persona.dialogue import load_split

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "train_config.yaml"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainArgs:
    """Everything a training run needs; YAML (``--config``) < command-line flags."""

    base_model: str = field(default="smollm2-135m", metadata={
        "help": "base model: 'smollm2-135m' (the embedded GGUF), a hub id or a local directory"})
    data_dir: str = field(default="data/prepared", metadata={
        "help": "directory with train.jsonl and validation.jsonl from 'drhouse data prepare'"})
    output_dir: str = field(default="runs/house-smollm2", metadata={
        "help": "checkpoints and the trainer's state"})
    adapter_dir: str = field(default="models/house-smollm2", metadata={
        "help": "where the final adapter is written (float16 safetensors)"})
    report_dir: str = field(default="", metadata={
        "help": "report folder (metrics.json, loss.png, command.txt); default ADAPTER_DIR/report"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default=LORA_TARGETS, metadata={
        "help": "comma-separated module names that get LoRA"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up share of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: float = field(default=1.0, metadata={"help": "epochs over the train split"})
    max_steps: int = field(default=-1, metadata={
        "help": "optimizer steps; > 0 overrides --epochs"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    eval_batch_size: int = field(default=16, metadata={"help": "sequences per eval batch"})
    max_length: int = field(default=256, metadata={
        "help": "tokens per sequence (prompt + reply); longer ones are cut at the end"})
    max_train_samples: int = field(default=0, metadata={
        "help": "use only the first N train records (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={
        "help": "use only the first N validation records (0 = all)"})
    eval_steps: int = field(default=100, metadata={"help": "evaluate every N optimizer steps"})
    save_steps: int = field(default=100, metadata={
        "help": "checkpoint every N steps (a multiple of eval_steps)"})
    logging_steps: int = field(default=10, metadata={"help": "log the train loss every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    early_stopping_patience: int = field(default=3, metadata={
        "help": "stop after N evaluations without improvement (0 = off)"})
    early_stopping_threshold: float = field(default=0.001, metadata={
        "help": "smallest eval-loss improvement that counts"})
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={
        "help": "bf16 autocast or fp32; auto = bf16 on CUDA and on CPUs with native bf16 "
                "(avx512_bf16/AMX; measured faster, see README), else fp32"})
    qlora: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "4-bit base (bitsandbytes nf4); auto = on when CUDA is present"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "training device"})
    torch_threads: int = field(default=0, metadata={
        "help": "CPU threads for torch (0 = torch's default)"})
    init_adapter: str = field(default="", metadata={
        "help": "start from this LoRA adapter instead of a fresh one (continue training, or "
                "evaluate it with --eval-only)"})
    eval_only: bool = field(default=False, metadata={
        "help": "no training: print the eval loss of the base model and of the adapter"})
    time_budget_min: float = field(default=0.0, metadata={
        "help": "stop training after N minutes (evaluate and checkpoint first; 0 = off)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in OUTPUT_DIR"})
    base_eval: bool = field(default=True, metadata={
        "help": "evaluate the base model (adapter off) on the validation split first"})
    save_dtype: Literal["float16", "bfloat16", "float32"] = field(default="float16", metadata={
        "help": "dtype of the saved adapter weights"})
    shared_prefix: bool = field(default=True, metadata={
        "help": "encode the system-prompt prefix all sequences share once per batch (exact)"})
    compact_head: bool = field(default=True, metadata={
        "help": "score only the reply positions in the LM head on CPU too (exact)"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    cache_dir: str = field(default=".cache/models", metadata={
        "help": "where the embedded model's safetensors copy is cached"})
    persona: str = field(default="house", metadata={"help": "persona pack (for the report)"})
    config: str = field(default="", metadata={"help": "YAML file with any of these options"})
    measure_precision: int = field(default=0, metadata={
        "help": "instead of training, time N steps in fp32 and in bf16 and print tokens/s"})


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainArgs` field; unset flags stay out of the namespace."""
    hints = get_type_hints(TrainArgs)
    for f in fields(TrainArgs):
        kind = hints[f.name]
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif get_origin(kind) is Literal:
            parser.add_argument(_flag(f.name), dest=f.name, choices=get_args(kind),
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind,
                                default=argparse.SUPPRESS, help=help_text)


def build_args(overrides: dict[str, Any]) -> TrainArgs:
    """Defaults, then the YAML named by ``config`` (if any), then ``overrides``."""
    import yaml

    known = {f.name for f in fields(TrainArgs)}
    values: dict[str, Any] = {}
    config = overrides.get("config") or ""
    if config:
        raw = yaml.safe_load(_resolve(config).read_text(encoding="utf-8")) or {}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{config}: unknown options {sorted(unknown)}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if k in known})
    return TrainArgs(**values)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(args: TrainArgs, device_type: str) -> bool:
    """Whether to train with bf16 autocast."""
    import torch

    if args.precision != "auto":
        if args.precision == "bf16" and device_type == "cpu" and not _cpu_has_bf16():
            log.warning("this CPU has no native bf16; bf16 autocast will be emulated (slow)")
        return args.precision == "bf16"
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and _cpu_has_bf16()


def load_records(data_dir: Path, split: str, limit: int) -> list[dict[str, Any]]:
    """The split's prompt–completion pairs, as the SFT trainer takes them."""
    return [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in load_split(data_dir, split, limit)]


def load_base_for_training(args: TrainArgs, device: Any, qlora: bool,
                           bf16: bool = False) -> tuple[Any, Any]:
    """The base model (float32, or 4-bit on CUDA) and its tokenizer, through the serving loader
    so the embedded model's cached safetensors copy is reused."""
    import torch

    from engine.model_loading import load_base
    from offline.train_speedups import FrozenLinearCast

    model, tokenizer, source = load_base(
        args.base_model, device, torch.float32 if not qlora else torch.bfloat16,
        _resolve(args.cache_dir), load_in_4bit=qlora,
    )
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        if device.type != "cpu":
            model = model.to(device)
        if bf16:
            FrozenLinearCast(torch.bfloat16).apply(model)
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    log.info("base %s loaded from %s", args.base_model, source)
    return model, tokenizer


def lora_config(args: TrainArgs) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(args: TrainArgs, bf16: bool, use_cpu: bool, output_dir: Path) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        group_by_length=True,
        bf16=bf16,
        use_cpu=use_cpu,
        gradient_checkpointing=False,
        max_length=args.max_length,
        completion_only_loss=True,
        packing=False,
        report_to="none",
        disable_tqdm=not args.progress,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        save_only_model=False,
        dataset_num_proc=None,
    )


def build_trainer(args: TrainArgs, output_dir: Path, callbacks: list[Any] | None = None,
                  ) -> tuple[Any, dict[str, Any]]:
    """The SFTTrainer (LoRA applied) and a description of the setup."""
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    from engine.model_loading import pick_device
    from offline.train_callbacks import EvaluateLastStep, TimeBudget
    from offline.train_speedups import CompactLMHead, SharedPrefixSFTTrainer

    device = pick_device(args.device)
    if device.type == "cpu" and args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    qlora = args.qlora == "on" or (args.qlora == "auto" and device.type == "cuda")
    bf16 = pick_precision(args, device.type)
    model, tokenizer = load_base_for_training(args, device, qlora, bf16)
    peft_config = lora_config(args)
    if args.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(_resolve(args.init_adapter)),
                                          is_trainable=True)
        peft_config = None
    if args.compact_head:
        CompactLMHead.install()
    data_dir = _resolve(args.data_dir)
    train_rows = load_records(data_dir, "train", args.max_train_samples)
    eval_rows = load_records(data_dir, "validation", args.max_eval_samples)
    all_callbacks = [EvaluateLastStep(), *(callbacks or [])]
    if args.time_budget_min > 0:
        all_callbacks.append(TimeBudget(args.time_budget_min))
    if args.early_stopping_patience > 0:
        all_callbacks.append(EarlyStoppingCallback(args.early_stopping_patience,
                                                   args.early_stopping_threshold))
    trainer = SharedPrefixSFTTrainer(
        model=model,
        args=sft_config(args, bf16, device.type == "cpu", output_dir),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=all_callbacks,
    )
    prefix_len = trainer.set_shared_prefix() if args.shared_prefix else 0
    setup = {
        "device": str(device),
        "shared_prefix_tokens": prefix_len,
        "precision": "bf16-autocast" if bf16 else "fp32",
        "qlora": qlora,
        "torch_threads": torch.get_num_threads(),
        "train_records": len(train_rows),
        "eval_records": len(eval_rows),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    return trainer, setup


def save_adapter(trainer: Any, adapter_dir: Path, dtype_name: str, base_model: str = "") -> int:
    """Save the adapter with its weights cast to ``dtype_name``; returns the weight file size.

    ``base_model`` (the name training was given, e.g. ``smollm2-135m``) replaces the local
    path PEFT records, so the config means the same on every machine."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    if base_model:
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = adapter_dir / "adapter_model.safetensors"
    dtype = getattr(torch, dtype_name)
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return weights.stat().st_size


def plot_losses(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = metrics["train_loss"]
    evals = metrics["eval_loss"]
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", alpha=0.35)
        window = min(10, len(train))
        if window > 1:
            # Length-grouped batches make the per-step loss a saw-tooth; the mean shows the trend.
            values = [v for _, v in train]
            chunks = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
            means = [sum(chunk) / len(chunk) for chunk in chunks]
            ax.plot([s for s, _ in train], means, color="C0",
                    label=f"train loss, mean of last {window} logs")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss (validation)")
    if metrics.get("base_eval_loss") is not None:
        ax.axhline(metrics["base_eval_loss"], color="grey", linestyle="--",
                   label=f"base model eval loss {metrics['base_eval_loss']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (House's reply tokens only)")
    ax.set_title(f"House LoRA on {metrics['args']['base_model']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report_dir: Path, metrics: dict[str, Any], command: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (report_dir / "command.txt").write_text(command + "\n")
    plot_losses(metrics, report_dir / "loss.png")


def _history(trainer: Any) -> tuple[list[list[float]], list[list[float]]]:
    train, evals = [], []
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            train.append([entry["step"], round(float(entry["loss"]), 5)])
        if "eval_loss" in entry and "step" in entry:
            evals.append([entry["step"], round(float(entry["eval_loss"]), 5)])
    return train, evals


def evaluate_only(args: TrainArgs) -> dict[str, Any]:
    """Eval loss of the base model and of ``init_adapter`` on the validation split."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer, setup = build_trainer(
            TrainArgs(**{**asdict(args), "early_stopping_patience": 0, "time_budget_min": 0.0}),
            Path(tmp))
        with trainer.model.disable_adapter():
            base = float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
        tuned = float(trainer.evaluate()["eval_loss"])
    return {"base_eval_loss": base, "adapter_eval_loss": tuned, "adapter": args.init_adapter,
            "eval_records": setup["eval_records"], "precision": setup["precision"]}


def main(args: TrainArgs, command: str = "") -> dict[str, Any]:
    """Train, save the adapter and write the report; returns the metrics."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(args.seed)
    from offline.train_callbacks import TimeBudget

    started = time.perf_counter()
    output_dir = _resolve(args.output_dir)
    adapter_dir = _resolve(args.adapter_dir)
    report_dir = _resolve(args.report_dir) if args.report_dir else adapter_dir / "report"
    trainer, setup = build_trainer(args, output_dir)
    log.info("training setup: %s", setup)

    base_eval_loss = None
    if args.base_eval:
        with trainer.model.disable_adapter():
            base_eval_loss = float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
        log.info("base model eval loss %.4f", base_eval_loss)

    resume = get_last_checkpoint(str(output_dir)) if args.resume and output_dir.is_dir() else None
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - train_started
    train_loss, eval_loss = _history(trainer)  # before the final evaluation of the kept model
    final_eval = trainer.evaluate()
    size = save_adapter(trainer, adapter_dir, args.save_dtype, args.base_model)
    tokens = int(trainer._total_train_tokens)
    metrics = {
        "args": asdict(args),
        "setup": setup,
        "resumed_from": resume,
        "stopped_by_time_budget_at_step": next(
            (c.stopped_at_step for c in trainer.callback_handler.callbacks
             if isinstance(c, TimeBudget)), None),
        "base_eval_loss": base_eval_loss,
        "final_eval_loss": float(final_eval["eval_loss"]),
        "best_eval_loss": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "steps": trainer.state.global_step,
        "epochs_done": round(float(trainer.state.epoch or 0), 4),
        "train_tokens": tokens,
        "train_runtime_s": round(float(result.metrics.get("train_runtime", train_s)), 1),
        "tokens_per_s": round(tokens / max(train_s, 1e-9), 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "adapter_bytes": size,
        "adapter_dir": str(adapter_dir),
    }
    write_report(report_dir, metrics, command)
    log.info("adapter saved to %s (%.1f MiB); eval loss %.4f (base %s); report in %s",
             adapter_dir, size / 2**20, metrics["final_eval_loss"], base_eval_loss, report_dir)
    return metrics


def measure_precision(args: TrainArgs, steps: int, rounds: int = 3) -> dict[str, Any]:
    """Time training micro-batches in fp32 and in bf16 autocast on the same batches.

    Both set-ups are built as for training (LoRA, shared prefix, compact head; bf16 also stores
    the frozen linears in bf16). After a warm-up batch each, ``rounds`` rounds alternate
    between them, ``steps`` forward+backward passes each, so a change in the machine's load
    hits both alike; the median round is reported, in sequence tokens (padding excluded) per
    second.
    """
    import tempfile

    import torch

    setups: dict[str, tuple[Any, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            run_args = TrainArgs(**{**asdict(args), "precision": precision,
                                    "early_stopping_patience": 0, "progress": False,
                                    "time_budget_min": 0.0})
            setups[precision] = build_trainer(run_args, Path(tmp) / precision)
        trainer = setups["fp32"][0]
        size = args.batch_size
        batches = [trainer.data_collator([trainer.train_dataset[i]
                                          for i in range(j * size, (j + 1) * size)])
                   for j in range(steps + 1)]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])

        def run_steps(precision: str, chosen: list[Any]) -> float:
            trainer = setups[precision][0]
            model = trainer.model
            model.train()
            started = time.perf_counter()
            for batch in chosen:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = trainer.compute_loss(model, dict(batch))
                loss.backward()
                model.zero_grad(set_to_none=True)
            return time.perf_counter() - started

        for precision in setups:
            run_steps(precision, batches[:1])
        seconds: dict[str, list[float]] = {p: [] for p in setups}
        for _ in range(rounds):
            for precision in setups:
                seconds[precision].append(run_steps(precision, batches[1:]))
    results: dict[str, Any] = {}
    for precision, times in seconds.items():
        median = sorted(times)[len(times) // 2]
        results[precision] = {
            "round_seconds": [round(t, 2) for t in times],
            "tokens_per_round": tokens,
            "tokens_per_s": round(tokens / median, 1),
            "s_per_micro_batch": round(median / steps, 2),
            "setup": setups[precision][1],
        }
    results["bf16_speedup"] = round(
        results["bf16"]["tokens_per_s"] / results["fp32"]["tokens_per_s"], 3)
    results["batch_size"] = args.batch_size
    return results


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    add_arguments(parser)
    parser.set_defaults(action=name)


def args_from_namespace(args: argparse.Namespace) -> TrainArgs:
    """The flags given on the command line over the YAML config (``offline/train_config.yaml``
    unless ``--config`` names another)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainArgs) if hasattr(args, f.name)}
    if "config" not in overrides and DEFAULT_CONFIG.is_file():
        overrides["config"] = str(DEFAULT_CONFIG)
    return build_args(overrides)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_args = args_from_namespace(args)
    command = "drhouse " + shlex.join(sys.argv[1:])
    if train_args.eval_only:
        if not train_args.init_adapter:
            print("drhouse train --eval-only needs --init-adapter PATH", file=sys.stderr)
            return 2
        print(json.dumps(evaluate_only(train_args), indent=2))
        return 0
    if train_args.measure_precision:
        results = measure_precision(train_args, train_args.measure_precision)
        print(json.dumps(results, indent=2))
        return 0
    metrics = main(train_args, command)
    print(json.dumps({k: metrics[k] for k in ("base_eval_loss", "final_eval_loss", "steps",
                                              "tokens_per_s", "wall_s", "adapter_bytes")},
                     indent=2))
    return 0
