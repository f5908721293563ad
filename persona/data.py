"""``drhouse data prepare``: repair the House dialogue pairs and write train/validation/test JSONL.

The source CSV (columns ``anchor,response``) went through a case-insensitive name replacement
upstream, so fragments inside ordinary words were rewritten (``chi``→``Park``, ``eve``→``Eve``,
``rob``→``Rob``, ``man``→``Man``, ``cate``→``Cate``, ``patient``/``house`` capitalised), and
its lines carry stage directions and speaker notes. :func:`repair_text` undoes both;
:func:`count_artefacts` finds what is left (the statistics table shows it before and after).
The rows follow the episodes in order, and 13% of the anchors begin with the end of the row
before's response — House's own previous line, glued to what the other character said ("You
found ham. So?" after House's "...You found ham."), or nothing else at all.
:func:`strip_previous_line` cuts that prefix; pairs whose anchor is only House's previous line
are dropped, since nobody else spoke.

Each output record holds ``id``, ``anchor`` and ``response`` (cleaned), ``prompt`` (the chat
messages :func:`persona.prompt.build_messages` builds, so training sees exactly the serving
prompt) and ``completion`` (House's reply as one assistant message)::

    drhouse data prepare                      # ../shared/data/house/questions_answers.csv
    drhouse data prepare --input other.csv --out data/prepared --seed 13
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.config import ROOT
from persona.dialogue import SPLITS
from persona.patterns import BRACKETED

log = logging.getLogger(__name__)

DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "house" / "questions_answers.csv"
DEFAULT_OUT = ROOT / "data" / "prepared"
COLUMNS = ("anchor", "response")



def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Fragments the upstream replacement wrote, with the lower-case text they replaced.
FRAGMENTS = {"Park": "chi", "Eve": "eve", "Rob": "rob", "Man": "man", "Cate": "cate"}
# Words starting with a fragment that are real proper nouns (compared without a trailing 's).
PROPER = _wordset(
    """Park Parker Parkinson Parks Eve Evelyn Everest Everett Everglade Everglades Rob Robert
    Roberts Robbins Robin Robinson Man Manhattan Mandarin Manson Mannix Manila Mandela
    Manishewitz Manning Mandy Manchester Manuel Cate Catherine"""
)
# ``Park…`` words that really were ``park…`` (everything else after ``Park`` was ``chi``).
PARK_WORDS = frozenset({"parking", "parked", "parks", "parkway"})
# Words that come back from ``chi`` and are proper nouns themselves.
CHI_PROPER = frozenset({"chinese", "chicago", "chile", "chilean", "chianti", "chiari"})
# ``house``/``park`` after one of these is the building or the place, not the name.
DETERMINERS = _wordset(
    """the a an my your his our their its whose every any own new big old haunted empty whole
    same other"""
)
# Abbreviations whose period does not end a sentence.
ABBREVIATIONS = re.compile(
    r"(?:\b(?:Dr|Mr|Mrs|Ms|St|Jr|Sr|vs|etc|approx|No)|\b[a-zA-Z]\.[a-zA-Z])\.$"
)

_FRAG = "|".join(FRAGMENTS)
# A fragment glued to the letters before it: ``nEver``, ``teaParkng``, ``KaufMan``.
_INNER = re.compile(rf"(?<=[A-Za-z])({_FRAG})")
# A word that starts with a fragment: ``Parkldren``, ``Everything``, ``Manual``, ``Robe``.
_LEADING = re.compile(rf"\b({_FRAG})([a-z]*)((?:'[a-z]+)?)\b")
_PATIENT = re.compile(r"\bPatient(s?'?|'s|ly)?\b")
_HOUSE_WORD = re.compile(r"\b(House|Park)\b")
_HOUSE_COMPOUND = re.compile(r"\bHouse(s|hold|keeping|keeper|wives|warming|wife|work)\b")

# Stage directions and speaker notes.
_NOTE_TOKENS = re.compile(r"(?:^|(?<=\s))(?:\(?V\.?O\.?\)?|\(?O\.?S\.?\)?|\(?CONT'?D\)?)(?=\s|$)")
# Verbs of a narrative sentence after a name or He/She/They ("Chase glares at Wilson.").
STAGE_VERBS = _wordset(
    """walks enters exits stares glares shrugs sighs nods smiles grins laughs chuckles pauses
    sits stands limps points picks hands gives grabs pulls pushes presses opens closes shuts
    throws tosses puts moves follows appears notices lifts waves taps raises slams storms
    hurries rushes heads returns approaches kneels leans reaches shakes hugs kisses slaps
    glances winces frowns smirks blinks gestures hesitates sips scribbles dials hangs unlocks
    knocks rips examines injects inserts removes peers waits leaves turns pops drops pockets
    climbs pours steps pats rolls swallows holds writes watches disconnects sticks jumps
    tugs flips wipes"""
)
# Movements and gestures narrated after "They" (other verbs after it are usually dialogue:
# "They give him the wrong meds…").
THEY_VERBS = _wordset(
    "leave enter exit walk sit stand shrug sigh stare hug smile turn follow kiss nod glance shake"
)
# Verbs that read as narration only after a character's name ("Chase comes in.", "Wilson
# takes the chart."); after He/She they are as often about a patient ("He comes in twice a
# week", "She takes warfarin").
NAME_VERBS = _wordset("takes gets starts comes continues tries runs makes calls stops goes")
# Capitalised words that open dialogue after a note glued to it, besides CONTINUATIONS.
DIALOGUE_OPENERS = _wordset(
    """tell call run start get go give look stop welcome congratulations sorry thanks thank
    good great hi hello hey another unless assuming except tough did are do does have has
    can't won't don't didn't isn't we she he they i you it this that there here how what why
    when who where one two mommy daddy mom dad kids people nice fine sure never always
    please wait hold sit"""
)
# Sentences that are a note on their own ("A beat.", "Long pause.").
NOTE_SENTENCES = frozenset({"a beat", "beat", "pause", "a pause", "long pause", "silence",
                            "voice over", "beat beat"})
# Verbs that alone open a direction ("Shrugs.", "Walks in You could have…").
BARE_VERBS = _wordset(
    """walks enters exits stares glares shrugs sighs nods smiles grins laughs chuckles pauses
    limps winces frowns smirks gestures hesitates kneels sits stands shuts closes opens picks
    grabs hands points leaves waits washes swallows"""
)
# Lower-case words that continue dialogue rather than open a note ("... and then he left").
CONTINUATIONS = _wordset(
    """and but or so then because if when what which who whom whose that the a an you it is
    he she we they i me my your his her our their this these those not no yes of in for with
    as like than just even still too also maybe about from by up out all some any how why
    where there here was were are am be been do does did don't can can't will won't would
    should could has have had let let's okay ok oh uh um well right"""
)
# Capitalised words inside a note that do not start the dialogue ("brushing Vicodin off…").
NOTE_NAMES = _wordset(
    """House Wilson Cuddy Chase Cameron Foreman Thirteen Taub Kutner Amber Park Adams Masters
    Stacy Tritter Vogler Lucas Dominika Nolan Vicodin Rachel Annie Sam Martha Cate"""
)
# Main characters: after one of these, NAME_VERBS narrate.
CHARACTERS = NOTE_NAMES - {"Vicodin"}
_LOOK_DIRECTIONS = _wordset("at around up down away over back out into toward towards")
_NOT_SUBJECTS = _wordset(
    """I You We It This That What Which Who Where There Here Nothing Something Everything
    Anything Nobody Somebody Everybody Anybody Everyone Someone Anyone No One If When Why
    How Because And But Or So Only Just Maybe"""
)
# A phone or pager going off ("The phone rings.", "His beeper beeps").
_DEVICE_SOUND = re.compile(
    r"(?:The|His|Her|House's|[A-Z][a-z]+'s) (?:cell )?(?:phone|pager|beeper|cellphone) "
    r"(?:rings|beeps|buzzes|goes off)\b")
