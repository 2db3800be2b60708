"""``GET /metrics`` in the Prometheus text format.

Job gauges are read from the store at scrape time (so every API server behind a load balancer
reports the same, whole picture); request counters and latencies are this process's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from posttrain.domain.jobs import JobStatus
from posttrain.services.jobs import JobService

router = APIRouter(tags=["Operations"])


class _JobCollector:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.jobs.operational_snapshot()
        by_status = GaugeMetricFamily("posttrain_jobs", "Jobs in the store by status.", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], snapshot["by_status"].get(status.value, 0))
        yield by_status
        yield GaugeMetricFamily("posttrain_queue_depth", "Jobs waiting for a worker.",
                                value=snapshot["by_status"].get(JobStatus.SCHEDULED.value, 0))
        # Per method, not per job: /metrics is open to scrapers and must not list tenants' jobs.
        tokens = GaugeMetricFamily("posttrain_running_tokens_per_second",
                                   "Real (non-padding) tokens/s of the running jobs' latest steps, summed.", labels=["kind"])
        step = GaugeMetricFamily("posttrain_running_step_seconds",
                                 "Mean duration of the running jobs' latest optimizer steps.", labels=["kind"])
        running = GaugeMetricFamily("posttrain_running_jobs", "Jobs training now.", labels=["kind"])
        write = GaugeMetricFamily("posttrain_checkpoint_write_seconds",
                                  "Longest latest checkpoint write among the running jobs.", labels=["kind"])
        for kind in sorted({job["kind"] for job in snapshot["running"]}):
            jobs = [j for j in snapshot["running"] if j["kind"] == kind]
            running.add_metric([kind], len(jobs))
            rates = [j["metric"]["tokens_per_s"] for j in jobs if j["metric"].get("tokens_per_s") is not None]
            if rates:
                tokens.add_metric([kind], sum(rates))
            steps = [j["metric"]["step_seconds"] for j in jobs if j["metric"].get("step_seconds") is not None]
            if steps:
                step.add_metric([kind], sum(steps) / len(steps))
            writes = [j["checkpoint"]["write_seconds"] for j in jobs if j["checkpoint"].get("write_seconds") is not None]
            if writes:
                write.add_metric([kind], max(writes))
        yield from (running, tokens, step, write)


def install_metrics(app: FastAPI, jobs: JobService) -> Callable[[str, str, int, float], None]:
    """Register the collectors on ``app``; return the function the gate calls after each request."""
    registry = CollectorRegistry()
    registry.register(_JobCollector(jobs))
    requests = Counter("posttrain_http_requests", "HTTP requests answered.", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("posttrain_http_request_seconds", "HTTP request latency.", ["method", "route"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    app.state.metrics_registry = registry

    def observe(method: str, route: str, status: int, seconds: float) -> None:
        requests.labels(method, route, str(status)).inc()
        latency.labels(method, route).observe(seconds)

    return observe


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
