"""A local fake of the Telegram Bot API, for running the real python-telegram-bot offline.

`FakeTelegram` is an aiohttp server that speaks enough of the Bot API for a polling bot:
getMe, deleteWebhook, getUpdates (long polling), sendMessage, sendChatAction,
editMessageText, setMyCommands, getMyCommands. Bodies may be form-encoded (what PTB sends:
every non-string value JSON-encoded), multipart or JSON. A method can be made to answer 429
with ``retry_after`` a given number of times.

Tests (and the load test) inject updates with `private_text`, `group_text`, `sticker` or
`inject`, and read what the bot sent from `sent` / `sent_to(chat)` / `wait_sent(...)`::

    async with FakeTelegram() as tg:
        app = Application.builder().token(tg.token).base_url(tg.api_url).build()
        ...
        msg = tg.private_text(user_id=1, text="hi")
        [reply] = await tg.wait_sent(1, chat_id=1)

Waiting is event-driven (one condition variable), so thousands of messages cost little.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

JSON_FIELDS = {"reply_parameters", "commands", "allowed_updates", "entities", "reply_markup",
               "link_preview_options", "scope"}
INT_FIELDS = {"chat_id", "message_id", "message_thread_id", "offset", "limit",
              "reply_to_message_id"}
FLOAT_FIELDS = {"timeout"}
BOOL_FIELDS = {"drop_pending_updates", "disable_notification", "protect_content",
               "allow_sending_without_reply"}
_MENTION = re.compile(r"@[A-Za-z0-9_]{3,64}")
_COMMAND = re.compile(r"^/[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)?")


def utf16_len(text: str) -> int:
    """Telegram counts entity offsets in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def entities_for(text: str) -> list[dict[str, Any]]:
    """The bot_command and mention entities Telegram would attach to ``text``."""
    entities = []
    command = _COMMAND.match(text)
    if command:
        entities.append({"type": "bot_command", "offset": 0,
                         "length": utf16_len(command.group(0))})
    for match in _MENTION.finditer(text):
        if command and match.start() < command.end():
            continue
        entities.append({"type": "mention", "offset": utf16_len(text[: match.start()]),
                         "length": utf16_len(match.group(0))})
    return entities


@dataclass
class Failure:
    """Answer the next ``times`` calls of a method with 429 Too Many Requests (or 403
    Forbidden: the user blocked the bot)."""

    times: int
    retry_after: int
    code: int = 429


