"""Train and measure the response selector: a MiniLM dual encoder fine-tuned on the train
split's message → House-reply pairs with in-batch negatives (`MultipleNegativesRankingLoss`).

Queries carry the exchange before the message (as the bot's history does), dropped at random
for part of the pairs so a first message with no history is matched too; each pair brings a
hard negative, House's line from a neighbouring row of the same scene. Measured on the test
split: Recall@1 and @10 among 100 candidates (the true reply and 99 other test replies, drawn
with a fixed seed) and MRR, against frozen MiniLM.

    drhouse selector train                  # ~45 min on 2 CPU cores, writes models/house-selector
    drhouse selector eval --model-dir models/house-selector
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from base.config import ROOT
from persona.dialogue import Pair, Scenes, query_text, read_pairs

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = ROOT / "data" / "prepared"
DEFAULT_MODEL_DIR = ROOT / "models" / "house-selector"
CANDIDATES = 100


@dataclass
class SelectorConfig:
    epochs: float = 2.0
    batch_size: int = 128
    learning_rate: float = 5e-4
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    warmup_ratio: float = 0.1
    max_seq_length: int = 64
    context_keep: float = 0.5  # share of training queries that keep the exchange before them
    hard_negatives: bool = True
    bf16: bool = True
    seed: int = 0
    max_steps: int = -1
    torch_threads: int = 0
    init_from: str = ""  # a stored selector to continue from (same LoRA rank)
    eval_every: int = 0  # steps between validation Recall@1 checks (0: none)
    context_exchanges: int = 1  # exchanges before the message a query carries
    cached_mini_batch: int = 0  # >0: CachedMultipleNegativesRankingLoss in chunks this size


def training_rows(pairs: Sequence[Pair], scenes: Scenes, config: SelectorConfig
                  ) -> dict[str, list[str]]:
    """Columns for the trainer: query, positive and (optionally) a same-scene negative."""
    rng = random.Random(config.seed)
    rows: dict[str, list[str]] = {"query": [], "positive": []}
    if config.hard_negatives:
        rows["negative"] = []
    for pair in pairs:
        if pair.split != "train":
            continue
        negatives = [n.response for n in scenes.neighbours(pair)
                     if n.response.strip().lower() != pair.response.strip().lower()]
        if config.hard_negatives and not negatives:
            continue
        context = (scenes.context(pair, config.context_exchanges)
                   if rng.random() < config.context_keep else ())
        rows["query"].append(query_text(pair.anchor, context))
        rows["positive"].append(pair.response)
        if config.hard_negatives:
            rows["negative"].append(rng.choice(negatives))
    return rows


def ranking_metrics(model: Any, pairs: Sequence[Pair], scenes: Scenes, context: bool,
                    seed: int = 0, batch_size: int = 64, exchanges: int = 1
                    ) -> dict[str, float]:
    """Recall@1, Recall@10 and MRR of each pair's true reply among ``CANDIDATES`` (the true
    one and 99 other replies of the same pairs, drawn with ``seed``); with ``context``, each
    query carries the ``exchanges`` exchanges before it."""
    queries = [query_text(p.anchor, scenes.context(p, exchanges) if context else ())
               for p in pairs]
    q = model.encode(queries, batch_size=batch_size, normalize_embeddings=True)
    r = model.encode([p.response for p in pairs], batch_size=batch_size,
                     normalize_embeddings=True)
    scores = q @ r.T
    return rank_scores(scores, seed)


def candidate_sets(n: int, seed: int = 0) -> list[list[int]]:
    """For each of ``n`` pairs, its own index first and ``CANDIDATES - 1`` others."""
    rng = random.Random(seed)
    return [[i, *rng.sample([j for j in range(n) if j != i], CANDIDATES - 1)] for i in range(n)]


def summarise(ranks: Sequence[int]) -> dict[str, float]:
    n = len(ranks)
    return {"recall@1": round(sum(r == 1 for r in ranks) / n, 4),
            "recall@10": round(sum(r <= 10 for r in ranks) / n, 4),
            "mrr": round(sum(1 / r for r in ranks) / n, 4), "n": n}


def rank_scores(scores: Any, seed: int = 0) -> dict[str, float]:
    ranks = []
    for i, cands in enumerate(candidate_sets(scores.shape[0], seed)):
        row = scores[i, cands]
        ranks.append(1 + int((row[1:] > row[0]).sum()))
    return summarise(ranks)


def listener_ranking_metrics(model: Any, pairs: Sequence[Pair], scenes: Scenes,
                             listener: Any, persona: Any, shortlist: int, weight: float,
                             seed: int = 0, limit: int = 0, exchanges: int = 1
                             ) -> dict[str, float]:
    """The bot's two stages on the same 100-candidate sets as :func:`ranking_metrics`: the
    selector's ``shortlist`` best (message + exchange before), re-ranked by cosine + ``weight``
    / 20 x the listener's PMI with the serving prompt; a true reply outside the shortlist keeps
    its selector rank. ``limit``: the first that many pairs of a seeded order (0 = all)."""
    from tqdm import tqdm

    from persona.prompt import Turn, render_prompt
    from persona.reply_choice import COSINE_SCALE

    queries = [query_text(p.anchor, scenes.context(p, exchanges)) for p in pairs]
    q = model.encode(queries, batch_size=64, normalize_embeddings=True)
    r = model.encode([p.response for p in pairs], batch_size=64, normalize_embeddings=True)
    scores = q @ r.T
    sets = candidate_sets(len(pairs), seed)
    chosen = list(range(len(pairs)))
    if limit:
        chosen = random.Random(seed + 1).sample(chosen, min(limit, len(chosen)))
    ranks = []
    for i in tqdm(chosen, desc="listener re-rank", unit="message"):
        row = scores[i, sets[i]]
        order = sorted(range(CANDIDATES), key=lambda c: -row[c])
        top = order[:shortlist]
        pair = pairs[i]
        context = scenes.context(pair, exchanges)
        history = [Turn("user" if t % 2 == 0 else "assistant", text)
                   for t, text in enumerate(context)]
        prompt = render_prompt(listener.tokenizer, persona, history, pair.anchor)
        pmi = listener.pmi(prompt, [pairs[sets[i][c]].response for c in top])
        combined = {c: float(row[c]) + weight / COSINE_SCALE * v
                    for c, v in zip(top, pmi, strict=True)}
        if 0 in combined:
            ranks.append(1 + sum(v > combined[0] for v in combined.values()))
        else:
            ranks.append(1 + order.index(0))
    return summarise(ranks)


def load_encoder(path: Path | str | None = None) -> tuple[Any, int]:
    """A stored selector's encoder and how many exchanges before a message its queries
    carry, or frozen MiniLM (and 1) when ``path`` is None."""
    from persona.selector import Selector, base_encoder

    if not path:
        return base_encoder(), 1
    selector = Selector.load(path)
    return selector.model, selector.context_exchanges


def train(data_dir: Path, out: Path, config: SelectorConfig, work_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.training_args import BatchSamplers

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    pairs = read_pairs(data_dir)
    scenes = Scenes(pairs)
    rows = training_rows(pairs, scenes, config)
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from persona.selector import META_FILE, WEIGHTS_FILE, base_encoder, lora_config

    model = base_encoder(config.max_seq_length)
    frozen = {
        split: {f"context={c}": ranking_metrics(model, [p for p in pairs if p.split == split],
                                                scenes, c) for c in (False, True)}
        for split in ("test",)
    }
    log.info("frozen MiniLM: %s", frozen)
    module = model[0]
    module.auto_model = get_peft_model(
        module.auto_model, lora_config(config.lora_r, config.lora_alpha, config.lora_dropout))
    if config.init_from:
        _continue_from(module.auto_model, Path(config.init_from))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio,
        bf16=config.bf16,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    curve: list[dict[str, float]] = []
    callbacks = ([_validation_curve(model, [p for p in pairs if p.split == "validation"],
                                   scenes, config.eval_every, curve,
                                   config.context_exchanges)]
                 if config.eval_every else [])
    # The cached loss (GradCache) spends one more forward pass to give a large batch's
    # in-batch negatives at a small batch's memory.
    loss = (CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.cached_mini_batch)
            if config.cached_mini_batch else MultipleNegativesRankingLoss(model))
    started = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows),
        loss=loss, callbacks=callbacks)
    trainer.train()
    train_s = time.perf_counter() - started
    model = model.to(torch.float32)
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in get_peft_model_state_dict(module.auto_model).items()}
    metrics = {
        split: {f"context={c}": ranking_metrics(model, [p for p in pairs if p.split == split],
                                                scenes, c, exchanges=config.context_exchanges)
                for c in (False, True)}
        for split in ("validation", "test")
    }
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(state, str(out / WEIGHTS_FILE))
    report = {
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha,
                 "targets": list(module.auto_model.peft_config["default"].target_modules)},
        "max_seq_length": config.max_seq_length,
        "context_exchanges": config.context_exchanges,
        "config": asdict(config),
        "train_pairs": len(rows["query"]),
        "train_minutes": round(train_s / 60, 1),
        "frozen_minilm": frozen,
        "fine_tuned": metrics,
        "validation_curve": curve,
        "protocol": f"true reply among {CANDIDATES} (99 other replies of the split, seed 0)",
        "cpu": _cpu_name(),
    }
    (out / META_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _continue_from(peft_model: Any, directory: Path) -> None:
    """Load a stored selector's LoRA weights into ``peft_model`` to train on from there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from persona.selector import WEIGHTS_FILE

    if not (directory / WEIGHTS_FILE).is_file():
        raise SystemExit(f"--init-from {directory}: no {WEIGHTS_FILE} there")
    prefix = "base_model.model."
    state = {k if k.startswith(prefix) else prefix + k: v.float()
             for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as exc:  # another rank: tensors of another size
        raise SystemExit(f"{directory} does not fit this LoRA shape (another --lora-r?): "
                         f"{str(exc).splitlines()[0]}") from exc
    if result.unexpected_keys:
        raise SystemExit(f"{directory} does not fit this LoRA shape: "
                         f"{result.unexpected_keys[:3]}")
    log.info("continuing from %s", directory)


def _validation_curve(model: Any, pairs: Sequence[Pair], scenes: Scenes, every: int,
                      curve: list[dict[str, float]], exchanges: int) -> Any:
    """A trainer callback that logs validation Recall@1 (message + exchange) every ``every``
    steps, so a run shows whether more steps still help."""
    from transformers import TrainerCallback

    class ValidationCurve(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every:
                return
            model.eval()
            point = {"step": state.global_step,
                     **ranking_metrics(model, pairs, scenes, context=True,
                                       exchanges=exchanges)}
            model.train()
            curve.append(point)
            log.info("validation at step %d: %s", state.global_step, point)

    return ValidationCurve()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return f"unknown x{os.cpu_count()}"


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)
    sub = parser.add_subparsers(dest="selector_action", required=True)
    t = sub.add_parser("train", help="fine-tune the selector and write it with its report")
    t.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    t.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    t.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "selector")
    for field, value in asdict(SelectorConfig()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            t.add_argument(flag, type=type(value), default=value)
    r = sub.add_parser("refine-data", help="the splits with House's real exchanges for each "
                                           "message in its prompt (retrieve and refine)")
    r.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    r.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    r.add_argument("--out", type=Path, default=ROOT / "data" / "refine")
    r.add_argument("--examples", type=int, default=3)
    e = sub.add_parser("eval", help="ranking metrics of a selector on a split")
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    e.add_argument("--model-dir", type=Path, help="default: frozen MiniLM")
    e.add_argument("--split", default="test", choices=("validation", "test"))
    e.add_argument("--listener", action="store_true",
                   help="also the two stages the bot uses: the selector's --shortlist best "
                        "re-ranked with the House model's PMI (engine/listener.py)")
    e.add_argument("--shortlist", type=int, help="default: CANON_SHORTLIST, as the bot")
    e.add_argument("--listener-weight", type=float, help="default: LISTENER_WEIGHT")
    e.add_argument("--listener-tokens", type=int,
                   help="score only each reply's first this many tokens (default: "
                        "LISTENER_TOKENS)")
    e.add_argument("--limit", type=int, default=0,
                   help="--listener on this many messages of the split (0 = all)")


def run(args: argparse.Namespace) -> int:
    from persona.dialogue import SPLITS

    for split in SPLITS:
        if not (args.data_dir / f"{split}.jsonl").is_file():
            raise SystemExit(f"{args.data_dir}/{split}.jsonl not found: run "
                             "`drhouse data prepare` first")
    if args.selector_action == "train":
        config = SelectorConfig(**{f: getattr(args, f) for f in asdict(SelectorConfig())})
        if config.init_from and not (Path(config.init_from) / "selector.safetensors").is_file():
            raise SystemExit(f"--init-from {config.init_from}: no stored selector there")
        report = train(args.data_dir, args.out, config, args.work_dir)
        print(json.dumps(report, indent=2))
        return 0
    if args.selector_action == "refine-data":
        from offline.refine_data import write_refine_data
        from persona.selector import Selector

        counts = write_refine_data(args.data_dir, args.out, Selector.load(args.model_dir),
                                   args.examples)
        print(f"wrote {args.out}: {counts}")
        return 0
    pairs = read_pairs(args.data_dir)
    scenes = Scenes(pairs)
    model, exchanges = load_encoder(args.model_dir)
    chosen = [p for p in pairs if p.split == args.split]
    for context in (False, True):
        print(f"context={context}:", ranking_metrics(model, chosen, scenes, context,
                                                     exchanges=exchanges))
    if args.listener:
        from base.config import Settings
        from engine.model_loading import load_model
        from engine.runtime import listener_for, local_engine
        from persona.pack import load_persona

        settings = Settings()
        choice = settings.reply_choice  # what the bot ranks with, unless told otherwise
        shortlist = args.shortlist or choice.canon_shortlist
        weight = args.listener_weight if args.listener_weight is not None \
            else choice.listener_weight
        tokens = args.listener_tokens or choice.listener_tokens
        settings = settings.with_overrides(listener="pmi", listener_tokens=tokens)
        persona = load_persona(settings.generation.persona)
        model_settings = settings.model
        from engine.llamacpp_engine import settle_torch_threads

        settle_torch_threads(settings)
        loaded = load_model(model_settings.base_model, model_settings.adapter_paths,
                            model_settings.device, model_settings.dtype,
                            model_settings.cache_dir)
        engine = local_engine(settings, loaded, persona)  # the bot's listener runs on it
        listener = listener_for(settings, loaded, persona, engine)
        if listener is None:
            raise SystemExit(f"no {model_settings.default_adapter} adapter for the listener")
        print(f"selector {shortlist} best + listener (weight {weight:g}, {tokens} tokens, "
              f"{getattr(engine, 'engine_name', '?')}):",
              listener_ranking_metrics(model, chosen, scenes, listener, persona, shortlist,
                                       weight, limit=args.limit, exchanges=exchanges))
    return 0
