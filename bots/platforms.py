"""``drhouse telegram`` and ``drhouse discord``, and each platform's entry point for
``drhouse up``: one code path for both, driven by a row per platform.

The frontends themselves (`bots.telegram_frontend`, `bots.discord_frontend`) are imported only
when one runs, so the command line stays quick to start.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any

from base.config import Settings

TELEGRAM_ID, DISCORD_ID = "telegram", "discord"


@dataclass(frozen=True)
class Platform:
    name: str  # the subcommand, the frontend id (its reply stream, conversations), its settings
    token_variable: str
    frontend: str  # "module:Class"; the class takes (settings, persona, queue, keys)

    def token(self, settings: Settings) -> Any:
        """The platform's token setting (a SecretStr), or None when it is not set."""
        return getattr(settings, self.name).token

    def problem(self, settings: Settings) -> str | None:
        """Why this frontend must not start with these settings, or None."""
        if self.token(settings) is None:
            return f"{self.token_variable} is not set (see .env.example)."
        return settings.telegram.webhook_problem() if self.name == TELEGRAM_ID else None


PLATFORMS = {p.name: p for p in (
    Platform(TELEGRAM_ID, "TELEGRAM_TOKEN", "bots.telegram_frontend:TelegramFrontend"),
    Platform(DISCORD_ID, "DISCORD_TOKEN", "bots.discord_frontend:DiscordFrontend"),
)}


async def serve_platform(name: str, settings: Settings, redis: Any) -> None:
    """One platform's frontend until cancelled; it cleans up on cancellation."""
    from base.logging_setup import keys_for
    from base.queue_client import QueueClient
    from persona.pack import load_persona

    platform = PLATFORMS[name]
    problem = platform.problem(settings)
    if problem:
        raise ValueError(problem)
    module, _, cls = platform.frontend.partition(":")
    frontend_class = getattr(importlib.import_module(module), cls)
    keys = keys_for(settings)
    queue = QueueClient(redis, keys, name, settings.redis.max_queue_depth,
                        settings.redis.stream_maxlen)
    await queue.setup()
    frontend = frontend_class(settings, load_persona(settings.generation.persona), queue, keys)
    await frontend.serve()


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    """``drhouse telegram|discord``: the frontend alone; start workers separately."""
    from bots.serving import run_frontend

    name = args.action
    settings = Settings()
    problem = PLATFORMS[name].problem(settings)
    if problem:
        print(f"drhouse {name}: {problem}")
        return 2

    async def serve(settings: Settings, redis: Any) -> None:
        await serve_platform(name, settings, redis)

    return run_frontend(settings, serve, name)
