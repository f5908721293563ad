"""Streamed replies on platforms that can edit a message (Telegram, Discord).

The worker publishes the text so far as partial events while a reply generates. The first
one is sent as a message (through the chat's outbox, so it keeps its place among the chat's
sends); later ones edit that message, at most once per ``interval_s(chat)`` per chat
(asyncio-throttle), each edit showing the newest text. The final reply, which may be another
candidate or a line from the series, edits the message a last time (its first piece; the rest
are sent after it). A reply whose first partial never reached the chat is sent normally.

The state is one small record per reply being streamed, dropped when its final reply is sent
(at most ``max_streams``; past that, replies are not streamed). A frontend restarted
mid-stream sends the final reply as a new message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncio_throttle import Throttler

from bots.outbox import ChatOutbox

log = logging.getLogger(__name__)

SendFirst = Callable[[Hashable, str], Awaitable[Any]]  # (chat, text) → the sent message
Edit = Callable[[Hashable, Any, str], Awaitable[object]]  # (chat, message, text)
SendMore = Callable[[Hashable, str], Awaitable[object]]  # (chat, text): a piece after it


@dataclass
class Stream:
    chat: Hashable
    latest: str  # the newest text so far
    message: Any = None  # the platform's message, once the first partial is sent
    shown: str = ""  # what the chat shows now
    final: bool = False
    editing: asyncio.Task[None] | None = field(default=None, repr=False)


class StreamedReplies:
    def __init__(self, outbox: ChatOutbox, interval_s: Callable[[Hashable], float],
                 limit: int, max_streams: int = 1000):
        """``interval_s(chat)``: the least time between two edits in a chat (the platform's
        limit); ``limit``: the longest message the platform takes."""
        self.outbox = outbox
        self.interval_s = interval_s
        self.limit = limit
        self.max_streams = max_streams
        self.edits = 0  # edits made, for tests and logs
        self._streams: dict[str, Stream] = {}
        self._throttlers: dict[Hashable, Throttler] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def partial(self, reply_id: str, chat: Hashable, text: str, send_first: SendFirst,
                edit: Edit) -> None:
        """Show the text so far of ``reply_id`` (never waits for the platform)."""
        text = text[: self.limit].strip()
        if not text:
            return
        stream = self._streams.get(reply_id)
        if stream is None:
            if len(self._streams) >= self.max_streams:
                return
            stream = self._streams[reply_id] = Stream(chat, text)
            self.outbox.submit(chat, lambda: self._send_first(stream, send_first, edit))
            return
        stream.latest = text
        self._edit_soon(stream, edit)

    def take(self, reply_id: str) -> Stream | None:
        """The stream of a reply whose final text is about to be sent (no longer updated)."""
        stream = self._streams.pop(reply_id, None)
        if stream is not None:
            stream.final = True
            if not any(s.chat == stream.chat for s in self._streams.values()):
                self._throttlers.pop(stream.chat, None)
        return stream

    async def finish(self, stream: Stream, pieces: Sequence[str], edit: Edit,
                     send_more: SendMore) -> bool:
        """Edit the streamed message to the final reply (inside the final reply's outbox
        send); False when there is no message to edit, or the edit failed: then the reply is
        sent normally."""
        if stream.editing is not None and not stream.editing.done():
            stream.editing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream.editing
        if stream.message is None or not pieces:
            return False
        if pieces[0] != stream.shown:
            try:
                await edit(stream.chat, stream.message, pieces[0])
            except Exception as exc:  # deleted meanwhile, too old to edit …: send it anew
                log.warning("the final edit of a streamed reply failed (%s); sending it",
                            type(exc).__name__)
                return False
            self.edits += 1
        for piece in pieces[1:]:
            await send_more(stream.chat, piece)
        return True

    async def _send_first(self, stream: Stream, send_first: SendFirst, edit: Edit) -> None:
        if stream.final:
            return  # the final reply came first: it is sent on its own
        text = stream.latest
        stream.message = await send_first(stream.chat, text)
        stream.shown = text
        self._edit_soon(stream, edit)  # text that arrived while it was being sent

    def _edit_soon(self, stream: Stream, edit: Edit) -> None:
        if (stream.message is None or stream.final or stream.latest == stream.shown
                or (stream.editing is not None and not stream.editing.done())):
            return
        stream.editing = asyncio.get_running_loop().create_task(self._edit(stream, edit))

    async def _edit(self, stream: Stream, edit: Edit) -> None:
        throttler = self._throttlers.setdefault(
            stream.chat, Throttler(rate_limit=1, period=self.interval_s(stream.chat)))
        while not stream.final and stream.latest != stream.shown:
            async with throttler:
                if stream.final:
                    return
                text = stream.latest
                try:
                    await edit(stream.chat, stream.message, text)
                except Exception as exc:  # the final reply still edits or sends
                    log.warning("editing a streamed reply failed (%s)", type(exc).__name__)
                    return
                self.edits += 1
                stream.shown = text
