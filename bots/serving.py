"""What every chat frontend runs beside its platform client: the reply reader and the typing
refresher; and running one frontend as its own process (``drhouse telegram|discord``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from base.config import Settings
from base.metrics import FrontendMetrics
from base.protocol import Reply
from base.queue_client import QueueClient
from base.signals import on_stop_signals
from bots.outbox import ChatOutbox
from bots.typing_indicator import TypingIndicator

log = logging.getLogger(__name__)

Serve = Callable[[Settings, Any], Awaitable[None]]


def serve_metrics(metrics: FrontendMetrics, port: int) -> None:
    """Expose a frontend's Prometheus metrics on ``port`` (0 = off). When two frontends run in
    one process (``drhouse up``), the second finds the port taken and goes without."""
    try:
        metrics.serve(port)
    except OSError as exc:
        log.warning("%s metrics not served on port %d: %s", metrics.frontend, port, exc)


async def serve_replies(queue: QueueClient, deliver: Callable[[Reply], Awaitable[Any]],
                        typing: TypingIndicator[Any], outbox: ChatOutbox,
                        block_ms: int = 1000) -> None:
    """Read replies and refresh "typing…" until cancelled (or the reader fails); then stop
    reading and let the sends already queued finish, while the platform client still runs."""
    stop = asyncio.Event()
    reader = asyncio.create_task(queue.run_reader(deliver, block_ms=block_ms, stop=stop),
                                 name=f"{queue.frontend_id}-replies")
    refresher = asyncio.create_task(typing.run(), name=f"{queue.frontend_id}-typing")
    try:
        done, _ = await asyncio.wait({reader, refresher}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        stop.set()
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(reader, block_ms / 1000 + 5)
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await outbox.drain()
        await queue.settle()  # acknowledge what was sent; the rest stays pending


def run_frontend(settings: Settings, serve: Serve, name: str) -> int:
    """Serve until SIGINT/SIGTERM, then let ``serve`` clean up; the exit code."""
    from base.logging_setup import setup_logging

    setup_logging(settings)
    return asyncio.run(_main(settings, serve, name))


async def _main(settings: Settings, serve: Serve, name: str) -> int:
    from base.logging_setup import redis_for

    redis = await redis_for(settings)
    task = asyncio.create_task(serve(settings, redis), name=name)
    on_stop_signals(lambda sig: task.cancel())
    try:
        await task
    except asyncio.CancelledError:
        log.info("%s frontend: stopped by signal", name)
    except Exception:
        log.exception("%s frontend failed", name)
        return 1
    finally:
        await redis.aclose()
    return 0
