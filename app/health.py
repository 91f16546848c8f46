"""Health probes for the load balancer: liveness and readiness."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from app import keys

routes = web.RouteTableDef()

#: Event-loop lag past which the process counts as not alive: it no longer serves in time.
MAX_LOOP_LAG = 2.0
#: A ping waiting this long means a hung database, long before the ping's own deadline.
HUNG_PING = 1.0
#: Readiness asks for a fresh ping when the last good one is older than this.
PING_FRESHNESS = 1.0


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    """200 while the event loop keeps up and the supervisor runs; no auth, no I/O."""
    supervisor = request.app.get(keys.SUPERVISOR)
    reasons = []
    if supervisor is None or not supervisor.supervising:
        reasons.append("supervisor")
    lag = request.app[keys.LOOP_LAG].recent
    if lag is not None and lag > MAX_LOOP_LAG:
        reasons.append("event_loop_lag")
    body = {
        "status": "not_alive" if reasons else "alive",
        "reasons": reasons,
        "loop_lag_ms": None if lag is None else round(lag * 1000, 2),
    }
    return web.json_response(body, status=503 if reasons else 200)


def _checks(supervisor) -> dict[str, Any]:
    # Degraded dependencies are reported but keep the instance ready: it still serves,
    # spooling publishes while PostgreSQL is away and delivering locally without Redis.
    if supervisor is None:
        return {}
    checks: dict[str, Any] = {}
    monitor = supervisor.find("db_monitor")
    if monitor is not None:
        # Read, never queried: a hung database cannot hang this probe. A stale answer
        # asks the monitor for a ping, so a hang shows as "unresponsive" within ~2 s.
        age = monitor.last_ok_age()
        if age is None or age > PING_FRESHNESS:
            monitor.check_soon()
        hung = monitor.ping_waiting() > HUNG_PING
        checks["database"] = "unresponsive" if hung else monitor.status()["db_state"]
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