@dataclass
class FakeTelegram:
    token: str = "123456:TEST-TOKEN"
    bot_id: int = 123456
    username: str = "DrHouseBot"
    first_name: str = "House"
    host: str = "127.0.0.1"
    port: int = 0
    max_poll_s: float = 1.0  # cap on one long poll, so shutdown never waits long

    sent: list[dict[str, Any]] = field(default_factory=list)  # sendMessage calls, in order
    actions: list[dict[str, Any]] = field(default_factory=list)  # sendChatAction calls
    edits: list[dict[str, Any]] = field(default_factory=list)  # editMessageText calls
    calls: Counter[str] = field(default_factory=Counter)  # every method, successes and 429s
    rejected: Counter[str] = field(default_factory=Counter)  # 429 answers per method
    commands: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: defaultdict[int, itertools.count[int]] = defaultdict(
            lambda: itertools.count(1))
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._failures: dict[str, Failure] = {}
        self._sent_by_chat: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        self._changed = asyncio.Condition()
        self._closing = False
        self._runner: web.AppRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": self.first_name,
                "username": self.username, "can_join_groups": True,
                "can_read_all_group_messages": False, "supports_inline_queries": False}

    @property
    def api_url(self) -> str:
        """The value for PTB's ``base_url`` (and the TELEGRAM_API_URL setting)."""
        return f"http://{self.host}:{self.port}/bot"

    async def start(self) -> FakeTelegram:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._closing = True
        await self._notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- injecting updates -----------------------------------------------------------------

    def chat(self, chat_id: int, kind: str = "private", title: str = "",
             is_forum: bool = False, first_name: str = "") -> dict[str, Any]:
        """Register (or fetch) a chat; private chats have positive ids, groups negative."""
        if chat_id not in self._chats:
            chat: dict[str, Any] = {"id": chat_id, "type": kind}
            if kind == "private":
                chat["first_name"] = first_name or f"User{chat_id}"
            else:
                chat["title"] = title or f"Group {chat_id}"
                if is_forum:
                    chat["is_forum"] = True
            self._chats[chat_id] = chat
        return self._chats[chat_id]

    @staticmethod
    def user(user_id: int, first_name: str = "", username: str = "") -> dict[str, Any]:
        user: dict[str, Any] = {"id": user_id, "is_bot": False,
                                "first_name": first_name or f"User{user_id}"}
        if username:
            user["username"] = username
        return user

    def inject(self, update: dict[str, Any]) -> int:
        """Queue a raw update (without ``update_id``); returns its update id."""
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        self._notify_soon()
        return update["update_id"]

    def message(self, chat_id: int, user: dict[str, Any], text: str | None = None,
                reply_to: int | None = None, thread: int | None = None,
                **extra: Any) -> dict[str, Any]:
        """Build (and remember) a message from ``user`` in a registered chat."""
        chat = self._chats[chat_id]
        message: dict[str, Any] = {"message_id": next(self._message_ids[chat_id]),
                                   "date": int(time.time()), "chat": chat, "from": user}
        if text is not None:
            message["text"] = text
            entities = entities_for(text)
            if entities:
                message["entities"] = entities
        if thread is not None:
            message["message_thread_id"] = thread
            message["is_topic_message"] = True
        if reply_to is not None:
            message["reply_to_message"] = self._replied(chat_id, reply_to)
        message.update(extra)
        self._messages[(chat_id, message["message_id"])] = message
        return message

    def private_text(self, user_id: int, text: str, first_name: str = "",
                     edited: bool = False) -> dict[str, Any]:
        """A text message in the user's private chat with the bot (chat id = user id)."""
        self.chat(user_id, "private", first_name=first_name)
        message = self.message(user_id, self.user(user_id, first_name), text)
        self.inject({"edited_message" if edited else "message": message})
        return message

    def group_text(self, chat_id: int, user_id: int, text: str, first_name: str = "",
                   reply_to: int | None = None, thread: int | None = None,
                   kind: str = "supergroup") -> dict[str, Any]:
        """A text message in a group; ``reply_to`` is the id of a message in that chat."""
        self.chat(chat_id, kind, is_forum=thread is not None)
        message = self.message(chat_id, self.user(user_id, first_name), text, reply_to, thread)
        self.inject({"message": message})
        return message

    def sticker(self, chat_id: int, user_id: int, kind: str = "private",
                reply_to: int | None = None) -> dict[str, Any]:
        self.chat(chat_id, kind)
        sticker = {"file_id": "CAAD-sticker", "file_unique_id": "sticker-1", "type": "regular",
                   "width": 512, "height": 512, "is_animated": False, "is_video": False,
                   "emoji": "🤒"}
        message = self.message(chat_id, self.user(user_id), None, reply_to, sticker=sticker)
        self.inject({"message": message})
        return message

    def channel_post(self, chat_id: int, text: str) -> dict[str, Any]:
        self.chat(chat_id, "channel")
        chat = self._chats[chat_id]
        post = {"message_id": next(self._message_ids[chat_id]), "date": int(time.time()),
                "chat": chat, "text": text}
        self.inject({"channel_post": post})
        return post

    def _replied(self, chat_id: int, message_id: int) -> dict[str, Any]:
        """A replied-to message as Telegram nests it: one level deep."""
        replied = self._messages[(chat_id, message_id)]
        return {k: v for k, v in replied.items() if k != "reply_to_message"}

    # ---- failures --------------------------------------------------------------------------

    def fail_next(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and ``retry_after``."""
        self._failures[method] = Failure(times, retry_after)

    def forbid_next(self, method: str, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 403 (bot blocked by the user)."""
        self._failures[method] = Failure(times, 0, 403)

    # ---- reading what the bot did ----------------------------------------------------------

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        """The bot's sendMessage calls to a chat (the text as sent, before any edit)."""
        return list(self._sent_by_chat.get(chat_id, []))

    def shown(self, chat_id: int, message_id: int) -> str:
        """A message's text as the chat shows it now (after edits)."""
        return str(self._messages[(chat_id, message_id)]["text"])

    @property
    def pending_updates(self) -> int:
        return len(self._updates)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked whenever the bot calls the API)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_sent(self, count: int, chat_id: int | None = None,
                        timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages went to ``chat_id`` (or anywhere)."""
        def sent() -> list[dict[str, Any]]:
            return self.sent if chat_id is None else self._sent_by_chat.get(chat_id, [])

        await self.wait_for(lambda: len(sent()) >= count, timeout)
        return list(sent())

    async def settle(self, delay_s: float = 0.3) -> None:
        """Wait until every injected update was fetched, then a little longer, so a test can
        check that nothing (more) was sent."""
        await self.wait_for(lambda: not self._updates and self.calls["getUpdates"] > 0)
        await asyncio.sleep(delay_s)

    # ---- the HTTP side ---------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _notify_soon(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nobody waits yet
            asyncio.get_running_loop().create_task(self._notify())

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            body = await request.json() if request.can_read_body else {}
            return dict(body or {})
        raw: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            raw.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key in JSON_FIELDS:
                params[key] = json.loads(value)
            elif key in INT_FIELDS and re.fullmatch(r"-?\d+", value):
                params[key] = int(value)
            elif key in FLOAT_FIELDS:
                params[key] = float(value)
            elif key in BOOL_FIELDS:
                params[key] = value.lower() == "true"
            else:
                params[key] = value
        return params

    async def _dispatch(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        params = await self._params(request)
        self.calls[method] += 1
        failure = self._failures.get(method)
        if failure is not None and failure.times > 0:
            failure.times -= 1
            self.rejected[method] += 1
            await self._notify()
            if failure.code == 403:
                return _error(403, "Forbidden: bot was blocked by the user")
            return web.json_response(
                {"ok": False, "error_code": 429,
                 "description": f"Too Many Requests: retry after {failure.retry_after}",
                 "parameters": {"retry_after": failure.retry_after}}, status=429)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return _error(404, "Not Found")
        try:
            result = await handler(params)
        except KeyError as exc:
            return _error(400, f"Bad Request: {exc.args[0]} is missing or unknown")
        await self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _api_getMe(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.bot_user

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> bool:
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _api_setMyCommands(self, params: dict[str, Any]) -> bool:
        self.commands = list(params["commands"])
        return True

    async def _api_getMyCommands(self, params: dict[str, Any]) -> list[dict[str, str]]:
        return self.commands

    async def _api_getUpdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        limit = int(params.get("limit") or 100)
        wait_s = min(float(params.get("timeout") or 0), self.max_poll_s)
        if not self._updates and wait_s > 0 and not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s), self._changed:
                    await self._changed.wait_for(lambda: bool(self._updates) or self._closing)
        return self._updates[:limit]

    async def _api_sendMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        chat = self._chats.get(chat_id) or self.chat(chat_id)
        text = str(params["text"])
        if not text.strip():
            raise KeyError("text")
        reply_to = params.get("reply_to_message_id")
        if "reply_parameters" in params:
            reply_to = params["reply_parameters"].get("message_id")
        message: dict[str, Any] = {"message_id": next(self._message_ids[chat_id]),
                                   "date": int(time.time()), "chat": chat,
                                   "from": self.bot_user, "text": text}
        if "message_thread_id" in params:
            message["message_thread_id"] = params["message_thread_id"]
        if reply_to is not None and (chat_id, reply_to) in self._messages:
            message["reply_to_message"] = self._replied(chat_id, reply_to)
        self._messages[(chat_id, message["message_id"])] = message
        record = {**params, "chat_id": chat_id, "message_id": message["message_id"],
                  "reply_to": reply_to, "parse_mode": params.get("parse_mode")}
        self.sent.append(record)
        self._sent_by_chat[chat_id].append(record)
        return message

    async def _api_sendChatAction(self, params: dict[str, Any]) -> bool:
        self.actions.append({**params, "chat_id": int(params["chat_id"])})
        return True

    async def _api_editMessageText(self, params: dict[str, Any]) -> dict[str, Any]:
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self._messages[key]
        message["text"] = str(params["text"])
        message["edit_date"] = int(time.time())
        self.edits.append({**params, "chat_id": key[0], "message_id": key[1],
                           "at": time.monotonic()})
        return message


def _error(status: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": status, "description": description},
                             status=status)