# Capitalised words before 's that open dialogue ("It's", "Let's"), unlike names ("Chase's").
_CONTRACTION_SUBJECTS = _wordset(
    """It That What Here There He She Let Who Where How When Why This Nothing Something
    Everything Everybody Nobody Somebody Everyone Someone"""
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][\w'-]*")
_QUOTES = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'",
     "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
     "\u2013": "-", "\u2014": " - ", "\u2026": "...", "\u00a0": " "}
)
# Words that open a lower-case stage direction ("to Thirteen", "into mic", "pointing to Annie").
_DIRECTION_PREPOSITIONS = _wordset(
    "to at toward towards with from into onto over a an the his her their"
)


class DataError(ValueError):
    """The input file is not a House dialogue CSV (missing file or columns)."""


def _sentence_start(text: str, pos: int) -> bool:
    """Whether ``pos`` starts a sentence (text start, or after ., !, ? and optional quotes)."""
    before = text[:pos].rstrip(" \"'-")
    if not before:
        return True
    if before[-1] in "!?:\n":
        return True
    return before[-1] == "." and not ABBREVIATIONS.search(before)


def _base(word: str) -> str:
    """A word without its possessive/plural tail, for the proper-noun lists."""
    return re.sub(r"(?:'s|s'|')$", "", word)


