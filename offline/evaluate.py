"""``drhouse eval``: does it sound like House, without echoes, loops or invented scenes?

Runs the same user messages through several systems and writes ``report.md``,
``metrics.json``, ``run.json``, ``chart.png`` and ``samples.jsonl`` into ``--out``:

    drhouse eval --limit 300 --out reports/eval                 # base, adapters, retrieval, human
    drhouse eval --split validation --limit 100 --systems house --set temperature=0.8 \\
        --out runs/tune/t08                                      # one tuning point
    drhouse eval --collect runs/tune/* --out reports/eval        # before/after table

Model systems generate exactly as the worker serves: `render_prompt` with the persona, one
``generate`` of the worker's engine (``LOCAL_ENGINE``) per batch of requests (``candidates``
rows each, fixed seeds), `reply_candidate` and `best_generated` (the worker's generated-mode
choice) with the configured reranker, the fallback line when nothing may be said.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from base.config import ROOT, Settings

if TYPE_CHECKING:
    from engine.generation import Generator
    from offline.quality import Sample
    from persona.canon import CanonPool
    from persona.pack import Controls, Persona

log = logging.getLogger(__name__)

HUMAN, RETRIEVAL, BASE = "human", "retrieval", "base"
CANON, HYBRID, DEFAULT, CLASSIC = "canon", "hybrid", "default", "house-classifier"
# Systems chosen from the default adapter's generations (and canon lines) by the bot's own
# reply choice, so they need no generation of their own.
DERIVED = (CANON, HYBRID, DEFAULT, CLASSIC)
DEFAULT_DATA_DIR = ROOT / "data" / "prepared"
DEFAULT_OUT = ROOT / "reports" / "eval"


@dataclass(frozen=True)
class Prompt:
    message: str
    reference: str | None = None


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="prepared splits (train.jsonl for the classifier and retrieval)")
    parser.add_argument("--split", default="test", choices=("test", "validation", "train"),
                        help="split whose anchors are the prompts (default test)")
    parser.add_argument("--prompts", type=Path,
                        help="a file with one user message per line instead of a split")
    parser.add_argument("--limit", type=int, default=300,
                        help="prompts to use, a seeded sample (default 300; 0 = all)")
    parser.add_argument("--systems",
                        help="comma-separated: default (what the bot answers with its shipped "
                             "settings), house (the adapter alone: best of n by fit x voice), "
                             "house-classifier (the adapter reranked by the persona classifier "
                             "only, the bot before the selector), canon, hybrid, base, other "
                             "adapter names, retrieval, human (default: all; human needs "
                             "prompts from a split)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and prompts")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="requests per generate() call, as the worker's BATCH_SIZE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a generation control (temperature=0.8, candidates=4…)")
    parser.add_argument("--reranker", choices=("persona", "none"),
                        help="candidate reranker (default: the RERANKER setting)")
    parser.add_argument("--classifier-dir", type=Path,
                        help="stored persona classifier (default models/persona-classifier)")
    parser.add_argument("--reranker-dir", type=Path,
                        help="classifier used for reranking when it should differ from the "
                             "judge (default: the same as --classifier-dir)")
    parser.add_argument("--retrain-classifier", action="store_true",
                        help="train the persona classifier on --data-dir and store it")
    parser.add_argument("--time-budget-min", type=float, default=0.0,
                        help="stop generating after this many minutes (checked between "
                             "batches) and report on the prompts every system answered")
    parser.add_argument("--also-no-rerank", action="store_true",
                        help="add '<system>-norerank': the first acceptable candidate of the "
                             "same generations, i.e. the reply without the reranker")
    parser.add_argument("--label", default="", help="a name for this run in tables")
    parser.add_argument("--reuse", type=Path, nargs="+", metavar="RUN_DIR",
                        help="take the systems not named in --systems from earlier runs on "
                             "the same prompts (their samples/ folders; the first run that has "
                             "a system wins) instead of recomputing")
    parser.add_argument("--rerank-reused", action="store_true",
                        help="choose the reused systems' replies again from their stored "
                             "candidates with this run's reranker (after a new classifier)")
    parser.add_argument("--judge-dir", type=Path,
                        help="the fit judge (default models/fit-judge); none there: no fit_score")
    parser.add_argument("--collect", nargs="+", type=Path, metavar="RUN_DIR",
                        help="only build tuning.md in --out from earlier runs' outputs")


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return overrides


def read_prompts(args: argparse.Namespace, max_chars: int) -> list[Prompt]:
    """The prompts of this run: a seeded sample of a split's anchors or a file's lines."""
    from persona.prompt import clean_user_text

    if args.prompts:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
        items = [Prompt(clean_user_text(line, max_chars)) for line in lines]
    else:
        from persona.dialogue import load_split

        try:
            records = load_split(args.data_dir, args.split)
        except FileNotFoundError as exc:
            raise SystemExit(f"{exc} (or pass --data-dir)") from None
        items = [Prompt(clean_user_text(r["anchor"], max_chars), r["response"])
                 for r in records]
    items = [p for p in items if p.message]
    if args.limit and args.limit < len(items):
        keep = sorted(random.Random(args.seed).sample(range(len(items)), args.limit))
        items = [items[i] for i in keep]
    return items


def prompt_seed(base: int, index: int) -> int:
    """Seed of a prompt's first candidate; candidate k uses seed + k (as the worker)."""
    return (base * 1_000_003 + index * 97) % (2**31 - 1)


