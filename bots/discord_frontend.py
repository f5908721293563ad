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
from collections.abc import Callable
from typing import Any

import discord
from discord import app_commands

from base.commands import COMMANDS, CommandSpec
from base.config import Settings
from base.keys import Keys
from base.protocol import Reply
from base.queue_client import QueueClient
from bots.chat_frontend import ChatFrontend
from bots.conversations import conversation_id
from bots.core import Immediate, Incoming
from bots.platforms import DISCORD_ID as FRONTEND_ID
from bots.serving import serve_metrics
from bots.splitting import DISCORD_LIMIT, split_message
from bots.triggers import Triggers
from persona.pack import Persona

log = logging.getLogger(__name__)

SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False,
                                        replied_user=True)
SLASH_COMMANDS = tuple(c.name for c in COMMANDS if c.slash)

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
        if self.frontend.settings.discord.sync_commands:
            synced = await self.tree.sync()
            log.info("discord: %d slash commands synced", len(synced))

    async def on_ready(self) -> None:
        log.info("discord frontend serving as %s (%s guilds)", self.user, len(self.guilds))

    async def on_message(self, message: discord.Message) -> None:
        await self.frontend.on_message(message)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        await self.frontend.on_error(event_method, *args)


class DiscordFrontend(ChatFrontend):
    frontend_id = FRONTEND_ID
    limit = DISCORD_LIMIT
    # Missing permissions and a deleted channel; server errors and lost connections are
    # worth a retry.
    lost_causes = (discord.Forbidden, discord.NotFound)

    # Discord allows about 5 edits in 5 s per channel: the base's one a second leaves room.
    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 reader_block_ms: int = 1000):
        super().__init__(settings, persona, queue, keys, reader_block_ms)
        self.client = HouseClient(self)
        # Slash commands waiting for their reply: request id → (interaction, when).
        self._interactions: dict[str, tuple[discord.Interaction, float]] = {}
        self._triggers: Triggers | None = None
        register_commands(self.client.tree, self)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Connect to Discord (``DISCORD_TOKEN``) and deliver replies until cancelled."""
        if self.settings.discord.token is None:
            raise ValueError("DISCORD_TOKEN is not set")
        token = self.settings.discord.token.get_secret_value()
        serve_metrics(self.core.metrics, self.settings.frontend.metrics_port)
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

    @property
    def triggers(self) -> Triggers:
        me = self.client.user
        if self._triggers is None and me is not None:
            self._triggers = Triggers(self.settings.frontend.bot_name_list, "",
                                      [f"<@{me.id}>", f"<@!{me.id}>"])
        return self._triggers or Triggers(self.settings.frontend.bot_name_list)

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
        await self.submit(self.incoming(message.author, message.channel.id, guild_id, text,
                                        message.id),
                          lambda line: self._say(message, line), (message.channel.id, guild_id))

    def incoming(self, author: discord.User | discord.Member, channel_id: int,
                 guild_id: int | None, text: str, message_id: int | None = None,
                 request_id: str = "") -> Incoming:
        """The core's view of a message or command: who, which conversation, where to reply."""
        private = guild_id is None
        shared = self.settings.discord.group_history == "shared" and not private
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
        if guild_id is not None and str(guild_id) in self.settings.frontend.allowed_chat_ids:
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
                   if now - at > self.settings.frontend.reply_timeout_s]
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

    def address(self, route: dict[str, Any]) -> tuple[int, int | None, int | None] | None:
        channel = route.get("channel")
        return None if channel is None else (channel, route.get("message"), route.get("guild"))

    def deliver_elsewhere(self, reply: Reply, text: str) -> Callable[[], Any] | None:
        """A slash command's reply is its interaction's follow-up."""
        pending = self._interactions.pop(reply.id, None)
        if pending is None:
            return None
        return lambda: self._followup(pending[0], text)

    def streams_reply(self, reply: Reply) -> bool:
        """Slash commands answer through their interaction and are not streamed."""
        return reply.id not in self._interactions

    async def edit(self, channel: int, sent: discord.Message, text: str) -> None:
        await sent.edit(content=text, allowed_mentions=SAFE_MENTIONS)

    def channel(self, channel_id: int, guild_id: int | None = None) -> Channel:
        """A channel to send to, from the cache or (on another instance) by id alone."""
        found = self.client.get_channel(channel_id)
        if isinstance(found, discord.abc.Messageable):
            return found
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    async def send_piece(self, channel_id: int, piece: str, reply_to: int | None,
                         guild_id: int | None) -> discord.Message:
        reference = (discord.MessageReference(message_id=reply_to, channel_id=channel_id,
                                              guild_id=guild_id, fail_if_not_exists=False)
                     if reply_to is not None else None)
        return await self.channel(channel_id, guild_id).send(
            piece, reference=reference,  # type: ignore[arg-type]
            allowed_mentions=SAFE_MENTIONS)

    async def send_typing(self, place: tuple[int, int | None]) -> None:
        channel_id, guild_id = place
        await self.channel(channel_id, guild_id).typing()

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
    """The command table's slash commands (``/compare <text>``, ``/reset`` …) on the tree."""
    for spec in COMMANDS:
        if spec.slash:
            tree.add_command(_slash_command(spec, frontend))
    tree.error(frontend.on_command_error)


def _slash_command(spec: CommandSpec, frontend: DiscordFrontend) -> app_commands.Command:
    name, description = spec.name, spec.description[:100]
    if spec.takes_text:
        @app_commands.describe(text="the message both models answer")
        async def with_text(interaction: discord.Interaction, text: str) -> None:
            await frontend.slash(interaction, name, text)

        return app_commands.Command(name=name, description=description, callback=with_text)

    async def bare(interaction: discord.Interaction) -> None:
        await frontend.slash(interaction, name)

    return app_commands.Command(name=name, description=description, callback=bare)
