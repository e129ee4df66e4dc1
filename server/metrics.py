"""Prometheus metrics, one registry per app (so several apps in one process, as in tests, never clash)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aimlqa_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("aimlqa_request_latency_seconds", "HTTP request latency, to the last byte", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("aimlqa_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self.batch_size = Histogram("aimlqa_batch_size", "Questions per generate call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("aimlqa_batch_seconds", "Time of one batched answer_many call", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("aimlqa_tokens", "Prompt and completion tokens", ["model", "kind"], registry=r)
        self.refused = Counter("aimlqa_refused", "Requests refused: queue full, timed out, or failed", ["model", "reason"], registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
