"""Health: liveness and readiness for the load balancer, the database probe, and the
detailed view for admins. None of them queries anything: they read the state the actors
keep, so they answer at once even while a dependency hangs."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from app import __version__, keys
from app.api import require_admin
from app.log import iso_utc

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


#: Free disk below this share of the spool's file system counts as low (seed 000 §6).
LOW_DISK_SHARE = 0.10


def _database(supervisor) -> dict[str, Any] | None:
    """The DbMonitor's view: state (``unresponsive`` while a ping hangs), latency, pool."""
    monitor = supervisor.find("db_monitor") if supervisor is not None else None
    if monitor is None:
        return None
    status = monitor.status()
    hung = monitor.ping_waiting() > HUNG_PING
    return {
        "state": "unresponsive" if hung else status["db_state"],
        "latency_ms": status["latency_ms"],
        "pool": status["pool"],
    }


@routes.get("/health/db")
async def database_health(request: web.Request) -> web.Response:
    """The database as the DbMonitor last saw it (seed 002's shape); 503 when unhealthy."""
    database = _database(request.app.get(keys.SUPERVISOR))
    connected = database is not None and database["state"] == "connected"
    pool = database["pool"] if database is not None else {}
    body = {
        "healthy": connected,
        "database": {
            "connected": connected,
            "latencyMs": database["latency_ms"] if database is not None else None,
            "poolSize": pool.get("size", 0),
            "availableConnections": pool.get("free", 0),
        },
        "timestamp": iso_utc(datetime.now(UTC)),
    }
    return web.json_response(body, status=200 if connected else 503)


@routes.get("/health")
async def detailed_health(request: web.Request) -> web.Response:
    """Admin only: every dependency with its latency, the actors, uptime, version and
    connections (seed 000 §5.3). ``status`` is ``healthy``, ``degraded`` (serving, with a
    dependency down) or ``unhealthy`` (not ready)."""
    await require_admin(request)
    app = request.app
    supervisor = app.get(keys.SUPERVISOR)
    checks: dict[str, Any] = {}
    database = _database(supervisor)
    if database is not None:
        checks["database"] = {
            "status": "up" if database["state"] == "connected" else database["state"],
            "latency_ms": database["latency_ms"],
            "pool": database["pool"],
        }
    ready_checks = _checks(supervisor)
    canary = ready_checks.get("redis_canary") or {}
    redis_state = ready_checks.get("redis", "disabled")
    checks["redis"] = {
        "status": "up" if redis_state == "connected" else redis_state,
        "latency_ms": canary.get("rtt_ms"),
        "canary_age_seconds": canary.get("age_seconds"),
    }
    checks["disk"] = _disk(app[keys.SETTINGS].spool_dir)
    events = supervisor.find("events") if supervisor is not None else None
    for name, feed in (events.status()["feeds"] if events is not None else {}).items():
        breaker = feed["breaker"] or {}
        checks[f"upstream:{name}"] = {
            "status": "down" if feed["is_stale"] else "up",
            "breaker": breaker.get("state"),
            "cache_age_seconds": feed["cache_age_seconds"],
        }
    ready = supervisor is not None and supervisor.ready and not app[keys.DRAINING]["draining"]
    degraded = any(
        check["status"] not in ("up", "disabled") for check in checks.values()
    )  # fmt: skip
    body = {
        "status": "unhealthy" if not ready else "degraded" if degraded else "healthy",
        "checks": checks,
        "uptime_seconds": round(time.monotonic() - app[keys.STARTED_AT], 3),
        "version": __version__,
        "connections": len(app[keys.REGISTRY].connections),
        "actors": [
            _actor_summary(status)
            for status in (supervisor.statuses() if supervisor is not None else [])
        ],
    }  # fmt: skip
    return web.json_response(body)


def _actor_summary(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": status["name"], "state": status["state"], "restarts": status["restarts"],
        "mailbox": status["mailbox"]["depth"], "last_error": status["last_error"],
    }  # fmt: skip


def _disk(folder: str) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(folder if os.path.isdir(folder) else ".")
    except OSError as exc:
        return {"status": "unknown", "error": type(exc).__name__}
    low = usage.free < usage.total * LOW_DISK_SHARE
    return {
        "status": "low" if low else "up",
        "free_gb": round(usage.free / 1024**3, 2),
        "free_share": round(usage.free / usage.total, 3) if usage.total else None,
    }