def _leading_fix(text: str, match: re.Match[str]) -> str | None:
    """The repaired word for a word that starts with a fragment, or None to keep it."""
    frag, rest, tail = match.group(1), match.group(2), match.group(3)
    word = frag + rest + tail
    if _base(frag + rest) in PROPER or (frag + rest) in PROPER:
        return None
    at_start = _sentence_start(text, match.start())
    if frag == "Park":
        if not rest:  # "Park" alone: the name, unless it is a place ("the park").
            return None
        if (frag + rest).lower() in PARK_WORDS:
            return None if at_start else word.lower()
        fixed = "chi" + rest + tail
        if at_start or fixed.lower() in CHI_PROPER:
            fixed = fixed[0].upper() + fixed[1:]
        return fixed
    if frag in ("Eve", "Cate", "Rob") and not rest:
        return None  # the names Eve, Cate and Rob
    if at_start:
        return None
    return word[0].lower() + word[1:]


def _prev_word(text: str, pos: int) -> str:
    """The word right before ``pos`` when only one space separates them, else ``""``."""
    m = re.search(r"([A-Za-z']+) $", text[max(0, pos - 40):pos])
    return m.group(1).lower() if m else ""


def _repair_fragments(text: str) -> str:
    text = _INNER.sub(lambda m: FRAGMENTS[m.group(1)], text)

    def leading(m: re.Match[str]) -> str:
        fixed = _leading_fix(text, m)
        return m.group(0) if fixed is None else fixed

    text = _LEADING.sub(leading, text)

    def patient(m: re.Match[str]) -> str:
        return m.group(0) if _sentence_start(text, m.start()) else m.group(0).lower()

    text = _PATIENT.sub(patient, text)
    text = _HOUSE_COMPOUND.sub(
        lambda m: m.group(0) if _sentence_start(text, m.start()) else m.group(0).lower(), text
    )

    def place(m: re.Match[str]) -> str:
        if _prev_word(text, m.start()) in DETERMINERS and not _sentence_start(text, m.start()):
            return m.group(0).lower()
        return m.group(0)

    return _HOUSE_WORD.sub(place, text)