def generate_replies(
    generator: Generator,
    persona: Persona,
    prompts: Sequence[Prompt],
    adapter: str,
    controls: Controls,
    seed: int,
    batch_size: int,
    scorer: Callable[[Sequence[str]], Sequence[float]] | None,
    token_budget: int,
    progress: Any = None,
    deadline: float | None = None,
    examples: Callable[[str], Sequence[tuple[str, str]]] | None = None,
) -> tuple[list[Sample], dict[str, float]]:
    """Answer every prompt the way the worker would; returns samples and timing totals.

    With ``deadline`` (a `time.monotonic` value), stops after the batch that passes it;
    ``examples`` gives House's real exchanges for a message (retrieve and refine)."""
    from engine.generation import GenerationJob
    from offline.quality import Sample
    from persona.postprocess import reply_candidate
    from persona.prompt import render_prompt
    from persona.reply_choice import best_generated

    samples: list[Sample] = []
    tokens, generate_s = 0, 0.0
    n = controls.candidates
    for start in range(0, len(prompts), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            log.warning("time budget spent: %d of %d prompts answered", start, len(prompts))
            break
        batch = prompts[start : start + batch_size]
        jobs = []
        for offset, item in enumerate(batch):
            prompt = render_prompt(generator.tokenizer, persona, [], item.message, "",
                                   token_budget,
                                   examples=examples(item.message) if examples else ())
            first = prompt_seed(seed, start + offset)
            jobs.extend(GenerationJob(prompt, adapter, controls, first + k, item.message)
                        for k in range(n))
        started = time.perf_counter()
        outputs = generator.generate(jobs)
        batch_ms = (time.perf_counter() - started) * 1000
        generate_s += batch_ms / 1000
        tokens += sum(o.tokens for o in outputs)
        for offset, item in enumerate(batch):
            rows = outputs[offset * n : (offset + 1) * n]
            rerank_started = time.perf_counter()
            candidates = [reply_candidate(o.text, o.finished, persona.other_speakers,
                                          controls.sentence_cap, persona.system_prompt)
                          for o in rows]
            best = best_generated(candidates, item.message, scorer)
            rerank_ms = (time.perf_counter() - rerank_started) * 1000
            chosen = rows[max(best, 0)]
            said = candidates[best] if best >= 0 else ""
            samples.append(Sample(
                message=item.message,
                reply=said or persona.line("fallback"),
                reference=item.reference,
                raw=chosen.text,
                hit_cap=not chosen.finished,
                fallback=not said,
                tokens=chosen.tokens,
                ms=batch_ms + rerank_ms,
                candidates=tuple((c, o.text, o.finished) for c, o in zip(candidates, rows,
                                                                         strict=True)),
            ))
        if progress is not None:
            progress.update(len(batch))
    return samples, {"tokens": tokens, "generate_s": generate_s}


def load_generator(settings: Settings, persona: Persona, adapters: dict[str, str]) -> Generator:
    """The serving model and engine (`load_model` + the worker's `LOCAL_ENGINE`) with only
    the adapters evaluated."""
    from engine.llamacpp_engine import settle_torch_threads
    from engine.model_loading import load_model
    from engine.runtime import local_engine

    model = settings.model
    settle_torch_threads(settings)
    loaded = load_model(model.base_model, adapters, model.device, model.dtype, model.cache_dir,
                        model.load_in_4bit)
    return local_engine(settings, loaded, persona)


def load_classifier(args: argparse.Namespace) -> Any:
    from persona.classifier import DEFAULT_DIR, ClassifierError, PersonaClassifier, build

    directory = args.classifier_dir or DEFAULT_DIR
    if not args.retrain_classifier:
        try:
            return PersonaClassifier.load(directory)
        except ClassifierError as exc:
            log.warning("%s; training one", exc)
    if not (args.data_dir / "train.jsonl").is_file():
        raise SystemExit(f"no classifier in {directory} and no {args.data_dir}/train.jsonl")
    return build(args.data_dir, directory)


def pick_systems(spec: str | None, adapters: Sequence[str], has_reference: bool) -> list[str]:
    systems = ([s.strip() for s in spec.split(",") if s.strip()] if spec
               else [BASE, *adapters, CLASSIC, CANON, HYBRID, DEFAULT, RETRIEVAL, HUMAN])
    known = {BASE, *adapters, *DERIVED, RETRIEVAL, HUMAN}
    unknown = [s for s in systems if s.removesuffix("-norerank") not in known]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(known))})")
    if HUMAN in systems and not has_reference:
        log.warning("no human replies for prompts from a file; 'human' skipped")
        systems.remove(HUMAN)
    return systems


