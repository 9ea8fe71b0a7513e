"""Prometheus metrics of one backend process: requests, refusals by reason, latency, usage per licence.

Served at GET /metrics in the Prometheus text format. Every label has a bounded set of values (a
route name from a fixed list, a status code, a reason class), so a client sending junk paths cannot
grow the registry; usage per licence is read from the database at scrape time, so it is exact and
the same whichever worker is scraped. The request figures are per process: with several workers,
scrape each and add them up (`sum by (route, status)`).

Who may read it: usage per licence is the owner's business data. With a token configured
(`MODELCLOAK_METRICS_TOKEN`), a scrape must send `Authorization: Bearer <token>`; without one, only
clients on loopback are answered (a Prometheus on the same host, or an SSH tunnel), others get 403.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_PATH = "/metrics"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# What a refusal's status means; the label `reason` takes only these values.
REASONS = {
    400: "malformed",
    401: "bad_signature",
    403: "refused_by_policy",
    404: "unknown_licence",
    405: "method_not_allowed",
    408: "body_timeout",
    409: "sequence_conflict",
    413: "too_large",
    422: "invalid_shape",
    429: "throttled",
    500: "internal_error",
    503: "database_unavailable",
}
# Latency buckets (seconds) around the 100 ms p99 target.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class _UsageCollector(Collector):
    """Queries used and quota per licence, read from the database at each scrape."""

    def __init__(self, read: Callable[[], list[tuple[str, int, int | None]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        used = CounterMetricFamily(
            "modelcloak_licence_queries", "Queries counted for a licence (all workers)", labels=["licence"]
        )
        quota = GaugeMetricFamily("modelcloak_licence_query_quota", "A licence's query quota", labels=["licence"])
        for licence, queries_used, query_quota in self.read():
            used.add_metric([licence], queries_used)
            if query_quota is not None:
                quota.add_metric([licence], query_quota)
        yield used
        yield quota


class Metrics:
    """The registry of one app, and the counters the middleware and the error handlers update."""

    def __init__(self, routes: list[str], usage: Callable[[], list[tuple[str, int, int | None]]]) -> None:
        self.routes = {*routes, METRICS_PATH}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelcloak_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "modelcloak_refusals",
            "Requests refused (any 4xx/5xx), by route and reason",
            ["route", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelcloak_http_request_duration_seconds",
            "Time from the request's arrival to the end of its answer, by route",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.database_errors = Counter(
            "modelcloak_database_errors", "Requests answered 503 because the database failed", registry=self.registry
        )
        self.registry.register(_UsageCollector(usage))
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def route_of(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        route = self.route_of(path)
        method = method if method in ("GET", "POST") else "other"
        # The labelled children, looked up once per (route, method, status): `labels()` costs more than
        # the increments. Bounded like the labels themselves (fixed routes, methods, statuses).
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            refusal = (
                self.refusals.labels(route, REASONS.get(status, f"http_{status // 100}xx")) if status >= 400 else None
            )
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route), refusal)
            self._children[key] = children
        requests, latency, refusals = children
        requests.inc()
        latency.observe(seconds)
        if refusals is not None:
            refusals.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Outermost layer: times every request (throttled and oversized ones too) and serves /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, *, token: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if scope.get("path") == METRICS_PATH:
            status = await self._serve_metrics(scope, send)
            self.metrics.observe(METRICS_PATH, scope.get("method", ""), status, time.perf_counter() - started)
            return
        status = 500  # what the server answers if the app raises before starting a response

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.observe(scope.get("path", ""), scope.get("method", ""), status, time.perf_counter() - started)

    def _allowed(self, scope: Scope) -> bool:
        if self.token is not None:
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    return hmac.compare_digest(value, b"Bearer " + self.token.encode())
            return False
        client = (scope.get("client") or ("",))[0]
        return client in _LOOPBACK

    async def _serve_metrics(self, scope: Scope, send: Send) -> int:
        if scope.get("method") != "GET":
            status, body, headers = 405, b'{"error": "method not allowed"}', [(b"allow", b"GET")]
            headers.append((b"content-type", b"application/json"))
        elif not self._allowed(scope):
            reason = "a bearer token is required" if self.token else "only loopback clients may read metrics"
            status, body = 403, ('{"error": "%s"}' % reason).encode()
            headers = [(b"content-type", b"application/json")]
        else:
            status, body = 200, self.metrics.exposition()
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return status
