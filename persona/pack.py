"""The persona pack: a YAML file with the system prompt, lines and generation controls."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from persona.cued import CuedAnswers, load_cued
from persona.differentials import load_differentials
from persona.rotation import unheard

PACKS_DIR = Path(__file__).resolve().parent / "packs"


@dataclass(frozen=True)
class Controls:
    """Generation controls; persona defaults, overridable per request."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 3
    sentence_cap: int = 3
    candidates: int = 2
    seed: int = 0

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "max_new_tokens": (1, 512),
        "temperature": (0.0, 2.0),
        "top_p": (0.05, 1.0),
        "repetition_penalty": (1.0, 2.0),
        "no_repeat_ngram_size": (0, 10),
        "sentence_cap": (1, 10),
        "candidates": (1, 8),
        "seed": (0, 2**31 - 1),
    }

    def merged(self, overrides: dict[str, Any] | None) -> Controls:
        """These controls with ``overrides`` applied; unknown keys are ignored, values clamped."""
        if not overrides:
            return self
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known or value is None:
                continue
            low, high = self.LIMITS[key]
            cast = int if isinstance(getattr(self, key), int) else float
            try:
                changes[key] = min(max(cast(value), low), high)
            except (TypeError, ValueError):
                continue
        return replace(self, **changes)


@dataclass(frozen=True)
class Persona:
    name: str
    full_name: str
    system_prompt: str
    greeting: str
    disclaimer: str
    help: str
    other_speakers: tuple[str, ...]
    controls: Controls
    lines: dict[str, str] = field(default_factory=dict)
    jabs: tuple[str, ...] = ()
    language_jabs: tuple[str, ...] = ()
    filler_jabs: tuple[str, ...] = ()
    role_jabs: tuple[str, ...] = ()
    errand_jabs: tuple[str, ...] = ()
    greeting_jabs: tuple[str, ...] = ()
    mash_jabs: tuple[str, ...] = ()
    harm_jabs: tuple[str, ...] = ()
    link_jabs: tuple[str, ...] = ()
    differentials: CuedAnswers = field(default_factory=CuedAnswers)
    topics: CuedAnswers = field(default_factory=CuedAnswers)

    def jab(self, seed: int, kind: str = "no_words", avoid: Collection[str] = ()) -> str:
        """A short jab for a message with no words in it (``no_words``), in another language
        (``language``), of nothing but "ok", "hmm", "lol" (``filler``), an attempt to make him
        someone else (``role``), a chore for an assistant (``errand``), a bare greeting
        (``greeting``), a keyboard mash (``mash``), a request for a dose to harm someone
        (``harm``) or a bare link (``link``); ``seed`` picks
        which, the next one on when it is in ``avoid`` (what the conversation already heard)
        while another is left. A kind the pack has no jabs for gets the no-words ones."""
        pool = {"language": self.language_jabs, "filler": self.filler_jabs,
                "role": self.role_jabs, "errand": self.errand_jabs,
                "greeting": self.greeting_jabs, "mash": self.mash_jabs,
                "harm": self.harm_jabs, "link": self.link_jabs}.get(kind) or self.jabs
        if not pool:
            return self.line("empty")
        return unheard(pool, seed, avoid)

    def line(self, key: str) -> str:
        """A canned in-character line (``busy``, ``error`` …); falls back to ``error``."""
        return self.lines.get(key) or self.lines.get("error", "Something went wrong.")


def load_persona(name_or_path: str = "house") -> Persona:
    """Load a pack by name (``persona/packs/<name>.yaml``) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PACKS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"persona pack not found: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Persona(
        name=raw["name"],
        full_name=raw.get("full_name", raw["name"]),
        system_prompt=raw["system_prompt"].strip(),
        greeting=raw.get("greeting", "").strip(),
        disclaimer=raw.get("disclaimer", "").strip(),
        help=raw.get("help", "").strip(),
        other_speakers=tuple(raw.get("other_speakers", [])),
        controls=Controls().merged(raw.get("controls", {})),
        lines={k: str(v).strip() for k, v in raw.get("lines", {}).items()},
        jabs=_texts(raw, "jabs", path),
        language_jabs=_texts(raw, "language_jabs", path),
        filler_jabs=_texts(raw, "filler_jabs", path),
        role_jabs=_texts(raw, "role_jabs", path),
        errand_jabs=_texts(raw, "errand_jabs", path),
        greeting_jabs=_texts(raw, "greeting_jabs", path),
        mash_jabs=_texts(raw, "mash_jabs", path),
        harm_jabs=_texts(raw, "harm_jabs", path),
        link_jabs=_texts(raw, "link_jabs", path),
        differentials=load_differentials(path.parent / raw["differentials"])
        if raw.get("differentials") else CuedAnswers(),
        topics=load_cued(path.parent / raw["topics"], "topic")
        if raw.get("topics") else CuedAnswers(),
    )


def _texts(raw: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    """A pack's list of lines under ``key``; an item YAML read as something else (an unquoted
    line with ": " in it is a mapping) is a clear error, not a reply printed as a dict."""
    items = raw.get(key) or []
    bad = [j for j in items if not isinstance(j, str)]
    if bad:
        raise ValueError(f"{path}: {key} holds {bad[0]!r}, not a line of text; quote a line "
                         "that contains ': ' or starts with a special character")
    return tuple(j.strip() for j in items if j.strip())
