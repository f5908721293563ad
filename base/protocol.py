"""Request and reply as they travel on the streams: JSON in one stream field, ``data``.

The schema is the one in DESIGN.md. Frontends build `Request`s; workers answer with `Reply`s.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from base.commands import CHAT, KINDS

FIELD = "data"

class ProtocolError(ValueError):
    """A stream entry that is not a valid request or reply."""


class Request(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    frontend: str
    conversation: str
    user: str
    speaker: str = ""
    kind: str = CHAT  # one of base.commands.KINDS
    text: str = ""
    variants: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    # Where the frontend delivers the reply (chat id, message id …); copied into the reply so
    # a restarted frontend can still deliver it.
    route: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown request kind {value!r} (known: {', '.join(KINDS)})")
        return value

    def dumps(self) -> dict[str, str]:
        return {FIELD: self.model_dump_json()}

    def envelope(self) -> str:
        """The request without what the user wrote: enough to answer it when it is lost."""
        return self.model_copy(update={"text": "", "variants": [], "settings": {}}
                               ).model_dump_json()

    @classmethod
    def loads(cls, fields: dict[Any, Any]) -> Request:
        return _load(cls, fields)


class Variant(BaseModel):
    name: str
    text: str
    tokens: int = 0
    ms: float = 0.0
    won: str | None = None  # "generated" or "canon": what the reply choice picked


class Reply(BaseModel):
    id: str
    conversation: str
    text: str | None = None
    variants: list[Variant] | None = None
    error: str | None = None
    worker: str = ""
    tokens: int = 0
    queued_ms: float = 0.0
    generation_ms: float = 0.0
    batch_size: int = 0
    kind: str = "chat"
    # "generated", "canon", "differential" or "topic": the kind of reply that won
    won: str | None = None
    # Set on a partial event (the text generated so far, numbered from 1) that a final reply
    # with the same id supersedes; None on the final reply.
    partial: int | None = None
    route: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    def dumps(self) -> dict[str, str]:
        return {FIELD: self.model_dump_json(exclude_none=True)}

    @classmethod
    def loads(cls, fields: dict[Any, Any]) -> Reply:
        return _load(cls, fields)


def _load(model: type[BaseModel], fields: dict[Any, Any]):  # type: ignore[no-untyped-def]
    raw = fields.get(FIELD, fields.get(FIELD.encode()))
    if raw is None:
        raise ProtocolError(f"stream entry has no {FIELD!r} field")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        return model.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ProtocolError(f"invalid {model.__name__}: {exc}") from exc
