"""Liveness and readiness, for load balancers and orchestrators (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from audit_platform.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(svc: ServicesDep) -> JSONResponse:
    """Elasticsearch and the platform database answer; 503 names the one that does not."""
    checks: dict[str, str] = {}
    try:
        health = svc.es.options(request_timeout=2).cluster.health()
        checks["elasticsearch"] = str(health["status"])
    except Exception as exc:  # any failure means "not ready", and says which server
        checks["elasticsearch"] = f"unavailable: {type(exc).__name__}"
    try:
        with svc.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
        checks["platform_database"] = "ok"
    except Exception as exc:
        checks["platform_database"] = f"unavailable: {type(exc).__name__}"
    ready = checks["elasticsearch"] in {"green", "yellow"} and checks["platform_database"] == "ok"
    return JSONResponse(
        status_code=200 if ready else 503, content={"ready": ready, "checks": checks}
    )
