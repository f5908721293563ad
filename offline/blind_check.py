"""``drhouse blind``: a reader does the persona classifier's job blind, on the same lines.

The classifier's AUC says little on its own: how well can *anyone* tell House's lines from
the lines said to him, one line at a time, without the scene? And does a reader hear more
House in the adapter's replies than in the base model's, where the classifier hears none?

    drhouse blind lines --n 200 --out runs/blind/lines      # lines.txt: text only, no speaker
    drhouse blind pairs --run reports/eval --systems base,house --n 60 --out runs/blind/pairs
    drhouse blind many --run reports/eval --systems base,house,retrieval,default --n 60 \
        --out runs/blind/many
    # the reader writes labels.txt next to it: one answer per item, in order
    #   lines: 0 (not House) … 1 (House), e.g. 0, 0.25, 0.5, 0.75, 1
    #   pairs: A or B (which reply sounds more like House), = for no difference
    #   many: one line per message: FIT/VOICE for each shown reply in order (each 0..1: does it
    #         answer this message? is it House?), then the number of the best reply
    drhouse blind score runs/blind/lines [more dirs of the same kind: pooled] [--out FILE]

In ``many`` the systems' replies to each message are shuffled and numbered; systems that gave
the same text share one number (and its scores). ``score`` reports, per system, mean fit and
voice, how often it gave the best reply, and head to head against each other system (the reply
with the higher fit + voice wins, ties and equal texts count half).

``key.json`` (who said what, which system is A) sits beside the texts; a reader must not open
it. ``score`` prints the reader's and the classifier's figures on the same items with
bootstrap 95% intervals and writes ``result.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from base.config import ROOT

if TYPE_CHECKING:  # numpy is not in the slim frontend image, which imports every subcommand
    import numpy as np

DEFAULT_DATA_DIR = ROOT / "data" / "prepared"
KEY_FILE, LABELS_FILE, RESULT_FILE = "key.json", "labels.txt", "result.json"
LINES_FILE, PAIRS_FILE, MANY_FILE = "lines.txt", "pairs.txt", "many.txt"
PAIR_ANSWERS = {"a": 1.0, "b": 0.0, "=": 0.5}
BOOTSTRAP_ROUNDS = 2000


class BlindError(ValueError):
    """Missing or mismatched files, or answers that cannot be read."""


def sample_lines(records: Sequence[dict[str, Any]], n: int, seed: int,
                 exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``n // 2`` House replies and ``n - n // 2`` anchors of distinct records (none whose id
    is in ``exclude``), shuffled."""
    rng = random.Random(seed)
    records = [r for r in records if r["id"] not in exclude]
    if n > len(records):
        raise BlindError(f"asked for {n} lines from {len(records)} records")
    chosen = rng.sample(list(records), n)
    items = [{"id": r["id"], "field": "response", "text": r["response"], "house": 1}
             for r in chosen[:n // 2]]
    items += [{"id": r["id"], "field": "anchor", "text": r["anchor"], "house": 0}
              for r in chosen[n // 2:]]
    rng.shuffle(items)
    return items


def sample_pairs(first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]],
                 names: tuple[str, str], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` messages both systems answered, each system shown as A or B at random."""
    if [r["message"] for r in first] != [r["message"] for r in second]:
        raise BlindError("the two systems answered different messages")
    rng = random.Random(seed)
    indices = rng.sample(range(len(first)), min(n, len(first)))
    items = []
    for i in indices:
        flip = rng.random() < 0.5
        (a, a_row), (b, b_row) = ([(names[1], second[i]), (names[0], first[i])] if flip
                                  else [(names[0], first[i]), (names[1], second[i])])
        items.append({"index": i, "message": first[i]["message"], "a": a, "b": b,
                      "a_text": a_row["reply"], "b_text": b_row["reply"]})
    return items


def message_digest(message: str) -> str:
    """What a key keeps of a message (the text quotes the data set): the same message in
    another eval run, of other prompts, has the same digest."""
    return hashlib.sha1(" ".join(message.split()).encode()).hexdigest()[:16]


def sample_many(rows: dict[str, Sequence[dict[str, Any]]], n: int, seed: int,
                exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``n`` messages every system answered (none whose `message_digest` is in ``exclude``:
    an earlier reading's); per message the distinct replies, shuffled, each with the systems
    that gave it."""
    names = list(rows)
    messages = [r["message"] for r in rows[names[0]]]
    for name in names[1:]:
        if [r["message"] for r in rows[name]] != messages:
            raise BlindError(f"{name} answered other messages than {names[0]}")
    rng = random.Random(seed)
    items = []
    free = [i for i in range(len(messages)) if message_digest(messages[i]) not in exclude]
    for i in rng.sample(free, min(n, len(free))):
        options: dict[str, list[str]] = {}
        for name in names:
            options.setdefault(" ".join(rows[name][i]["reply"].split()), []).append(name)
        shown = list(options.items())
        rng.shuffle(shown)
        items.append({"index": i, "message": messages[i],
                      "message_sha": message_digest(messages[i]),
                      "options": [{"text": t, "systems": s} for t, s in shown]})
    return items


def read_many_answers(path: Path, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per message: ``fit`` and ``voice`` per shown option and the ``best`` option index."""
    try:
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8")
                 .splitlines()]
    except OSError as exc:
        raise BlindError(f"no answers: {exc}") from exc
    lines = [ln for ln in lines if ln]
    if len(lines) != len(items):
        raise BlindError(f"{path} has {len(lines)} answer lines for {len(items)} messages")
    answers = []
    for number, (line, item) in enumerate(zip(lines, items, strict=True)):
        tokens = line.split()
        width = len(item["options"])
        if len(tokens) != width + 1:
            raise BlindError(f"{path}, message {number}: expected {width} FIT/VOICE answers "
                             f"and the best reply's number, got {line!r}")
        fit, voice = [], []
        for token in tokens[:width]:
            try:
                f, v = (float(x) for x in token.split("/"))
            except ValueError as exc:
                raise BlindError(f"{path}, message {number}: cannot read {token!r} as "
                                 "FIT/VOICE") from exc
            if not (0 <= f <= 1 and 0 <= v <= 1):
                raise BlindError(f"{path}, message {number}: {token!r} is outside 0..1")
            fit.append(f)
            voice.append(v)
        try:
            best = int(tokens[-1]) - 1
        except ValueError as exc:
            raise BlindError(f"{path}, message {number}: the best reply's number, not "
                             f"{tokens[-1]!r}") from exc
        if not 0 <= best < width:
            raise BlindError(f"{path}, message {number}: no reply number {best + 1}")
        answers.append({"fit": fit, "voice": voice, "best": best})
    return answers


def score_many(items: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]]
               ) -> dict[str, Any]:
    """Per system: mean fit and voice, share of messages where it gave the best reply, and
    head-to-head shares against each other system."""
    import numpy as np

    names = sorted({s for it in items for opt in it["options"] for s in opt["systems"]})
    n = len(items)
    fit = {name: np.zeros(n) for name in names}
    voice = {name: np.zeros(n) for name in names}
    best = {name: np.zeros(n) for name in names}
    for i, (item, answer) in enumerate(zip(items, answers, strict=True)):
        for k, opt in enumerate(item["options"]):
            for name in opt["systems"]:
                fit[name][i], voice[name][i] = answer["fit"][k], answer["voice"][k]
                best[name][i] = float(k == answer["best"])
    result: dict[str, Any] = {"n": n, "systems": {}}
    for name in names:
        total = fit[name] + voice[name]
        heads = {}
        for other in names:
            if other == name:
                continue
            theirs = fit[other] + voice[other]
            wins = np.where(total > theirs, 1.0, np.where(total < theirs, 0.0, 0.5))
            heads[other] = {"wins": round(float(wins.mean()), 3),
                            "wins_ci": bootstrap(lambda i, w=wins: float(w[i].mean()), n)}
        result["systems"][name] = {
            "fit": round(float(fit[name].mean()), 3),
            "voice": round(float(voice[name].mean()), 3),
            "best": int(best[name].sum()),
            "best_share": round(float(best[name].mean()), 3),
            "best_share_ci": bootstrap(lambda i, b=best[name]: float(b[i].mean()), n),
            "head_to_head": heads,
        }
    return result


def read_answers(path: Path, kind: str, count: int) -> np.ndarray:
    """The reader's answers, whitespace-separated, in item order."""
    import numpy as np

    try:
        tokens = path.read_text(encoding="utf-8").split()
    except OSError as exc:
        raise BlindError(f"no answers: {exc}") from exc
    if len(tokens) != count:
        raise BlindError(f"{path} has {len(tokens)} answers for {count} items")
    values = []
    for token in tokens:
        try:
            value = (PAIR_ANSWERS[token.lower()] if kind == "pairs" else float(token))
        except (KeyError, ValueError) as exc:
            raise BlindError(f"{path}: cannot read the answer {token!r}") from exc
        if not 0.0 <= value <= 1.0:
            raise BlindError(f"{path}: answer {token!r} is outside 0..1")
        values.append(value)
    return np.array(values)


def bootstrap(stat: Any, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``stat(indices)`` over resampled items."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP_ROUNDS):
        value = stat(rng.integers(0, n, n))
        if value is not None:
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return round(float(low), 3), round(float(high), 3)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return None if labels.min() == labels.max() else float(roc_auc_score(labels, scores))


def score_lines(items: Sequence[dict[str, Any]], reader: np.ndarray,
                classifier: np.ndarray) -> dict[str, Any]:
    """AUC of the reader and of the classifier on the same lines, the difference, and how
    often each reader score was right."""
    import numpy as np

    labels = np.array([item["house"] for item in items])
    n = len(labels)

    def diff(i: np.ndarray) -> float | None:
        a, b = _auc(labels[i], reader[i]), _auc(labels[i], classifier[i])
        return None if a is None or b is None else a - b

    if labels.min() == labels.max():
        raise BlindError("the lines need both House's and other speakers' lines")
    return {
        "n": n,
        "reader_auc": round(float(_auc(labels, reader)), 3),
        "reader_auc_ci": bootstrap(lambda i: _auc(labels[i], reader[i]), n),
        "classifier_auc": round(float(_auc(labels, classifier)), 3),
        "classifier_auc_ci": bootstrap(lambda i: _auc(labels[i], classifier[i]), n),
        "reader_minus_classifier_ci": bootstrap(diff, n),
        "by_reader_score": {f"{v:g}": {"n": int((reader == v).sum()),
                                        "share_house": round(float(labels[reader == v].mean()), 3)}
                            for v in sorted(set(reader.tolist()))},
    }


def score_pairs(items: Sequence[dict[str, Any]], reader: np.ndarray,
                classifier: np.ndarray) -> dict[str, Any]:
    """For each system, the share of pairs where the reader (and the classifier) hear more
    House in its reply (ties count half), and how often the two judges agree."""
    import numpy as np

    names = sorted({items[0]["a"], items[0]["b"]})
    n = len(items)

    def for_system(values: np.ndarray, name: str) -> np.ndarray:
        return np.array([v if it["a"] == name else 1.0 - v
                         for it, v in zip(items, values, strict=True)])

    decided = reader != 0.5
    agree = ((reader > 0.5) == (classifier > 0.5))[decided]
    result: dict[str, Any] = {"n": n, "reader_ties": int((~decided).sum()),
                              "agreement_where_reader_decided":
                                  round(float(agree.mean()), 3) if agree.size else None}
    for name in names:
        mine = for_system(reader, name)
        result[name] = {
            "reader_prefers": round(float(mine.mean()), 3),
            "reader_prefers_ci": bootstrap(lambda i, m=mine: float(m[i].mean()), n),
            "classifier_prefers": round(float(for_system(classifier, name).mean()), 3),
        }
    return result


def classifier_answers(kind: str, items: Sequence[dict[str, Any]], scorer: Any) -> np.ndarray:
    """The classifier's answer to each item: P(House), or for pairs 1 when A scores higher."""
    import numpy as np

    if kind == "lines":
        return np.asarray(scorer([it["text"] for it in items]), dtype=float)
    a = np.asarray(scorer([it["a_text"] for it in items]), dtype=float)
    b = np.asarray(scorer([it["b_text"] for it in items]), dtype=float)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def write_task(out: Path, kind: str, items: list[dict[str, Any]], source: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "lines":
        text = "".join(f"{i}\t{it['text']}\n" for i, it in enumerate(items))
        task = out / LINES_FILE
    elif kind == "many":
        text = "".join(f"[{i}] MESSAGE: {it['message']}\n" + "".join(
            f"    {k + 1}. {opt['text']}\n" for k, opt in enumerate(it["options"])) + "\n"
            for i, it in enumerate(items))
        task = out / MANY_FILE
    else:
        text = "".join(f"{i}\tMESSAGE: {it['message']}\n{i}\tA: {it['a_text']}\n"
                       f"{i}\tB: {it['b_text']}\n\n" for i, it in enumerate(items))
        task = out / PAIRS_FILE
    task.write_text(text, encoding="utf-8")
    if kind == "many":  # the key names systems only: the texts (the data set's) stay in the task
        items = [{"index": it["index"], "message_sha": it["message_sha"],
                  "options": [{"systems": o["systems"]}
                                                    for o in it["options"]]} for it in items]
    (out / KEY_FILE).write_text(json.dumps({"kind": kind, **source, "items": items},
                                           indent=1) + "\n", encoding="utf-8")
    return task


def read_digests(directories: Sequence[Path]) -> frozenset[str]:
    """The messages of earlier ``many`` readings, by `message_digest` (an item's index is its
    place in one eval run's prompts, which another run's --limit or --seed changes)."""
    digests = set()
    for directory in directories:
        for item in read_key(directory)["items"]:
            if "message_sha" not in item:
                raise BlindError(f"{directory / KEY_FILE} names its messages by index only; "
                                 "add their message_sha to exclude them")
            digests.add(item["message_sha"])
    return frozenset(digests)


def read_key(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BlindError(f"no readable {KEY_FILE} in {directory}: {exc}") from exc


def load_task(directory: Path) -> tuple[str, list[dict[str, Any]], Any]:
    key = read_key(directory)
    if key["kind"] == "many":
        return "many", key["items"], read_many_answers(directory / LABELS_FILE, key["items"])
    answers = read_answers(directory / LABELS_FILE, key["kind"], len(key["items"]))
    return key["kind"], key["items"], answers


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="blind_action", metavar="ACTION", required=True)
    lines = sub.add_parser("lines", help="sample single lines of a split, speaker hidden")
    lines.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    lines.add_argument("--split", default="test", choices=("test", "validation"))
    lines.add_argument("--exclude", type=Path, nargs="*", default=[],
                       help="earlier task folders whose records are not sampled again")
    pairs = sub.add_parser("pairs", help="sample two systems' replies to the same messages")
    pairs.add_argument("--run", type=Path, required=True,
                       help="a drhouse eval output folder (its samples/ are read)")
    pairs.add_argument("--systems", default="base,house", help="two systems of that run")
    many = sub.add_parser("many", help="several systems' replies to the same messages: fit "
                                       "and voice per reply, the best one")
    many.add_argument("--run", type=Path, nargs="+", required=True,
                      help="drhouse eval output folders (their samples/ are read; the first "
                           "that has a system wins)")
    many.add_argument("--systems", default="base,house-classifier,retrieval,default",
                      help="systems of those runs, comma-separated")
    many.add_argument("--exclude", type=Path, nargs="*", default=[],
                      help="earlier task folders whose messages are not sampled again")
    for p in (lines, pairs, many):
        p.add_argument("--n", type=int, default=200, help="how many items")
        p.add_argument("--seed", type=int, default=2026)
        p.add_argument("--out", type=Path, required=True, help="folder for the task and key")
    score = sub.add_parser("score", help="reader vs classifier on the labelled items")
    score.add_argument("dirs", type=Path, nargs="+",
                       help="task folders with labels.txt (same kind; pooled)")
    score.add_argument("--classifier", type=Path, help="classifier folder (default: shipped)")
    score.add_argument("--out", type=Path,
                       help=f"result file (default: the first folder's {RESULT_FILE})")


def _read_records(directory: Path, name: str) -> list[dict[str, Any]]:
    """``name``.jsonl of a prepared-data or samples folder."""
    from persona.dialogue import load_split

    try:
        return load_split(directory, name)
    except (OSError, ValueError) as exc:
        raise BlindError(f"cannot read {directory / name}.jsonl: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BlindError as exc:
        print(f"drhouse blind: {exc}")
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.blind_action == "lines":
        records = _read_records(args.data_dir, args.split)
        seen = frozenset(it["id"] for d in args.exclude for it in read_key(d)["items"])
        items = sample_lines(records, args.n, args.seed, seen)
        task = write_task(args.out, "lines", items, {"split": args.split, "seed": args.seed})
    elif args.blind_action == "pairs":
        names = tuple(s.strip() for s in args.systems.split(","))
        if len(names) != 2:
            raise BlindError("--systems needs two systems, e.g. base,house")
        rows = [_read_records(args.run / "samples", s) for s in names]
        items = sample_pairs(rows[0], rows[1], (names[0], names[1]), args.n, args.seed)
        task = write_task(args.out, "pairs", items, {"run": str(args.run), "seed": args.seed})
    elif args.blind_action == "many":
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
        if len(names) < 2:
            raise BlindError("--systems needs at least two systems")
        rows = {}
        for name in names:
            folder = next((r for r in args.run if (r / "samples" / f"{name}.jsonl").is_file()),
                          None)
            if folder is None:
                raise BlindError(f"no samples/{name}.jsonl in {', '.join(map(str, args.run))}")
            rows[name] = _read_records(folder / "samples", name)
        items = sample_many(rows, args.n, args.seed, read_digests(args.exclude))
        task = write_task(args.out, "many", items, {"runs": [str(r) for r in args.run],
                                                    "seed": args.seed})
    else:
        return _score(args)
    print(f"{task}: {len(items)} items. Write one answer per item into "
          f"{args.out / LABELS_FILE} without opening {args.out / KEY_FILE}, then: "
          f"drhouse blind score {args.out}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from persona.classifier import DEFAULT_DIR, PersonaClassifier

    tasks = [load_task(d) for d in args.dirs]
    kinds = {kind for kind, _, _ in tasks}
    if len(kinds) != 1:
        raise BlindError("pool folders of one kind only (lines, pairs or many)")
    kind = kinds.pop()
    items = [it for _, its, _ in tasks for it in its]
    if kind == "many":
        result = score_many(items, [a for _, _, answers in tasks for a in answers])
        out = args.out or args.dirs[0] / RESULT_FILE
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2))
        return 0
    reader = np.concatenate([answers for _, _, answers in tasks])
    clf = PersonaClassifier.load(args.classifier or DEFAULT_DIR)
    machine = classifier_answers(kind, items, clf.score)
    result = (score_lines(items, reader, machine) if kind == "lines"
              else score_pairs(items, reader, machine))
    result["classifier"] = {k: clf.meta.get(k) for k in ("validation_auc", "test_auc",
                                                          "train_sha256")}
    out = args.out or args.dirs[0] / RESULT_FILE
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0
