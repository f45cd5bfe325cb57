"""Health (readiness and liveness) and the version: open, never behind the API key. Prometheus
metrics: behind the key when one is set, unless METRICS_PUBLIC."""

from __future__ import annotations

import time

from litestar import MediaType, Request, Response

from app.auth import require_api_key_for_metrics
from app.routes import SECURITY_REQUIREMENT, get_or_head
from app.schemas.models import HealthResponse
from app.services import services
from app.settings import Settings
from app.version import VERSION


def _health(request: Request) -> Response[HealthResponse]:
    svc = services(request)
    scheduler = svc.scheduler
    status = scheduler.status if scheduler is not None else "loading"
    tool_format = svc.tool_format() if scheduler is not None and scheduler.chat_template is not None else None
    body = HealthResponse(
        status=status,
        model=svc.settings.model_name,
        ready=status == "ready",
        uptime_s=round(time.monotonic() - scheduler.started_at, 3) if scheduler is not None else 0.0,
        replicas=scheduler.replica_stats() if scheduler is not None else [],
        **_source(svc.settings),
        tool_call_parser=tool_format.name if tool_format is not None else None,
    )
    return Response(body, status_code=200 if status == "ready" else 503)


def _source(settings: Settings) -> dict[str, str | None]:
    if settings.redact_source:
        return {}
    return {
        "source": settings.model_path,
        "revision": settings.model_revision,
        "cache_dir": settings.cache_dir,
    }


@get_or_head(
    ["/health", "/health/ready"],
    tags=["Health"],
    summary="Readiness: 200 when every replica serves, else 503",
    cache=False,
)
async def health(request: Request) -> Response[HealthResponse]:
    return _health(request)


@get_or_head(
    "/health/live",
    tags=["Health"],
    summary="Liveness: 200 while the process answers, 503 once a replica's step loop has died",
    cache=False,
)
async def live(request: Request) -> Response[dict[str, str]]:
    # A replica that crashed after serving never comes back by itself; readiness alone would keep
    # the pod unready but running forever, so liveness fails and the kubelet restarts it. Loading,
    # a failed load and draining stay live: a restart would not help those.
    scheduler = services(request).scheduler
    if scheduler is not None and scheduler.crashed:
        # Which one, so that the kubelet's probe log (it keeps the body) says it without /health.
        crashed = ",".join(e.name for e in getattr(scheduler, "executors", ()) if e.crashed)
        body = {"status": "replica crashed"} | ({"replicas": crashed} if crashed else {})
        return Response(body, status_code=503)
    return Response({"status": "alive"}, status_code=200)


@get_or_head(
    "/metrics",
    tags=["Health"],
    summary="Prometheus metrics (behind the API key unless METRICS_PUBLIC)",
    media_type=MediaType.TEXT,
    cache=False,
    guards=[require_api_key_for_metrics],
    security=SECURITY_REQUIREMENT,
)
async def metrics(request: Request) -> Response[bytes]:
    return Response(services(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get_or_head("/version", tags=["Health"], summary="The server's version", cache=False)
async def version() -> dict[str, str]:
    return {"version": VERSION}