def count_artefacts(text: str) -> Counter[str]:
    """Name-replacement artefacts left in ``text``, counted by kind.

    The kinds: ``inner`` (a fragment glued inside a word: ``nEver``), ``chi`` (``Park`` that
    stands for ``chi``: ``Parkldren``), ``capital`` (a fragment word capitalised mid-sentence:
    ``Everything``), ``patient`` (``Patient`` mid-sentence) and ``house`` (``House``/``Park``
    as a place after a determiner: ``his House``).
    """
    found: Counter[str] = Counter()
    found["inner"] = len(_INNER.findall(text))
    for m in _LEADING.finditer(text):
        if _leading_fix(text, m) is not None:
            found["chi" if m.group(1) == "Park" and (m.group(1) + m.group(2)).lower()
                  not in PARK_WORDS else "capital"] += 1
    found["patient"] = sum(
        1 for m in _PATIENT.finditer(text) if not _sentence_start(text, m.start())
    )
    found["house"] = sum(
        1 for m in _HOUSE_COMPOUND.finditer(text) if not _sentence_start(text, m.start())
    ) + sum(
        1
        for m in _HOUSE_WORD.finditer(text)
        if _prev_word(text, m.start()) in DETERMINERS and not _sentence_start(text, m.start())
    )
    return +found


def _is_direction_sentence(sentence: str) -> bool:
    """A narrative sentence: ``He stares at her.``, ``Chase glares at Wilson.``, ``Shrugs.``,
    ``He finally turns around.``, ``A beat.``"""
    words = [w.strip("\"'.,!?;:") for w in sentence.split()]
    words = [w for w in words if w]
    if not words:
        return False
    if " ".join(words).lower() in NOTE_SENTENCES:
        return True
    if len(words) > 2 and words[1].endswith("ly") and words[1].islower():
        words = [words[0], *words[2:]]  # "He finally turns", "House slowly limps"
    if _DEVICE_SOUND.match(" ".join(words)):
        return True
    first = words[0]
    if first.lower() == "looks" or (len(words) > 1 and words[1].lower() == "looks"):
        at = 1 if first.lower() == "looks" else 2
        return len(words) > at and words[at].lower() in _LOOK_DIRECTIONS
    if first[:1].isupper() and first.lower() in BARE_VERBS:
        return True
    idx = 1
    if first == "They" and len(words) > 1:  # "They shake on it.", not "They give him…"
        return words[1].lower() in THEY_VERBS
    if len(words) > 3 and words[1] == "and" and re.fullmatch(r"[A-Z][a-z]+", words[2]):
        idx = 3  # "Ethan and Karen start to laugh"
    if len(words) <= idx or first in _NOT_SUBJECTS or not re.fullmatch(r"[A-Z][a-z]+", first):
        return False
    verb = words[idx].lower()
    if idx == 3:
        return verb + "s" in STAGE_VERBS or verb + "es" in STAGE_VERBS
    return verb in STAGE_VERBS or (verb in NAME_VERBS and first in CHARACTERS)


def _opens_dialogue(word: str) -> bool:
    """A word that starts a line of dialogue (a pronoun, a question word, an auxiliary, a
    contraction, a common imperative), unlike a name that starts more narration."""
    lower = word.lower()
    return (lower in CONTINUATIONS or lower in DIALOGUE_OPENERS or word in _NOT_SUBJECTS
            or lower.endswith(("'s", "'re", "'ll", "n't", "'m", "'ve", "'d")))


def _dialogue_after_direction(sentence: str) -> str:
    """The dialogue glued after a narrative sentence without a full stop (``He holds up a
    flashcard Hint the answer is a number.``): the words from the first capitalised one that
    opens a line of dialogue; "" when there is none. Names the note mentions (``to Thirteen``,
    ``Chase's pocket``) and a new narrative subject (``Mickey crumples to the floor.``) do
    not open one."""
    words = sentence.split(" ")
    for i in range(3, len(words) - 1):
        word = words[i].lstrip("'\"").strip(".,!?;:")
        if not word[:1].isupper():
            continue
        if word.endswith("'s") and word[:-2] not in _CONTRACTION_SUBJECTS:
            continue  # "Chase's pocket", "Wilson's desk": part of the note
        if words[i - 1].lower().strip(",") in _DIRECTION_PREPOSITIONS:
            continue
        if words[i - 1].endswith((",", ";", ":")):
            continue
        if not _opens_dialogue(word):
            continue  # "Mickey crumples to the floor.", "Room One, where Sarah awaits."
        rest = " ".join(words[i:])
        if rest[-1:] in ".?!" and not _is_direction_sentence(rest):
            return rest
    return ""


