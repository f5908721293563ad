"""A redis-server of a test's own, on a free loopback port with its data in a temp dir.

Outage and persistence tests stop, kill and restart it; the shared Redis on 6379 is never
touched. It runs with the production config (deploy/redis.conf: AOF on), with only the port,
bind address and directory overridden.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from base.config import ROOT

REDIS_CONF = ROOT / "deploy" / "redis.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """``start()``, ``stop()`` (clean: AOF fsynced), ``kill()`` (SIGKILL), ``restart()``."""

    def __init__(self, data_dir: Path, conf: Path = REDIS_CONF, port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (deploy/scripts/ensure-redis.sh "
                               "installs Debian's redis-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.conf = conf
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_connect_timeout=1, socket_timeout=5)

    def start(self, *extra: str, wait_s: float = 10.0) -> PrivateRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--logfile", str(self.data_dir / "redis.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """A clean shutdown (what systemd and docker do with SIGTERM)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
