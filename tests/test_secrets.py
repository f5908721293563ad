"""Secrets: tokens come only from the environment or .env, never show in settings dumps or
logs (messages, arguments, tracebacks, library loggers), no token-like string is committed,
and the real `drhouse telegram` process, run at DEBUG against the fake Bot API, never writes
its token. Plus the allow-list and the admin ids that guard /stats."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fake_telegram import FakeTelegram
from harness import ask, make_settings
from private_redis import free_port

from base.config import ROOT, Settings
from base.keys import Keys
from base.logging_setup import setup_logging
from base.queue_client import QueueClient
from bots.core import FrontendCore
from engine.worker import Worker
from persona.pack import Persona

# A fake token, assembled so the source holds nothing shaped like a real one.
TOKEN = "987654321" + ":" + "AAHsecret-token-that-must-never-be-logged"
DISCORD = "MTA5ODc2NTQzMjEwOTg3NjU0.Gsecret.discord-token-that-must-not-leak"
WEBHOOK_SECRET = "webhook-secret-value-0123456789"
# Shapes of real tokens: Telegram "<bot id>:<35 chars>", Discord "<base64 id>.<6>.<27+>".
TELEGRAM_SHAPE = re.compile(r"(?<!\d)\d{8,10}:[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])")
DISCORD_SHAPE = re.compile(r"\b[MN][A-Za-z\d_-]{23,25}\.[\w-]{6}\.[\w-]{27,}\b")


def test_tokens_come_from_the_environment_and_env_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TELEGRAM_TOKEN", "DISCORD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text(f"TELEGRAM_TOKEN={TOKEN}\nDISCORD_TOKEN={DISCORD}\n")
    settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert settings.telegram.token is not None
    assert settings.telegram.token.get_secret_value() == TOKEN
    monkeypatch.setenv("TELEGRAM_TOKEN", "111:from-the-environment")
    settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert settings.telegram.token.get_secret_value() == "111:from-the-environment"
    assert Settings(_env_file=None).discord.token is None  # type: ignore[call-arg]


def test_tokens_never_show_in_settings_dumps() -> None:
    settings = Settings(_env_file=None, telegram_token=TOKEN,  # type: ignore[call-arg]
                        discord_token=DISCORD, telegram_webhook_secret=WEBHOOK_SECRET)
    for text in (repr(settings), str(settings), settings.model_dump_json(),
                 str(settings.model_dump())):
        assert TOKEN not in text and DISCORD not in text and WEBHOOK_SECRET not in text


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    """setup_logging as a process does it, writing to a file; the root logger is restored."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    settings = Settings(_env_file=None, telegram_token=TOKEN,  # type: ignore[call-arg]
                        discord_token=DISCORD, telegram_webhook_secret=WEBHOOK_SECRET,
                        log_level="DEBUG")
    path = tmp_path / "drhouse.log"
    setup_logging(settings, path)
    try:
        yield path
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_a_log_line_with_a_token_is_masked(logfile: Path) -> None:
    log = logging.getLogger("drhouse.test")
    url = f"https://api.telegram.org/bot{TOKEN}/getUpdates"
    log.info("calling %s", url)
    log.info(f"formatted in place: {url}")
    log.warning("discord said %r", {"token": DISCORD, "secret": WEBHOOK_SECRET})
    try:
        raise ConnectionError(f"POST {url} failed")
    except ConnectionError:
        log.exception("request failed")
    log.error("with a stack", stack_info=True, extra={"note": TOKEN})
    logging.getLogger("telegram.ext.Updater").error("Error while getting Updates: %s", url)
    logging.getLogger("httpx").warning("HTTP Request: POST %s", url)
    text = logfile.read_text()
    assert TOKEN not in text and DISCORD not in text and WEBHOOK_SECRET not in text
    assert text.count("***") >= 7
    assert "Traceback" in text and "ConnectionError: POST https://api.telegram.org/bot***" in text


def test_no_token_is_committed() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    found = []
    for name in files:
        path = ROOT / name
        if not name or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        if name == "tests/test_secrets.py":
            continue  # the fake tokens above
        found += [f"{name}: {m.group(0)[:12]}…" for m in TELEGRAM_SHAPE.finditer(text)]
        found += [f"{name}: {m.group(0)[:12]}…" for m in DISCORD_SHAPE.finditer(text)]
    assert not found, found
    assert TELEGRAM_SHAPE.search("bot" + "123456789:" + "A" * 35 + "/getMe")  # the check works
    tracked = set(files)
    assert ".env" not in tracked and ".env.example" in tracked


