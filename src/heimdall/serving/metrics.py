"""Prometheus metrics of one server: requests, latency, batching, the served version, swaps.

Each ``Metrics`` owns its registry, so several apps can live in one process (tests, Ray
replicas) without colliding in prometheus_client's global one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from heimdall.serving.backend import Served

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The metrics the app, the batcher and the follower record."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "heimdall_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "heimdall_request_seconds",
            "Time from routing a request to its response, by route template",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "heimdall_batch_samples",
            "Samples per ONNX Runtime call",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "heimdall_queue_samples",
            "Samples waiting for a batch",
            registry=self.registry,
        )
        self.served = Gauge(
            "heimdall_served_model",
            "1 for the model version served now",
            ["version", "sha256", "alias"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "heimdall_swaps",
            "Changes from one served model to another",
            registry=self.registry,
        )
        self.refused = Counter(
            "heimdall_refused_versions",
            "Model versions that failed a check and were not served, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "heimdall_webhook_deliveries",
            "MLflow webhook deliveries, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self._current: Served | None = None

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
        self.latency.labels(route=route).observe(seconds)

    def on_swap(self, served: Served) -> None:
        """``served`` is now current; the first load is not counted as a swap."""
        if self._current is not None and self._current != served:
            self.swaps.inc()
        self._current = served
        self.served.clear()
        self.served.labels(
            version=served.version, sha256=served.sha256, alias=served.alias or ""
        ).set(1)

    def on_refused(self, reason: str) -> None:
        """A version failed a check (``reason``, a short word: ``sha256``) and is not served."""
        self.refused.labels(reason=reason).inc()

    def on_webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
