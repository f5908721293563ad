"""The fit judge, for evaluation only: does this reply answer this message?

A MiniLM cross-encoder (message and reply read together) with a LoRA adapter, trained on the
train split's **judge fold** (`persona.dialogue.in_judge_fold`), which the canon pool leaves
out, and on the validation pairs outside its own held-out sample, so it never saw a line of the
pool as a positive. It is never used to choose replies
(that is the selector's and the persona classifier's job, `persona.reply_choice`).

`drhouse eval` reports each system's **fit_score**: for every message, the percentile of the
system's reply among 99 other House replies (of the same split, drawn with a fixed seed) by
the judge's score — 1.0 when the judge prefers it to all 99, 0.5 for a reply that fits like a
random House line. Human (the line House really said) is the ceiling.

    drhouse judge train        # writes models/fit-judge (18 min on 2 CPU cores)
    drhouse judge eval         # its ranking of held-out validation pairs
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from base.config import ROOT
from persona.dialogue import Pair, Scenes, in_judge_fold, read_pairs

log = logging.getLogger(__name__)

DEFAULT_DIR = ROOT / "models" / "fit-judge"
DEFAULT_DATA_DIR = ROOT / "data" / "prepared"
WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
OTHERS = 99


class JudgeError(RuntimeError):
    """The judge's files are missing."""


@dataclass
class JudgeConfig:
    epochs: float = 3.0
    batch_size: int = 32
    num_negatives: int = 3
    learning_rate: float = 5e-4
    lora_r: int = 32
    lora_alpha: int = 64
    max_length: int = 80
    bf16: bool = True
    seed: int = 0
    max_steps: int = -1
    eval_pairs: int = 300
    torch_threads: int = 0


def _cross_encoder(max_length: int) -> Any:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers.cross_encoder import CrossEncoder
    from transformers.utils import logging as hf_logging

    from persona.classifier import minilm_path

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    try:
        return CrossEncoder(str(minilm_path()), num_labels=1, max_length=max_length,
                            device="cpu")
    finally:
        hf_logging.set_verbosity(verbosity)


def _lora(r: int, alpha: int, dropout: float) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=["query", "key", "value", "dense"])


class FitJudge:
    def __init__(self, model: Any, meta: dict[str, Any]):
        self.model = model
        self.meta = meta

    @classmethod
    def load(cls, directory: Path | str = DEFAULT_DIR) -> FitJudge:
        from peft import get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file() or not (directory / META_FILE).is_file():
            raise JudgeError(f"no fit judge in {directory} (train one with "
                             "`drhouse judge train`)")
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        model = _cross_encoder(meta["max_length"])
        module = model[0]
        peft_model = get_peft_model(module.model, _lora(meta["lora"]["r"],
                                                        meta["lora"]["alpha"], 0.0))
        result = set_peft_model_state_dict(peft_model, load_file(str(directory / WEIGHTS_FILE)))
        if result.unexpected_keys:
            raise JudgeError(f"unexpected judge weights: {result.unexpected_keys[:3]}")
        module.model = peft_model.merge_and_unload()
        model.eval()
        return cls(model, meta)

    def score(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float]:
        if not pairs:
            return []
        out = self.model.predict([list(p) for p in pairs], batch_size=64,
                                 show_progress_bar=progress, convert_to_numpy=True)
        return [float(x) for x in out]


def other_replies(n_messages: int, pool: Sequence[str], exclude: Sequence[int | None],
                  seed: int = 0) -> list[list[str]]:
    """For each message, ``OTHERS`` replies of ``pool`` drawn with ``seed``, leaving out the
    message's own index (``exclude``)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_messages):
        choices = [j for j in range(len(pool)) if j != exclude[i]]
        out.append([pool[j] for j in rng.sample(choices, min(OTHERS, len(choices)))])
    return out


def percentile(score: float, others: Sequence[float]) -> float:
    """Share of ``others`` below ``score`` (ties count half)."""
    if not others:
        return 0.5
    below = sum(1.0 if o < score else 0.5 if o == score else 0.0 for o in others)
    return below / len(others)


def ranking_accuracy(judge: FitJudge, pairs: Sequence[Pair], seed: int = 0,
                     progress: bool = False) -> dict[str, float]:
    """The judge's own held-out ranking: the true reply among itself and 99 others."""
    replies = [p.response for p in pairs]
    others = other_replies(len(pairs), replies, list(range(len(pairs))), seed)
    flat = [(p.anchor, r) for p, group in zip(pairs, others, strict=True)
            for r in [p.response, *group]]
    scores = judge.score(flat, progress=progress)
    r1 = r10 = mrr = pct = 0.0
    start = 0
    for group in others:
        row, start = scores[start : start + len(group) + 1], start + len(group) + 1
        rank = 1 + sum(s > row[0] for s in row[1:])
        r1 += rank == 1
        r10 += rank <= 10
        mrr += 1 / rank
        pct += percentile(row[0], row[1:])
    n = len(pairs)
    return {"recall@1": round(r1 / n, 4), "recall@10": round(r10 / n, 4),
            "mrr": round(mrr / n, 4), "mean_percentile": round(pct / n, 4), "n": n}


