"""Sending to chats: concurrent across chats, in order within one chat.

The reply reader must not wait for a send: a group held back by its rate limit (20 messages a
minute on Telegram) would stall every other chat's replies. So each send runs as its own task,
chained behind the previous send to the same chat, so a chat's messages (and the pieces of a
long reply) keep their order. The state is one task reference per chat with a send in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)


class ChatOutbox:
    def __init__(self) -> None:
        self._tails: dict[Hashable, asyncio.Task[None]] = {}  # last send queued per chat
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tails)

    def submit(self, chat: Hashable, send: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        """Run ``send()`` after the sends already queued for ``chat``; failures are logged."""
        previous = self._tails.get(chat)
        task = asyncio.get_running_loop().create_task(self._run(previous, send))
        self._tails[chat] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._release(chat, done))
        return task

    def _release(self, chat: Hashable, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(chat) is task:
            del self._tails[chat]

    @staticmethod
    async def _run(previous: asyncio.Task[None] | None,
                   send: Callable[[], Awaitable[object]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await send()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sending to a chat failed")

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for queued sends (at shutdown); cancel what is left after ``timeout_s``."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pending:
            log.warning("%d chats still had messages to send at shutdown", len(pending))
