"""Training: completion-only labels that match the serving prompt, the shared-prefix forward,
TRL's parser over YAML and flags (and the command line's errors), ``bench precision``, and a
tiny end-to-end run (a two-layer Llama with the SmolLM2 tokenizer, built here) that produces a
loadable float16 adapter whose loss went down. Everything runs in tmp dirs with reporting off."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from base.config import Settings
from cli.main import build_parser
from cli.main import main as drhouse
from engine.model_loading import (
    ModelLoadError,
    _cached_copy,
    cpu_has_bf16,
    find_embedded_gguf,
    load_model,
)
from offline.train import (
    TrainArgs,
    auto_bf16,
    build_trainer,
    evaluate_only,
    main,
    measure_precision,
    parse_train_args,
    train_arguments,
)
from offline.train_speedups import common_prefix
from persona.data import PrepareConfig, prepare
from persona.dialogue import load_split
from persona.pack import load_persona
from persona.prompt import render_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [
    (f"{opener} Is it {disease}?", f"It's never {disease}. Check the {organ}.")
    for opener in ("Doctor,", "Tell me.", "Honestly,", "Quick question.", "House,", "Wait.")
    for disease, organ in (("lupus", "kidneys"), ("cancer", "liver"), ("sarcoidosis", "lungs"),
                           ("an infection", "heart"), ("an allergy", "skin"))
]


def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    gguf = find_embedded_gguf("smollm2-135m")
    cached = _cached_copy(gguf, Path(Settings().model.cache_dir))
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Llama with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import csv

    root = tmp_path_factory.mktemp("data")
    source = root / "qa.csv"
    with source.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["anchor", "response"])
        writer.writerows(ROWS)
    prepare(PrepareConfig(input=source, out=root / "prepared", validation=0.25, test=0.05))
    assert load_split(root / "prepared", "validation")
    return root / "prepared"


def tiny_args(base: Path, data: Path, tmp: Path, **changes: Any) -> TrainArgs:
    values: dict[str, Any] = {
        "model_name_or_path": str(base), "dataset_name": str(data),
        "output_dir": str(tmp / "run"), "adapter_dir": str(tmp / "adapter"), "max_steps": 12,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "per_device_eval_batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
        "eval_steps": 6, "save_steps": 6, "logging_steps": 1, "early_stopping_patience": 0,
        "disable_tqdm": True, "bf16": False, "lora_dropout": 0.0, "cache_dir": str(tmp / "cache"),
        "torch_threads": 1,
    }
    values.update(changes)
    return train_arguments(**values)


@pytest.fixture
def trainer_setup(tiny_base: Path, data_dir: Path, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    trainer, setup = build_trainer(tiny_args(tiny_base, data_dir, tmp_path), tmp_path / "run")
    yield trainer, setup


def test_labels_mask_every_prompt_token_and_prompt_equals_serving(
    trainer_setup: tuple[Any, Any], data_dir: Path
) -> None:
    trainer, _ = trainer_setup
    tokenizer = trainer.processing_class
    persona = load_persona()
    records = load_split(data_dir, "train")
    rows = trainer.train_dataset
    assert len(rows) == len(records)
    for record, row in zip(records, rows, strict=True):
        served = render_prompt(tokenizer, persona, [], record["anchor"])
        served_ids = tokenizer(served, add_special_tokens=False)["input_ids"]
        ids, labels = row["input_ids"], row["labels"]
        n = len(served_ids)
        assert ids[:n] == served_ids  # train prompt == serving prompt, token for token
        assert all(label == -100 for label in labels[:n])  # no prompt token in the loss
        assert labels[n:] == ids[n:]  # every reply token (and the turn end) in the loss
        reply = tokenizer.decode(ids[n:])
        assert reply.startswith(record["response"]) and reply.rstrip().endswith("<|im_end|>")


def test_shared_prefix_forward_equals_full_forward(trainer_setup: tuple[Any, Any]) -> None:
    trainer, setup = trainer_setup
    assert setup["shared_prefix_tokens"] > 40  # the persona system prompt
    model = trainer.model
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    results = []
    for prefix in (None, trainer.prefix_ids):
        trainer.prefix_ids = prefix
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss.item(), grads))
    (full_loss, full_grads), (shared_loss, shared_grads) = results
    assert shared_loss == pytest.approx(full_loss, rel=1e-5)
    assert torch.allclose(shared_grads, full_grads, rtol=1e-3, atol=1e-6)


def test_tiny_run_produces_a_loadable_adapter_and_lowers_the_loss(
    tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    args = tiny_args(tiny_base, data_dir, tmp_path)
    metrics = main(*args, command="drhouse train --test")
    assert metrics["steps"] == 12
    assert metrics["final_eval_loss"] < metrics["base_eval_loss"] - 0.1
    assert metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    assert [step for step, _ in metrics["eval_loss"]] == [6, 12]
    assert metrics["tokens_per_s"] > 0

    adapter = tmp_path / "adapter"
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float16 for t in weights.values())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == str(tiny_base)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"}
    report = adapter / "report"
    assert json.loads((report / "metrics.json").read_text())["base_eval_loss"] == pytest.approx(
        metrics["base_eval_loss"])
    assert (report / "loss.png").stat().st_size > 1000
    assert (report / "command.txt").read_text().strip() == "drhouse train --test"

    loaded = load_model(str(tiny_base), {"house": str(adapter)}, device="cpu", dtype="float32")
    assert loaded.adapters == ["house"]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        tuned = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)

    again = evaluate_only(tiny_args(tiny_base, data_dir, tmp_path, init_adapter=str(adapter)))
    assert again["base_eval_loss"] == pytest.approx(metrics["base_eval_loss"], rel=1e-4)
    assert again["adapter_eval_loss"] == pytest.approx(metrics["final_eval_loss"], rel=1e-2)


def test_drhouse_train_command_runs(tiny_base: Path, data_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The command line end to end: the earlier flag names, the YAML under them, the report."""
    argv = ["--base-model", str(tiny_base), "--data-dir", str(data_dir), "--output-dir",
            str(tmp_path / "run"), "--adapter-dir", str(tmp_path / "adapter"), "--max-steps", "2",
            "--eval-steps", "2", "--save-steps", "2", "--batch-size", "4", "--eval-batch-size",
            "8", "--precision", "fp32", "--no-progress", "--no-base-eval", "--cache-dir",
            str(tmp_path / "cache"), "--torch-threads", "1"]
    assert drhouse(["train", *argv]) == 0
    out = capsys.readouterr().out  # the Trainer's log lines, then the summary
    assert json.loads(out[out.rindex("{\n"):])["steps"] == 2
    report = tmp_path / "adapter" / "report"
    assert (report / "command.txt").read_text().split() == ["drhouse", "train", *argv]
    options = json.loads((report / "metrics.json").read_text())["args"]
    assert options["per_device_train_batch_size"] == 4 and options["bf16"] is False
    assert options["learning_rate"] == 2e-4 and options["per_device_eval_batch_size"] == 8
    assert options["gradient_accumulation_steps"] == 2  # the YAML's, under the flags
    assert options["model_name_or_path"] == str(tiny_base) and options["base_eval"] is False


