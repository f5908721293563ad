"""``drhouse blind``: sampling hides the speaker, answers are read strictly, scores are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from offline.blind_check import (
    BlindError,
    read_answers,
    sample_lines,
    sample_pairs,
    score_lines,
    score_pairs,
)

RECORDS = [{"id": f"p{i}", "anchor": f"Someone asks question {i}?",
            "response": f"House answers {i}."} for i in range(40)]


def test_lines_are_half_house_and_hide_the_speaker(tmp_path: Path) -> None:
    items = sample_lines(RECORDS, 10, seed=1)
    assert sum(it["house"] for it in items) == 5
    assert len({it["id"] for it in items}) == 10  # one line per record: no pair gives itself away
    assert items == sample_lines(RECORDS, 10, seed=1)
    again = sample_lines(RECORDS, 10, seed=2, exclude=frozenset(it["id"] for it in items))
    assert not {it["id"] for it in again} & {it["id"] for it in items}
    with pytest.raises(BlindError):
        sample_lines(RECORDS, 41, seed=1)


def test_pairs_show_each_system_as_a_and_as_b() -> None:
    base = [{"message": f"m{i}", "reply": f"base {i}"} for i in range(30)]
    house = [{"message": f"m{i}", "reply": f"house {i}"} for i in range(30)]
    items = sample_pairs(base, house, ("base", "house"), 30, seed=0)
    assert {it["a"] for it in items} == {"base", "house"}
    for it in items:
        assert it["a_text"].startswith(it["a"]) and it["b_text"].startswith(it["b"])
    with pytest.raises(BlindError):
        sample_pairs(base, house[::-1], ("base", "house"), 5, seed=0)


def test_answers_are_read_strictly(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("A b\n=\n")
    assert read_answers(path, "pairs", 3).tolist() == [1.0, 0.0, 0.5]
    path.write_text("0 0.25\n1")
    assert read_answers(path, "lines", 3).tolist() == [0.0, 0.25, 1.0]
    with pytest.raises(BlindError, match="2 answers for 3"):
        path.write_text("0 1")
        read_answers(path, "lines", 3)
    with pytest.raises(BlindError, match="outside"):
        path.write_text("0 1 2")
        read_answers(path, "lines", 3)
    with pytest.raises(BlindError, match="cannot read"):
        path.write_text("A maybe B")
        read_answers(path, "pairs", 3)


def test_line_scores() -> None:
    items = [{"house": h} for h in (1, 1, 0, 0)]
    perfect = np.array([1.0, 0.75, 0.25, 0.0])
    backwards = np.array([0.0, 0.2, 0.8, 0.9])
    result = score_lines(items, perfect, backwards)
    assert result["reader_auc"] == 1.0 and result["classifier_auc"] == 0.0
    assert result["by_reader_score"]["1"] == {"n": 1, "share_house": 1.0}


def test_pair_scores_follow_the_system_not_the_letter() -> None:
    items = [{"a": "house", "b": "base"}, {"a": "base", "b": "house"},
             {"a": "base", "b": "house"}, {"a": "house", "b": "base"}]
    reader = np.array([1.0, 0.0, 0.5, 1.0])  # house, house, tie, house
    classifier = np.array([0.0, 0.0, 1.0, 1.0])  # base, house, base, house
    result = score_pairs(items, reader, classifier)
    assert result["house"]["reader_prefers"] == pytest.approx(3.5 / 4)
    assert result["base"]["reader_prefers"] == pytest.approx(0.5 / 4)
    assert result["house"]["classifier_prefers"] == 0.5
    assert result["reader_ties"] == 1
    assert result["agreement_where_reader_decided"] == pytest.approx(2 / 3, abs=1e-3)


def test_command_round_trip_with_the_shipped_classifier(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    task = tmp_path / "task"
    assert main(["blind", "lines", "--data-dir", str(data), "--n", "8", "--out",
                 str(task)]) == 0
    key = json.loads((task / "key.json").read_text())
    shown = [line.split("\t") for line in (task / "lines.txt").read_text().splitlines()]
    assert shown == [[str(i), it["text"]] for i, it in enumerate(key["items"])]  # nothing else
    (task / "labels.txt").write_text(" ".join(str(it["house"]) for it in key["items"]))
    capsys.readouterr()
    assert main(["blind", "score", str(task)]) == 0
    result = json.loads((task / "result.json").read_text())
    assert result["reader_auc"] == 1.0 and 0.0 <= result["classifier_auc"] <= 1.0
    (task / "labels.txt").write_text("1 0")
    assert main(["blind", "score", str(task)]) == 2
    assert "2 answers for 8" in capsys.readouterr().out


def test_many_shuffles_systems_merges_equal_replies_and_scores_fit_voice_best(
        tmp_path: Path) -> None:
    from offline.blind_check import read_many_answers, sample_many, score_many

    rows = {name: [{"message": f"m{i}", "reply": f"{name} {i}"} for i in range(20)]
            for name in ("base", "house", "retrieval")}
    rows["default"] = [{"message": f"m{i}", "reply": f"retrieval {i}"} for i in range(20)]
    items = sample_many(rows, 20, seed=3)
    assert all(len(it["options"]) == 3 for it in items)  # default == retrieval: one option
    shared = [opt for opt in items[0]["options"] if len(opt["systems"]) == 2]
    assert shared and sorted(shared[0]["systems"]) == ["default", "retrieval"]
    firsts = {it["options"][0]["systems"][0] for it in items}
    assert len(firsts) > 1  # the order is shuffled per message
    # the reader: retrieval/default fits (1/1) and is best; house 0.5/1; base 0/0
    lines = []
    for it in items:
        scores = {"base": "0/0", "house": "0.5/1", "retrieval": "1/1"}
        tokens = [scores[opt["systems"][0] if opt["systems"][0] != "default" else "retrieval"]
                  for opt in it["options"]]
        best = next(k for k, opt in enumerate(it["options"]) if "retrieval" in opt["systems"])
        lines.append(" ".join(tokens) + f" {best + 1}")
    labels = tmp_path / "labels.txt"
    labels.write_text("# fit/voice per reply, then the best\n" + "\n".join(lines) + "\n")
    result = score_many(items, read_many_answers(labels, items))
    systems = result["systems"]
    assert systems["default"]["best_share"] == 1.0 and systems["base"]["best"] == 0
    assert systems["house"]["fit"] == 0.5 and systems["house"]["voice"] == 1.0
    assert systems["default"]["head_to_head"]["retrieval"]["wins"] == 0.5  # same text: a tie
    assert systems["default"]["head_to_head"]["house"]["wins"] == 1.0
    labels.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(BlindError, match="answer lines"):
        read_many_answers(labels, items)
    labels.write_text("\n".join([*lines[:-1], "1/1 2/0 0/0 1"]) + "\n")
    with pytest.raises(BlindError, match="outside"):
        read_many_answers(labels, items)


def test_many_command_writes_a_task_without_system_names(tmp_path: Path) -> None:
    run = tmp_path / "run" / "samples"
    run.mkdir(parents=True)
    for name in ("base", "default"):
        (run / f"{name}.jsonl").write_text("".join(
            json.dumps({"message": f"m{i}", "reply": f"{name} reply {i}"}) + "\n"
            for i in range(5)))
    out = tmp_path / "task"
    assert main(["blind", "many", "--run", str(tmp_path / "run"), "--systems",
                 "base,default", "--n", "3", "--out", str(out)]) == 0
    shown = (out / "many.txt").read_text()
    assert "MESSAGE: m" in shown and "base reply" in shown
    assert "base\n" not in shown and "default\n" not in shown and "systems" not in shown
    assert "MESSAGE: m" not in (out / "key.json").read_text()
    # another run asks the same messages in another order: an earlier reading's are left out
    other = tmp_path / "other" / "samples"
    other.mkdir(parents=True)
    for name in ("base", "default"):
        (other / f"{name}.jsonl").write_text("".join(
            json.dumps({"message": f"m{i}", "reply": f"{name} again {i}"}) + "\n"
            for i in reversed(range(5))))
    again = tmp_path / "again"
    assert main(["blind", "many", "--run", str(tmp_path / "other"), "--systems",
                 "base,default", "--n", "5", "--exclude", str(out), "--out", str(again)]) == 0
    first = {ln for ln in shown.splitlines() if "MESSAGE" in ln}
    second = {ln.split("] ", 1)[1] for ln in (again / "many.txt").read_text().splitlines()
              if "MESSAGE" in ln}
    assert len(second) == 2 and not second & {ln.split("] ", 1)[1] for ln in first}
