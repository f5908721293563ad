"""Show "typing…" while requests wait for their replies, for any number of chats.

Platforms show a typing action for a few seconds (Telegram 5, Discord 10), so it must be
refreshed until the reply is delivered. Instead of one task per request, one loop ticks every
``interval_s`` and sends one action per chat that still has a pending request; an entry is
dropped when its reply arrives (`done`) or after ``timeout_s`` (then ``on_expire`` can tell
the user; a reply that comes later is still delivered). The state is one small tuple
per pending request. Typing is best effort: a failed action is logged at debug level and
never reaches the user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Target = TypeVar("Target", bound=Hashable)
MAX_PENDING = 10_000


class TypingIndicator(Generic[Target]):
    def __init__(self, send: Callable[[Target], Awaitable[object]], interval_s: float = 4.0,
                 timeout_s: float = 120.0,
                 on_expire: Callable[[str, Target], object] | None = None):
        self.send = send
        self.on_expire = on_expire  # called for a request whose reply did not come in time
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._pending: dict[str, tuple[Target, float]] = {}
        self._waiting: dict[Target, int] = {}  # pending requests per chat
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies that arrived before `start` was called for them (a fast worker can answer
        # before the handler gets back from submitting): `start` then does nothing.
        self._early: deque[str] = deque(maxlen=256)

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, request_id: str, target: Target) -> None:
        """Show typing in ``target`` now and keep it up until `done(request_id)`. At most
        ``MAX_PENDING`` requests are tracked; past that the oldest one stops typing."""
        if request_id in self._pending or request_id in self._early:
            return
        while len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            self._forget(self._pending.pop(oldest)[0])
        self._pending[request_id] = (target, time.monotonic())
        self._waiting[target] = self._waiting.get(target, 0) + 1
        if self._waiting[target] == 1:
            self._spawn(target)

    def done(self, request_id: str) -> float | None:
        """Stop typing for a request; returns seconds since `start`, None if unknown here
        (another instance received the message, or it timed out)."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            self._early.append(request_id)
            return None
        self._forget(entry[0])
        return time.monotonic() - entry[1]

    def _forget(self, target: Target) -> None:
        left = self._waiting.get(target, 0) - 1
        if left > 0:
            self._waiting[target] = left
        else:
            self._waiting.pop(target, None)

    def targets(self) -> set[Target]:
        """Chats that still wait; expired entries are dropped."""
        deadline = time.monotonic() - self.timeout_s
        for request_id, (target, started) in list(self._pending.items()):
            if started < deadline:
                del self._pending[request_id]
                self._forget(target)
                log.warning("request %s: no reply after %.0fs, typing stopped", request_id,
                            self.timeout_s)
                if self.on_expire is not None:
                    self.on_expire(request_id, target)
        return set(self._waiting)

    async def run(self) -> None:
        """Refresh every ``interval_s`` until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                for target in self.targets():
                    self._spawn(target)
        finally:
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, target: Target) -> None:
        task = asyncio.get_running_loop().create_task(self._send(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, target: Target) -> None:
        try:
            await self.send(target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("typing action failed: %s", type(exc).__name__)
