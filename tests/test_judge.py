"""The fit judge (evaluation only): its held-out ranking is computed as documented, a short
training run writes a judge that loads, and `drhouse judge eval` measures it or says what is
missing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_selector_train import write_splits

from cli.main import main
from offline.judge import JudgeConfig, ranking_accuracy, train
from persona.dialogue import Pair


class OverlapJudge:
    """Scores a pair by the words message and reply share (``sign`` -1 prefers none)."""

    def __init__(self, sign: float = 1.0) -> None:
        self.sign = sign

    def score(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float]:
        return [self.sign * len(set(m.split()) & set(r.split())) for m, r in pairs]


def pairs_sharing_a_word(n: int) -> list[Pair]:
    return [Pair(i, "validation", f"tell me about w{i}", f"w{i} is boring") for i in range(n)]


def test_ranking_accuracy_puts_the_true_reply_among_99_others() -> None:
    pairs = pairs_sharing_a_word(120)
    right = ranking_accuracy(OverlapJudge(), pairs)  # type: ignore[arg-type]
    assert right == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0, "mean_percentile": 1.0,
                     "n": 120}
    wrong = ranking_accuracy(OverlapJudge(-1.0), pairs)  # type: ignore[arg-type]
    assert wrong["recall@1"] == 0.0 and wrong["recall@10"] == 0.0
    assert wrong["mean_percentile"] == 0.0 and wrong["mrr"] == pytest.approx(0.01)


def test_a_short_run_writes_a_judge_that_judge_eval_measures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_splits(data)
    with pytest.raises(SystemExit, match="judge train"):
        main(["judge", "eval", "--data-dir", str(data), "--judge-dir", str(tmp_path / "none")])
    meta = train(data, tmp_path / "judge",
                 JudgeConfig(batch_size=8, max_steps=2, bf16=False, eval_pairs=20),
                 tmp_path / "work")
    assert meta["validation_ranking"]["n"] == 20
    capsys.readouterr()
    assert main(["judge", "eval", "--data-dir", str(data), "--judge-dir", str(tmp_path / "judge"),
                 "--pairs", "20"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert {k: measured[k] for k in meta["validation_ranking"]} == meta["validation_ranking"]
    assert measured["protocol"] == meta["protocol"]


def test_the_judge_trains_on_no_line_of_the_canon_pool_nor_on_its_held_out_pairs() -> None:
    from offline.judge import training_rows, validation_sample
    from persona.dialogue import Scenes, in_judge_fold

    pairs = [Pair(i, "train", f"m{i}", f"r{i}") for i in range(400)]
    pairs += [Pair(1000 + i, "validation", f"m{1000 + i}", f"r{1000 + i}") for i in range(60)]
    pairs += [Pair(2000 + i, "test", f"m{2000 + i}", f"r{2000 + i}") for i in range(20)]
    held = validation_sample(pairs, 20, 0)
    rows = training_rows(pairs, Scenes(pairs), 0, held_out=held)
    trained = set(rows["reply"])
    fold = {p.response for p in pairs if in_judge_fold(p)}
    validation = {p.response for p in pairs if p.split == "validation"}
    assert fold and fold <= trained
    assert trained - fold == validation - {p.response for p in held}
    assert not any(p.response in trained for p in pairs
                   if p.split == "test" or (p.split == "train" and not in_judge_fold(p)))
