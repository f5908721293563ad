"""Sending to chats: concurrent across chats, in order within one chat.

The reply reader must not wait for a send: a group held back by its rate limit (20 messages a
minute on Telegram) would stall every other chat's replies. So each send runs as its own task,
chained behind the previous send to the same chat, so a chat's messages (and the pieces of a
long reply) keep their order. The state is one task reference per chat with a send in flight.

Each send's task ends with its outcome, which the reply reader waits for before it
acknowledges the reply (`base.queue_client`): ``sent``; ``undeliverable`` (the platform says
the message can never arrive: bot blocked, chat gone), dropped; ``retry`` (a network error, 429s
past the retries, the frontend stopping), left pending and sent again later, a limited number
of times; ``wait`` (the chat's backlog is full), left pending for as long as it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Literal

from base.queue_client import RETRY, SENT, UNDELIVERABLE, WAIT

log = logging.getLogger(__name__)

Outcome = Literal["sent", "undeliverable", "retry", "wait"]


def retry_everything(exc: BaseException) -> Outcome:
    return RETRY


Notice = Callable[[Hashable], Callable[[], Awaitable[object]]]


class ChatOutbox:
    def __init__(self, classify: Callable[[BaseException], Outcome] = retry_everything,
                 max_per_chat: int = 50, notice: Notice | None = None,
                 on_full: Callable[[], object] | None = None, notice_every_s: float = 600.0):
        """``classify`` tells a failed send's outcome from its exception (platform-specific:
        Telegram's Forbidden is undeliverable, its NetworkError worth a retry). When a chat's
        backlog fills, ``notice(chat)`` is sent to it (at most once in ``notice_every_s``), so
        its people know why answers are slow, and ``on_full()`` counts each refused send."""
        self.classify = classify
        self.max_per_chat = max_per_chat
        self.notice = notice
        self.on_full = on_full
        self.refused = 0  # sends refused because their chat's backlog was full
        self.notice_every_s = notice_every_s
        self._told: dict[Hashable, float] = {}  # chat → when it was told its backlog was full
        self._tails: dict[Hashable, asyncio.Task[Outcome]] = {}  # last send queued per chat
        self._queued: dict[Hashable, int] = {}  # sends queued per chat
        self._tasks: set[asyncio.Task[Outcome]] = set()

    def __len__(self) -> int:
        return len(self._tails)

    def submit(self, chat: Hashable, send: Callable[[], Awaitable[object]]
               ) -> asyncio.Task[Outcome]:
        """Run ``send()`` after the sends already queued for ``chat``; the task's result is the
        outcome (failures are logged, never raised). A chat with ``max_per_chat`` sends
        queued (a group behind its 20-a-minute limit) gets no more: the task ends at once with
        ``wait``, so a reply stays pending in Redis instead of growing this process (a wait is
        no failed send: it never uses up the reply's attempts)."""
        loop = asyncio.get_running_loop()
        if self._queued.get(chat, 0) >= self.max_per_chat:
            self.refused += 1
            if self.on_full is not None:
                self.on_full()
            log.warning("chat backlog full (%d sends); the reply waits in Redis",
                        self.max_per_chat)
            if self.notice is not None and self._may_tell(chat):
                self._queue(chat, self.notice(chat))
            refused: asyncio.Future[Outcome] = loop.create_future()
            refused.set_result(WAIT)
            return refused  # type: ignore[return-value]
        return self._queue(chat, send)

    def _may_tell(self, chat: Hashable) -> bool:
        now = time.monotonic()
        for told in [c for c, at in self._told.items() if now - at > self.notice_every_s]:
            del self._told[told]
        if chat in self._told:
            return False
        self._told[chat] = now
        return True

    def _queue(self, chat: Hashable, send: Callable[[], Awaitable[object]]
               ) -> asyncio.Task[Outcome]:
        loop = asyncio.get_running_loop()
        self._queued[chat] = self._queued.get(chat, 0) + 1
        previous = self._tails.get(chat)
        task = loop.create_task(self._run(previous, send))
        self._tails[chat] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._release(chat, done))
        return task

    def _release(self, chat: Hashable, task: asyncio.Task[Outcome]) -> None:
        self._tasks.discard(task)
        left = self._queued.get(chat, 1) - 1
        if left > 0:
            self._queued[chat] = left
        else:
            self._queued.pop(chat, None)
        if self._tails.get(chat) is task:
            del self._tails[chat]

    async def _run(self, previous: asyncio.Task[Outcome] | None,
                   send: Callable[[], Awaitable[object]]) -> Outcome:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await send()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = self.classify(exc)
            if outcome == UNDELIVERABLE:
                log.warning("a message can never reach its chat (%s); dropped",
                            type(exc).__name__)
            else:
                log.exception("sending to a chat failed; it is sent again later")
            return outcome
        return SENT

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
