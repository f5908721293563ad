"""The one table of chat commands and request kinds.

Each row says what a command is and how every part treats it: the frontends' core (answer it
at once or enqueue a request of ``kind``; admins only; counted by the per-user limit), the
protocol (the request kinds it accepts), the worker (what it may answer while a batch runs,
what writes history), Telegram's ``setMyCommands`` and Discord's slash commands. A new
command is one row here plus the code that answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT = "chat"  # the request kind of an ordinary message


@dataclass(frozen=True)
class CommandSpec:
    name: str
    description: str
    kind: str | None = None  # the request kind it enqueues; None: the frontend answers it
    takes_text: bool = False  # "/compare <text>": the text is the request's message
    needs_model: bool = True  # False: a worker answers it at once, even while a batch runs
    writes_history: bool = False  # its question and answer join the conversation's history
    admin_only: bool = False
    rate_limited: bool = True  # counts against the per-user limit (every kind does today)
    slash: bool = False  # registered as a Discord slash command


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("start", "greeting and a not-medical-advice notice"),
    CommandSpec("help", "what House can do", slash=True),
    CommandSpec("reset", "clear this conversation's history", kind="reset",
                needs_model=False, slash=True),
    CommandSpec("compare", "base model and House answer the same message: /compare <text>",
                kind="compare", takes_text=True, slash=True),
    CommandSpec("retry", "regenerate the last answer", kind="retry", writes_history=True),
    CommandSpec("forget", "delete everything stored about you", kind="forget",
                needs_model=False, slash=True),
    CommandSpec("stats", "queue and reply counters (admins only)", admin_only=True),
)
BY_NAME: dict[str, CommandSpec] = {c.name: c for c in COMMANDS}

# Request kinds: an ordinary message and every command a worker answers.
KINDS: tuple[str, ...] = (CHAT, *(c.kind for c in COMMANDS if c.kind))
# Kinds a worker answers without the model (its control lane, while a batch runs).
CONTROL_KINDS: frozenset[str] = frozenset(c.kind for c in COMMANDS
                                          if c.kind and not c.needs_model)
# Kinds whose question and answer are written to the conversation's history.
HISTORY_KINDS: frozenset[str] = frozenset(
    {CHAT, *(c.kind for c in COMMANDS if c.kind and c.writes_history)})
