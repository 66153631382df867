"""``/healthz`` (the process answers), ``/readyz`` (database at the migrated schema, broker
reachable) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import Ctx
from service.api.schemas import HealthOut, ReadyOut
from service.core.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut, "description": "not ready"}},
            summary="Readiness: database migrated and reachable, broker reachable")
def readyz(ctx: Ctx):
    checks: dict[str, str] = {}
    try:
        ctx.db.ping()
        rev, head = current_revision(ctx.db.engine), head_revision(ctx.db.url)
        checks["database"] = "ok" if rev == head else f"schema at {rev}, expected {head}: run 'unlearnd migrate'"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        ctx.dispatcher.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}})
def metrics(ctx: Ctx):
    from service.api.telemetry import refresh_gauges

    registry = refresh_gauges(ctx)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
