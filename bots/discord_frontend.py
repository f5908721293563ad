"""The Discord frontend (discord.py 2.x). Run it with ``drhouse discord`` (frontend only;
workers run separately) or as part of ``drhouse up``.

Thin over `FrontendCore`, like the Telegram frontend: a message becomes an `Incoming`, the core
answers at once or enqueues a request, "typing…" shows until the reply arrives on the reply
stream, and the reply's route (channel, message to reply to) lets any instance with frontend
id ``discord`` deliver it.

- DMs: every message is answered; one history per user.
- Guild channels and threads: House answers when mentioned, when one of his messages is
  replied to, or when his name is written (`bots.triggers`); otherwise he is silent. History
  is per channel (a thread is a channel) with each turn carrying the speaker's display name,
  or per user within the channel when ``DISCORD_GROUP_HISTORY=per_user``.
- Slash commands ``/compare``, ``/reset``, ``/forget``, ``/help`` (synced at start-up unless
  ``DISCORD_SYNC_COMMANDS=false``); the reply comes as the interaction's follow-up.
- Attachments or stickers without text, when addressed to him: a short line (``non_text``).
  Edited messages are ignored, as on Telegram.
- Replies are plain text, split at 2,000 characters, and never ping anyone but the person
  House replies to (no @everyone from a model's output).

The bot needs the privileged **Message Content** intent (developer portal → Bot), otherwise
guild messages arrive without their text.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import discord
from discord import app_commands

from bots.commands import COMMANDS
from bots.conversations import conversation_id
from bots.core import FrontendCore, Immediate, Incoming
from bots.discord_bot import FRONTEND_ID
from bots.formatting import format_reply
from bots.outbox import RETRY, UNDELIVERABLE, ChatOutbox, Outcome
from bots.serving import serve_metrics, serve_replies
from bots.splitting import DISCORD_LIMIT, split_message
from bots.streaming import Stream, StreamedReplies
from bots.triggers import Triggers
from bots.typing_indicator import TypingIndicator
from engine.config import Settings
from engine.keys import Keys
from engine.protocol import Reply
from engine.queue_client import QueueClient
from persona.pack import Persona

log = logging.getLogger(__name__)

SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False,
                                        replied_user=True)
SLASH_COMMANDS = ("compare", "reset", "forget", "help")

Channel = discord.abc.Messageable


def intents() -> discord.Intents:
    """Guild messages and DMs, with their text (the privileged Message Content intent)."""
    wanted = discord.Intents.default()
    wanted.message_content = True
    return wanted


class HouseClient(discord.Client):
    """The gateway client; events go to the frontend, slash commands live on ``tree``."""

    def __init__(self, frontend: DiscordFrontend):
        super().__init__(intents=intents(), allowed_mentions=SAFE_MENTIONS)
        self.frontend = frontend
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        if self.frontend.settings.discord_sync_commands:
            synced = await self.tree.sync()
            log.info("discord: %d slash commands synced", len(synced))

    async def on_ready(self) -> None:
        log.info("discord frontend serving as %s (%s guilds)", self.user, len(self.guilds))

    async def on_message(self, message: discord.Message) -> None:
        await self.frontend.on_message(message)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        await self.frontend.on_error(event_method, *args)


def classify_send_error(exc: BaseException) -> Outcome:
    """Missing permissions and a deleted channel can never succeed; server errors and
    connection failures can."""
    if isinstance(exc, discord.Forbidden | discord.NotFound):
        return UNDELIVERABLE
    return RETRY


class DiscordFrontend:
    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 reader_block_ms: int = 1000):
        self.settings = settings
        self.persona = persona
        self.queue = queue
        self.core = FrontendCore(settings, persona, queue, keys)
        self.client = HouseClient(self)
        backlog = persona.line("backlog")
        self.outbox = ChatOutbox(
            classify_send_error, on_full=self.core.metrics.held_back,
            notice=lambda channel: lambda: self.send_text(channel, backlog))
        # Discord allows about 5 edits in 5 s per channel: one a second leaves room.
        self.streams = StreamedReplies(self.outbox, lambda channel: 1.0, DISCORD_LIMIT)
        if settings.stream_replies:
            queue.on_partial = self.partial
        self.typing: TypingIndicator[int] = TypingIndicator(
            self._send_typing, settings.typing_interval_s, settings.reply_timeout_s,
            on_expire=self._timed_out)
        self.reader_block_ms = reader_block_ms
        # Slash commands waiting for their reply: request id → (interaction, when).
        self._interactions: dict[str, tuple[discord.Interaction, float]] = {}
        self._triggers: Triggers | None = None
        register_commands(self.client.tree, self)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self, token: str) -> None:
        """Connect to Discord and deliver replies until cancelled."""
        serve_metrics(self.core.metrics, self.settings.frontend_metrics_port)
        async with self.client:
            gateway = asyncio.create_task(self.client.start(token), name="discord-gateway")
            replies = asyncio.create_task(self.serve_replies(), name="discord-serve-replies")
            try:
                done, _ = await asyncio.wait({gateway, replies},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                replies.cancel()  # first: the sends already queued go out while connected
                await asyncio.gather(replies, return_exceptions=True)
                await self.client.close()
                gateway.cancel()
                await asyncio.gather(gateway, return_exceptions=True)
                log.info("discord frontend stopped")

    async def serve_replies(self) -> None:
        """The reply reader and typing refresher (beside the gateway; tests run it alone)."""
        await serve_replies(self.queue, self.deliver, self.typing, self.outbox,
                            self.reader_block_ms)

    @property
    def triggers(self) -> Triggers:
        me = self.client.user
        if self._triggers is None and me is not None:
            self._triggers = Triggers(self.settings.bot_name_list, "",
                                      [f"<@{me.id}>", f"<@!{me.id}>"])
        return self._triggers or Triggers(self.settings.bot_name_list)

    # ---- incoming messages -----------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """A message House can see: answer it, queue it, or stay silent."""
        me = self.client.user
        if me is None or message.author.bot or message.type not in (
                discord.MessageType.default, discord.MessageType.reply):
            return
        private = message.guild is None
        mentioned = any(user.id == me.id for user in message.mentions)
        reason = self.triggers.reason(message.content, private=private, mentioned=mentioned,
                                      replied_to_bot=self._replies_to_me(message))
        if reason is None:
            return
        text = self.triggers.clean(message.content)
        if not text:
            if message.attachments or message.stickers:
                guild_id = message.guild.id if message.guild is not None else None
                line = await self.core.non_text(str(message.author.id),
                                                self._chat_key(message.channel.id, guild_id))
                if line is not None:
                    self._say(message, line.text)
            elif not private:  # a bare mention
                self._say(message, self.persona.line("empty"))
            return
        guild_id = message.guild.id if message.guild is not None else None
        outcome = await self.core.handle(self.incoming(message.author, message.channel.id,
                                                       guild_id, text, message.id))
        if isinstance(outcome, Immediate):
            self._say(message, outcome.text)
            return
        self.typing.start(outcome.id, message.channel.id)
        notice = await self.core.queued_notice()  # no worker: say it waits in the queue
        if notice is not None:
            self._say(message, notice)

    def incoming(self, author: discord.User | discord.Member, channel_id: int,
                 guild_id: int | None, text: str, message_id: int | None = None,
                 request_id: str = "") -> Incoming:
        """The core's view of a message or command: who, which conversation, where to reply."""
        private = guild_id is None
        shared = self.settings.discord_group_history == "shared" and not private
        conversation = conversation_id(FRONTEND_ID, str(author.id), chat=str(channel_id),
                                       private=private, shared=shared)
        route: dict[str, Any] = {"channel": channel_id, "guild": guild_id,
                                 "message": None if private else message_id}
        return Incoming(user=str(author.id), conversation=conversation, text=text,
                        speaker=author.display_name if shared else "",
                        chat=self._chat_key(channel_id, guild_id), route=route,
                        request_id=request_id, shared=shared)

    def _chat_key(self, channel_id: int, guild_id: int | None) -> str:
        """What the allow-list checks: ALLOWED_CHATS may name a guild (all its channels) or
        single channels."""
        if guild_id is not None and str(guild_id) in self.settings.allowed_chat_ids:
            return str(guild_id)
        return str(channel_id)

    def _replies_to_me(self, message: discord.Message) -> bool:
        me = self.client.user
        reference = message.reference
        if me is None or reference is None:
            return False
        replied = reference.resolved or reference.cached_message
        return isinstance(replied, discord.Message) and replied.author.id == me.id

    # ---- slash commands --------------------------------------------------------------------

    async def slash(self, interaction: discord.Interaction, command: str, args: str = "") -> None:
        """A slash command: the same path as a typed command; the answer is the follow-up."""
        public = command == "compare"
        await interaction.response.defer(thinking=True, ephemeral=not public)
        request_id = uuid.uuid4().hex
        self._remember(request_id, interaction)
        text = f"/{command} {args}".strip()
        outcome = await self.core.handle(self.incoming(
            interaction.user, interaction.channel_id or 0, interaction.guild_id, text,
            request_id=request_id))
        if isinstance(outcome, Immediate):
            self._interactions.pop(request_id, None)
            await self._followup(interaction, outcome.text)

    def _remember(self, request_id: str, interaction: discord.Interaction) -> None:
        now = time.monotonic()
        expired = [rid for rid, (_, at) in self._interactions.items()
                   if now - at > self.settings.reply_timeout_s]
        for rid in expired:
            del self._interactions[rid]
        self._interactions[request_id] = (interaction, now)

    async def _followup(self, interaction: discord.Interaction, text: str) -> None:
        for piece in split_message(text, DISCORD_LIMIT):
            await interaction.followup.send(piece, allowed_mentions=SAFE_MENTIONS)

    # ---- outgoing --------------------------------------------------------------------------

    def _say(self, message: discord.Message, text: str) -> None:
        """Queue a line for the message's channel; in guilds it replies to ``message``."""
        guild = message.guild
        self.outbox.submit(message.channel.id, lambda: self.send_text(
            message.channel.id, text, None if guild is None else message.id,
            None if guild is None else guild.id))

    async def deliver(self, reply: Reply) -> asyncio.Task[Outcome] | str:
        """Called by the reply reader: queue the reply (never waits for a send); the send's
        task tells the reader when to acknowledge it."""
        waited_s = self.typing.done(reply.id)
        if waited_s is not None:
            self.core.metrics.reply_seconds.labels(FRONTEND_ID).observe(waited_s)
        text = format_reply(reply) or self.persona.line("fallback")
        route = reply.route
        channel = route.get("channel")
        pending = self._interactions.pop(reply.id, None)
        if channel is None:
            log.error("reply %s has no channel in its route; dropped", reply.id)
            return UNDELIVERABLE
        if pending is not None:
            return self.outbox.submit(channel, lambda: self._followup(pending[0], text))
        stream = self.streams.take(reply.id)
        if stream is not None:
            return self.outbox.submit(channel, lambda: self._finish_stream(stream, text, route))
        return self.outbox.submit(channel, lambda: self.send_text(channel, text,
                                                                  route.get("message"),
                                                                  route.get("guild")))

    async def partial(self, reply: Reply) -> None:
        """The reply's text so far: sent at once, then edited as it grows (`bots.streaming`).
        Slash commands answer through their interaction and are not streamed."""
        route = reply.route
        channel = route.get("channel")
        if channel is None or not reply.text or reply.id in self._interactions:
            return

        async def send_first(channel: int, text: str) -> discord.Message:
            return await self._send_piece(channel, text, route.get("message"),
                                          route.get("guild"))

        self.streams.partial(reply.id, channel, reply.text, send_first, self._edit)

    async def _finish_stream(self, stream: Stream, text: str, route: dict[str, Any]) -> None:
        async def send_more(channel: int, piece: str) -> None:
            await self._send_piece(channel, piece, None, route.get("guild"))

        if not await self.streams.finish(stream, split_message(text, DISCORD_LIMIT),
                                         self._edit, send_more):
            await self.send_text(route["channel"], text, route.get("message"), route.get("guild"))

    @staticmethod
    async def _edit(channel: int, message: discord.Message, text: str) -> None:
        await message.edit(content=text, allowed_mentions=SAFE_MENTIONS)

    def channel(self, channel_id: int, guild_id: int | None = None) -> Channel:
        """A channel to send to, from the cache or (on another instance) by id alone."""
        found = self.client.get_channel(channel_id)
        if isinstance(found, discord.abc.Messageable):
            return found
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    async def send_text(self, channel_id: int, text: str, reply_to: int | None = None,
                        guild_id: int | None = None) -> None:
        """Plain text in pieces of at most 2,000 characters, the first one as a reply."""
        for i, piece in enumerate(split_message(text, DISCORD_LIMIT)):
            await self._send_piece(channel_id, piece, reply_to if i == 0 else None, guild_id)

    async def _send_piece(self, channel_id: int, piece: str, reply_to: int | None,
                          guild_id: int | None) -> discord.Message:
        reference = (discord.MessageReference(message_id=reply_to, channel_id=channel_id,
                                              guild_id=guild_id, fail_if_not_exists=False)
                     if reply_to is not None else None)
        return await self.channel(channel_id, guild_id).send(
            piece, reference=reference,  # type: ignore[arg-type]
            allowed_mentions=SAFE_MENTIONS)

    def _timed_out(self, request_id: str, channel_id: int) -> None:
        text = self.persona.line("timeout")
        self.outbox.submit(channel_id, lambda: self.send_text(channel_id, text))

    async def _send_typing(self, channel_id: int) -> None:
        await self.channel(channel_id).typing()

    # ---- errors ----------------------------------------------------------------------------

    async def on_error(self, event_method: str, *args: Any) -> None:
        """Log a failed event with its traceback; a message's author gets an in-character
        line."""
        log.exception("discord event %s failed", event_method)
        if event_method == "on_message" and args and isinstance(args[0], discord.Message):
            self._say(args[0], self.persona.line("error"))

    async def on_command_error(self, interaction: discord.Interaction,
                               error: app_commands.AppCommandError) -> None:
        log.error("discord slash command failed", exc_info=error)
        line = self.persona.line("error")
        if interaction.response.is_done():
            await interaction.followup.send(line, ephemeral=True)
        else:
            await interaction.response.send_message(line, ephemeral=True)


def register_commands(tree: app_commands.CommandTree, frontend: DiscordFrontend) -> None:
    """``/compare <text>``, ``/reset``, ``/forget`` and ``/help`` on the client's tree."""

    @tree.command(name="compare", description=COMMANDS["compare"][:100])
    @app_commands.describe(text="the message both models answer")
    async def compare(interaction: discord.Interaction, text: str) -> None:
        await frontend.slash(interaction, "compare", text)

    @tree.command(name="reset", description=COMMANDS["reset"][:100])
    async def reset(interaction: discord.Interaction) -> None:
        await frontend.slash(interaction, "reset")

    @tree.command(name="forget", description=COMMANDS["forget"][:100])
    async def forget(interaction: discord.Interaction) -> None:
        await frontend.slash(interaction, "forget")

    @tree.command(name="help", description=COMMANDS["help"][:100])
    async def help_(interaction: discord.Interaction) -> None:
        await frontend.slash(interaction, "help")

    tree.error(frontend.on_command_error)
