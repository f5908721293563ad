"""Command parsing shared by every frontend (the commands themselves: ``base.commands``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Command:
    name: str
    args: str
    target: str = ""  # the @BotName of "/cmd@BotName", if given


def parse_command(text: str) -> Command | None:
    """``/compare@DrHouseBot is it lupus?`` → Command("compare", "is it lupus?", "DrHouseBot").

    Returns None when the text is not a command at all.
    """
    text = text.strip()
    if not text.startswith("/"):
        return None
    match = _COMMAND.match(text)
    if match is None:
        return Command("", text[1:].strip())
    return Command(match.group(1).lower(), (match.group(3) or "").strip(), match.group(2) or "")
