"""Health probes for the load balancer: liveness and readiness."""

from __future__ import annotations

import time

from aiohttp import web

from app import keys

routes = web.RouteTableDef()


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    """200 while the process serves HTTP at all."""
    return web.json_response({"status": "alive"})


def _checks(supervisor) -> dict[str, str]:
    # Degraded dependencies are reported but keep the instance ready: it still serves,
    # spooling publishes while PostgreSQL is away.
    if supervisor is None:
        return {}
    try:
        return {"database": supervisor.get("db_monitor").status()["db_state"]}
    except KeyError:
        return {}


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
    body = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "checks": _checks(supervisor),
        "uptime_seconds": round(time.monotonic() - app[keys.STARTED_AT], 3),
    }
    return web.json_response(body, status=503 if reasons else 200)
