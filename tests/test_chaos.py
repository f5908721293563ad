"""Crash recovery with real worker processes: kill -9 one of two workers while it holds a
batch; every request still gets exactly one reply. And a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REDIS_URL

from base.keys import WORKERS_GROUP
from base.protocol import Reply, Request
from base.queue_client import QueueClient

pytestmark = pytest.mark.timeout(180)
DRHOUSE = str(Path(sys.executable).with_name("drhouse"))


def start_worker(prefix: str, name: str, delay_ms: int, claim_idle_ms: int = 2000,
                 batch: int = 8) -> subprocess.Popen[bytes]:
    """A fake worker process; its log goes to a file (a pipe nobody reads would stop it once
    full), read back by `log_tail` when a test fails."""
    env = {**os.environ, "REDIS_URL": REDIS_URL, "KEY_PREFIX": prefix, "WORKER_NAME": name,
           "CLAIM_IDLE_MS": str(claim_idle_ms), "BATCH_SIZE": str(batch),
           "WORKER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING", "BATCH_WAIT_MS": "0"}
    with tempfile.NamedTemporaryFile(prefix=f"chaos-{name}-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen([DRHOUSE, "worker", "--fake", "--fake-delay-ms", str(delay_ms)],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen[bytes], chars: int = 3000) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-chars:]  # type: ignore[attr-defined]


async def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def pending_of(redis, keys, consumer: str) -> int:  # type: ignore[no-untyped-def]
    for c in await redis.xinfo_consumers(keys.requests, WORKERS_GROUP):
        if c["name"] == consumer:
            return int(c["pending"])
    return 0


async def test_kill_9_mid_batch_loses_and_duplicates_nothing(redis, keys, prefix) -> None:  # type: ignore[no-untyped-def]
    client = QueueClient(redis, keys, "chaos", max_queue_depth=10_000)
    await client.setup()
    workers = {name: start_worker(prefix, name, delay_ms=300) for name in ("w1", "w2")}
    try:
        requests = [Request(frontend="chaos", conversation=f"c{i}", user=f"u{i}",
                            text=f"question {i}", settings={"candidates": 1})
                    for i in range(200)]
        for r in requests:
            await client.submit(r)

        async def w1_holds_a_batch() -> bool:
            return await pending_of(redis, keys, "w1") > 0

        await wait_until(w1_holds_a_batch, 60, "w1 to hold a batch")
        held = await pending_of(redis, keys, "w1")
        workers["w1"].send_signal(signal.SIGKILL)
        workers["w1"].wait(10)
        assert held > 0

        async def final_replies() -> list[Reply]:  # streamed partial events left out
            replies = [Reply.loads(f) for _, f in await redis.xrange(keys.replies("chaos"))]
            return [r for r in replies if r.partial is None]

        async def all_answered() -> bool:
            return len(await final_replies()) >= len(requests)

        try:
            await wait_until(all_answered, 120, "every request to be answered")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {len(await final_replies())} of {len(requests)} answered; w2 "
                f"{'runs' if workers['w2'].poll() is None else 'exited'}; its log:\n"
                f"{log_tail(workers['w2'])}") from None
        await asyncio.sleep(1.0)  # a late duplicate would show up here
        counts = Counter(r.id for r in await final_replies())
        assert set(counts) == {r.id for r in requests}, "a request was lost"
        assert max(counts.values()) == 1, "a request was answered twice"
        assert (await redis.xpending(keys.requests, WORKERS_GROUP))["pending"] == 0
        assert workers["w2"].poll() is None, "the surviving worker died"
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]


async def test_sigterm_finishes_the_batch_in_flight(redis, keys, prefix) -> None:  # type: ignore[no-untyped-def]
    client = QueueClient(redis, keys, "graceful")
    await client.setup()
    worker = start_worker(prefix, "g1", delay_ms=1500, batch=4)
    try:
        requests = [Request(frontend="graceful", conversation=f"g{i}", user="u",
                            text=f"q{i}", settings={"candidates": 1}) for i in range(4)]
        for r in requests:
            await client.submit(r)

        async def holding() -> bool:
            return await pending_of(redis, keys, "g1") == 4

        await wait_until(holding, 60, "the worker to take the batch")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        replies = [Reply.loads(f) for _, f in await redis.xrange(keys.replies("graceful"))]
        assert {r.id for r in replies if r.partial is None} == {r.id for r in requests}
        assert (await redis.xpending(keys.requests, WORKERS_GROUP))["pending"] == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        Path(worker.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
