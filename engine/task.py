"""One request of a batch on its way through the worker: what intake admitted, the rows the
engine generates for it, and what output makes of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from base.protocol import Reply, Request
from persona.pack import Controls
from persona.reply_choice import GENERATED, CanonScores


@dataclass
class Task:
    """One request of a batch and the generation rows it needs."""

    entry_id: str
    request: Request
    text: str = ""
    speaker: str = ""
    variants: list[str] = field(default_factory=list)
    controls: Controls | None = None
    rows: list[int] = field(default_factory=list)
    reply: Reply | None = None
    mode: str = GENERATED
    context: tuple[str, ...] = ()  # the exchange before the message, for the selector
    prompt: str = ""  # the conversation as the adapter reads it, for the listener
    mentioned: str = ""  # the conversation's text: names a canon line may use
    heard: set[int] = field(default_factory=set)  # canon rows heard lately
    canon_row: int | None = None  # the canon line that won, to remember
    # /compare: the pack's written answer (kind, text) to the message — what the bot answers
    answer: tuple[str, str] | None = None
    scores: CanonScores | None = None  # the reply choice's scoring so far (ReplyBuilder)
    listens: bool = False  # whether the listener scores this reply (decided with ``scores``)
    choice_s: float = 0.0  # seconds spent choosing its reply (selector, listener, classifier)
    shortlist: int = 0  # canon lines the listener re-ranks for it
    partials: int = 0  # partial events published (their sequence number)
    partial_text: str = ""
    partial_at: float = 0.0  # time.monotonic() of the last one
