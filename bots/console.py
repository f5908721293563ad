"""The terminal frontend: the same queue as Telegram and Discord, in a terminal.

Interactive on a TTY (with a prompt and a /compare table); when stdin is a pipe it reads one
message per line and prints one reply per message, so it can be scripted:
``printf 'Do I need surgery?\\n' | drhouse chat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from base.config import Settings
from base.keys import Keys
from base.protocol import Reply
from base.queue_client import QueueClient
from bots.commands import parse_command
from bots.conversations import conversation_id
from bots.core import FrontendCore, Immediate, Incoming
from bots.formatting import format_reply, variant_label
from persona.pack import Persona

log = logging.getLogger(__name__)

STARTUP_WAITS = 5  # reply timeouts waited in a row while no worker has started yet


class ConsoleFrontend:
    def __init__(self, settings: Settings, persona: Persona, queue: QueueClient, keys: Keys,
                 stdin: TextIO | None = None, stdout: TextIO | None = None,
                 interactive: bool | None = None):
        self.settings = settings
        self.persona = persona
        self.queue = queue
        # One line at a time, each after the last one's reply: a scripted chat of ten lines
        # used to hear "Slow down" from the seventh on (USER_RATE_LIMIT is for chat platforms).
        self.core = FrontendCore(settings, persona, queue, keys, rate_limit=False)
        self.stdin = stdin or sys.stdin
        self.out = Console(file=stdout or sys.stdout, highlight=False, soft_wrap=True,
                           emoji=False)
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.user = os.environ.get("USER", "console")
        self.conversation = conversation_id("console", self.user)
        self._waiting: str | None = None  # the request whose reply is on its way
        self._streamed = False  # its text so far is on the current line
        if self.interactive and settings.frontend.stream_replies:
            queue.on_partial = self.partial

    async def run(self) -> None:
        """Read messages until EOF or /quit."""
        stop = asyncio.Event()
        reader = asyncio.create_task(self.queue.run_reader(stop=stop, block_ms=200))
        try:
            if self.interactive:
                self.out.print(f"[bold]{self.persona.full_name}[/bold]: {self.persona.greeting}")
                self.out.print("[dim]/help for commands, /quit to leave.[/dim]")
            while True:
                if self.interactive:
                    self.out.print("[bold cyan]you>[/bold cyan] ", end="")
                line = await asyncio.to_thread(self.stdin.readline)
                if not line:
                    break
                command = parse_command(line)
                if command is not None and command.name in ("quit", "exit"):
                    break
                await self.handle_line(line.rstrip("\n"))
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def handle_line(self, line: str) -> None:
        outcome = await self.core.handle(
            Incoming(user=self.user, conversation=self.conversation, text=line))
        if isinstance(outcome, Immediate):
            self.say(outcome.text)
            return
        if self.interactive:
            self.out.print("[dim]House is typing…[/dim]")
        self._waiting, self._streamed = outcome.id, False
        try:
            reply = await self._wait(outcome.id)
        except TimeoutError:
            self._clear_line()
            self.say(self.persona.line("timeout"))
            return
        finally:
            self._waiting = None
        self._clear_line()
        self.show(reply)

    async def _wait(self, request_id: str) -> Reply:
        """The reply; while no worker is up yet (``drhouse up`` still loading the model and
        House's lines) the wait goes on, so a first question typed at once is not lost to
        the timeout line."""
        for _ in range(STARTUP_WAITS):
            try:
                return await self.queue.wait_reply(request_id,
                                                   self.settings.frontend.reply_timeout_s)
            except TimeoutError:
                if await self.core.workers_alive(fresh=True):
                    raise
                if self.interactive:
                    self.out.print("[dim]House is still getting ready…[/dim]")
        raise TimeoutError(request_id)

    async def partial(self, reply: Reply) -> None:
        """The reply's text so far, rewritten in place on the line as it grows."""
        if reply.id != self._waiting or not reply.text:
            return
        self._clear_line()
        self.out.print(Text.assemble(("House:", "bold"), " ", reply.text), end="")
        self.out.file.flush()
        self._streamed = True

    def _clear_line(self) -> None:
        if self._streamed:
            self.out.file.write("\r\x1b[K")
            self._streamed = False

    def say(self, text: str) -> None:
        if self.interactive:
            # Text, not markup: whatever brackets or backslashes the text holds print as is.
            self.out.print(Text.assemble(("House:", "bold"), " ", text))
        else:
            self.out.print(text, markup=False)

    def show(self, reply: Reply) -> None:
        if reply.variants and self.interactive and not reply.error:
            table = Table(show_lines=True)
            for column in ("model", "reply", "tokens", "ms"):
                table.add_column(column)
            for v in reply.variants:
                table.add_row(variant_label(v.name), Text(v.text), str(v.tokens),
                              f"{v.ms:.0f}")
            self.out.print(table)
            return
        if self.interactive:
            self.say(format_reply(reply))
        else:
            self.out.print(format_reply(reply), markup=False)
