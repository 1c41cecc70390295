"""Prometheus metrics on prometheus-client, one registry per app.

Every `ServiceMetrics` owns its `CollectorRegistry`: two apps in one process (tests, an embedder
serving several pools) never share a series nor clash on a name, and nothing is registered in
the library's process-global default registry. `/metrics` is the library's exposition of that
registry, with content negotiation (`render`): the text format 0.0.4 by default, OpenMetrics
when the scraper asks for it.

The series are the ones the hand-written exposition had: the library's `_created` series
(one per counter and histogram child) are left out, so a scrape shows the same names as before.

Label values come from a closed set wherever a client could otherwise invent new ones: routes
are the service's route templates ("other" for anything else), policies are loaded policy ids,
categories are the policy's ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from ..verdict import Decision

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "policy_engine_"


class ServiceRegistry(CollectorRegistry):
    """A registry whose scrape leaves out the `_created` series.

    The library's own switch (`disable_created_metrics`) is process-global; this one is per
    registry, so an embedder's other metrics keep theirs.
    """

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class ServiceMetrics:
    """The service's metrics, with one method per thing that happens.

    `in_flight`, `queued` and `ready` are read when the registry is scraped.
    """

    def __init__(
        self,
        *,
        in_flight: Callable[[], float] = lambda: 0,
        queued: Callable[[], float] = lambda: 0,
        ready: Callable[[], float] = lambda: 0,
        images_in_flight: Callable[[], float] = lambda: 0,
        images_queued: Callable[[], float] = lambda: 0,
    ) -> None:
        self.registry = ServiceRegistry(auto_describe=True)
        p, registry = PREFIX, self.registry
        self.requests = Counter(
            p + "http_requests_total",
            "HTTP requests answered, by method, route and status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            p + "http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.assess_latency = Histogram(
            p + "assessment_duration_seconds",
            "Time spent judging the images of one request (after admission), by policy and mode.",
            ("policy", "mode"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.verdicts = Counter(
            p + "verdicts_total",
            "Verdicts, by policy, rating (Safe, Unsafe or error) and category id.",
            ("policy", "rating", "category"),
            registry=registry,
        )
        self.actions = Counter(
            p + "actions_total",
            "Actions decided by post-processors.",
            ("policy", "action"),
            registry=registry,
        )
        self.errors = Counter(
            p + "assessment_errors_total",
            "Images that could not be judged, by policy and error kind (image, backend, "
            "output, config).",
            ("policy", "kind"),
            registry=registry,
        )
        self.rejected = Counter(
            p + "requests_rejected_total",
            "Requests refused by the service's guards, by reason (unauthorized, too_large, "
            "saturated, timeout, not_ready).",
            ("reason",),
            registry=registry,
        )
        gauges = (
            ("requests_in_flight", "Requests being assessed.", in_flight),
            ("requests_queued", "Admitted requests waiting for a slot.", queued),
            (
                "images_in_flight",
                "Images being assessed (what --max-concurrency counts).",
                images_in_flight,
            ),
            (
                "images_queued",
                "Admitted images waiting for a slot (a request whose body is "
                "not read yet counts one).",
                images_queued,
            ),
            (
                "backend_ready",
                "1 while /readyz says ready: the backend loaded, warmed up and reachable.",
                ready,
            ),
        )
        for name, help_text, read in gauges:
            Gauge(p + name, help_text, registry=registry).set_function(read)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def decisions(
        self, policy: str, mode: str, decisions: Sequence[Decision], seconds: float
    ) -> None:
        self.assess_latency.labels(policy, mode).observe(seconds)
        for decision in decisions:
            verdict = decision.verdict
            if verdict.error is not None:
                self.verdicts.labels(policy, "error", "none").inc()
                self.errors.labels(policy, verdict.error.kind).inc()
            else:
                rating, category = verdict.rating or "none", verdict.category_id or "none"
                self.verdicts.labels(policy, rating, category).inc()
            for action in decision.actions:
                self.actions.labels(policy, action.name).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the scraper's Accept header asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
