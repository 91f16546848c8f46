"""Health probes for the load balancer: liveness and readiness."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from app import keys

routes = web.RouteTableDef()


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    """200 while the process serves HTTP at all."""
    return web.json_response({"status": "alive"})


def _checks(supervisor) -> dict[str, Any]:
    # Degraded dependencies are reported but keep the instance ready: it still serves,
    # spooling publishes while PostgreSQL is away and delivering locally without Redis.
    if supervisor is None:
        return {}
    checks: dict[str, Any] = {}
    monitor = supervisor.find("db_monitor")
    if monitor is not None:
        checks["database"] = monitor.status()["db_state"]
    bridge = supervisor.find("redis_bridge")
    if bridge is None:
        checks["redis"] = "disabled"
    else:
        status = bridge.status()
        checks["redis"] = status["bridge_state"]
        checks["redis_canary"] = {
            "age_seconds": status["canary_age_seconds"],
            "rtt_ms": status["canary_rtt_ms"],
        }
    return checks


def _redis_not_ready(supervisor, settings) -> bool:
    """Whether local-only mode has lasted past HEARTH_REDIS_DEGRADED_READY_AFTER (if set)."""
    limit = settings.redis_degraded_ready_after
    bridge = supervisor.find("redis_bridge")
    return bool(limit) and bridge is not None and bridge.degraded_for() > limit


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    """200 when every actor runs and we are not draining, else 503 with the reasons."""
    app = request.app
    reasons = []
    if app[keys.DRAINING]["draining"]:
        reasons.append("draining")
    supervisor = app.get(keys.SUPERVISOR)
    if supervisor is None:
        reasons.append("starting")
    else:
        if not supervisor.ready:
            reasons.append("actors")
        reasons += [
            f"{status['name']}:{status['state']}"
            for status in supervisor.statuses()
            if status["state"] in ("failed", "restarting", "starting")
        ]
        if _redis_not_ready(supervisor, app[keys.SETTINGS]):
            reasons.append("redis:degraded")
    body = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "checks": _checks(supervisor),
        "uptime_seconds": round(time.monotonic() - app[keys.STARTED_AT], 3),
    }
    return web.json_response(body, status=503 if reasons else 200)
