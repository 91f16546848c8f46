"""Typed keys for everything stored on the aiohttp application."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from weakref import WeakSet

    import redis.asyncio as aioredis

    from actors.hub import Registry
    from actors.room_writer import Outlet
    from actors.supervisor import Supervisor
    from app.analytics import ErrorRecorder
    from app.auth import Authenticator
    from app.config import Settings
    from app.directory import RoomDirectory
    from app.looplag import LoopLag
    from app.maintenance import Maintenance
    from app.ratelimit import KeyedBuckets, SharedLimiter
    from app.spool import Spool
    from app.store import Store
    from app.vitals import Vitals

#: The settings the app was built with.
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
#: The PostgreSQL store with its spool; the DbMonitor owns its pool.
STORE: web.AppKey[Store] = web.AppKey("store")
#: The supervisor running every actor.
SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")
#: Set once shutdown begins; readiness turns 503 at once.
DRAINING: web.AppKey[dict[str, bool]] = web.AppKey("draining")
#: Open WebSockets, closed with GOING_AWAY on shutdown.
WEBSOCKETS: web.AppKey[WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")
#: Open event streams (``GET /sse``), counted with the WebSockets against
#: HEARTH_MAX_CONNECTIONS.
EVENT_STREAMS: web.AppKey[WeakSet[web.StreamResponse]] = web.AppKey("event_streams")
#: Connections and subscriptions; outlives Hub restarts.
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
#: Per-user publish token buckets, shared by all of a user's connections.
USER_PUBLISH_BUCKETS: web.AppKey[KeyedBuckets] = web.AppKey("user_publish_buckets")
#: Monotonic time the app started, for uptime.
STARTED_AT: web.AppKey[float] = web.AppKey("started_at")
#: Logs users in and guards rooms; see app/auth.py.
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
#: Every room's privacy and members, kept fresh by the DbMonitor; access never queries.
DIRECTORY: web.AppKey[RoomDirectory] = web.AppKey("directory")
#: Where stored messages leave the room writers for the hub (and the Redis bridge).
OUTLET: web.AppKey[Outlet] = web.AppKey("outlet")
#: The durable spool of publishes waiting for PostgreSQL.
SPOOL: web.AppKey[Spool] = web.AppKey("spool")
#: Names of the status feeds this instance serves (``status:<name>``).
STATUS_TOPICS: web.AppKey[frozenset[str]] = web.AppKey("status_topics")
#: The instance's Redis client, or None in local-only mode (no HEARTH_REDIS_URL). Commands
#: fail fast (HEARTH_REDIS_TIMEOUT); callers fall back to local behaviour on any error.
REDIS: web.AppKey[aioredis.Redis | None] = web.AppKey("redis")
#: This process's id among the instances sharing Redis (random per start).
INSTANCE_ID: web.AppKey[str] = web.AppKey("instance_id")
#: How late the event loop runs callbacks; liveness and system_status read it.
LOOP_LAG: web.AppKey[LoopLag] = web.AppKey("loop_lag")
#: Takes from the shared token buckets (per-user publishes, logins): in Redis while it
#: answers, else local; local only without Redis.
LIMITER: web.AppKey[SharedLimiter] = web.AppKey("limiter")
#: Every error answered to a client, kept in memory for statistics and written to
#: ``error_events`` while PostgreSQL is up (see app/analytics.py).
ERRORS: web.AppKey[ErrorRecorder] = web.AppKey("errors")
#: Maintenance mode: readiness answers 503 while it is on (see app/maintenance.py).
MAINTENANCE: web.AppKey[Maintenance] = web.AppKey("maintenance")
#: The last two minutes of traffic and the alerts firing, written by the diagnostics
#: sampler every second; the snapshot reads them.
VITALS: web.AppKey[Vitals] = web.AppKey("vitals")
#: The dashboard sub-app's parent: the main app, whose snapshot it shows and whose actions
#: it calls.
DASHBOARD_PARENT: web.AppKey[web.Application] = web.AppKey("dashboard_parent")
#: Random per process: the dashboard's CSRF tokens and flash notes are HMACs under it.
DASHBOARD_SECRET: web.AppKey[bytes] = web.AppKey("dashboard_secret")
