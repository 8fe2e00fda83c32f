"""The API's Prometheus metrics at ``/metrics``: requests by route, method and status, their
latency, the part of it spent in Elasticsearch, and the audit records returned.

Routes are labelled by template (``/v1/events/{event_id}``), never by the values in a path,
which may be personal data and would make the label set unbounded. Each application has its
own registry (tests build several). With ``--workers N`` each worker counts its own requests:
scrape them separately, or run one worker per pod (what the Kubernetes manifests do).

Who may scrape is AUDIT_API_METRICS: open on a developer's machine; keyed in the Helm chart (the
counts hold no audit data, but show who uses the API how much), where Prometheus sends a key of
the environment as a bearer token; or off.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from audit_platform.api.deps import scope
from audit_platform.settings import Exposure

#: Seconds: the API answers in milliseconds; exports and revert plans take seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "audit_api_requests",
            "Requests answered.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "audit_api_request_duration_seconds",
            "Time to the response, in the API process.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.elasticsearch = Histogram(
            "audit_api_elasticsearch_duration_seconds",
            "Time spent in Elasticsearch per request.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.records = Counter(
            "audit_api_records_returned",
            "Audit records returned.",
            ["route"],
            registry=self.registry,
        )
        self.failed_authentications = Counter(
            "audit_api_failed_authentications",
            "Requests refused for a missing, malformed or unknown key (api/refusals.py).",
            ["reason"],
            registry=self.registry,
        )

    def observe(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        elasticsearch_seconds: float,
        records: int,
    ) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        self.elasticsearch.labels(route).observe(elasticsearch_seconds)
        if records:
            self.records.labels(route).inc(records)


def install(app: FastAPI, exposure: Exposure) -> ApiMetrics:
    """Count every request; serve ``/metrics`` as ``exposure`` says (AUDIT_API_METRICS)."""
    metrics = ApiMetrics()
    app.state.metrics = metrics  # the key check counts failed authentications here
    if exposure == "off":
        return metrics
    keyed = [Depends(scope)] if exposure == "keyed" else []

    @app.get("/metrics", include_in_schema=False, dependencies=keyed)
    def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
