"""How every long-running process hears that it should stop: SIGTERM (systemd, Docker,
Kubernetes) and SIGINT (Ctrl-C), handled on the event loop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(callback: Callable[[signal.Signals], object]) -> None:
    """Call ``callback(sig)`` on the running loop whenever a stop signal arrives."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback, sig)
