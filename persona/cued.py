"""Answers written for the bot, found by cues in the message: the pack's differentials (a
user's own complaint) and its topics (House himself, his people, small talk) share this
file format and this matching.

A file is a list of entries: ``name``, ``when`` (rules, any may match; a rule is cues joined
by " & ", all of which must be in the message) and ``replies`` — or a mapping of ``entries``
(that list) and ``guards``: named lists of rules an entry's ``unless`` can name, so that one
rule ("not while the message names a symptom") is written once for the entries it keeps out.
A cue is a case-insensitive regular expression of whole words or their plural, ``*`` for any
ending; a cue right after "no", "not", "without", "don't have" … is denied, not said.
The first entry that matches answers, and a conversation hears each of its replies before one
comes again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from persona.rotation import unheard

# A cue right after one of these is denied, not reported: "no fever", "doesn't itch".
_DENIED = re.compile(
    r"(?:\b(?:no|not|without|never|none)|\b(?:don'?t|doesn'?t|didn'?t|haven'?t|hasn'?t|"
    r"isn'?t|wasn'?t|aren'?t))\s+(?:(?:have|had|got|get|feel|any|a|an|really)\s+){0,2}$", re.I)


def _cue(text: str) -> re.Pattern[str]:
    """A cue of the file as a pattern: whole words or their plural, ``*`` for any ending
    ("vomit*")."""
    return re.compile(r"\b(?:" + text.replace("*", r"\w*") + r")(?:e?s)?\b", re.I)


def _present(cue: re.Pattern[str], message: str) -> bool:
    return any(not _DENIED.search(message[:m.start()]) for m in cue.finditer(message))


def _anyone(message: str) -> bool:
    return True


Rule = tuple[re.Pattern[str], ...]


def _any_rule(rules: tuple[Rule, ...], message: str) -> bool:
    return any(all(_present(cue, message) for cue in rule) for rule in rules)


def _rules(raw: object) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise TypeError(f"rules must be a list, not {raw!r}")
    return tuple(tuple(_cue(part.strip()) for part in str(rule).split(" & ")) for rule in raw)


@dataclass(frozen=True)
class CuedEntry:
    """One entry: the rules that recognise it (any rule; every cue of a rule), the rules
    that keep it out (``unless``: any) and the answers to it."""

    name: str
    rules: tuple[Rule, ...]
    replies: tuple[str, ...]
    unless: tuple[Rule, ...] = ()

    def matches(self, message: str) -> bool:
        return _any_rule(self.rules, message) and not _any_rule(self.unless, message)


@dataclass(frozen=True)
class CuedAnswers:
    """A file's entries in their order: the first that matches answers, for the messages
    ``applies`` admits (all of them unless the file's kind says otherwise)."""

    entries: tuple[CuedEntry, ...] = ()
    applies: Callable[[str], bool] = _anyone

    def find(self, message: str) -> CuedEntry | None:
        """The entry ``message`` names, or None."""
        if not self.entries or not self.applies(message):
            return None
        return next((e for e in self.entries if e.matches(message)), None)

    def answer(self, message: str, seed: int, avoid: Collection[str] = ()) -> str | None:
        """The answer to the entry ``message`` names (``seed`` picks which), one the
        conversation has not heard (``avoid``) while there is one — else the same again: the
        right answer twice beats a line of the series that contradicts it (a stiff neck with a
        fever asked twice got "No fever, no neck pain." the second time). None: no entry."""
        found = self.find(message)
        return unheard(found.replies, seed, avoid) if found is not None else None


def load_cued(path: Path, what: str, applies: Callable[[str], bool] = _anyone) -> CuedAnswers:
    """Read a file of ``what`` entries ("differential", "topic"); a broken entry is a clear
    error naming the file and it."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    guards: dict[str, tuple[Rule, ...]] = {}
    if isinstance(raw, dict):
        try:
            guards = {str(k): _rules(v) for k, v in (raw.get("guards") or {}).items()}
        except (AttributeError, TypeError, re.error) as e:
            raise ValueError(f"{path}: its guards are broken ({e!r}); each is a list of "
                             "rules") from e
        raw = raw.get("entries") or []
    entries = []
    for i, item in enumerate(raw):
        name = str(item.get("name", f"entry {i + 1}")) if isinstance(item, dict) else str(i + 1)
        try:
            rules = _rules(item["when"])
            replies = tuple(str(r).strip() for r in item["replies"] if str(r).strip())
            unless = tuple(rule for guard in item.get("unless", []) for rule in guards[guard])
        except (KeyError, TypeError, re.error) as e:
            raise ValueError(f"{path}: {what} {name!r} is broken ({e!r}); each needs "
                             "`when` (rules of cues joined by ' & ') and `replies`, and "
                             "`unless` may name the file's guards") from e
        if not rules or not replies:
            raise ValueError(f"{path}: {what} {name!r} needs a rule and a reply")
        entries.append(CuedEntry(name=name, rules=rules, replies=replies, unless=unless))
    return CuedAnswers(tuple(entries), applies)
