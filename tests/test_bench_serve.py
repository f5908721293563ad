"""`drhouse bench serve`'s load shapes: closed loop waits for each reply, open loop does not."""

from __future__ import annotations

import asyncio

from engine.bench import _serve_level


def _recording_ask(in_flight: list[int], peak: list[int], reply_s: float):  # type: ignore[no-untyped-def]
    async def ask(conversation: str, text: str, kind: str = "chat"):  # type: ignore[no-untyped-def]
        if kind == "reset":
            return 1.0, None, 0
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(reply_s)
        in_flight[0] -= 1
        return reply_s * 1000, reply_s * 500, 8

    return ask


def test_closed_loop_keeps_one_message_per_conversation_in_flight() -> None:
    in_flight, peak = [0], [0]
    figures = asyncio.run(_serve_level(_recording_ask(in_flight, peak, 0.05), 2, 3,
                                       lambda: 0))
    assert figures["replies"] == 6
    assert peak[0] == 2


def test_open_loop_sends_without_waiting_for_replies() -> None:
    in_flight, peak = [0], [0]
    figures = asyncio.run(_serve_level(_recording_ask(in_flight, peak, 0.5), 2, 4,
                                       lambda: 0, arrival_gap_s=0.01))
    assert figures["replies"] == 8
    assert peak[0] > 2  # a conversation's later messages left before its first reply came