def _is_note_start(word: str) -> bool:
    word = word.strip(",")
    return bool(word) and word[0].islower() and word not in CONTINUATIONS


def _strip_leading_direction(sentence: str, continues: bool = False) -> str:
    """Remove a lower-case note glued before the dialogue (``to Thirteen That receiver…``,
    ``brushing Vicodin off his papers Is that…``) or a stage verb glued to it (``Walks in You
    could…``). Dialogue lines start with a capital, so a lower-case start is a note, unless
    the sentence ``continues`` one that trailed off (``I hate this... kid.``)."""
    words = sentence.split(" ")
    first = words[0].strip("\"'")
    verb_start = first[:1].isupper() and first.lower() in BARE_VERBS
    if not (verb_start or (_is_note_start(first) and not continues)):
        return sentence
    for i, word in enumerate(words[1:16], start=1):
        if not word.lstrip("'\"")[:1].isupper():
            continue
        if words[i - 1].lower().strip(",") in _DIRECTION_PREPOSITIONS and i + 1 < len(words):
            continue  # "to Thirteen", "with a German accent": the name belongs to the note
        if word.strip(".,!?;:'") in NOTE_NAMES and i + 1 < len(words):
            continue
        return " ".join(words[i:])
    if len(words) <= 4 and not verb_start:
        return ""  # a note on its own: "pause", "small pause"
    return sentence


def strip_directions(text: str) -> str:
    """Drop stage directions and speaker notes, keep the dialogue."""
    text = BRACKETED.sub(" ", text)
    text = _NOTE_TOKENS.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    kept: list[str] = []
    previous = ""
    for sentence in _SENTENCE_SPLIT.split(text):
        stripped = _strip_leading_direction(sentence.strip(), previous.endswith(("..", "-")))
        previous = sentence.strip()
        if stripped != sentence.strip() and stripped[:1].islower():
            stripped = stripped[0].upper() + stripped[1:]
        sentence = stripped
        if sentence and _is_direction_sentence(sentence):
            sentence = _dialogue_after_direction(sentence)
        if sentence:
            kept.append(sentence)
    return " ".join(kept)


