"""Data preparation: the repair rules, the artefact counter, the split and the JSONL records."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from persona.data import (
    DataError,
    PrepareConfig,
    count_artefacts,
    prepare,
    repair_text,
    run,
    split_of,
    strip_directions,
    strip_previous_line,
)
from persona.dialogue import load_split
from persona.pack import load_persona
from persona.prompt import build_messages

FIXES = [
    # chi -> Park inside and at the start of words
    ("Parkldren are liars.", "Children are liars."),
    ("I was teaParkng a class on sParkzophrenia.", "I was teaching a class on schizophrenia."),
    ("Bring the maParkne.", "Bring the machine."),
    ("We're near the Parkcago office.", "We're near the Chicago office."),
    ("She's an overaParkever.", "She's an overachiever."),
    # eve -> Eve
    ("I nEver said that.", "I never said that."),
    ("NEver better.", "Never better."),
    ("Her fEver is at a lEvel of sEven.", "Her fever is at a level of seven."),
    ("I don't beliEve whatEver you said.", "I don't believe whatever you said."),
    ("We checked Everything and Everyone.", "We checked everything and everyone."),
    # rob -> Rob (the README calls it "Ro"), man -> Man, cate -> Cate
    ("That's not my pRoblem, pRobably.", "That's not my problem, probably."),
    ("It's a huMan error, perManent damage.", "It's a human error, permanent damage."),
    ("The tests indiCate it's compliCated.", "The tests indicate it's complicated."),
    ("It doesn't respond to Manual stimulation.", "It doesn't respond to manual stimulation."),
    # Patient / House mid-sentence
    ("The Patient's okay, and the other Patients?", "The patient's okay, and the other patients?"),
    ("He's at his House, the House on the hill.", "He's at his house, the house on the hill."),
]

UNCHANGED = [
    "Chase, Cameron and Foreman are in the lab.",
    "Eve is upset. It was Christmas Eve.",
    "Park, run the test. Tell Park and Chase.",
    "House! Dr. House wants you. Talk to House.",
    "Cate will start the test.",
    "He has Parkinson's, he lives in Manhattan.",
    "Rosa Parks sat down. Everything is fine.",
    "Patient is stable.",
    "Man, that hurts. Every time.",
    "Robert Roberts works here.",
]


@pytest.mark.parametrize(("raw", "fixed"), FIXES)
def test_repair_fixes_artefacts(raw: str, fixed: str) -> None:
    assert count_artefacts(raw), raw
    assert repair_text(raw) == fixed
    assert not count_artefacts(fixed)


@pytest.mark.parametrize("text", UNCHANGED)
def test_repair_keeps_names_and_real_words(text: str) -> None:
    assert repair_text(text) == text
    assert not count_artefacts(text)


def test_count_artefacts_kinds() -> None:
    found = count_artefacts("I nEver met the Patient's Parkldren at his House.")
    assert found == {"inner": 1, "patient": 1, "chi": 1, "house": 1}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Walks in You could have killed me!", "You could have killed me!"),
        ("VO He's on drugs?", "He's on drugs?"),
        ("I told you. Shuts the door.", "I told you."),
        ("Shrugs. I noticed they were fat?", "I noticed they were fat?"),
        ("Again. Washes the pill down with some beer.", "Again."),  # a canon pick, read
        ("Freeze it. Chase presses a button, and the screen goes dark.", "Freeze it."),
        ("to Thirteen That receiver is broken.", "That receiver is broken."),
        ("speaking with a German accent They gave it to me.", "They gave it to me."),
        ("Do me a favor. He gives House the right bottle. Find Cuddy. pause",
         "Do me a favor. Find Cuddy."),
        ("brushing Vicodin off his papers Is that supposed to be funny?",
         "Is that supposed to be funny?"),
        ("I hate this... kid.", "I hate this... kid."),
        ("Looks like lupus. Turns out he lied.", "Looks like lupus. Turns out he lied."),
        ("He [coughs] is fine (quietly).", "He is fine."),
        ("Just get out of here. He turns to leave", "Just get out of here."),
        ("We call him Dr. Idiot. Chase rolls his eyes, Foreman crosses his arms.",
         "We call him Dr. Idiot."),
        ("A month. A pause.", "A month."),
        ("Wilson comes in. Hey.", "Hey."),
        ("It itches. House finally limps out.", "It itches."),
        ("He holds up another flashcard Let's see it.", "Let's see it."),
        ("He pats Taub on the shoulder and takes Chase's pen.", ""),
        ("He turns to the window Mickey crumples to the floor.", ""),
        ("Okay, it's a deal. They shake on it. The phone rings.", "Okay, it's a deal."),
        ("They give him the wrong meds, who knows?", "They give him the wrong meds, who knows?"),
        ("He comes in twice a week. She takes warfarin.",
         "He comes in twice a week. She takes warfarin."),
        ("Wilson says you're fine. He stops breathing. Only pockets for important stuff.",
         "Wilson says you're fine. He stops breathing. Only pockets for important stuff."),
    ],
)
def test_stage_directions_are_stripped(raw: str, clean: str) -> None:
    assert repair_text(raw) == clean


def test_whitespace_and_quotes_are_normalised() -> None:
    assert repair_text("  \u201cWell,\u201d   he said \u2026 it\u2019s  fine . ") == (
        "\"Well,\" he said... it's fine."
    )
    assert strip_directions("") == ""


def write_csv(path: Path, rows: list[tuple[str, str]],
              header: tuple[str, str] = ("anchor", "response"), bom: bool = True) -> Path:
    with path.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sample_rows(n: int) -> list[tuple[str, str]]:
    return [(f"Question {i}: do I nEver need pRoblem {i}?", f"Answer {i}. Shrugs. It's lupus {i}.")
            for i in range(n)]


@pytest.mark.parametrize(("anchor", "previous", "own"), [
    ("You found ham. So?", "Everything you found was interrupted. You found ham.", "So?"),
    ("Guess where they go. Out.", "Tapeworms lay eggs. Guess where they go.", "Out."),
    ("Sit. Why?", "Sit.", "Why?"),
    ("You found ham.", "Everything you found. You found ham.", "You found ham."),  # one sentence
    ("So? You found ham.", "You found ham.", "So? You found ham."),   # not at the start
    ("Hamster? No.", "You found ham.", "Hamster? No."),                # not a whole sentence
    ("Out.Everywhere", "Out.", "Out.Everywhere"),                      # no space after it
    ("Any question?", "", "Any question?"),
])
def test_strip_previous_line(anchor: str, previous: str, own: str) -> None:
    assert strip_previous_line(anchor, previous) == own


def test_anchor_that_is_only_house_s_previous_line_is_dropped(tmp_path: Path) -> None:
    rows = [("Is it lupus?", "It's never lupus. Get out."),
            ("Get out. Now?", "Now."),                  # prefix cut: the anchor becomes "Now?"
            ("Now.", "And take the cane."),            # the whole anchor is House's line
            ("Fine.", "Good.")]
    config = PrepareConfig(input=write_csv(tmp_path / "qa.csv", rows), out=tmp_path / "out",
                           validation=0.0, test=0.0)
    stats = prepare(config)
    assert stats.dropped == {"anchor is House's previous line": 1}
    assert stats.changed["anchor: House's previous line cut"] == 1
    anchors = [r["anchor"] for r in load_split(config.out, "train")]
    assert anchors == ["Is it lupus?", "Now?", "Fine."]


def test_prepare_writes_records_built_with_the_serving_prompt(tmp_path: Path) -> None:
    rows = [
        *sample_rows(40),
        ("Walks in", "Nothing."),                       # anchor empty after stripping
        ("A fine question?", "pause"),                   # response empty after stripping
        ("Why " + "so long " * 80 + "?", "Too long a question."),  # anchor too long
    ]
    config = PrepareConfig(input=write_csv(tmp_path / "qa.csv", rows), out=tmp_path / "out")
    stats = prepare(config)
    assert stats.rows == 43
    assert stats.kept == 40
    assert stats.dropped == {"empty anchor": 1, "empty response": 1, "anchor too long": 1}
    assert sum(stats.artefacts_before.values()) == 80
    assert sum(stats.artefacts_after.values()) == 0
    records = [r for s in ("train", "validation", "test") for r in load_split(config.out, s)]
    assert len(records) == 40
    persona = load_persona()
    for record in records:
        assert set(record) == {"id", "anchor", "response", "prompt", "completion"}
        assert record["prompt"] == build_messages(persona, [], record["anchor"])
        assert record["prompt"][0]["role"] == "system"
        assert record["completion"] == [{"role": "assistant", "content": record["response"]}]
        assert "Shrugs" not in record["response"]
        assert not count_artefacts(record["anchor"])


def test_split_is_deterministic_and_stable(tmp_path: Path) -> None:
    rows = sample_rows(2000)
    first = PrepareConfig(input=write_csv(tmp_path / "a.csv", rows), out=tmp_path / "a")
    second = PrepareConfig(input=write_csv(tmp_path / "b.csv", rows[::-1][:1500]),
                           out=tmp_path / "b")
    stats = prepare(first)
    prepare(first.__class__(**{**first.__dict__, "out": tmp_path / "a2"}))
    prepare(second)
    for split in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "a2" / f"{split}.jsonl").read_bytes()
    assert 0.87 < stats.splits["train"] / stats.kept < 0.93
    assert 0.03 < stats.splits["test"] / stats.kept < 0.07
    # A pair keeps its split when other rows go away or the order changes.
    split_a = {r["anchor"]: s for s in ("train", "validation", "test")
               for r in load_split(tmp_path / "a", s)}
    split_b = {r["anchor"]: s for s in ("train", "validation", "test")
               for r in load_split(tmp_path / "b", s)}
    assert all(split_a[anchor] == split for anchor, split in split_b.items())
    assert split_of("a", "b", 1, 0.05, 0.05) == split_of("a", "b", 1, 0.05, 0.05)
    assert {split_of(str(i), "r", 1, 0.05, 0.05) for i in range(200)} == {
        "train", "validation", "test"}


def test_wrong_columns_give_a_clear_error(tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", [("a", "b")], header=("question", "answer"))
    with pytest.raises(DataError, match="anchor, response"):
        prepare(PrepareConfig(input=bad, out=tmp_path / "out"))
    with pytest.raises(DataError, match="no data file"):
        prepare(PrepareConfig(input=tmp_path / "missing.csv", out=tmp_path / "out"))


def test_command_reads_house_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "qa.csv", sample_rows(30), bom=False)
    monkeypatch.setenv("HOUSE_DATA", str(source))
    args = argparse.Namespace(input=None, out=tmp_path / "out", seed=13, validation=0.05,
                              test=0.05, max_anchor_chars=500, max_response_chars=300,
                              persona="house")
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "artefacts total before → after" in out and "60 → 0" in out
    lines = sum(len((tmp_path / "out" / f"{s}.jsonl").read_text().splitlines())
                for s in ("train", "validation", "test"))
    assert lines == 30
    bad = write_csv(tmp_path / "bad.csv", [("a", "b")], header=("text", "label"))
    assert run(argparse.Namespace(**{**vars(args), "input": bad})) == 2
    assert "needs anchor, response" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])["id"]
