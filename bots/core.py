"""What every frontend does with an incoming message, whatever the platform.

`FrontendCore.handle` validates a message, answers commands that need no model at once,
applies the allow-list and the per-user limit, and otherwise enqueues a request. It returns
either a line to send immediately or the submitted `Request` (whose reply arrives later on
the frontend's reply stream).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from base.commands import BY_NAME, CHAT, COMMANDS
from base.config import Settings
from base.keys import Keys
from base.metrics import FrontendMetrics
from base.protocol import Request
from base.queue_client import QueueClient, QueueFull, QueueUnavailable, queue_depth
from base.redis_conn import REDIS_DOWN
from bots.commands import parse_command
from bots.throttle import UserRateLimit
from persona.pack import Persona

log = logging.getLogger(__name__)

# How long a frontend reuses its finding that a worker is (or is not) alive.
WORKER_CHECK_S = 5.0
SEEN_TTL_S = 24 * 3600


@dataclass
class Incoming:
    """A platform message reduced to what the core needs."""

    user: str
    conversation: str
    text: str
    speaker: str = ""
    chat: str = ""
    route: dict[str, Any] = field(default_factory=dict)
    # The id the request gets, when the frontend must know it before submitting (a Discord
    # interaction waiting for its reply); empty: a fresh one.
    request_id: str = ""
    shared: bool = False  # a group's one shared conversation (GROUP_HISTORY=shared)


@dataclass
class Immediate:
    """A line to send now, without the queue."""

    text: str


class FrontendCore:
    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 metrics: FrontendMetrics | None = None, rate_limit: bool = True):
        """``rate_limit`` False: no per-user limit, for a frontend that waits for each reply
        before it takes the next message (the terminal chat), so no user can flood the
        queue through it."""
        self.settings = settings
        self.persona = persona
        self.queue = queue
        self.keys = keys
        self.metrics = metrics or FrontendMetrics(queue.frontend_id)
        self.limit = UserRateLimit(queue.redis, keys,
                                   settings.frontend.user_rate_limit if rate_limit else 0,
                                   settings.frontend.user_rate_window_s)
        self._alive = False
        self._alive_checked = float("-inf")

    async def first_delivery(self, chat: str, message: str) -> bool:
        """False when this (chat, message id) was handled before: Telegram delivers an
        update again after a poll or webhook retry, which would give two answers."""
        try:
            return bool(await self.queue.redis.set(
                self.keys.seen_message(self.queue.frontend_id, chat, message), "1", nx=True,
                ex=SEEN_TTL_S))
        except REDIS_DOWN:
            return True  # cannot tell: answer (handle() says the outage)

    def allowed(self, user: str, chat: str = "") -> bool:
        frontend = self.settings.frontend
        users, chats = frontend.allowed_user_ids, frontend.allowed_chat_ids
        if not users and not chats:
            return True
        return user in users or (bool(chat) and chat in chats)

    def is_admin(self, user: str) -> bool:
        return user in self.settings.frontend.admin_user_ids

    async def handle(self, msg: Incoming) -> Immediate | Request:
        try:
            outcome = await self._handle(msg)
        except QueueFull:
            outcome = Immediate(self.persona.line("busy"))
        except (QueueUnavailable, *REDIS_DOWN):
            outcome = Immediate(self.persona.line("outage"))
        self.metrics.count("queued" if isinstance(outcome, Request) else "immediate")
        return outcome

    async def _handle(self, msg: Incoming) -> Immediate | Request:
        p = self.persona
        if not self.allowed(msg.user, msg.chat):
            return Immediate(p.line("not_allowed"))
        text = msg.text.strip()
        if not text:
            return Immediate(p.line("empty"))
        command = parse_command(text)
        spec = BY_NAME.get(command.name) if command is not None else None
        # Every kind counts against the per-user limit (the table's rate_limited): /reset floods
        # and /help spam would fill the queue or burn the platform's send budget for everyone.
        if (spec is None or spec.rate_limited) and not await self.limit.allow(msg.user):
            return Immediate(p.line("slow_down"))
        kind, body = CHAT, text
        if command is not None:
            if spec is None:
                return Immediate(p.line("unknown_command"))
            if spec.admin_only and not self.is_admin(msg.user):
                return Immediate(p.line("not_allowed"))
            if spec.kind is None:
                return Immediate(await self.answer_here(spec.name))
            if spec.takes_text and not command.args:
                return Immediate(f"{spec.name.capitalize()} what? /{spec.name} <your message>")
            kind, body = spec.kind, command.args if spec.takes_text else ""
        if len(body) > self.settings.frontend.max_message_chars:
            return Immediate(p.line("too_long"))
        settings = {}
        if kind == "reset" and msg.shared and not self.is_admin(msg.user):
            settings["scope"] = "own"  # only an admin clears everyone's shared history
        request = Request(frontend=self.queue.frontend_id, conversation=msg.conversation,
                          user=msg.user, speaker=msg.speaker, kind=kind, text=body,
                          route=msg.route, settings=settings,
                          **({"id": msg.request_id} if msg.request_id else {}))
        await self.queue.submit(request)
        log.info("request %s kind=%s chars=%d", request.id, kind, len(body))
        return request

    async def non_text(self, user: str, chat: str = "") -> Immediate | None:
        """A sticker, photo or voice message: a line, or None once the user is over the
        per-user limit (a flood of media gets silence, not a flood of replies)."""
        if not self.allowed(user, chat):
            return Immediate(self.persona.line("not_allowed"))
        if not await self.limit.allow(user):
            return None
        return Immediate(self.persona.line("non_text"))

    async def queued_notice(self) -> str | None:
        """A line to send right after a request was queued while no worker is serving: the
        request waits in the stream and is answered when a worker is back. None while a
        worker is alive (or Redis cannot tell)."""
        try:
            alive = await self.workers_alive()
        except REDIS_DOWN:
            return None
        return None if alive else self.persona.line("queued")

    async def workers_alive(self, fresh: bool = False) -> bool:
        """Whether any worker's health key exists (workers refresh it every loop; it expires
        HEALTH_WINDOW_S after the last). Checked at most every WORKER_CHECK_S, unless ``fresh``."""
        now = time.monotonic()
        if fresh or now - self._alive_checked >= WORKER_CHECK_S:
            found = False
            async for _ in self.queue.redis.scan_iter(match=self.keys.health_pattern,
                                                      count=1000):
                found = True
                break
            self._alive, self._alive_checked = found, now
        return self._alive

    async def answer_here(self, name: str) -> str:
        """The commands the frontend answers itself (the table's rows without a kind)."""
        p = self.persona
        if name == "start":
            return f"{p.greeting}\n\n{p.disclaimer}"
        if name == "help":
            listing = "\n".join(f"/{c.name} — {c.description}" for c in COMMANDS)
            return f"{p.help}\n\n{listing}"
        if name == "stats":
            return await self.stats()
        raise ValueError(f"/{name} has no answer in the frontend")

    async def stats(self) -> str:
        redis = self.queue.redis
        counters = await redis.hgetall(self.keys.stats)
        depth = await queue_depth(redis, self.keys)
        workers = [k async for k in redis.scan_iter(match=self.keys.health_pattern)]
        return (f"Queue: {depth} waiting. Workers alive: {len(workers)}. "
                f"Replies: {counters.get('replies', 0)}, errors: {counters.get('errors', 0)}, "
                f"dead letters: {counters.get('dead_letters', 0)}.")
