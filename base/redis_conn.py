"""Redis connections: one asyncio pool per process, created with retries."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def make_client(url: str, password: str | None = None) -> aioredis.Redis:
    """A client whose commands retry a few times with backoff when the connection drops;
    ``password`` (REDIS_PASSWORD) is used when the URL carries none."""
    extra = {"password": password} if password else {}
    return aioredis.Redis.from_url(
        url,
        **extra,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        socket_connect_timeout=5,
    )


async def connect(url: str, retries: int = 5, delay_s: float = 1.0,
                  password: str | None = None) -> aioredis.Redis:
    """Connect and PING, warning "N retries remaining" before giving up."""
    client = make_client(url, password)
    for attempt in range(retries + 1):
        try:
            await client.ping()
            return client
        except REDIS_DOWN as exc:
            if attempt == retries:
                await client.aclose()
                raise ConnectionError(f"Redis at {safe_url(url)} does not answer: {exc}") from exc
            log.warning("Redis at %s not reachable (%s); %d retries remaining",
                        safe_url(url), type(exc).__name__, retries - attempt)
            await asyncio.sleep(delay_s)
    raise AssertionError("unreachable")


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(parsed.password, "***")
    return url


def ensure_redis_server(url: str, data_dir: Path | None = None,
                        wait_s: float = 10.0) -> subprocess.Popen[bytes] | None:
    """Start a local ``redis-server`` when none answers at ``url`` (loopback only).

    With ``data_dir`` it keeps an append-only file there, so histories survive a restart.
    Returns the process we started, or None when one already answered.
    """
    import redis

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    try:
        redis.Redis(host=host, port=port, socket_connect_timeout=1).ping()
        return None
    except redis.exceptions.RedisError:
        pass
    except Exception:
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConnectionError(f"Redis at {safe_url(url)} does not answer and is not local")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConnectionError("no Redis answers and redis-server is not installed "
                              "(apt-get install redis-server)")
    persistence = (["--dir", str(data_dir), "--appendonly", "yes"] if data_dir
                   else ["--appendonly", "no"])
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            redis.Redis(host=host, port=port, socket_connect_timeout=1).ping()
            log.info("started redis-server on port %d (pid %d)", port, proc.pid)
            return proc
        except redis.exceptions.RedisError:
            time.sleep(0.1)
    proc.terminate()
    raise ConnectionError("redis-server did not start")