def normalise(text: str, capitalise: bool = True) -> str:
    """Unicode NFC, straight quotes, one space between words, no space before punctuation;
    with ``capitalise`` the first letter upper-case."""
    text = unicodedata.normalize("NFC", text).translate(_QUOTES)
    text = re.sub(r"[\x00-\x1f\x7f\u200b-\u200f\ufeff]", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    text = re.sub(r"^[\s,.;:!-]+(?=[A-Za-z\"'])", "", text)
    text = text.strip()
    if capitalise and text[:1].islower() and not re.match(r"[a-z]\w*[A-Z]", text):
        text = text[0].upper() + text[1:]
    return text


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def strip_previous_line(anchor: str, previous_response: str) -> str | None:
    """``anchor`` without a leading copy of the end of ``previous_response`` (House's line of
    the row before, one or more whole sentences, followed by a space); None when the anchor is
    nothing but House's previous line."""
    anchor, previous = anchor.strip(), previous_response.strip()
    if not previous:
        return anchor
    if anchor == previous:
        return None
    sentences = _SENTENCE_END.split(previous)
    for start in range(len(sentences)):
        tail = " ".join(sentences[start:])
        if anchor.startswith(tail) and anchor[len(tail):len(tail) + 1].isspace():
            return anchor[len(tail):].strip()
    return anchor


def repair_text(text: str) -> str:
    """Fragments fixed, directions and notes removed, whitespace and quotes normalised."""
    text = normalise(text, capitalise=False)
    text = _repair_fragments(text)
    text = strip_directions(text)
    return normalise(text)


@dataclass
class PrepareConfig:
    input: Path = DEFAULT_INPUT
    out: Path = DEFAULT_OUT
    seed: int = 13
    validation: float = 0.05
    test: float = 0.05
    max_anchor_chars: int = 500
    max_response_chars: int = 300
    min_chars: int = 2
    persona: str = "house"


@dataclass
class Stats:
    rows: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    artefacts_before: Counter[str] = field(default_factory=Counter)
    artefacts_after: Counter[str] = field(default_factory=Counter)
    changed: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    anchor_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(self.splits.values())


def _open_checked(path: Path) -> tuple[Any, csv.DictReader[str], dict[str, str]]:
    if not path.is_file():
        raise DataError(f"no data file at {path} (set HOUSE_DATA or pass --input)")
    handle = path.open(encoding="utf-8-sig", newline="")
    reader = csv.DictReader(handle)
    header = [c.strip().lower() for c in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        handle.close()
        raise DataError(
            f"{path} has columns {reader.fieldnames or []}; a House dialogue CSV needs "
            f"{', '.join(COLUMNS)} (missing {', '.join(missing)})"
        )
    return handle, reader, dict(zip(header, reader.fieldnames or [], strict=True))


def check_input(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is a CSV with anchor and response columns."""
    handle, _, _ = _open_checked(path)
    handle.close()


def read_pairs(path: Path) -> Iterator[tuple[int, str, str]]:
    """(row number, anchor, response) from a CSV with ``anchor`` and ``response`` columns."""
    handle, reader, names = _open_checked(path)
    with handle:
        for number, row in enumerate(reader, start=1):
            yield number, row[names["anchor"]] or "", row[names["response"]] or ""


def split_of(anchor: str, response: str, seed: int, validation: float, test: float) -> str:
    """Deterministic split from a seeded hash of the raw pair: a pair keeps its split when
    other rows are added, removed or reordered."""
    digest = hashlib.sha1(f"{seed}\x1f{anchor}\x1f{response}".encode()).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    if x < test:
        return "test"
    if x < test + validation:
        return "validation"
    return "train"


def make_record(pair_id: str, anchor: str, response: str, persona: object) -> dict[str, object]:
    from persona.prompt import build_messages

    return {
        "id": pair_id,
        "anchor": anchor,
        "response": response,
        "prompt": build_messages(persona, [], anchor),  # type: ignore[arg-type]
        "completion": [{"role": "assistant", "content": response}],
    }


def _drop_reason(anchor: str, response: str, config: PrepareConfig) -> str | None:
    if len(anchor) < config.min_chars or not re.search(r"[A-Za-z]", anchor):
        return "empty anchor"
    if len(response) < config.min_chars or not re.search(r"[A-Za-z]", response):
        return "empty response"
    if len(anchor) > config.max_anchor_chars:
        return "anchor too long"
    if len(response) > config.max_response_chars:
        return "response too long"
    return None


def prepare(config: PrepareConfig) -> Stats:
    """Read, repair, filter, split and write; returns the statistics."""
    from persona.pack import load_persona

    check_input(config.input)
    persona = load_persona(config.persona)
    stats = Stats()
    seen: set[tuple[str, str]] = set()
    config.out.mkdir(parents=True, exist_ok=True)
    # Written next to the outputs and renamed at the end: a failed run leaves the old files.
    paths = {name: config.out / f"{name}.jsonl" for name in SPLITS}
    handles = {name: p.with_suffix(".jsonl.tmp").open("w", encoding="utf-8")
               for name, p in paths.items()}
    try:
        previous_response = ""
        for number, raw_anchor, raw_response in read_pairs(config.input):
            stats.rows += 1
            stats.artefacts_before.update(count_artefacts(raw_anchor))
            stats.artefacts_before.update(count_artefacts(raw_response))
            own_anchor = strip_previous_line(raw_anchor, previous_response)
            previous_response = raw_response
            if own_anchor is None:
                stats.dropped["anchor is House's previous line"] += 1
                continue
            stats.changed["anchor: House's previous line cut"] += own_anchor != raw_anchor.strip()
            anchor, response = repair_text(own_anchor), repair_text(raw_response)
            stats.changed["anchor"] += anchor != raw_anchor.strip()
            stats.changed["response"] += response != raw_response.strip()
            reason = _drop_reason(anchor, response, config)
            if reason is None and (anchor, response) in seen:
                reason = "duplicate after repair"
            if reason:
                stats.dropped[reason] += 1
                continue
            seen.add((anchor, response))
            stats.artefacts_after.update(count_artefacts(anchor))
            stats.artefacts_after.update(count_artefacts(response))
            split = split_of(raw_anchor, raw_response, config.seed, config.validation, config.test)
            stats.splits[split] += 1
            stats.anchor_lengths.append(len(anchor))
            stats.response_lengths.append(len(response))
            record = make_record(f"qa-{number:05d}", anchor, response, persona)
            handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    for path in paths.values():
        path.with_suffix(".jsonl.tmp").replace(path)
    return stats


def percentiles(values: Iterable[int], points: tuple[int, ...] = (5, 50, 95, 99)) -> list[int]:
    ordered = sorted(values)
    if not ordered:
        return [0 for _ in points]
    return [ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points]


def print_stats(stats: Stats, config: PrepareConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"House data: {config.input.name} → {config.out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", str(stats.rows))
    for reason, n in sorted(stats.dropped.items()):
        table.add_row(f"dropped: {reason}", str(n))
    table.add_row("kept", str(stats.kept))
    for split in SPLITS:
        table.add_row(f"  {split}", str(stats.splits[split]))
    table.add_row("anchors changed by repair", str(stats.changed["anchor"]))
    table.add_row("  of which: House's previous line cut",
                  str(stats.changed["anchor: House's previous line cut"]))
    table.add_row("responses changed by repair", str(stats.changed["response"]))
    kinds = sorted(set(stats.artefacts_before) | set(stats.artefacts_after))
    for kind in kinds:
        table.add_row(f"artefacts '{kind}' before → after",
                      f"{stats.artefacts_before[kind]} → {stats.artefacts_after[kind]}")
    table.add_row("artefacts total before → after",
                  f"{sum(stats.artefacts_before.values())} → {sum(stats.artefacts_after.values())}")
    console.print(table)
    lengths = Table(title="lengths in characters (kept pairs)")
    lengths.add_column("field")
    for p in ("p5", "p50", "p95", "p99", "max"):
        lengths.add_column(p, justify="right")
    for name, values in (("anchor", stats.anchor_lengths), ("response", stats.response_lengths)):
        lengths.add_row(name, *map(str, percentiles(values)), str(max(values, default=0)))
    console.print(lengths)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="repair, filter and split the dialogue CSV into JSONL")
    defaults = PrepareConfig()
    prep.add_argument("--input", type=Path, default=None,
                      help=f"CSV with anchor,response (default: $HOUSE_DATA or {DEFAULT_INPUT})")
    prep.add_argument("--out", type=Path, default=defaults.out, help="output directory")
    prep.add_argument("--seed", type=int, default=defaults.seed, help="split seed")
    prep.add_argument("--validation", type=float, default=defaults.validation,
                      help="validation fraction")
    prep.add_argument("--test", type=float, default=defaults.test, help="test fraction")
    prep.add_argument("--max-anchor-chars", type=int, default=defaults.max_anchor_chars,
                      help="drop pairs whose repaired anchor is longer")
    prep.add_argument("--max-response-chars", type=int, default=defaults.max_response_chars,
                      help="drop pairs whose repaired response is longer")
    prep.add_argument("--persona", default=defaults.persona, help="persona pack for the prompts")
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    source = args.input or Path(os.environ.get("HOUSE_DATA") or DEFAULT_INPUT)
    config = PrepareConfig(
        input=Path(source), out=args.out, seed=args.seed, validation=args.validation,
        test=args.test, max_anchor_chars=args.max_anchor_chars,
        max_response_chars=args.max_response_chars, persona=args.persona,
    )
    try:
        stats = prepare(config)
    except DataError as exc:
        print(f"drhouse data prepare: {exc}", file=sys.stderr)
        return 2
    print_stats(stats, config)
    if sum(stats.artefacts_after.values()):
        print("artefacts remain after repair; see the table", file=sys.stderr)
        return 1
    return 0
