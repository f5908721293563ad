"""``drhouse train``: the House LoRA adapter, trained with TRL's SFTTrainer on the prepared data.

Laid out like TRL's ``trl/scripts/sft.py``: :func:`make_parser` is a :class:`trl.TrlParser`
over TRL's own :class:`trl.SFTConfig` (the Trainer's and SFT's settings) and
:class:`trl.ModelConfig` (base model and LoRA) plus one project dataclass,
:class:`TrainScriptArguments` (a :class:`trl.ScriptArguments`: the data directory and what TRL
has no name for: adapter and report folders, early stopping, time budget, thread count, the
speed-ups); :func:`parse_train_args` reads defaults < YAML (``--config``, else
``offline/train_config.yaml``) < flags into them; :func:`main` trains, apart from parsing.

The records are prompt–completion conversations (``drhouse data prepare``): the prompt is the
persona system prompt plus the anchor, built by :func:`persona.prompt.build_messages`, and the
tokenizer's chat template renders it with the generation prompt exactly as serving does
(:func:`persona.prompt.render_prompt`). The loss covers House's reply only (SFTConfig's
``completion_only_loss``): the prompt tokens are masked with -100, so the model learns to
answer, not to echo.

The trainer is TRL's SFTTrainer (its tokenisation, completion-only masking and fused LM head),
subclassed as :class:`offline.train_speedups.SharedPrefixSFTTrainer` for the shared-prefix
forward (the speed-ups are in :mod:`offline.train_speedups`, the callbacks in
:mod:`offline.train_callbacks`). Two things differ from sft.py: the model is loaded here and
handed to the trainer as an object (``smollm2-135m`` names the embedded GGUF, whose
safetensors copy the serving loader caches; on CUDA it is 4-bit for QLoRA), and the data is
the prepared directory read with :func:`persona.dialogue.load_split` rather than
``datasets.load_dataset``.

Exact commands (defaults in ``offline/train_config.yaml``; any flag overrides the YAML)::

    drhouse data prepare
    drhouse train            # the shipped adapter: see models/house-smollm2/report/command.txt
    drhouse train --max-steps 20 --output-dir runs/smoke --adapter-dir runs/smoke/adapter
    drhouse train --resume   # continue from the last checkpoint in --output-dir
    drhouse train --eval-only --init-adapter models/house-smollm2   # base vs adapter eval loss
    drhouse bench precision --steps 3 --train-args "--torch-threads 1"   # bf16 autocast vs fp32

Flags take TRL's names in either spelling (``--per-device-train-batch-size`` or
``--per_device_train_batch_size``); the project's earlier names still work as aliases
(:data:`RENAMED`: ``--batch-size``, ``--epochs``, ``--precision``, ...). The YAML takes TRL's
names only.

Training uses a cosine schedule with warm-up, evaluates on the validation split every
``eval_steps``, stops early when the eval loss stops improving, keeps checkpoints (``--resume``
continues from the last one), groups batches by length, and accumulates gradients. On CUDA the
base is loaded in 4 bits (QLoRA) unless ``--qlora off``. On a CPU with native bf16 it trains
under bf16 autocast. At the end it writes the adapter in float16 and a report folder:
``metrics.json``, ``loss.png``, ``command.txt``. On a shared CPU ``--torch-threads 1`` is much
faster than two threads fighting other processes (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from base.config import ROOT
from base.cpu import cpu_has_bf16
from persona.dialogue import load_split

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "train_config.yaml"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainScriptArguments(ScriptArguments):
    """What a training run needs that neither SFTConfig nor ModelConfig names.

    ``dataset_name`` is the prepared data directory (train.jsonl, validation.jsonl);
    ``dataset_test_split`` the split evaluated on.
    """

    dataset_name: str = field(default="data/prepared", metadata={
        "help": "directory with train.jsonl and validation.jsonl from 'drhouse data prepare'"})
    dataset_test_split: str = field(default="validation", metadata={
        "help": "the split evaluated on (a .jsonl file in DATASET_NAME)"})
    adapter_dir: str = field(default="models/house-smollm2", metadata={
        "help": "where the final adapter is written (float16 safetensors)"})
    report_dir: str = field(default="", metadata={
        "help": "report folder (metrics.json, loss.png, command.txt); default ADAPTER_DIR/report"})
    max_train_samples: int = field(default=0, metadata={
        "help": "use only the first N train records (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={
        "help": "use only the first N validation records (0 = all)"})
    early_stopping_patience: int = field(default=3, metadata={
        "help": "stop after N evaluations without improvement (0 = off)"})
    early_stopping_threshold: float = field(default=0.001, metadata={
        "help": "smallest eval-loss improvement that counts"})
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
        "help": "continue from the last checkpoint in OUTPUT_DIR (none there: start afresh); "
                "--resume-from-checkpoint PATH names one"})
    base_eval: bool = field(default=True, metadata={
        "help": "evaluate the base model (adapter off) on the validation split first"})
    save_dtype: Literal["float16", "bfloat16", "float32"] = field(default="float16", metadata={
        "help": "dtype of the saved adapter weights"})
    shared_prefix: bool = field(default=True, metadata={
        "help": "encode the system-prompt prefix all sequences share once per batch (exact)"})
    compact_head: bool = field(default=True, metadata={
        "help": "score only the reply positions in the LM head on CPU too (exact)"})
    cache_dir: str = field(default=".cache/models", metadata={
        "help": "where the embedded model's safetensors copy is cached"})
    persona: str = field(default="house", metadata={"help": "persona pack (for the report)"})
    measure_precision: int = field(default=0, metadata={
        "help": "instead of training, time N steps in fp32 and in bf16 and print tokens/s "
                "(the same as 'drhouse bench precision --steps N')"})


TrainArgs = tuple[TrainScriptArguments, SFTConfig, ModelConfig]
DATACLASSES = (TrainScriptArguments, SFTConfig, ModelConfig)

# The project's settings for fields TRL names, over TRL's defaults (the YAML and flags override
# them in turn). The hardware-dependent three are in hardware_defaults().
TRL_DEFAULTS: dict[str, Any] = {
    # ModelConfig
    "model_name_or_path": "smollm2-135m",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": LORA_TARGETS,
    # SFTConfig
    "output_dir": "runs/house-smollm2",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "logging_steps": 10,
    "logging_first_step": True,
    "group_by_length": True,
    "gradient_checkpointing": False,
    "max_length": 256,
    "completion_only_loss": True,
    "packing": False,
    "report_to": "none",
    "disable_tqdm": False,
    "seed": 42,
    "dataloader_num_workers": 0,
    "save_only_model": False,
}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def auto_bf16() -> bool:
    """bf16 autocast on CUDA with bf16 and on CPUs with native bf16 (avx512_bf16/AMX: measured
    faster, see docs/training.md), else fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def hardware_defaults() -> dict[str, Any]:
    """``use_cpu`` when there is no CUDA, ``bf16`` by :func:`auto_bf16`, and
    ``load_in_4bit`` None: QLoRA exactly when training runs on CUDA."""
    return {"use_cpu": not _cuda(), "bf16": auto_bf16(), "load_in_4bit": None}


