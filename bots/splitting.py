"""Split long replies into platform-sized messages at sentence boundaries."""

from __future__ import annotations

import re

TELEGRAM_LIMIT = 4096
DISCORD_LIMIT = 2000

_BOUNDARIES = (re.compile(r"(?<=[.!?…])\s+"), re.compile(r"\n+"), re.compile(r"\s+"))


def split_message(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut after a sentence where possible, then at a
    line break, then at a space, and only as a last resort inside a word. Joining the pieces
    with single spaces gives back the text up to whitespace."""
    if limit < 1:
        raise ValueError("limit must be positive")
    text = text.strip()
    pieces: list[str] = []
    while len(text) > limit:
        window = text[: limit + 1]
        cut = -1
        for boundary in _BOUNDARIES:
            matches = [m for m in boundary.finditer(window) if 0 < m.start() <= limit]
            if matches:
                cut = matches[-1].start()
                break
        if cut <= 0:
            cut = limit
        piece, text = text[:cut].rstrip(), text[cut:].lstrip()
        if piece:
            pieces.append(piece)
    if text:
        pieces.append(text)
    return pieces
