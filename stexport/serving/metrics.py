"""Prometheus metrics of one `stexport serve` replica (prometheus_client), answered at GET PREFIX/metrics.

Each replica keeps its own registry, so with several replicas a scrape sees the replica that answered it
(its id is the `replica` label); Ray's own metrics endpoint aggregates cluster-wide.

    stexport_requests_total{model, route, status}   requests answered (model "" on routes that name none)
    stexport_queue_seconds{model}                    decoded video waiting for its batch to start
    stexport_decode_seconds{model}                   decoding one video (upload written to a file → clips)
    stexport_backend_seconds{model}                  one backend call (a batch's views of one task)
    stexport_batch_videos                            videos per batch (serve.batch, across callers)
    stexport_decode_failures_total{reason}           videos that failed to decode: invalid, stall, timeout, crash
"""

from __future__ import annotations

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
VIDEOS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One replica's counters and histograms in a registry of its own (never the process-global one, which
    Ray's own metrics share)."""

    def __init__(self, replica: str = ""):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"replica": replica}
        kw = {"registry": self.registry}
        self.requests = Counter("stexport_requests", "Requests answered, by model, route and HTTP/gRPC status",
                                ["replica", "model", "route", "status"], **kw)
        self.queue = Histogram("stexport_queue_seconds", "Seconds a decoded video waited for its batch",
                               ["replica", "model"], buckets=SECONDS, **kw)
        self.decode = Histogram("stexport_decode_seconds", "Seconds decoding one video took",
                                ["replica", "model"], buckets=SECONDS, **kw)
        self.backend = Histogram("stexport_backend_seconds", "Seconds one backend call took",
                                 ["replica", "model"], buckets=SECONDS, **kw)
        self.batch = Histogram("stexport_batch_videos", "Videos per batch", ["replica"], buckets=VIDEOS, **kw)
        self.decode_failures = Counter("stexport_decode_failures", "Videos that failed to decode, by reason",
                                       ["replica", "reason"], **kw)
        self.replica = labels["replica"]

    def request(self, model: str, route: str, status) -> None:
        self.requests.labels(self.replica, model, route, str(status)).inc()

    def decoded(self, model: str, seconds: float) -> None:
        self.decode.labels(self.replica, model).observe(seconds)

    def decode_failed(self, reason: str) -> None:
        """Count a decoding failure by its VideoError.reason: invalid, stall, timeout or crash."""
        self.decode_failures.labels(self.replica, reason).inc()

    def batched(self, items, now: float) -> None:
        """A batch of Clips starts at perf_counter() `now`: its size and each item's queueing time."""
        self.batch.labels(self.replica).observe(len(items))
        for it in items:
            self.queue.labels(self.replica, it.task or "").observe(max(0.0, now - it.ready_at))

    def backend_call(self, model: str, seconds: float) -> None:
        self.backend.labels(self.replica, model).observe(seconds)

    def text(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
