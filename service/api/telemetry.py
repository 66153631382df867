"""Prometheus metrics of the API process: requests by route and status, their latency, and
gauges read from the database at scrape time (versions by status, jobs by status, pending
deletion requests)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.models import DeletionRequest, Job, ModelVersion
from service.core.statuses import RequestStatus


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("unlearnd_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("unlearnd_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry)
        self.versions = Gauge("unlearnd_model_versions", "Model versions by status", ["status"],
                              registry=self.registry)
        self.jobs = Gauge("unlearnd_jobs", "Unlearning jobs by status", ["status"], registry=self.registry)
        self.pending = Gauge("unlearnd_deletion_requests_pending", "Deletion requests not yet completed",
                             registry=self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def _send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status[0])).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


def refresh_gauges(ctx) -> CollectorRegistry:
    m: Metrics = ctx.metrics
    with ctx.db.session() as session:
        for gauge, column in ((m.versions, ModelVersion.status), (m.jobs, Job.status)):
            gauge.clear()
            for status, n in session.execute(select(column, func.count()).group_by(column)):
                gauge.labels(status).set(n)
        m.pending.set(session.scalar(select(func.count()).select_from(DeletionRequest)
                                     .where(DeletionRequest.status.in_(RequestStatus.ACTIVE))))
    return m.registry
