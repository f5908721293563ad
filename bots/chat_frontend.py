"""The one shape of a chat frontend: what Telegram and Discord share.

`ChatFrontend` owns the core (commands, limits, queueing), the per-chat outbox, the typing
indicator and its timeout notice, streamed replies and the delivery of replies from the reply
stream. A platform subclass says only what differs: how a reply's route names a chat, how to
send one piece of text, edit it and show "typing…", which send errors are lost causes, and how
its events become messages for the core (mentions, replies, threads).

A chat is addressed by ``(chat, reply_to, where)``: the outbox key (Telegram chat id, Discord
channel id), the message to reply to (or None), and the platform's extra place (Telegram's
forum topic, Discord's guild).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from base.config import Settings
from base.keys import Keys
from base.protocol import Reply
from base.queue_client import RETRY, UNDELIVERABLE, QueueClient
from bots.core import FrontendCore, Immediate, Incoming
from bots.formatting import format_reply
from bots.outbox import ChatOutbox, Outcome
from bots.serving import serve_replies
from bots.splitting import split_message
from bots.streaming import Stream, StreamedReplies
from bots.typing_indicator import TypingIndicator
from persona.pack import Persona

log = logging.getLogger(__name__)

# Where a reply goes: (outbox key, message to reply to, topic or guild).
Address = tuple[Any, Any, Any]
# Where "typing…" is shown and the timeout notice goes: (outbox key, topic or guild).
Place = tuple[Any, Any]


class ChatFrontend(ABC):
    frontend_id: ClassVar[str]
    limit: ClassVar[int]  # characters per platform message
    # Send errors that can never succeed (blocked, chat gone): the reply is dropped and
    # counted; any other failed send is retried.
    lost_causes: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 reader_block_ms: int = 1000):
        self.settings = settings
        self.persona = persona
        self.queue = queue
        self.core = FrontendCore(settings, persona, queue, keys)
        backlog = persona.line("backlog")
        self.outbox = ChatOutbox(
            self.classify_send_error, on_full=self.core.metrics.held_back,
            notice=lambda chat: lambda: self.send_text(chat, backlog))
        self.streams = StreamedReplies(self.outbox, self.edit_interval_s, self.limit)
        frontend = settings.frontend
        if frontend.stream_replies:
            queue.on_partial = self.partial
        self.typing: TypingIndicator[Place] = TypingIndicator(
            self.send_typing, frontend.typing_interval_s, frontend.reply_timeout_s,
            on_expire=self._timed_out)
        self.reader_block_ms = reader_block_ms

    # ---- what each platform says ---------------------------------------------------------

    def classify_send_error(self, exc: BaseException) -> Outcome:
        return UNDELIVERABLE if isinstance(exc, self.lost_causes) else RETRY

    @abstractmethod
    def address(self, route: dict[str, Any]) -> Address | None:
        """Where a reply with this route goes; None when the route names no chat."""

    @abstractmethod
    async def send_piece(self, chat: Any, piece: str, reply_to: Any, where: Any) -> Any:
        """Send one piece (within ``limit``); returns what ``edit`` needs to change it."""

    @abstractmethod
    async def edit(self, chat: Any, sent: Any, text: str) -> None:
        """Replace the text of a message ``send_piece`` sent."""

    @abstractmethod
    async def send_typing(self, place: Place) -> None:
        """Show "typing…" at ``place``."""

    def edit_interval_s(self, chat: Hashable) -> float:
        """Least time between two edits of a streamed reply in ``chat``."""
        return 1.0

    def deliver_elsewhere(self, reply: Reply, text: str) -> Callable[[], Any] | None:
        """A send that replaces the usual one for this reply (Discord's slash commands answer
        through their interaction), or None."""
        return None

    def streams_reply(self, reply: Reply) -> bool:
        """Whether this reply's partial text is shown as it grows."""
        return True

    # ---- the message flow ------------------------------------------------------------------

    async def submit(self, incoming: Incoming, say: Callable[[str], None], place: Place) -> None:
        """Hand a message to the core: say its immediate answer, or show "typing…" until the
        reply comes (and say that it waits when no worker runs)."""
        outcome = await self.core.handle(incoming)
        if isinstance(outcome, Immediate):
            say(outcome.text)
            return
        self.typing.start(outcome.id, place)
        notice = await self.core.queued_notice()
        if notice is not None:
            say(notice)

    async def serve_replies(self) -> None:
        """The reply reader and typing refresher until cancelled (beside the platform client)."""
        await serve_replies(self.queue, self.deliver, self.typing, self.outbox,
                            self.reader_block_ms)

    async def deliver(self, reply: Reply) -> asyncio.Task[Outcome] | str:
        """Called by the reply reader: queue the reply for its chat (never waits for a send);
        the send's task tells the reader when to acknowledge it."""
        waited_s = self.typing.done(reply.id)
        if waited_s is not None:
            self.core.metrics.reply_seconds.labels(self.frontend_id).observe(waited_s)
        text = format_reply(reply) or self.persona.line("fallback")
        elsewhere = self.deliver_elsewhere(reply, text)
        address = self.address(reply.route)
        if address is None:
            log.error("reply %s has no chat in its route; dropped", reply.id)
            return UNDELIVERABLE
        chat, reply_to, where = address
        if elsewhere is not None:
            return self.outbox.submit(chat, elsewhere)
        stream = self.streams.take(reply.id)
        if stream is not None:
            return self.outbox.submit(chat, lambda: self._finish_stream(stream, text, address))
        return self.outbox.submit(chat, lambda: self.send_text(chat, text, reply_to, where))

    async def partial(self, reply: Reply) -> None:
        """The reply's text so far: sent at once, then edited as it grows (`bots.streaming`)."""
        address = self.address(reply.route)
        if address is None or not reply.text or not self.streams_reply(reply):
            return
        chat, reply_to, where = address

        async def send_first(chat: Any, text: str) -> Any:
            return await self.send_piece(chat, text, reply_to, where)

        self.streams.partial(reply.id, chat, reply.text, send_first, self.edit)

    async def _finish_stream(self, stream: Stream, text: str, address: Address) -> None:
        chat, reply_to, where = address

        async def send_more(chat: Any, piece: str) -> None:
            await self.send_piece(chat, piece, None, where)

        if not await self.streams.finish(stream, split_message(text, self.limit), self.edit,
                                         send_more):
            await self.send_text(chat, text, reply_to, where)

    async def send_text(self, chat: Any, text: str, reply_to: Any = None,
                        where: Any = None) -> None:
        """Plain text in pieces of at most ``limit`` characters, the first one as a reply.
        Errors are raised: the outbox tells a lost cause from one worth a retry."""
        for i, piece in enumerate(split_message(text, self.limit)):
            await self.send_piece(chat, piece, reply_to if i == 0 else None, where)

    def _timed_out(self, request_id: str, place: Place) -> None:
        chat, where = place
        text = self.persona.line("timeout")
        self.outbox.submit(chat, lambda: self.send_text(chat, text, None, where))
