"""House's differentials: his answer to a user's own complaint, from the pack's
``differentials`` file (``persona/packs/house_differentials.yaml``).

Neither the 135M model nor the series' lines know what a butterfly rash or a stiff neck with a
fever means for *this* user: the model knows no medicine, and the series' lines answer other
patients. A message that names a complaint of the file gets House's answer to it, written for
the bot: a diagnosis or the question that decides it, and where to go now when it can kill.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from persona.rotation import unheard

# The message is about the writer or someone of theirs — it says so, or it names nobody else
# ("tongue feels numb on one side since this morning"): a complaint about House himself ("does
# your leg hurt?"), a line of the series about a patient ("He's got a fever") or about medicine
# in general ("It leads to rheumatic fever.") is not one.
_ABOUT_THEM = re.compile(
    r"\b(?:i|i'm|im|i've|ive|i'd|my|me|myself)\b|\b(?:sons?|daughters?|kids?|"
    r"child(?:ren)?|baby|toddler|wife|husband|partner|mom|mum|mother|dad|father|grand\w+|"
    r"boyfriend|girlfriend|brother|sister|friend|roommate)\b", re.I)
_SOMEONE_ELSE = re.compile(r"\b(?:you|your|yours|he|she|him|his|her|hers|they|them|their|"
                           r"it's|patient|house|wilson|cuddy|cause|causes|caused|"
                           r"leads?|explains?)\b|'s\b", re.I)

# A cue right after one of these is denied, not reported: "no fever", "doesn't itch".
_DENIED = re.compile(
    r"(?:\b(?:no|not|without|never|none)|\b(?:don'?t|doesn'?t|didn'?t|haven'?t|hasn'?t|"
    r"isn'?t|wasn'?t|aren'?t))\s+(?:(?:have|had|got|get|feel|any|a|an|really)\s+){0,2}$", re.I)


def _cue(text: str) -> re.Pattern[str]:
    """A cue of the file as a pattern: whole words or their plural, ``*`` for any ending
    ("vomit*")."""
    return re.compile(r"\b(?:" + text.replace("*", r"\w*") + r")(?:e?s)?\b", re.I)


def _theirs(message: str) -> bool:
    """Whether ``message`` is about the writer or someone of theirs (`_ABOUT_THEM`), or names
    nobody else (`_SOMEONE_ELSE`)."""
    return bool(_ABOUT_THEM.search(message)) or not _SOMEONE_ELSE.search(message)


def _present(cue: re.Pattern[str], message: str) -> bool:
    return any(not _DENIED.search(message[:m.start()]) for m in cue.finditer(message))


@dataclass(frozen=True)
class Differential:
    """One complaint: the rules that recognise it (any rule; every cue of a rule) and
    House's answers to it."""

    name: str
    rules: tuple[tuple[re.Pattern[str], ...], ...]
    replies: tuple[str, ...]

    def matches(self, message: str) -> bool:
        return any(all(_present(cue, message) for cue in rule) for rule in self.rules)


@dataclass(frozen=True)
class Differentials:
    """The pack's differentials in their order: the first that matches answers."""

    entries: tuple[Differential, ...] = ()

    def find(self, message: str) -> Differential | None:
        """The complaint ``message`` names, or None (also when it is not about the writer or
        someone of theirs)."""
        if not self.entries or not _theirs(message):
            return None
        return next((d for d in self.entries if d.matches(message)), None)

    def answer(self, message: str, seed: int, avoid: Collection[str] = ()) -> str | None:
        """House's answer to the complaint ``message`` names (``seed`` picks which), one the
        conversation has not heard (``avoid``) while there is one — else the same again: the
        right answer twice beats a line of the series that contradicts it (a stiff neck with a
        fever asked twice got "No fever, no neck pain." the second time). None: no complaint."""
        found = self.find(message)
        return unheard(found.replies, seed, avoid) if found is not None else None


def load_differentials(path: Path) -> Differentials:
    """Read a differentials file; a broken entry is a clear error naming the file and it."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    entries = []
    for i, item in enumerate(raw):
        name = str(item.get("name", f"entry {i + 1}")) if isinstance(item, dict) else str(i + 1)
        try:
            rules = tuple(tuple(_cue(part.strip()) for part in str(rule).split(" & "))
                          for rule in item["when"])
            replies = tuple(str(r).strip() for r in item["replies"] if str(r).strip())
        except (KeyError, TypeError, re.error) as e:
            raise ValueError(f"{path}: differential {name!r} is broken ({e!r}); each needs "
                             "`when` (rules of cues joined by ' & ') and `replies`") from e
        if not rules or not replies:
            raise ValueError(f"{path}: differential {name!r} needs a rule and a reply")
        entries.append(Differential(name=name, rules=rules, replies=replies))
    return Differentials(tuple(entries))
