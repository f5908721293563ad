"""``drhouse blind``: sampling hides the speaker, answers are read strictly, scores are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from persona.blind_check import (
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