def test_checkpoints_and_resume(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    first = main(*tiny_args(tiny_base, data_dir, tmp_path, max_steps=4, eval_steps=2,
                            save_steps=2, base_eval=False))
    assert first["steps"] == 4 and first["base_eval_loss"] is None
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    resumed = main(*tiny_args(tiny_base, data_dir, tmp_path, max_steps=6, eval_steps=2,
                              save_steps=2, base_eval=False, resume=True))
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["steps"] == 6


def test_evaluation_is_deterministic(trainer_setup: tuple[Any, Any]) -> None:
    trainer, _ = trainer_setup
    torch.manual_seed(1)
    first = trainer.evaluate()["eval_loss"]
    torch.manual_seed(2)
    assert trainer.evaluate()["eval_loss"] == first


def test_last_step_is_evaluated_and_can_be_the_one_kept(tiny_base: Path, data_dir: Path,
                                                         tmp_path: Path) -> None:
    metrics = main(*tiny_args(tiny_base, data_dir, tmp_path, max_steps=5, eval_steps=2,
                              save_steps=2, base_eval=False))
    assert [step for step, _ in metrics["eval_loss"]] == [2, 4, 5]
    assert (tmp_path / "run" / "checkpoint-5").is_dir()
    best = min(metrics["eval_loss"], key=lambda row: row[1])
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{best[0]}")


def test_yaml_config_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("lora_r: 8\nlearning_rate: 1.0e-3\nmax_steps: 30\n")
    flags = ["--config", str(config), "--max-steps", "5", "--no-progress", "--precision", "fp32"]
    cli = build_parser().parse_args(["train", *flags])  # the drhouse parser takes them too
    assert cli.command == "train"
    _, training, model = parse_train_args(flags)
    assert (model.lora_r, training.learning_rate, training.max_steps) == (8, 1e-3, 5)
    assert training.disable_tqdm is True and training.bf16 is False
    assert model.lora_alpha == 32  # untouched default
    assert training.lr_scheduler_type == "cosine" and training.completion_only_loss is True
    shipped_script, shipped, shipped_model = parse_train_args([])
    assert shipped_model.lora_r == 16 and shipped_model.lora_dropout == 0.05
    assert shipped.per_device_train_batch_size == 16  # offline/train_config.yaml
    assert shipped_script.dataset_name == "data/prepared"
    # TRL's names, in both spellings, and the earlier ones
    for flag in ("--per-device-train-batch-size", "--per_device_train_batch_size",
                 "--batch-size"):
        assert parse_train_args([flag, "3"])[1].per_device_train_batch_size == 3
    _, _, renamed = parse_train_args(["--lora-targets", "q_proj,v_proj", "--base-model", "x"])
    assert renamed.lora_target_modules == ["q_proj", "v_proj"]
    assert renamed.model_name_or_path == "x"
    config.write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match="unknown options"):
        parse_train_args(["--config", str(config)])
    config.write_text("epochs: 2\n")
    with pytest.raises(ValueError, match="epochs is now num_train_epochs"):
        parse_train_args(["--config", str(config)])
    with pytest.raises(ValueError, match="unknown options"):
        train_arguments(batch_size=4)


