"""Process entry points: ``up`` (everything on one machine), ``worker``, ``chat``,
``compare`` and ``health``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import sys
from typing import TYPE_CHECKING

from base.config import ROOT, Settings
from base.keys import HEALTH_WINDOW_S
from base.signals import on_stop_signals

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from engine.worker import Worker

log = logging.getLogger(__name__)
LOG_FILE = ROOT / ".cache" / "logs" / "drhouse.log"


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)
    if name in ("up", "worker"):
        parser.add_argument("--fake", action="store_true",
                            help="use the fast deterministic generator instead of a model")
        parser.add_argument("--fake-delay-ms", type=int, default=0,
                            help="with --fake: how long each batch takes (tests, demos)")
    if name == "worker":
        parser.add_argument("--burst", action="store_true",
                            help="answer what is queued, then exit")
    if name == "compare":
        parser.add_argument("text", nargs="+", help="the message both models answer")
    if name == "health":
        parser.add_argument("--max-age", type=float, default=HEALTH_WINDOW_S,
                            help="seconds since a worker's last report "
                                 f"(default {HEALTH_WINDOW_S})")


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    action = args.action
    if action == "health":
        return asyncio.run(_health(settings, args.max_age))
    problem = settings.lease_problem() if action in ("worker", "up", "compare") else None
    if problem:
        print(f"drhouse {action}: {problem}", file=sys.stderr)
        return 2
    if action == "worker":
        from base.logging_setup import setup_logging

        setup_logging(settings)
        return asyncio.run(_worker(settings, args.fake, args.burst, args.fake_delay_ms))
    if action == "chat":
        from base.logging_setup import setup_logging

        setup_logging(settings, LOG_FILE)
        return asyncio.run(_chat_only(settings))
    stdin = io.StringIO(f"/compare {' '.join(args.text)}\n") if action == "compare" else None
    return up(settings, fake=getattr(args, "fake", False), stdin=stdin)


def up(settings: Settings, fake: bool = False, stdin: io.StringIO | None = None) -> int:
    """Redis (started when none answers), a worker and the frontends, in one process."""
    from base.logging_setup import setup_logging
    from base.redis_conn import ensure_redis_server

    console = not (settings.telegram.token or settings.discord.token)
    setup_logging(settings, LOG_FILE if console else None)
    redis_dir = ROOT / ".cache" / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    server = ensure_redis_server(settings.redis.url, data_dir=redis_dir)
    try:
        return asyncio.run(_up(settings, fake, console, stdin))
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


async def _up(settings: Settings, fake: bool, console: bool, stdin: io.StringIO | None) -> int:
    from engine.runtime import build_worker, redis_for

    redis = await redis_for(settings)
    stop = asyncio.Event()
    on_stop_signals(lambda sig: stop.set())
    if console and (stdin or sys.stdin).isatty():
        print("Loading the model… you can start typing.", file=sys.stderr)
    worker_box: list[Worker] = []

    async def serve() -> None:
        worker = await build_worker(settings, redis, fake=fake)
        worker_box.append(worker)
        worker.metrics.serve(settings.worker.metrics_port,
                             settings.worker.generation_timeout_s + 60,
                             settings.worker.metrics_host)
        await worker.run()

    worker_task = asyncio.create_task(serve(), name="worker")
    frontends = [asyncio.create_task(coro, name=name)
                 for name, coro in _frontends(settings, redis, console, stdin)]
    stopper = asyncio.create_task(stop.wait(), name="stop")
    waiting = {worker_task, stopper, *frontends}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())
            print(f"{task.get_name()} failed: {task.exception()}", file=sys.stderr)
            code = 1
    for worker in worker_box:
        worker.stop.set()
    for task in (*frontends, stopper):
        task.cancel()
    if not worker_box:
        worker_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(worker_task, 120)
    await asyncio.gather(*frontends, return_exceptions=True)
    await redis.aclose()
    return code


def _frontends(settings: Settings, redis: aioredis.Redis, console: bool,
               stdin: io.StringIO | None):  # type: ignore[no-untyped-def]
    from bots.platforms import PLATFORMS, serve_platform

    for name, platform in PLATFORMS.items():
        if platform.token(settings):
            yield name, serve_platform(name, settings, redis)
    if console:
        yield "console", _console(settings, redis, stdin)


async def _console(settings: Settings, redis: aioredis.Redis,
                   stdin: io.StringIO | None = None) -> None:
    import os

    from base.logging_setup import keys_for
    from base.queue_client import QueueClient
    from bots.console import ConsoleFrontend
    from persona.pack import load_persona

    keys = keys_for(settings)
    queue = QueueClient(redis, keys, f"console-{os.getpid()}", settings.redis.max_queue_depth,
                        settings.redis.stream_maxlen)
    await queue.setup()
    frontend = ConsoleFrontend(settings, load_persona(settings.generation.persona), queue, keys,
                               stdin=stdin, interactive=False if stdin is not None else None)
    await frontend.run()
    await redis.delete(queue.reply_stream)


async def _chat_only(settings: Settings) -> int:
    from base.logging_setup import redis_for

    redis = await redis_for(settings)
    try:
        await _console(settings, redis)
    finally:
        await redis.aclose()
    return 0


async def _worker(settings: Settings, fake: bool, burst: bool, fake_delay_ms: int = 0) -> int:
    from engine.runtime import build_worker, redis_for

    redis = await redis_for(settings)
    worker = await build_worker(settings, redis, fake=fake, fake_delay_ms=fake_delay_ms)
    worker.install_signal_handlers()
    worker.metrics.serve(settings.worker.metrics_port, settings.worker.generation_timeout_s + 60,
                         settings.worker.metrics_host)
    try:
        await worker.run(burst=burst)
    finally:
        await redis.aclose()
    return 0


async def _health(settings: Settings, max_age_s: float) -> int:
    from base.logging_setup import keys_for, redis_for
    from engine.worker import check_health

    try:
        redis = await redis_for(settings.with_overrides(redis_connect_retries=0))
    except ConnectionError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        code = await check_health(redis, keys_for(settings), max_age_s)
    finally:
        await redis.aclose()
    print("healthy" if code == 0 else "no worker reported recently")
    return code



