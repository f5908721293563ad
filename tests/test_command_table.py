"""The command table drives the request kinds, the worker's control lane and history rule,
and each platform's command list."""

from __future__ import annotations

import json

import pytest

from base.commands import BY_NAME, COMMANDS, CONTROL_KINDS, HISTORY_KINDS, KINDS
from base.protocol import ProtocolError, Request
from bots.discord_frontend import SLASH_COMMANDS


def test_kinds_come_from_the_table() -> None:
    assert KINDS == ("chat", "reset", "compare", "retry", "forget")
    assert {"reset", "forget"} == CONTROL_KINDS
    assert {"chat", "retry"} == HISTORY_KINDS
    assert SLASH_COMMANDS == ("help", "reset", "compare", "forget")
    assert [c.name for c in COMMANDS if c.admin_only] == ["stats"]
    assert all(len(c.description) <= 100 for c in COMMANDS)  # Discord's limit


def test_the_protocol_refuses_a_kind_the_table_does_not_know() -> None:
    for kind in KINDS:
        assert Request.loads(Request(frontend="f", conversation="c", user="u",
                                     kind=kind).dumps()).kind == kind
    bogus = Request(frontend="f", conversation="c", user="u").model_dump()
    bogus["kind"] = "launch_missiles"
    with pytest.raises(ProtocolError):
        Request.loads({"data": json.dumps(bogus)})


def test_frontend_answered_commands_have_no_kind() -> None:
    assert {c.name for c in COMMANDS if c.kind is None} == {"start", "help", "stats"}
    assert BY_NAME["compare"].takes_text and not BY_NAME["reset"].takes_text