def validation_sample(pairs: Sequence[Pair], n: int, seed: int) -> list[Pair]:
    """The held-out pairs a judge is measured on: ``n`` validation pairs drawn with ``seed``."""
    validation = [p for p in pairs if p.split == "validation"]
    return random.Random(seed).sample(validation, min(n, len(validation)))


def protocol(n: int, seed: int) -> str:
    return (f"{n} validation pairs, the true reply among it and {OTHERS} other validation "
            f"replies (seed {seed})")


def training_rows(pairs: Sequence[Pair], scenes: Scenes, seed: int,
                  held_out: Sequence[Pair] = ()) -> dict[str, list[str]]:
    """The judge's pairs: the train split's judge fold and the validation pairs outside its own
    held-out sample ``held_out`` — none of them a line of the canon pool."""
    held = {p.row for p in held_out}
    fold = [p for p in pairs
            if in_judge_fold(p) or (p.split == "validation" and p.row not in held)]
    rng = random.Random(seed)
    rng.shuffle(fold)
    return {"message": [p.anchor for p in fold], "reply": [p.response for p in fold]}


def train(data_dir: Path, out: Path, config: JudgeConfig, work_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from sentence_transformers.cross_encoder import (
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    pairs = read_pairs(data_dir)
    sample = validation_sample(pairs, config.eval_pairs, config.seed)
    rows = training_rows(pairs, Scenes(pairs), config.seed, held_out=sample)
    model = _cross_encoder(config.max_length)
    module = model[0]
    module.model = get_peft_model(module.model, _lora(config.lora_r, config.lora_alpha, 0.05))
    args = CrossEncoderTrainingArguments(
        output_dir=str(work_dir), num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        warmup_ratio=0.1, bf16=config.bf16, save_strategy="no", logging_steps=10,
        report_to="none", seed=config.seed, dataloader_num_workers=0, use_cpu=True)
    started = time.perf_counter()
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows),
        loss=MultipleNegativesRankingLoss(model, num_negatives=config.num_negatives))
    trainer.train()
    train_s = time.perf_counter() - started
    model = model.to(torch.float32)
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in get_peft_model_state_dict(module.model).items()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {"lora": {"r": config.lora_r, "alpha": config.lora_alpha},
            "max_length": config.max_length, "config": asdict(config),
            "train_pairs": len(rows["message"]), "train_minutes": round(train_s / 60, 1),
            "trained_on": "train split's judge fold and the validation pairs outside the "
                          "held-out sample (disjoint from the canon pool)"}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    judge = FitJudge.load(out)
    meta["validation_ranking"] = ranking_accuracy(judge, sample, progress=True)
    meta["protocol"] = protocol(len(sample), config.seed)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)
    sub = parser.add_subparsers(dest="judge_action", required=True)
    t = sub.add_parser("train", help="train the fit judge on the judge fold")
    t.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    t.add_argument("--out", type=Path, default=DEFAULT_DIR)
    t.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "judge")
    for field, value in asdict(JudgeConfig()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            t.add_argument(flag, type=type(value), default=value)
    e = sub.add_parser("eval", help="a judge's ranking of held-out validation pairs (the true "
                                    "reply among 100)")
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    e.add_argument("--judge-dir", type=Path, default=DEFAULT_DIR)
    e.add_argument("--pairs", type=int, default=300, help="validation pairs to rank")
    e.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if not (args.data_dir / "train.jsonl").is_file():
        raise SystemExit(f"{args.data_dir}/train.jsonl not found: run `drhouse data prepare` "
                         "first")
    if args.judge_action == "eval":
        try:
            judge = FitJudge.load(args.judge_dir)
        except JudgeError as exc:
            raise SystemExit(str(exc)) from None
        sample = validation_sample(read_pairs(args.data_dir), args.pairs, args.seed)
        result = {"judge": str(args.judge_dir), "protocol": protocol(len(sample), args.seed),
                  **ranking_accuracy(judge, sample, args.seed, progress=True)}
        print(json.dumps(result, indent=2))
        return 0
    config = JudgeConfig(**{f: getattr(args, f) for f in asdict(JudgeConfig())})
    print(json.dumps(train(args.data_dir, args.out, config, args.work_dir), indent=2))
    return 0
