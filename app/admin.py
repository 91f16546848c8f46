"""Operator actions and the admin-only diagnostics API under ``/api/v1/diagnostics``.

The actions (restart an actor, reset a breaker, maintenance on or off) live here once; the
API and the dashboard both call them, and each is logged as an admin action.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from actors.events import ResetBreaker
from app import keys
from app.analytics import WINDOWS
from app.api import json_object, require_admin
from app.diagnostics import take_snapshot
from app.errors import AppError, Conflict, NotFound, ValidationError
from app.log import get_logger, trace_id_var
from app.maintenance import MaintenanceState

log = get_logger("admin")

routes = web.RouteTableDef()

#: Operations ``POST /api/v1/diagnostics/test`` runs.
PROBE_OPERATIONS = ("read", "write", "transaction")
#: The longest an operator waits for a breaker reset to be taken.
ACTION_TIMEOUT = 2.0


# -- the actions -------------------------------------------------------------------------------


def restart_actor(app: web.Application, name: str, *, by: str) -> None:
    """Restart actor *name* now; NotFound for an actor this instance does not run."""
    supervisor = app[keys.SUPERVISOR]
    try:
        restarted = supervisor.restart(name)
    except KeyError:
        raise NotFound(f"no actor {name!r}", text="no such actor") from None
    if not restarted:
        raise Conflict(f"actor {name} cannot restart now", text="actor cannot restart now")
    _audit("restart_actor", by, target=name)


async def reset_breaker(app: web.Application, source: str, *, by: str) -> None:
    """Close status feed *source*'s breaker; NotFound for an unknown feed or one without
    a breaker."""
    events = app[keys.SUPERVISOR].find("events")
    if events is None:
        raise NotFound("no event subscriber", text="no such breaker")
    if not await events.call(ResetBreaker(source), timeout=ACTION_TIMEOUT):
        raise NotFound(f"feed {source!r} has no breaker", text="no such breaker")
    _audit("reset_breaker", by, target=source)


async def set_maintenance(
    app: web.Application, on: bool, *, by: str, reason: str = ""
) -> MaintenanceState | None:
    """Turn maintenance on (with *reason*) or off; returns the state now."""
    maintenance = app[keys.MAINTENANCE]
    # An fsync'd file write: off the event loop.
    if on:
        return await asyncio.to_thread(maintenance.turn_on, by=by, reason=reason)
    await asyncio.to_thread(maintenance.turn_off, by=by)
    return None


def _audit(action: str, by: str, **fields: Any) -> None:
    log.bind(admin_action=action, by=by, **fields).warning(f"admin action: {action}")


# -- the API ---------------------------------------------------------------------------------


@routes.get("/api/v1/diagnostics")
async def diagnostics(request: web.Request) -> web.Response:
    """The whole diagnostics snapshot (see app/diagnostics.py)."""
    await require_admin(request)
    return web.json_response(take_snapshot(request.app).as_dict())


@routes.get("/api/v1/diagnostics/actors")
async def actors(request: web.Request) -> web.Response:
    """``{actors: [...]}``: state, restarts, mailbox and last error of each actor."""
    await require_admin(request)
    snapshot = take_snapshot(request.app).as_dict()
    return web.json_response({"actors": snapshot["actors"]})


@routes.post("/api/v1/diagnostics/actors/{name}/restart")
async def restart(request: web.Request) -> web.Response:
    """Restart one actor now: 202, the restart follows at once."""
    user = await require_admin(request)
    restart_actor(request.app, request.match_info["name"], by=user.username)
    return web.json_response({"restarting": request.match_info["name"]}, status=202)


@routes.post("/api/v1/diagnostics/breakers/{source}/reset")
async def reset(request: web.Request) -> web.Response:
    """Close a status feed's breaker; a poll follows at once."""
    user = await require_admin(request)
    await reset_breaker(request.app, request.match_info["source"], by=user.username)
    return web.json_response({"reset": request.match_info["source"]})


@routes.post("/api/v1/diagnostics/maintenance")
async def maintenance(request: web.Request) -> web.Response:
    """``{on: bool, reason?: str}`` → ``{maintenance: state or null}``."""
    user = await require_admin(request)
    body = await json_object(request)
    on, reason = body.get("on"), body.get("reason", "")
    if not isinstance(on, bool):
        raise ValidationError("on not a boolean", fields={"on": "must be true or false"})
    if not isinstance(reason, str):
        raise ValidationError("reason not a string", fields={"reason": "must be a string"})
    state = await set_maintenance(request.app, on, by=user.username, reason=reason)
    return web.json_response({"maintenance": None if state is None else state.as_dict()})


@routes.get("/api/v1/diagnostics/errors")
async def errors(request: web.Request) -> web.Response:
    """ErrorStatistics over ``timeRange`` 1h (default), 24h or 7d."""
    await require_admin(request)
    time_range = request.query.get("timeRange", "1h")
    if time_range not in WINDOWS:
        raise ValidationError(
            f"timeRange {time_range!r}", fields={"timeRange": "must be 1h, 24h or 7d"}
        )
    statistics = request.app[keys.ERRORS].statistics(WINDOWS[time_range])
    return web.json_response(statistics.as_dict())


@routes.get("/api/v1/diagnostics/database")
async def database(request: web.Request) -> web.Response:
    """The connection as the DbMonitor sees it, each table from the catalogue, and recent
    database errors. The catalogue needs PostgreSQL: while it is away, ``tables`` is null
    and ``tablesError`` says why, and the rest still answers."""
    await require_admin(request)
    app = request.app
    snapshot = take_snapshot(app).as_dict()
    body: dict[str, Any] = {
        "connection": snapshot["database"],
        "tables": None,
        "tablesError": None,
        "recentErrors": [
            record
            for record in snapshot["errors"]["recent"]
            if record["code"].startswith("DATABASE")
        ],
    }
    try:
        body.update(await app[keys.STORE].describe_tables())
    except AppError as exc:
        body["tablesError"] = exc.code
    return web.json_response(body)


@routes.post("/api/v1/diagnostics/test")
async def probe(request: web.Request) -> web.Response:
    """``{operation: read|write|transaction}`` → ``{success, durationMs, error}``: one
    real operation against PostgreSQL, within the store's deadline."""
    user = await require_admin(request)
    body = await json_object(request)
    operation = body.get("operation")
    if operation not in PROBE_OPERATIONS:
        raise ValidationError(
            "bad operation", fields={"operation": "must be read, write or transaction"}
        )
    started = time.perf_counter()
    error = None
    try:
        await request.app[keys.STORE].probe(operation, trace_id=trace_id_var.get())
    except AppError as exc:
        error = exc.code
    duration = round((time.perf_counter() - started) * 1000, 2)
    _audit("database_test", user.username, operation=operation, success=error is None)
    return web.json_response({"success": error is None, "durationMs": duration, "error": error})
