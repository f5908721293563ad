"""The Telegram frontend (python-telegram-bot 22): long polling, or a webhook when
``TELEGRAM_WEBHOOK_URL`` is set. Run it with ``drhouse telegram`` (frontend only; workers run
separately) or as part of ``drhouse up``.

Thin over `FrontendCore`: a message becomes an `Incoming`; the core answers at once (commands,
limits) or enqueues a request, and "typing…" shows until the reply arrives on the reply
stream. The reply carries its route (chat, message to reply to, forum topic), so any instance
with frontend id ``telegram`` — including one restarted in between — delivers it.

Which messages House answers:

- private chats: every message;
- groups and supergroups: commands, mentions of ``@username``, replies to his messages and
  his name (`bots.triggers`); history per user within the chat (per topic in forum groups),
  or one history per chat with first names when ``GROUP_HISTORY=shared``;
- stickers, photos, voice and other media, when they are addressed to him: a short line
  (``non_text``); service messages (joins, pins …): nothing;
- edited messages: ignored. He already answered the original; answering the edit too would
  give two answers to one question and put both into the history;
- channel posts: ignored. A channel has no one to talk to, and a reply would be broadcast to
  every subscriber.

Polling asks only for ``message`` updates, so edits and channel posts are not even fetched;
the handler filter ignores them too (a webhook or a self-hosted Bot API may send them).

Replies are plain text (no parse mode, so nothing in a user's or the model's text can break
formatting), split at 4,096 characters; in groups the first piece replies to the triggering
message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

from aiolimiter import AsyncLimiter
from telegram import (
    BotCommand,
    LinkPreviewOptions,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, Forbidden
from telegram.ext import AIORateLimiter, Application, ContextTypes, MessageHandler, filters

from base.commands import COMMANDS
from base.config import Settings
from base.keys import Keys
from base.queue_client import QueueClient
from bots.chat_frontend import ChatFrontend
from bots.commands import parse_command
from bots.conversations import conversation_id
from bots.core import Incoming
from bots.platforms import TELEGRAM_ID as FRONTEND_ID
from bots.serving import serve_metrics
from bots.splitting import TELEGRAM_LIMIT
from bots.triggers import Triggers
from persona.pack import Persona

log = logging.getLogger(__name__)

ALLOWED_UPDATES = [Update.MESSAGE]
WEBHOOK_PATH = "telegram"
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)

# (chat id, forum topic id or None): where a typing action goes.
ChatTarget = tuple[int, int | None]


class TypingFriendlyRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (overall and per-group limits, retries after 429) for messages;
    chat actions have a budget of their own (``overall_max_rate`` per
    ``overall_time_period``) and never wait: an action with no budget left is dropped. A
    "typing…" queued behind a group's 20-a-minute budget would arrive after the reply, which
    is worse than none; and with hundreds of chats waiting, refreshes must not crowd out
    replies."""

    def __init__(self, overall_max_rate: float = 30, overall_time_period: float = 1,
                 group_max_rate: float = 20, group_time_period: float = 60,
                 max_retries: int = 0) -> None:
        super().__init__(overall_max_rate=overall_max_rate,
                         overall_time_period=overall_time_period,
                         group_max_rate=group_max_rate, group_time_period=group_time_period,
                         max_retries=max_retries)
        self.actions = AsyncLimiter(overall_max_rate, overall_time_period)
        self.dropped_actions = 0

    async def process_request(self, callback, args, kwargs, endpoint, data,  # type: ignore[no-untyped-def,override]
                              rate_limit_args):
        if endpoint == "sendChatAction":
            if not self.actions.has_capacity():
                self.dropped_actions += 1
                return True
            async with self.actions:
                return await callback(*args, **kwargs)
        return await super().process_request(callback, args, kwargs, endpoint, data,
                                             rate_limit_args)