def _choice(name: str, mapping: Mapping[str, Any]) -> Any:
    def convert(value: str) -> Any:
        if value not in mapping:
            raise argparse.ArgumentTypeError(
                f"invalid choice {value!r} (choose from {', '.join(mapping)})")
        chosen = mapping[value]
        return chosen() if callable(chosen) else chosen

    convert.__name__ = name
    return convert


def _comma_list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


# The flags `drhouse train` had before it took TRL's names: old name -> TRL's field.
RENAMED = {
    "base_model": "model_name_or_path",
    "data_dir": "dataset_name",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "eval_batch_size": "per_device_eval_batch_size",
    "lora_targets": "lora_target_modules",
    "precision": "bf16",
    "qlora": "load_in_4bit",
    "device": "use_cpu",
    "progress": "disable_tqdm",
}


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "earlier drhouse train flags", "aliases of TRL's flags, kept so old commands still run")
    quiet = argparse.SUPPRESS

    def alias(old: str, help_text: str, **kwargs: Any) -> None:
        group.add_argument("--" + old.replace("_", "-"), dest=RENAMED[old], default=quiet,
                           help=f"= --{RENAMED[old].replace('_', '-')}: {help_text}", **kwargs)

    alias("base_model", "'smollm2-135m' (the embedded GGUF), a hub id or a local directory",
          metavar="NAME")
    alias("data_dir", "the prepared data directory", metavar="DIR")
    alias("epochs", "epochs over the train split", type=float, metavar="N")
    alias("batch_size", "sequences per micro-batch", type=int, metavar="N")
    alias("grad_accum", "micro-batches per optimizer step", type=int, metavar="N")
    alias("eval_batch_size", "sequences per eval batch", type=int, metavar="N")
    alias("lora_targets", "comma-separated module names that get LoRA", type=_comma_list,
          metavar="A,B,...")
    alias("precision", "bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with native bf16",
          type=_choice("precision", {"auto": auto_bf16, "bf16": True, "fp32": False}),
          metavar="{auto,bf16,fp32}")
    alias("qlora", "4-bit base (bitsandbytes nf4); auto: on when training runs on CUDA",
          type=_choice("qlora", {"auto": None, "on": True, "off": False}),
          metavar="{auto,on,off}")
    alias("device", "train on the CPU (cpu) or not (cuda, auto: CUDA when present)",
          type=_choice("device", {"auto": lambda: not _cuda(), "cpu": True, "cuda": False}),
          metavar="{auto,cpu,cuda}")
    group.add_argument("--progress", dest="disable_tqdm", action="store_const", const=False,
                       default=quiet, help="= --disable-tqdm false: show a progress bar")
    group.add_argument("--no-progress", dest="disable_tqdm", action="store_const", const=True,
                       default=quiet, help="= --disable-tqdm true")


