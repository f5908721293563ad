"""Prometheus metrics for the worker and the frontends (prometheus-client)."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("house_queue_depth", "Requests waiting or in flight", registry=r)
        self.batch_size = Histogram("house_batch_size", "Requests per micro-batch",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64), registry=r)
        self.queue_seconds = Histogram("house_time_in_queue_seconds",
                                       "From request creation to batch start", registry=r,
                                       buckets=(.005, .01, .05, .1, .5, 1, 2, 5, 10, 30, 60))
        self.generation_seconds = Histogram("house_generation_seconds",
                                            "One batched generate() call", registry=r,
                                            buckets=(.01, .1, .5, 1, 2, 5, 10, 20, 40, 80))
        self.tokens = Counter("house_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge("house_tokens_per_second", "Tokens/s of the last batch",
                                  registry=r)
        self.replies = Counter("house_replies", "Replies written", ["kind"], registry=r)
        self.errors = Counter("house_errors", "Requests answered with an error", ["reason"],
                              registry=r)
        self.winners = Counter("house_reply_winner", "Chat replies by the kind that won "
                               "(generated, canon, differential or topic)", ["kind"], registry=r)
        self.listener_skipped = Counter("house_listener_skipped", "Replies chosen without "
                                        "the listener because the worker was busy",
                                        registry=r)
        self.reply_choice_seconds = Histogram(
            "house_reply_choice_seconds", "Time one chat reply spent being chosen: the canon "
            "search, the listener and the persona classifier (issue 13: at most 15 % of a "
            "reply's latency)", registry=r,
            buckets=(.005, .01, .025, .05, .1, .2, .4, .8, 1.6, 3.2))
        self.canon_first = Counter("house_reply_canon_first", "Hybrid replies answered with "
                                   "a canon line before anything was generated "
                                   "(HYBRID_SURE_FIT)", registry=r)
        self.dead_letters = Counter("house_dead_letters", "Requests moved to dead letters",
                                    registry=r)
        self.lost = Counter("house_lost_requests", "Requests that vanished from the stream "
                            "before an answer (the user got an apology)", registry=r)
        self.claimed = Counter("house_claimed", "Requests taken over from another worker",
                               registry=r)
        self.last_batch_ts = Gauge("house_last_loop_timestamp_seconds",
                                   "When the worker loop last ran (liveness)", registry=r)
        self.last_beat = time.time()
        self.failures_in_a_row = 0
        self.max_failures_in_a_row = 3

    def generation_ok(self) -> None:
        self.failures_in_a_row = 0

    def generation_failed(self) -> None:
        self.failures_in_a_row += 1

    def beat(self) -> None:
        """Called by the worker loop once per turn."""
        self.last_beat = time.time()
        self.last_batch_ts.set(self.last_beat)

    def alive(self, max_age_s: float) -> bool:
        """True when the worker loop turned within ``max_age_s`` (choose it longer than the
        slowest batch: the loop turns once per batch) and the last generations did not all
        fail (a broken model keeps the loop turning while every request fails)."""
        return (time.time() - self.last_beat <= max_age_s
                and self.failures_in_a_row < self.max_failures_in_a_row)

    def serve(self, port: int, max_age_s: float = 300.0,
              host: str = "127.0.0.1") -> ThreadingHTTPServer | None:
        """``/metrics`` (Prometheus) and ``/healthz`` (200 alive, 503 stalled) on ``port`` of
        ``host`` (loopback unless WORKER_METRICS_HOST says otherwise, e.g. in a container)."""
        if not port:
            return None
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    ok = metrics.alive(max_age_s)
                    body, status, kind = (b"ok\n" if ok else b"stalled\n"), (200 if ok else 503), \
                        "text/plain"
                else:
                    body, status, kind = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s); metrics not served", port, exc)
            return None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        log.info("worker metrics on %s:%d/metrics, liveness on /healthz", host, port)
        return server


class FrontendMetrics:
    def __init__(self, frontend: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("house_frontend_messages", "Messages received",
                                ["frontend", "outcome"], registry=r)
        self.reply_seconds = Histogram("house_frontend_reply_seconds",
                                       "From message to delivered reply", ["frontend"],
                                       registry=r, buckets=(.05, .1, .5, 1, 2, 5, 10, 30, 60, 120))
        self.backlog_full = Counter("house_frontend_backlog_full",
                                    "Replies held back in Redis because their chat already had "
                                    "a full backlog of sends", ["frontend"], registry=r)
        self.frontend = frontend

    def count(self, outcome: str) -> None:
        self.messages.labels(self.frontend, outcome).inc()

    def held_back(self) -> None:
        self.backlog_full.labels(self.frontend).inc()

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
