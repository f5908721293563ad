"""``drhouse telegram`` and the Telegram frontend's entry point for ``drhouse up``.

The frontend itself is `bots.telegram_frontend` (imported only when it runs, so the CLI stays
quick to start).
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import Settings

FRONTEND_ID = "telegram"


async def serve_telegram(settings: Settings, redis: Any) -> None:
    """The Telegram frontend until cancelled; cleans up on cancellation."""
    from bots.telegram_frontend import TelegramFrontend
    from engine.logging_setup import keys_for
    from engine.queue_client import QueueClient
    from persona.pack import load_persona

    problem = settings.webhook_problem()
    if problem:
        raise ValueError(problem)
    keys = keys_for(settings)
    queue = QueueClient(redis, keys, FRONTEND_ID, settings.max_queue_depth,
                        settings.stream_maxlen)
    await queue.setup()
    frontend = TelegramFrontend(settings, load_persona(settings.persona), queue, keys)
    await frontend.serve()


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    """``drhouse telegram``: the frontend alone; start workers separately."""
    from bots.serving import run_frontend

    settings = Settings()
    if settings.telegram_token is None:
        print("TELEGRAM_TOKEN is not set (see .env.example).")
        return 2
    problem = settings.webhook_problem()
    if problem:
        print(f"drhouse telegram: {problem}")
        return 2
    return run_frontend(settings, serve_telegram, FRONTEND_ID)