def make_parser(prog: str = "drhouse train", add_help: bool = True) -> TrlParser:
    """TRL's parser over :data:`DATACLASSES`, the project's defaults set, the old flags added."""
    parser = TrlParser(DATACLASSES, prog=prog, add_help=add_help,
                       usage=f"{prog} [--config YAML] [OPTIONS]",
                       description="Options are TRL's (SFTConfig, ModelConfig, ScriptArguments) "
                                   "and the project's; YAML (--config, default "
                                   "offline/train_config.yaml) < flags.")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML",
                        help="YAML file with any of these options, by their TRL names "
                             "(default: offline/train_config.yaml)")
    parser.set_defaults_with_config(**TRL_DEFAULTS, **hardware_defaults())
    _add_aliases(parser)
    return parser


class ArgsError(ValueError):
    """Options that cannot be used: unknown YAML keys, a missing file, unsupported settings."""


def _field_names() -> set[str]:
    return {f.name for dtype in DATACLASSES for f in dataclasses.fields(dtype) if f.init}


def _check_keys(keys: Sequence[str], where: str) -> None:
    unknown = sorted(set(keys) - _field_names() - {"env"})
    if unknown:
        hints = [f"{k} is now {RENAMED[k]}" for k in unknown if k in RENAMED]
        raise ArgsError(f"{where}: unknown options {unknown}"
                        + (f" ({'; '.join(hints)})" if hints else ""))


def _check_supported(script: TrainScriptArguments, model: ModelConfig) -> None:
    if not model.use_peft:
        raise ArgsError("this trainer trains a LoRA adapter only (use_peft must stay true)")
    if model.load_in_8bit:
        raise ArgsError("load_in_8bit is not supported; --qlora on (load_in_4bit) is")
    if script.dataset_streaming or script.dataset_config:
        raise ArgsError("dataset_name is a prepared directory here: no streaming, no config name")


def _finish(args: Sequence[Any]) -> TrainArgs:
    script, training, model = args[:3]
    if isinstance(model.lora_target_modules, list):  # --lora-target-modules q_proj,k_proj too
        model.lora_target_modules = [t for item in model.lora_target_modules
                                     for t in _comma_list(item)]
    _check_supported(script, model)
    return script, training, model


