"""Prometheus metrics for the worker and the frontends (prometheus-client)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.dead_letters = Counter("house_dead_letters", "Requests moved to dead letters",
                                    registry=r)
        self.claimed = Counter("house_claimed", "Requests taken over from another worker",
                               registry=r)
        self.last_batch_ts = Gauge("house_last_loop_timestamp_seconds",
                                   "When the worker loop last ran (liveness)", registry=r)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
            log.info("worker metrics on :%d/metrics", port)


class FrontendMetrics:
    def __init__(self, frontend: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("house_frontend_messages", "Messages received",
                                ["frontend", "outcome"], registry=r)
        self.reply_seconds = Histogram("house_frontend_reply_seconds",
                                       "From message to delivered reply", ["frontend"],
                                       registry=r, buckets=(.05, .1, .5, 1, 2, 5, 10, 30, 60, 120))
        self.frontend = frontend

    def count(self, outcome: str) -> None:
        self.messages.labels(self.frontend, outcome).inc()

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