def run(args: argparse.Namespace) -> int:
    from base.logging_setup import setup_logging
    from offline import eval_report

    settings = Settings()
    setup_logging(settings)
    if args.collect:
        path = eval_report.write_tuning(args.collect, args.out)
        print(f"wrote {path}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm

    from base.keys import BASE_VARIANT
    from offline.quality import Sample
    from offline.retrieval import RetrievalBaseline
    from persona.classifier import Embedder, read_split
    from persona.pack import load_persona

    persona = load_persona(settings.generation.persona)
    controls = persona.controls.merged(settings.generation.overrides()).merged(
        parse_sets(args.set))
    reranker = args.reranker or settings.generation.reranker
    check_data(args, settings)
    check_reuse(args.reuse or [])
    prompts = read_prompts(args, settings.frontend.max_message_chars)
    if not prompts:
        raise SystemExit("no prompts")
    has_reference = all(p.reference is not None for p in prompts)
    systems = pick_systems(args.systems, list(settings.model.adapter_paths), has_reference)
    adapter_name = settings.model.default_adapter
    derived = [s for s in systems if s in (*DERIVED, adapter_name)]
    generation_systems = list(dict.fromkeys(
        [s for s in systems if s not in (HUMAN, RETRIEVAL, *DERIVED)]
        + ([adapter_name] if any(s != CANON for s in derived) else [])))
    model_systems = generation_systems
    load_before = os.getloadavg()

    embedder = Embedder()
    classifier = load_classifier(args)
    scorer = None
    reranker_name = reranker + (f" ({display_path(args.reranker_dir)})"
                                if args.reranker_dir and reranker == "persona" else "")
    if reranker == "persona":
        from persona.classifier import PersonaClassifier

        ranker = (PersonaClassifier.load(args.reranker_dir) if args.reranker_dir
                  else classifier)
        scorer = ranker.score
    samples: dict[str, list[Sample]] = {}
    timing: dict[str, dict[str, Any]] = {}
    reused: set[str] = set()
    for directory in args.reuse or []:
        more, more_timing = reuse_run(directory, prompts,
                                      skip=[*samples, *(systems if args.systems else [])])
        reused |= set(more)
        if args.rerank_reused:
            for system, items in more.items():
                if items and items[0].candidates and not system.endswith("-norerank"):
                    more[system] = rechoose(items, persona, scorer)
                    more_timing[system]["reranker"] = reranker_name
        samples.update(more)
        timing.update(more_timing)
    deadline = (time.monotonic() + args.time_budget_min * 60) if args.time_budget_min else None
    refine = settings.reply_choice.refine_examples
    canon = None
    if derived or refine > 0:
        from engine.runtime import build_canon

        canon = build_canon(settings.with_overrides(reply_mode="hybrid"))
    to_generate = [s for s in model_systems if s not in samples]
    adapters = {k: v for k, v in settings.model.adapter_paths.items() if k in to_generate}
    generator = load_generator(settings, persona, adapters) if to_generate else None
    for system in list(dict.fromkeys([*systems, *generation_systems])):
        if system in samples or system in DERIVED:
            continue
        info: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2)}
        if system == HUMAN:
            samples[system] = [Sample(p.message, p.reference or "", p.reference) for p in prompts]
            continue
        if system == RETRIEVAL:
            index = RetrievalBaseline.from_split(args.data_dir / "train.jsonl", embedder)
            replies, ms = index.reply([p.message for p in prompts])
            samples[system] = [Sample(p.message, r, p.reference, ms=ms / len(prompts))
                               for p, r in zip(prompts, replies, strict=True)]
            timing[system] = {**info, "tokens": 0, "generate_s": ms / 1000}
            continue
        adapter = BASE_VARIANT if system == BASE else system
        if generator is None or (adapter != BASE_VARIANT and adapter not in generator.adapters):
            log.warning("adapter %s is not loaded; skipped", system)
            continue
        examples = None
        if adapter != BASE_VARIANT and refine > 0 and canon is not None:
            def examples(message: str) -> Sequence[tuple[str, str]]:
                return canon.examples(message, (), refine)
            info["refine_examples"] = refine
        with tqdm(total=len(prompts), desc=system, unit="prompt", file=sys.stderr) as bar:
            samples[system], totals = generate_replies(
                generator, persona, prompts, adapter, controls, args.seed, args.batch_size,
                scorer, settings.history.token_budget, bar, deadline, examples)
        timing[system] = {**info, **totals, "controls": controls.__dict__,
                          "reranker": reranker_name,
                          "load_after": round(os.getloadavg()[0], 2)}
    if derived:
        derive_systems(samples, timing, derived, adapter_name, prompts, persona, scorer,
                       settings, canon, controls.sentence_cap)
    # what was asked for, and what earlier runs brought (--reuse)
    samples = {s: v for s, v in samples.items()
               if s in systems or s in reused or s.endswith("-norerank")}
    if args.also_no_rerank:
        for system in [s for s in samples
                       if s not in (HUMAN, RETRIEVAL) and not s.endswith("-norerank")]:
            if samples[system] and samples[system][0].candidates:
                samples[f"{system}-norerank"] = without_reranker(samples[system], persona)
                timing.pop(f"{system}-norerank", None)
    samples = {s: samples[s] for s in order_systems(samples, list(settings.model.adapter_paths))}
    answered = min(len(items) for items in samples.values())
    if answered < len(prompts):
        log.warning("reporting on the %d prompts every system answered", answered)
        prompts = prompts[:answered]
        samples = {s: items[:answered] for s, items in samples.items()}

    house_train, _ = read_split(args.data_dir / "train.jsonl")
    auc_split = args.data_dir / f"{args.split}.jsonl"
    auc = (eval_report.classifier_auc(classifier, auc_split) if not args.prompts
           else classifier.meta.get("test_auc"))
    metrics = eval_report.compute_metrics(samples, timing, classifier, embedder,
                                          persona.other_speakers, controls.sentence_cap,
                                          house_train, auc)
    judge_meta = add_fit_scores(metrics, samples, args)
    for system, info in timing.items():
        if system in metrics and "pick_ms" in info:
            metrics[system]["pick_ms"] = info["pick_ms"]
    run_info = {
        "label": args.label,
        "command": "drhouse eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "prompts": display_path(args.prompts or auc_split),
        "n_prompts": len(prompts),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "controls": controls.__dict__,
        "reranker": reranker_name,
        "systems": timing,
        "reused_from": [display_path(d) for d in args.reuse or []],
        "base_model": settings.model.base_model,
        "adapters": {k: display_path(Path(v)) for k, v in adapters.items()},
        "classifier": classifier.meta,
        "fit_judge": judge_meta,
        "reply_mode": settings.reply_choice.mode,
        "cpu_count": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    paths = eval_report.write_outputs(args.out, metrics, run_info, samples)
    print(eval_report.summary_table(metrics))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def check_data(args: argparse.Namespace, settings: Settings) -> None:
    """Before anything runs for minutes: the prepared splits must be there (the metrics,
    retrieval and canon need train.jsonl). The default directory is prepared from
    HOUSE_DATA when it is missing, as the worker does; another one is the user's to make."""
    if (args.data_dir / "train.jsonl").is_file():
        return
    if args.data_dir.resolve() == settings.reply_choice.data_dir.resolve():
        from engine.runtime import ensure_prepared

        try:
            ensure_prepared(settings)
            return
        except FileNotFoundError as exc:
            raise SystemExit(f"drhouse eval: no prepared data in {args.data_dir} and none to "
                             f"prepare ({exc}); run `drhouse data prepare --input CSV`") from exc
    raise SystemExit(f"drhouse eval: {args.data_dir}/train.jsonl not found: run `drhouse data "
                     f"prepare --out {args.data_dir}` or pass --data-dir")


def check_reuse(directories: Sequence[Path]) -> None:
    """Before anything runs for minutes: every ``--reuse`` folder must be an earlier run's
    output (its run.json and samples/*.jsonl)."""
    for directory in directories:
        if not (directory / "run.json").is_file():
            raise SystemExit(f"drhouse eval --reuse {directory}: no run.json there; give the "
                             "--out folder of an earlier `drhouse eval`")
        if not any((directory / "samples").glob("*.jsonl")):
            raise SystemExit(f"drhouse eval --reuse {directory}: no samples/*.jsonl there")


def hears_listener(system: str) -> bool:
    """Whether the bot's reply choice for ``system`` asks the listener: the worker's does in
    every mode (canon lines and generated candidates alike, `engine.output`); only the
    classifier-only system (the bot before the selector) does not."""
    return system != CLASSIC


def derive_systems(samples: dict[str, list[Sample]], timing: dict[str, dict[str, Any]],
                   systems: Sequence[str], adapter: str, prompts: Sequence[Prompt],
                   persona: Persona, scorer: Callable[[Sequence[str]], Sequence[float]] | None,
                   settings: Settings, canon: CanonPool | None, sentence_cap: int = 3) -> None:
    """The systems the bot's reply choice makes from the adapter's generations (kept with
    their candidates) and the canon pool, through `persona.reply_choice.pick` as the worker
    calls it (no history: every prompt opens a conversation)."""
    from engine.model_loading import load_model
    from engine.runtime import listener_for
    from offline.quality import Sample
    from persona.prompt import render_prompt
    from persona.reply_choice import (
        GENERATED,
        Candidate,
        CanonScores,
        canned_reply,
        pick,
        sure_canon,
    )

    generated = samples.get(adapter)
    listener = None
    if canon is None:
        log.warning("no selector or canon pool: canon and hybrid systems skipped")
    elif settings.reply_choice.listener == "pmi" and any(map(hears_listener, systems)):
        model = settings.model
        loaded = load_model(model.base_model, {adapter: model.adapter_paths[adapter]},
                            model.device, model.dtype, model.cache_dir)
        listener = listener_for(settings.with_overrides(default_adapter=adapter), loaded,
                                persona)
    modes = {CLASSIC: None, adapter: GENERATED, CANON: "canon", HYBRID: "hybrid",
             DEFAULT: settings.reply_choice.mode}
    for system in systems:
        mode = modes[system]
        if mode is None:
            if generated is not None:
                samples[CLASSIC] = list(generated)
                timing[CLASSIC] = {**timing.get(adapter, {}), "reranker": "persona only"}
            continue
        if canon is None and mode != GENERATED:
            continue
        if generated is None and mode != "canon":
            log.warning("%s needs the %s adapter's generations; skipped", system, adapter)
            continue
        out, picks = [], []
        for i, prompt in enumerate(prompts):
            source = generated[i] if generated is not None else None
            candidates = [Candidate(c[0], GENERATED, source=k)
                          for k, c in enumerate(source.candidates)] if source else []
            started = time.perf_counter()
            canned = canned_reply(persona, prompt.message, i,
                                  differentials=settings.reply_choice.differentials,
                                  topics=settings.reply_choice.topics)
            if canned is not None:  # as the worker: a jab or a written answer, nothing generated
                out.append(Sample(message=prompt.message, reply=canned[1],
                                  reference=prompt.reference, ms=0.0, won=canned[0]))
                continue
            heard = None
            if listener is not None:
                rendered = render_prompt(listener.tokenizer, persona, [], prompt.message)

                def heard(texts: Sequence[str], rendered: str = rendered) -> Sequence[float]:
                    return listener.pmi(rendered, texts)
            choice = dict(sentence_cap=sentence_cap, listener=heard,
                          shortlist=settings.reply_choice.canon_shortlist,
                          listener_weight=settings.reply_choice.listener_weight)
            scores = CanonScores()
            sure = None  # as the worker: a canon line sure to win, nothing generated
            if mode == "hybrid":
                sure = sure_canon(prompt.message, canon, settings.reply_choice.hybrid_sure_fit,
                                  settings.reply_choice.hybrid_sure_cosine, scores,
                                  settings.reply_choice.canon_candidates, **choice)
            winner = sure or pick(mode, prompt.message, candidates if mode != "canon" else [],
                                  canon, scorer, settings.reply_choice.canon_candidates,
                                  scores=scores, **choice)
            pick_ms = (time.perf_counter() - started) * 1000
            picks.append(pick_ms)
            text = winner.text if winner is not None else persona.line("fallback")
            chosen = (source.candidates[winner.source] if source and winner is not None
                      and winner.kind == GENERATED else None)
            generated_too = source is not None and mode != "canon" and sure is None
            out.append(Sample(
                message=prompt.message, reply=text, reference=prompt.reference,
                raw=chosen[1] if chosen else text,
                hit_cap=not chosen[2] if chosen else False,
                fallback=winner is None, tokens=source.tokens if generated_too else 0,
                ms=(source.ms or 0.0) + pick_ms if generated_too else pick_ms,
                candidates=source.candidates if generated_too else (),
                won=winner.kind if winner is not None else None))
        samples[system] = out
        timing[system] = {**(timing.get(adapter, {}) if mode != "canon" else {}),
                          "mode": mode, "pick_ms": round(sum(picks) / max(len(picks), 1), 1),
                          "generated_share": round(sum(bool(s.candidates) for s in out)
                                                   / max(len(out), 1), 3)}


def add_fit_scores(metrics: dict[str, Any], samples: dict[str, list[Sample]],
                   args: argparse.Namespace) -> dict[str, Any] | None:
    """``fit_score`` of every system: the percentile of its reply among 99 other House replies
    of the split (the same 99 for every system) by the fit judge."""
    from offline.judge import DEFAULT_DIR, FitJudge, JudgeError, other_replies, percentile

    try:
        judge = FitJudge.load(args.judge_dir or DEFAULT_DIR)
    except JudgeError as exc:
        log.warning("%s: no fit_score", exc)
        return None
    split = "test" if args.prompts else args.split
    pool = [json.loads(line)["response"] for line in
            (args.data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    first = next(iter(samples.values()))
    messages = [s.message for s in first]
    own = [pool.index(s.reference) if s.reference in pool else None for s in first]
    others = other_replies(len(messages), pool, own, args.seed)
    log.info("fit judge: scoring %d messages x %d other replies", len(messages), len(others[0]))
    other_scores = judge.score([(m, r) for m, group in zip(messages, others, strict=True)
                                for r in group], progress=True)
    width = len(others[0])
    for system, items in samples.items():
        scores = judge.score([(m, s.reply) for m, s in zip(messages, items, strict=True)])
        pcts = [percentile(x, other_scores[i * width : (i + 1) * width])
                for i, x in enumerate(scores)]
        metrics[system]["fit_score"] = round(sum(pcts) / len(pcts), 4)
    return {**judge.meta, "others": f"{width} other replies of the {split} split, seed "
                                    f"{args.seed}"}


def without_reranker(samples: Sequence[Sample], persona: Persona) -> list[Sample]:
    """The replies the same generations give when no scorer ranks the candidates."""
    return rechoose(samples, persona, None)


def rechoose(samples: Sequence[Sample], persona: Persona,
             scorer: Callable[[Sequence[str]], Sequence[float]] | None) -> list[Sample]:
    """The replies the same generations give with ``scorer`` as the reranker: generation does
    not depend on the reranker, so a new classifier needs no new generations."""
    from persona.reply_choice import best_generated

    out = []
    for s in samples:
        texts = [c[0] for c in s.candidates]
        best = best_generated(texts, s.message, scorer)
        _, raw, finished = s.candidates[max(best, 0)]
        said = texts[best] if best >= 0 else ""
        out.append(dataclasses.replace(s, reply=said or persona.line("fallback"),
                                       raw=raw, hit_cap=not finished, fallback=not said))
    return out


def order_systems(systems: Sequence[str], adapters: Sequence[str]) -> list[str]:
    """base, adapters, other model systems, retrieval, human."""
    rank = {BASE: 0, **{a: 1 for a in adapters}, RETRIEVAL: 3, HUMAN: 4}
    return sorted(systems, key=lambda s: (rank.get(s.split("-norerank")[0], 2), s))


def reuse_run(directory: Path, prompts: Sequence[Prompt], skip: Sequence[str]
              ) -> tuple[dict[str, list[Sample]], dict[str, dict[str, Any]]]:
    """Samples and timing of an earlier run's systems (except ``skip``); its prompts must be
    this run's prompts."""
    from offline.quality import Sample

    run = json.loads((directory / "run.json").read_text(encoding="utf-8"))
    samples, timing = {}, {}
    for path in sorted((directory / "samples").glob("*.jsonl")):
        if path.stem in skip:
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        theirs, ours = [r["message"] for r in rows], [p.message for p in prompts]
        n = min(len(theirs), len(ours))
        if not n or theirs[:n] != ours[:n]:
            raise SystemExit(f"{path}: other prompts than this run's (same --split, --limit, "
                             "--seed, --prompts?)")
        samples[path.stem] = [Sample(**{**r, "candidates": tuple(tuple(c) for c in
                                                                 r.get("candidates", []))})
                              for r in rows]
        timing[path.stem] = {**run.get("systems", {}).get(path.stem, {}),
                             "reused_from": display_path(directory)}
    return samples, timing


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
