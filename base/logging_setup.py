"""Process set-up every process shares, frontends included (no torch here): logging that
masks secrets, the configured keys and the Redis connection."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import redis.asyncio as aioredis

from base.config import Settings, mask_secret
from base.keys import Keys
from base.redis_conn import connect


class SecretMaskingFilter(logging.Filter):
    """Masks configured tokens in every log record (python-telegram-bot logs request URLs,
    which contain the bot token)."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secret(message, self.settings)
        if masked != message:
            record.msg, record.args = masked, None
        # Tracebacks too: an HTTP error's message holds the request URL, and so the token.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secret(record.exc_text, self.settings)
        if record.stack_info:
            record.stack_info = mask_secret(record.stack_info, self.settings)
        return True


def setup_logging(settings: Settings, logfile: Path | None = None) -> None:
    handler: logging.Handler
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logfile, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretMaskingFilter(settings))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())
    for noisy in ("httpx", "httpcore", "discord.gateway", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The client libraries log message contents at DEBUG; ours never log message text.
    for library in ("telegram", "discord"):
        logging.getLogger(library).setLevel(max(root.level, logging.INFO))


def keys_for(settings: Settings) -> Keys:
    return Keys(settings.redis.key_prefix)


async def redis_for(settings: Settings) -> aioredis.Redis:
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    return await connect(settings.redis.url, settings.redis.connect_retries,
                         settings.redis.retry_delay_s, password)


