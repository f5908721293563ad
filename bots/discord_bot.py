"""``drhouse discord`` and the Discord frontend's entry point for ``drhouse up``.

The frontend itself is `bots.discord_frontend` (imported only when it runs, so the CLI stays
quick to start).
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import Settings

FRONTEND_ID = "discord"


async def serve_discord(settings: Settings, redis: Any) -> None:
    """The Discord frontend until cancelled; cleans up on cancellation."""
    from bots.discord_frontend import DiscordFrontend
    from engine.logging_setup import keys_for
    from engine.queue_client import QueueClient
    from persona.pack import load_persona

    if settings.discord_token is None:
        raise ValueError("DISCORD_TOKEN is not set")
    keys = keys_for(settings)
    queue = QueueClient(redis, keys, FRONTEND_ID, settings.max_queue_depth,
                        settings.stream_maxlen)
    await queue.setup()
    frontend = DiscordFrontend(settings, load_persona(settings.persona), queue, keys)
    await frontend.serve(settings.discord_token.get_secret_value())


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    """``drhouse discord``: the frontend alone; start workers separately."""
    from bots.serving import run_frontend

    settings = Settings()
    if settings.discord_token is None:
        print("DISCORD_TOKEN is not set (see .env.example).")
        return 2
    return run_frontend(settings, serve_discord, FRONTEND_ID)