def build_application(settings: Settings) -> Application:  # type: ignore[type-arg]
    """The PTB Application: token, API server, rate limiter, long-poll read timeout."""
    if settings.telegram.token is None or not settings.telegram.token.get_secret_value():
        raise ValueError("TELEGRAM_TOKEN is not set")
    limiter = TypingFriendlyRateLimiter(
        overall_max_rate=settings.telegram.overall_rate, overall_time_period=1,
        group_max_rate=settings.telegram.group_rate, group_time_period=60,
        max_retries=settings.telegram.max_retries)
    return (Application.builder()
            .token(settings.telegram.token.get_secret_value())
            .base_url(settings.telegram.api_url)
            .rate_limiter(limiter)
            .get_updates_read_timeout(settings.telegram.poll_timeout_s + 10)
            .build())


def edit_interval_s(chat: Hashable) -> float:
    """Least time between two edits of a streamed reply: about one a second in a private
    chat; groups (negative ids) share 20 messages a minute, so one every three seconds."""
    return 3.0 if isinstance(chat, int) and chat < 0 else 1.0


class TelegramFrontend(ChatFrontend):
    frontend_id = FRONTEND_ID
    limit = TELEGRAM_LIMIT
    # Blocked, removed from the group, chat not found; RetryAfter past the limiter's retries,
    # timeouts and network errors are worth a retry.
    lost_causes = (Forbidden, BadRequest)

    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 application: Application | None = None,  # type: ignore[type-arg]
                 reader_block_ms: int = 1000):
        self.app = application or build_application(settings)
        super().__init__(settings, persona, queue, keys, reader_block_ms)
        self.triggers = Triggers(settings.frontend.bot_name_list)
        self.ready = asyncio.Event()
        self.app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self.on_message))
        self.app.add_error_handler(self.on_error)

    def edit_interval_s(self, chat: Hashable) -> float:
        return edit_interval_s(chat)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until cancelled: updates in, replies out; then stop cleanly."""
        serve_metrics(self.core.metrics, self.settings.frontend.metrics_port)
        async with self.app:
            bot = self.app.bot
            self.triggers = Triggers(self.settings.frontend.bot_name_list, bot.username,
                                     [f"@{bot.username}"])
            await bot.set_my_commands([BotCommand(c.name, c.description) for c in COMMANDS])
            await self.app.start()
            await self._start_updates()
            log.info("telegram frontend serving as @%s", bot.username)
            self.ready.set()
            try:
                await self.serve_replies()
            finally:
                self.ready.clear()
                if self.app.updater is not None and self.app.updater.running:
                    await self.app.updater.stop()
                await self.app.stop()
                log.info("telegram frontend stopped")

    async def _start_updates(self) -> None:
        updater = self.app.updater
        assert updater is not None
        if self.settings.telegram.webhook_url:
            secret = self.settings.telegram.webhook_secret
            await updater.start_webhook(
                listen=self.settings.telegram.webhook_listen,
                port=self.settings.telegram.webhook_port, url_path=WEBHOOK_PATH,
                webhook_url=self.settings.telegram.webhook_url,
                secret_token=secret.get_secret_value() if secret else None,
                allowed_updates=ALLOWED_UPDATES)
        else:
            await updater.start_polling(timeout=self.settings.telegram.poll_timeout_s,
                                        allowed_updates=ALLOWED_UPDATES)

    # ---- incoming --------------------------------------------------------------------------

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A new message in a chat the bot is in: answer it, queue it, or stay silent."""
        message = update.message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        if not await self.core.first_delivery(str(message.chat_id), str(message.message_id)):
            log.info("update %s delivered again; ignored", update.update_id)
            return
        private = message.chat.type == ChatType.PRIVATE
        text = message.text
        addressed = self.triggers.reason(
            text or message.caption or "", private=private,
            mentioned=self._mentions_me(message), replied_to_bot=self._replies_to_me(message))
        if addressed is None:
            return
        if text is None:
            if message.effective_attachment is not None:
                line = await self.core.non_text(str(message.from_user.id), str(message.chat_id))
                if line is not None:
                    self._say(message, line.text)
            return
        await self.submit(self.incoming(message, self._request_text(message)),
                          lambda text: self._say(message, text),
                          (message.chat_id, self._thread(message)))

    def incoming(self, message: Message, text: str) -> Incoming:
        """The core's view of a message: who, which conversation, where to reply."""
        user = message.from_user
        assert user is not None
        private = message.chat.type == ChatType.PRIVATE
        shared = self.settings.frontend.group_history == "shared" and not private
        thread = self._thread(message)
        conversation = conversation_id(FRONTEND_ID, str(user.id), chat=str(message.chat_id),
                                       thread=str(thread) if thread else None,
                                       private=private, shared=shared)
        route: dict[str, Any] = {"chat": message.chat_id,
                                 "reply_to": None if private else message.message_id,
                                 "thread": thread}
        return Incoming(user=str(user.id), conversation=conversation, text=text,
                        speaker=user.first_name if shared else "", chat=str(message.chat_id),
                        route=route, shared=shared)

    def _request_text(self, message: Message) -> str:
        """The text without mentions of the bot; ``/compare`` sent as a reply compares the
        message it replies to."""
        text = self.triggers.clean(message.text or "")
        command = parse_command(text)
        replied = message.reply_to_message
        if (command is not None and command.name == "compare" and not command.args
                and replied is not None and (replied.text or replied.caption)):
            return f"/compare {replied.text or replied.caption}"
        return text

    def _mentions_me(self, message: Message) -> bool:
        bot = self.app.bot
        handle = f"@{bot.username}".lower()
        types = [MessageEntity.MENTION, MessageEntity.TEXT_MENTION]
        entities = {**message.parse_entities(types), **message.parse_caption_entities(types)}
        for entity, value in entities.items():
            if entity.type == MessageEntity.MENTION and value.lower() == handle:
                return True
            if entity.user is not None and entity.user.id == bot.id:
                return True
        return False

    def _replies_to_me(self, message: Message) -> bool:
        replied = message.reply_to_message
        # In forum topics every message "replies" to the topic's creation message.
        return (replied is not None and replied.forum_topic_created is None
                and replied.from_user is not None and replied.from_user.id == self.app.bot.id)

    @staticmethod
    def _thread(message: Message) -> int | None:
        return message.message_thread_id if message.is_topic_message else None

    # ---- outgoing --------------------------------------------------------------------------

    def _say(self, message: Message, text: str) -> None:
        """Queue a line for the chat; in groups it replies to ``message``."""
        private = message.chat.type == ChatType.PRIVATE
        reply_to = None if private else message.message_id
        thread = self._thread(message)
        self.outbox.submit(message.chat_id,
                           lambda: self.send_text(message.chat_id, text, reply_to, thread))

    def address(self, route: dict[str, Any]) -> tuple[int, int | None, int | None] | None:
        chat = route.get("chat")
        return None if chat is None else (chat, route.get("reply_to"), route.get("thread"))

    async def edit(self, chat: int, sent: int, text: str) -> None:
        await self.app.bot.edit_message_text(text, chat_id=chat, message_id=sent,
                                             link_preview_options=NO_PREVIEW)

    async def send_piece(self, chat: int, piece: str, reply_to: int | None,
                         thread: int | None) -> int:
        params = (ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
                  if reply_to is not None else None)
        message = await self.app.bot.send_message(chat, piece, message_thread_id=thread,
                                                  reply_parameters=params,
                                                  link_preview_options=NO_PREVIEW)
        return message.message_id

    async def send_typing(self, place: tuple[int, int | None]) -> None:
        chat, thread = place
        await self.app.bot.send_chat_action(chat, ChatAction.TYPING, message_thread_id=thread)

    # ---- errors ----------------------------------------------------------------------------

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the failure with its traceback; the user gets an in-character line."""
        update_id = update.update_id if isinstance(update, Update) else None
        log.error("telegram update %s failed", update_id, exc_info=context.error)
        if isinstance(update, Update) and update.effective_message is not None:
            message = update.effective_message
            if message.chat.type != ChatType.CHANNEL:
                self._say(message, self.persona.line("error"))