def parse_train_args(argv: Sequence[str] = ()) -> TrainArgs:
    """The command line after ``drhouse train``: defaults < the YAML named by ``--config``
    (``offline/train_config.yaml`` when none is named) < the flags. Raises :class:`ArgsError`
    for a YAML key no dataclass has or a file that cannot be read."""
    import yaml

    argv = [piece for a in argv
            for piece in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" not in argv and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ArgsError("--config needs a YAML file")
        path = _resolve(argv[index + 1])
        argv[index + 1] = str(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ArgsError(f"{path}: {error}") from None
        if not isinstance(values, dict):
            raise ArgsError(f"{path}: not a YAML mapping of options")
        _check_keys(list(values), str(path))
    return _finish(make_parser().parse_args_and_config(argv))


def train_arguments(**values: Any) -> TrainArgs:
    """The three dataclasses from the project defaults and ``values`` (by field name), with no
    YAML: what tests and other modules use."""
    _check_keys(list(values), "train_arguments")
    parser = make_parser()
    parser.set_defaults_with_config(**values)
    return _finish(parser.parse_args_into_dataclasses(args=[], look_for_args_file=False))


def with_changes(args: TrainArgs, **changes: Any) -> TrainArgs:
    """A copy of ``args`` with fields changed, each in the dataclass that has it."""
    _check_keys(list(changes), "with_changes")
    copies = []
    for obj in args:
        names = {f.name for f in dataclasses.fields(obj) if f.init}
        mine = {k: v for k, v in changes.items() if k in names}
        copies.append(dataclasses.replace(obj, **mine) if mine else obj)
    return _finish(copies)


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def load_records(data_dir: Path, split: str, limit: int) -> list[dict[str, Any]]:
    """The split's prompt–completion pairs, as the SFT trainer takes them."""
    return [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in load_split(data_dir, split, limit)]


def load_base_for_training(model_args: ModelConfig, cache_dir: str, device: Any, qlora: bool,
                           bf16: bool = False) -> tuple[Any, Any]:
    """The base model (float32, or 4-bit on CUDA) and its tokenizer, through the serving loader
    so the embedded model's cached safetensors copy is reused."""
    import torch

    from engine.model_loading import load_base
    from offline.train_speedups import FrozenLinearCast

    model, tokenizer, source = load_base(
        model_args.model_name_or_path, device, torch.float32 if not qlora else torch.bfloat16,
        _resolve(cache_dir), load_in_4bit=qlora,
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
    log.info("base %s loaded from %s", model_args.model_name_or_path, source)
    return model, tokenizer


def build_trainer(args: TrainArgs, output_dir: Path | None = None,
                  callbacks: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The SFTTrainer (LoRA applied) and a description of the setup; ``output_dir`` replaces
    SFTConfig's (a temporary folder for evaluation and measurement)."""
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import get_peft_config

    from engine.model_loading import pick_device
    from offline.train_callbacks import EvaluateLastStep, TimeBudget
    from offline.train_speedups import CompactLMHead, SharedPrefixSFTTrainer

    script_args, training_args, model_args = args
    training_args = dataclasses.replace(
        training_args, output_dir=str(_resolve(output_dir or training_args.output_dir)))
    device = pick_device("cpu" if training_args.use_cpu else "auto")
    if device.type == "cpu" and script_args.torch_threads:
        torch.set_num_threads(script_args.torch_threads)
    qlora = (device.type == "cuda" if model_args.load_in_4bit is None
             else bool(model_args.load_in_4bit))
    bf16 = bool(training_args.bf16)
    if bf16 and device.type == "cpu" and not cpu_has_bf16():
        log.warning("this CPU has no native bf16; bf16 autocast will be emulated (slow)")
    # TrainingArguments leaves its precision in this variable, which the Trainer's Accelerator
    # reads: a bf16 config made earlier in the process would otherwise turn fp32 runs into bf16.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    model, tokenizer = load_base_for_training(model_args, script_args.cache_dir, device, qlora,
                                              bf16)
    peft_config = get_peft_config(model_args)
    if script_args.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(_resolve(script_args.init_adapter)),
                                          is_trainable=True)
        peft_config = None
    if script_args.compact_head:
        CompactLMHead.install()
    data_dir = _resolve(script_args.dataset_name)
    train_rows = load_records(data_dir, script_args.dataset_train_split,
                              script_args.max_train_samples)
    eval_rows = load_records(data_dir, script_args.dataset_test_split,
                             script_args.max_eval_samples)
    all_callbacks = [EvaluateLastStep(), *(callbacks or [])]
    if script_args.time_budget_min > 0:
        all_callbacks.append(TimeBudget(script_args.time_budget_min))
    if script_args.early_stopping_patience > 0:
        all_callbacks.append(EarlyStoppingCallback(script_args.early_stopping_patience,
                                                   script_args.early_stopping_threshold))
    trainer = SharedPrefixSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=all_callbacks,
    )
    prefix_len = trainer.set_shared_prefix() if script_args.shared_prefix else 0
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
    ax.set_title(f"House LoRA on {metrics['args']['model_name_or_path']}")
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

    script_args = args[0]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, setup = build_trainer(
            with_changes(args, early_stopping_patience=0, time_budget_min=0.0), Path(tmp))
        with trainer.model.disable_adapter():
            base = float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
        tuned = float(trainer.evaluate()["eval_loss"])
    return {"base_eval_loss": base, "adapter_eval_loss": tuned,
            "adapter": script_args.init_adapter, "eval_records": setup["eval_records"],
            "precision": setup["precision"]}


def resolved_options(args: TrainArgs) -> dict[str, Any]:
    """Every option of the run by its field name (the three dataclasses' names are disjoint),
    as the report records it."""
    script_args, training_args, model_args = args
    return {**asdict(script_args), **asdict(model_args), **training_args.to_dict()}


def main(script_args: TrainScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
         command: str = "") -> dict[str, Any]:
    """Train, save the adapter and write the report; returns the metrics."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from offline.train_callbacks import TimeBudget

    args = (script_args, training_args, model_args)
    set_seed(training_args.seed)
    started = time.perf_counter()
    output_dir = _resolve(training_args.output_dir)
    adapter_dir = _resolve(script_args.adapter_dir)
    report_dir = (_resolve(script_args.report_dir) if script_args.report_dir
                  else adapter_dir / "report")
    trainer, setup = build_trainer(args)
    log.info("training setup: %s", setup)

    base_eval_loss = None
    if script_args.base_eval:
        with trainer.model.disable_adapter():
            base_eval_loss = float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
        log.info("base model eval loss %.4f", base_eval_loss)

    resume = training_args.resume_from_checkpoint or (
        get_last_checkpoint(str(output_dir)) if script_args.resume and output_dir.is_dir()
        else None)
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - train_started
    train_loss, eval_loss = _history(trainer)  # before the final evaluation of the kept model
    final_eval = trainer.evaluate()
    size = save_adapter(trainer, adapter_dir, script_args.save_dtype,
                        model_args.model_name_or_path)
    tokens = int(trainer._total_train_tokens)
    metrics = {
        "args": resolved_options(args),
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
    """Time training micro-batches in fp32 and in bf16 autocast on the same batches
    (``drhouse bench precision``).

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
            run_args = with_changes(args, bf16=precision == "bf16", early_stopping_patience=0,
                                    disable_tqdm=True, time_budget_min=0.0)
            setups[precision] = build_trainer(run_args, Path(tmp) / precision)
        trainer = setups["fp32"][0]
        size = args[1].per_device_train_batch_size
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
    results["batch_size"] = size
    return results


def check_data(script_args: TrainScriptArguments) -> None:
    """Raises :class:`ArgsError` unless the data directory has both splits."""
    data_dir = _resolve(script_args.dataset_name)
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if not (data_dir / f"{split}.jsonl").is_file():
            raise ArgsError(f"no {split}.jsonl in {data_dir} (run 'drhouse data prepare', or "
                            "name the prepared directory with --dataset-name DIR)")


def parent_parsers() -> list[argparse.ArgumentParser]:
    """For ``cli.main``: the subcommand's parser takes all of TRL's options (``--help`` lists
    them; argparse checks them); :func:`run` reads them again with TRL's YAML handling."""
    return [make_parser(add_help=False)]


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.usage = "drhouse train [--config YAML] [OPTIONS]"
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(getattr(args, "argv", sys.argv[2:]))
    try:
        script_args, training_args, model_args = parse_train_args(argv)
        check_data(script_args)
    except ValueError as error:  # ArgsError, and TRL's and TrainingArguments' own checks
        print(f"drhouse train: {error}", file=sys.stderr)
        return 2
    train_args = (script_args, training_args, model_args)
    command = "drhouse train " + shlex.join(argv) if argv else "drhouse train"
    if script_args.eval_only:
        if not script_args.init_adapter:
            print("drhouse train --eval-only needs --init-adapter PATH", file=sys.stderr)
            return 2
        print(json.dumps(evaluate_only(train_args), indent=2))
        return 0
    if script_args.measure_precision:
        results = measure_precision(train_args, script_args.measure_precision)
        print(json.dumps(results, indent=2))
        return 0
    metrics = main(*train_args, command=command)
    print(json.dumps({k: metrics[k] for k in ("base_eval_loss", "final_eval_loss", "steps",
                                              "tokens_per_s", "wall_s", "adapter_bytes")},
                     indent=2))
    return 0
