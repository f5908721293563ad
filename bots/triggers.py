"""When House answers in a group, whatever the platform.

In a private chat or DM every message is for him. In a group he answers only when addressed:

- a command (``/compare …``; ``/cmd@OtherBot`` is for another bot and ignored),
- a mention of his account (``@DrHouseBot`` on Telegram, ``<@id>`` on Discord),
- a reply to one of his messages,
- his name, as written in the ``BOT_NAMES`` setting ("House", "Dr. House"), as a whole word
  and case-sensitive, so "my house is on fire" and "greenhouse" do not wake him.

Otherwise he stays silent. The platform decides what counts as a mention or a reply (it has
the message entities); this module decides what they mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import StrEnum

from bots.commands import parse_command


class Reason(StrEnum):
    PRIVATE = "private"
    COMMAND = "command"
    MENTION = "mention"
    REPLY = "reply"
    NAME = "name"


def name_pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    """A whole-word, case-sensitive pattern for any of ``names`` (longest first)."""
    names = sorted({n.strip() for n in names if n.strip()}, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![\w@/])(?:{alternatives})(?!\w)")


class Triggers:
    """The trigger rules for one bot account.

    ``username`` is the account's handle without ``@`` (Telegram; commands addressed to
    another bot are ignored); ``mention_tokens`` are the strings that mention the account in
    message text (``@DrHouseBot``; ``<@123>`` and ``<@!123>`` on Discord) and are removed
    from what the model sees.
    """

    def __init__(self, names: Sequence[str], username: str = "",
                 mention_tokens: Iterable[str] = ()):
        self.username = username.lstrip("@")
        self.names = name_pattern(names)
        tokens = sorted({t for t in mention_tokens if t}, key=len, reverse=True)
        self._mentions = (re.compile("|".join(rf"{re.escape(t)}(?!\w)" for t in tokens),
                                     re.IGNORECASE) if tokens else None)

    def is_for_me(self, command_target: str) -> bool:
        return not command_target or command_target.lower() == self.username.lower()

    def mentions_name(self, text: str) -> bool:
        return bool(self.names and self.names.search(text))

    def reason(self, text: str, *, private: bool, mentioned: bool = False,
               replied_to_bot: bool = False) -> Reason | None:
        """Why House answers this message, or None when he stays silent."""
        command = parse_command(text)
        if command is not None and not self.is_for_me(command.target):
            return None
        if private:
            return Reason.PRIVATE
        if command is not None:
            return Reason.COMMAND
        if mentioned:
            return Reason.MENTION
        if replied_to_bot:
            return Reason.REPLY
        if self.mentions_name(text):
            return Reason.NAME
        return None

    def clean(self, text: str) -> str:
        """The message without mentions of the bot account (his name stays: it is speech)."""
        if self._mentions is not None:
            text = self._mentions.sub(" ", text)
        text = re.sub(r"[ \t]{2,}", " ", text)
        return re.sub(r"^[\s,:;]+", "", text).strip()