async def test_drhouse_telegram_never_logs_its_token(
        tmp_path: Path, settings: Settings, prefix: str, fake_worker: Worker) -> None:
    """The deployed command, at DEBUG, through a full exchange, a 429 retry and shutdown:
    its output holds no token. It also serves its metrics (the container health check)."""
    metrics_port = free_port()
    env = {**os.environ, "TELEGRAM_TOKEN": TOKEN, "REDIS_URL": settings.redis.url,
           "KEY_PREFIX": prefix, "TELEGRAM_POLL_TIMEOUT_S": "1", "LOG_LEVEL": "DEBUG",
           "FRONTEND_METRICS_PORT": str(metrics_port), "HF_HUB_OFFLINE": "1",
           "TELEGRAM_WEBHOOK_SECRET": WEBHOOK_SECRET}
    async with FakeTelegram(token=TOKEN) as tg:
        env["TELEGRAM_API_URL"] = tg.api_url
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "telegram", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await tg.wait_for(lambda: tg.calls["getUpdates"] > 0, timeout=60)
            tg.fail_next("sendMessage", times=1, retry_after=1)
            tg.private_text(4242, "My token hurts")
            [reply] = await tg.wait_sent(1, chat_id=4242, timeout=60)
            assert reply["text"].startswith("Diagnosis ")
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
            assert "house_frontend_messages" in metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "DEBUG bots." in text or "DEBUG engine." in text or "DEBUG asyncio" in text
    # python-telegram-bot logs message contents at DEBUG: it is held at INFO.
    assert "DEBUG telegram" not in text
    assert "Rate limit hit" in text  # the 429 went through the retry path
    assert TOKEN not in text and TOKEN.split(":")[1] not in text
    assert WEBHOOK_SECRET not in text


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# ---- allow-list and admins -------------------------------------------------------------------


@pytest.fixture
async def guarded(settings: Settings, prefix: str, persona: Persona, queue: QueueClient,
                  keys: Keys) -> FrontendCore:
    return FrontendCore(make_settings(settings.redis.url, prefix, allowed_users="1, 2",
                                      allowed_chats="-100", admin_ids="2"),
                        persona, queue, keys)


async def test_allow_list_lets_listed_users_and_chats_in(
        guarded: FrontendCore, queue: QueueClient, persona: Persona, fake_worker: Worker,
        redis: aioredis.Redis, keys: Keys) -> None:
    refused = persona.line("not_allowed")
    assert (await ask(guarded, queue, "1", "what do you make of this?")).startswith("Diagnosis ")
    assert await ask(guarded, queue, "3", "what do you make of this?") == refused
    assert await ask(guarded, queue, "3", "/start") == refused
    assert await ask(guarded, queue, "3", "/forget") == refused
    assert (await ask(guarded, queue, "3", "what do you make of this?", chat="-100",
                      conversation="t:c:-100:u:3")).startswith("Diagnosis ")
    assert await ask(guarded, queue, "3", "what do you make of this?", chat="-200",
                     conversation="t:c:-200:u:3") == refused
    assert await redis.llen(keys.history("t:u:3")) == 0


async def test_stats_only_for_admin_ids(guarded: FrontendCore, queue: QueueClient,
                                        persona: Persona, fake_worker: Worker) -> None:
    await ask(guarded, queue, "1", "hello")
    stats = await ask(guarded, queue, "2", "/stats")
    assert stats.startswith("Queue: ") and "Replies: 1" in stats
    assert await ask(guarded, queue, "1", "/stats") == persona.line("not_allowed")
    assert await ask(guarded, queue, "3", "/stats", chat="-100",
                     conversation="t:c:-100:u:3") == persona.line("not_allowed")


async def test_nobody_is_admin_by_default(core_default: FrontendCore, queue: QueueClient,
                                          persona: Persona) -> None:
    for user in ("0", "1", "admin", ""):
        assert await ask(core_default, queue, user, "/stats") == persona.line("not_allowed")


@pytest.fixture
def core_default(settings: Settings, persona: Persona, queue: QueueClient,
                 keys: Keys) -> FrontendCore:
    return FrontendCore(settings, persona, queue, keys)
