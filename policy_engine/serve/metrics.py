"""Prometheus metrics, hand-rolled: counters, gauges and histograms in the text exposition
format (version 0.0.4), no client library.

Label values come from a closed set wherever a client could otherwise invent new ones: routes
are the service's route templates ("other" for anything else), policies are loaded policy ids,
categories are the policy's ids.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

from ..verdict import Decision

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"

    def samples(self) -> Iterator[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted(self.values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.labelnames, labels)} {_number(value)}"


class Gauge(_Metric):
    """A gauge read from a function when the metrics are rendered."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.read = read

    def samples(self) -> Iterator[str]:
        yield f"{self.name} {_number(float(self.read()))}"


class _Series:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size  # cumulative counts, one per upper bound
        self.count = 0
        self.sum = 0.0


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.bounds = tuple(sorted(buckets))
        self.series: dict[Labels, _Series] = {}

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self.series.get(labels)
            if series is None:
                series = self.series[labels] = _Series(len(self.bounds))
            for index, bound in enumerate(self.bounds):
                if value <= bound:
                    series.buckets[index] += 1
            series.count += 1
            series.sum += value

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = [
                (labels, list(s.buckets), s.count, s.sum)
                for labels, s in sorted(self.series.items())
            ]
        for labels, buckets, count, total in items:
            for bound, cumulative in zip(self.bounds, buckets, strict=True):
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {cumulative}"
            inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.labelnames, labels, inf)} {count}"
            yield f"{self.name}_sum{_labels(self.labelnames, labels)} {_number(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, labels)} {count}"


class ServiceMetrics:
    """The service's metrics, with one method per thing that happens."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], float] = lambda: 0,
        queued: Callable[[], float] = lambda: 0,
        ready: Callable[[], float] = lambda: 0,
    ) -> None:
        p = "policy_engine_"
        self.requests = Counter(
            p + "http_requests_total",
            "HTTP requests answered, by method, route and status.",
            ("method", "route", "status"),
        )
        self.latency = Histogram(
            p + "http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route.",
            ("route",),
        )
        self.assess_latency = Histogram(
            p + "assessment_duration_seconds",
            "Time spent judging the images of one request (after admission), by policy and mode.",
            ("policy", "mode"),
        )
        self.verdicts = Counter(
            p + "verdicts_total",
            "Verdicts, by policy, rating (Safe, Unsafe or error) and category id.",
            ("policy", "rating", "category"),
        )
        self.actions = Counter(
            p + "actions_total", "Actions decided by post-processors.", ("policy", "action")
        )
        self.errors = Counter(
            p + "assessment_errors_total",
            "Images that could not be judged, by policy and error kind (image, backend, "
            "output, config).",
            ("policy", "kind"),
        )
        self.rejected = Counter(
            p + "requests_rejected_total",
            "Requests refused by the service's guards, by reason (unauthorized, too_large, "
            "saturated, timeout, not_ready).",
            ("reason",),
        )
        self.gauges = [
            Gauge(p + "requests_in_flight", "Requests being assessed.", in_flight),
            Gauge(p + "requests_queued", "Admitted requests waiting for a slot.", queued),
            Gauge(p + "backend_ready", "1 once the backend is loaded.", ready),
        ]

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.inc(method, route, str(status))
        self.latency.observe(seconds, route)

    def reject(self, reason: str) -> None:
        self.rejected.inc(reason)

    def decisions(
        self, policy: str, mode: str, decisions: Sequence[Decision], seconds: float
    ) -> None:
        self.assess_latency.observe(seconds, policy, mode)
        for decision in decisions:
            verdict = decision.verdict
            if verdict.error is not None:
                self.verdicts.inc(policy, "error", "none")
                self.errors.inc(policy, verdict.error.kind)
            else:
                self.verdicts.inc(policy, verdict.rating or "none", verdict.category_id or "none")
            for action in decision.actions:
                self.actions.inc(policy, action.name)

    def render(self) -> str:
        lines: list[str] = []
        metrics: list[_Metric] = [
            self.requests,
            self.latency,
            self.assess_latency,
            self.verdicts,
            self.actions,
            self.errors,
            self.rejected,
            *self.gauges,
        ]
        for metric in metrics:
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"