def test_command_line_errors_are_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert drhouse(["train", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.jsonl" in err and "Traceback" not in err
    config = tmp_path / "bad.yaml"
    config.write_text("lora_rank: 8\n")
    assert drhouse(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown options ['lora_rank']" in err
    assert drhouse(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        drhouse(["train", "--max-steps", "many"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        drhouse(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--per-device-train-batch-size", "--lora-r", "--learning-rate",
                   "--adapter-dir", "--time-budget-min", "--config", "--batch-size"):
        assert option in help_text


def test_precision_and_qlora_choices(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    assert parse_train_args(["--precision", "fp32"])[1].bf16 is False
    assert parse_train_args(["--precision", "bf16"])[1].bf16 is True
    assert parse_train_args(["--precision", "auto"])[1].bf16 is auto_bf16()
    if not torch.cuda.is_available():
        assert auto_bf16() is cpu_has_bf16()
        assert parse_train_args([])[1].bf16 is cpu_has_bf16()  # the YAML leaves it to auto
        assert parse_train_args([])[2].load_in_4bit is None  # auto: on exactly on CUDA
        assert parse_train_args(["--qlora", "on"])[2].load_in_4bit is True
        with pytest.raises(ModelLoadError, match="CUDA"):
            build_trainer(tiny_args(tiny_base, data_dir, tmp_path, load_in_4bit=True),
                          tmp_path / "q")


def test_measure_precision_times_both(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    results = measure_precision(tiny_args(tiny_base, data_dir, tmp_path), steps=1, rounds=1)
    assert results["fp32"]["setup"]["precision"] == "fp32"
    assert results["bf16"]["setup"]["precision"] == "bf16-autocast"
    assert results["fp32"]["tokens_per_round"] == results["bf16"]["tokens_per_round"] > 0
    assert results["bf16_speedup"] > 0


def test_bench_precision_command(tiny_base: Path, data_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    train_flags = (f"--base-model {tiny_base} --data-dir {data_dir} --cache-dir {tmp_path} "
                   "--per-device-train-batch-size 4 --torch-threads 1")
    out = tmp_path / "precision.json"
    assert drhouse(["bench", "precision", "--steps", "1", "--rounds", "1", "--json", str(out),
                    f"--train-args={train_flags}"]) == 0
    results = json.loads(out.read_text())["precision"]
    assert results["batch_size"] == 4 and results["bf16_speedup"] > 0
    assert "bf16 autocast / fp32" in capsys.readouterr().out
    assert drhouse(["bench", "precision", f"--train-args=--data-dir {tmp_path}"]) == 2


def test_common_prefix() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[7, 8]]) == [7, 8]
    assert common_prefix([]) == []
