"""Settings: one frozen object read from ``HEARTH_*`` environment variables."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigError
from app.log import redact_dsn
from app.sources import Source, parse_sources, system_source

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The event loops HEARTH_EVENT_LOOP may name.
EVENT_LOOPS = ("asyncio", "uvloop")
#: Prefix of every variable hearth reads; others with it are typos worth a warning.
ENV_PREFIX = "HEARTH_"
#: A network ``HEARTH_TRUSTED_PROXIES`` may name.
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Endings of variable names whose whole value is a secret, shown as ``***``.
_SECRET_SUFFIXES = ("_KEY", "_PASSWORD", "_SECRET", "_TOKEN")


def setting(env: str, default: Any, doc: str, *, minimum: float | None = None) -> Any:
    """Declare one setting read from the environment variable *env*.

    *default* is used when the variable is unset or empty, *doc* goes into the README table,
    and numbers below *minimum* are refused.
    """
    return field(default=default, metadata={"env": env, "doc": doc, "minimum": minimum})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of a hearth instance; see README.rst for the table."""

    host: str = setting("HEARTH_HOST", "127.0.0.1", "Interface to listen on.")
    port: int = setting("HEARTH_PORT", 8080, "TCP port to listen on.", minimum=0)
    database_url: str = setting(
        "HEARTH_DATABASE_URL",
        "postgresql://hearth@127.0.0.1:55432/hearth",
        "PostgreSQL DSN: a libpq key=value string or a postgresql:// URL.",
    )
    redis_url: str = setting(
        "HEARTH_REDIS_URL", "", "redis:// URL. Empty means local-only mode, no Redis."
    )
    redis_timeout: float = setting(
        "HEARTH_REDIS_TIMEOUT",
        1.0,
        "Deadline of one Redis command or connect (s); past it, the instance works locally.",
        minimum=0.05,
    )
    redis_canary_interval: float = setting(
        "HEARTH_REDIS_CANARY_INTERVAL",
        1.0,
        "Seconds between canary round trips through Redis; two missed ones mean local-only.",
        minimum=0.05,
    )
    redis_degraded_ready_after: float = setting(
        "HEARTH_REDIS_DEGRADED_READY_AFTER",
        0.0,
        "Seconds in local-only mode after which /health/ready answers 503, so the load "
        "balancer moves clients to instances that still reach Redis (0: never).",
        minimum=0.0,
    )
    presence_refresh: float = setting(
        "HEARTH_PRESENCE_REFRESH",
        5.0,
        "Seconds between rewrites of this instance's presence in Redis; a crashed "
        "instance's users expire after two.",
        minimum=0.1,
    )
    log_level: str = setting("HEARTH_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_dir: str = setting(
        "HEARTH_LOG_DIR", "var/log", "Folder for hearth.log and errors.log. Empty: stdout only."
    )
    log_rotation_mb: float = setting(
        "HEARTH_LOG_ROTATION_MB", 10.0, "Size at which a log file rotates.", minimum=0.01
    )
    log_retention: int = setting(
        "HEARTH_LOG_RETENTION", 5, "How many rotated log files to keep.", minimum=1
    )
    mailbox_size: int = setting(
        "HEARTH_MAILBOX_SIZE", 1000, "Capacity of each actor's mailbox.", minimum=1
    )
    stall_timeout: float = setting(
        "HEARTH_STALL_TIMEOUT",
        30.0,
        "Seconds an actor may hold queued mail without progress before the watchdog restarts it.",
        minimum=0.1,
    )
    restart_initial: float = setting(
        "HEARTH_RESTART_INITIAL", 1.0, "First restart delay of a crashed actor (s).", minimum=0
    )
    restart_max: float = setting(
        "HEARTH_RESTART_MAX", 30.0, "Cap on the restart delay (s).", minimum=0
    )
    restart_intensity: int = setting(
        "HEARTH_RESTART_INTENSITY",
        5,
        "Restarts allowed within HEARTH_RESTART_PERIOD before an actor is marked failed.",
        minimum=1,
    )
    restart_period: float = setting(
        "HEARTH_RESTART_PERIOD", 60.0, "Window for the restart intensity (s).", minimum=1
    )
    restart_stable_after: float = setting(
        "HEARTH_RESTART_STABLE_AFTER",
        60.0,
        "Seconds of uptime after which an actor's backoff resets.",
        minimum=0,
    )
    db_timeout: float = setting(
        "HEARTH_DB_TIMEOUT",
        5.0,
        "Deadline of every pool acquire and SQL statement (s); a hung server turns into "
        "a timeout, never a hang.",
        minimum=0.1,
    )
    db_pool_size: int = setting(
        "HEARTH_DB_POOL_SIZE", 10, "Most PostgreSQL connections in the pool.", minimum=1
    )
    room_writers: int = setting(
        "HEARTH_ROOM_WRITERS",
        4,
        "Room-writer actors; each stores the publishes of its share of the rooms, in order.",
        minimum=1,
    )
    db_ping_interval: float = setting(
        "HEARTH_DB_PING_INTERVAL", 5.0, "Seconds between DbMonitor pings.", minimum=0.05
    )
    slow_query_ms: float = setting(
        "HEARTH_SLOW_QUERY_MS", 1000.0, "Queries slower than this are logged at WARN.", minimum=0
    )
    spool_dir: str = setting(
        "HEARTH_SPOOL_DIR", "var/spool", "Folder of the durable publish spool."
    )
    spool_max_mb: float = setting(
        "HEARTH_SPOOL_MAX_MB",
        64.0,
        "Spool size bound; past it a publish gets 503 with retry_after.",
        minimum=0.001,
    )
    message_key: str = setting(
        "HEARTH_MESSAGE_KEY",
        "",
        "Encryption at rest: comma-separated key_id:base64 AES keys, current first. Empty: off.",
    )
    max_content_length: int = setting(
        "HEARTH_MAX_CONTENT_LENGTH", 4096, "Longest message content, in characters.", minimum=1
    )
    token_ttl_hours: float = setting(
        "HEARTH_TOKEN_TTL_HOURS", 24.0, "Lifetime of a login token.", minimum=0.001
    )
    token_recheck: float = setting(
        "HEARTH_TOKEN_RECHECK",
        10.0,
        "Seconds a token PostgreSQL confirmed is accepted again without a query; a logout on "
        "another instance takes effect within it (0: query on every auth).",
        minimum=0.0,
    )
    login_rate_per_min: float = setting(
        "HEARTH_LOGIN_RATE_PER_MIN",
        10.0,
        "Login attempts allowed per client IP per minute.",
        minimum=0.01,
    )
    login_user_rate_per_min: float = setting(
        "HEARTH_LOGIN_USER_RATE_PER_MIN",
        5.0,
        "Login attempts allowed per username per minute.",
        minimum=0.01,
    )
    auth_timeout: float = setting(
        "HEARTH_AUTH_TIMEOUT", 10.0, "Seconds a WebSocket may stay unauthenticated.", minimum=0.1
    )
    allowed_origins: str = setting(
        "HEARTH_ALLOWED_ORIGINS",
        "",
        "Comma-separated Origins allowed to open a WebSocket; empty means same-origin only, "
        "``*`` any.",
    )
    trusted_proxies: str = setting(
        "HEARTH_TRUSTED_PROXIES",
        "",
        "Comma-separated IPs or CIDRs of the proxies whose X-Forwarded-For gives the client "
        "address (login throttle, logs); empty: never trust the header.",
    )
    ws_compress: bool = setting(
        "HEARTH_WS_COMPRESS", False, "permessage-deflate on hub WebSockets (CPU and BREACH cost)."
    )
    ws_max_msg_size: int = setting(
        "HEARTH_WS_MAX_MSG_SIZE",
        65536,
        "Largest inbound frame in bytes; larger closes 1009.",
        minimum=1024,
    )
    ws_ping_interval: float = setting(
        "HEARTH_WS_PING_INTERVAL",
        30.0,
        "WebSocket protocol ping interval; a dead peer is closed.",
        minimum=0.1,
    )
    heartbeat_interval: float = setting(
        "HEARTH_HEARTBEAT_INTERVAL", 10.0, "Seconds between heartbeat events.", minimum=0.05
    )
    client_queue_messages: int = setting(
        "HEARTH_CLIENT_QUEUE_MESSAGES",
        1000,
        "Room frames a client may have unsent before it is dropped with SLOW_CLIENT.",
        minimum=1,
    )
    client_queue_bytes: int = setting(
        "HEARTH_CLIENT_QUEUE_BYTES",
        4 * 1024 * 1024,
        "Unsent bytes a client may have before it is dropped with SLOW_CLIENT.",
        minimum=1024,
    )
    client_queue_warn_ratio: float = setting(
        "HEARTH_CLIENT_QUEUE_WARN_RATIO",
        0.5,
        "Fraction of those limits at which a client gets a SLOW_CLIENT warning event.",
        minimum=0.01,
    )
    ws_send_buffer: int = setting(
        "HEARTH_WS_SEND_BUFFER",
        0,
        "Kernel send buffer per client socket in bytes (0: the kernel's autotuning). A small "
        "one bounds memory per stalled client and finds slow clients sooner.",
        minimum=0,
    )
    send_timeout: float = setting(
        "HEARTH_SEND_TIMEOUT", 5.0, "Deadline of each send to a client.", minimum=0.01
    )
    sse_resume: float = setting(
        "HEARTH_SSE_RESUME",
        60.0,
        "Seconds after an event stream (GET /sse) dropped during which its ticket may resume "
        "it with Last-Event-ID.",
        minimum=0,
    )
    sse_keepalive: float = setting(
        "HEARTH_SSE_KEEPALIVE",
        15.0,
        "Seconds between keep-alive comments on an event stream, so proxies keep it open.",
        minimum=0.05,
    )
    pub_rate: float = setting(
        "HEARTH_PUB_RATE", 10.0, "Publishes per second allowed per connection.", minimum=0.01
    )
    pub_burst: float = setting(
        "HEARTH_PUB_BURST", 20.0, "Publish burst allowed per connection.", minimum=1
    )
    user_pub_rate: float = setting(
        "HEARTH_USER_PUB_RATE", 20.0, "Publishes per second allowed per user.", minimum=0.01
    )
    user_pub_burst: float = setting(
        "HEARTH_USER_PUB_BURST", 40.0, "Publish burst allowed per user.", minimum=1
    )
    event_sources: str = setting(
        "HEARTH_EVENT_SOURCES",
        "",
        "Status feed upstreams: a JSON list of {name, url, kind, method, interval, timeout, "
        "params}, or @/path/to/file.json. The built-in system_status feed is always on.",
    )
    event_interval: float = setting(
        "HEARTH_EVENT_INTERVAL", 5.0, "Default seconds between status feed polls.", minimum=0.05
    )
    event_timeout: float = setting(
        "HEARTH_EVENT_TIMEOUT", 3.0, "Default deadline of each upstream call (s).", minimum=0.01
    )
    breaker_open_seconds: float = setting(
        "HEARTH_BREAKER_OPEN_SECONDS",
        30.0,
        "Seconds an upstream's circuit breaker stays open after 3 consecutive failures.",
        minimum=0.01,
    )
    breaker_probe_seconds: float = setting(
        "HEARTH_BREAKER_PROBE_SECONDS",
        10.0,
        "Seconds between health probes of an upstream whose breaker is open.",
        minimum=0.01,
    )
    drain_grace: float = setting(
        "HEARTH_DRAIN_GRACE",
        1.0,
        "Seconds between readiness turning 503 on SIGTERM and clients being told to leave, "
        "so the load balancer stops routing first.",
        minimum=0,
    )
    shutdown_timeout: float = setting(
        "HEARTH_SHUTDOWN_TIMEOUT", 10.0, "Deadline for a graceful stop (s).", minimum=0.1
    )
    max_connections: int = setting(
        "HEARTH_MAX_CONNECTIONS",
        10000,
        "WebSocket clients an instance takes; past it an upgrade gets 503 with Retry-After. "
        "The effective limit is lower when the open-file limit (``ulimit -n``) is.",
        minimum=1,
    )
    event_loop: str = setting(
        "HEARTH_EVENT_LOOP",
        "asyncio",
        "``asyncio`` or ``uvloop`` (the ``uvloop`` extra); without uvloop installed, serve "
        "warns and uses asyncio.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from *environ* (default ``os.environ``).

        Raises `ConfigError` naming the first invalid variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"], "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check cross-field rules; raises `ConfigError`."""
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(variable="HEARTH_LOG_LEVEL", reason=f"must be one of {LOG_LEVELS}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(variable="HEARTH_EVENT_LOOP", reason=f"must be one of {EVENT_LOOPS}")
        if self.port > 65535:
            raise ConfigError(variable="HEARTH_PORT", reason="must be at most 65535")
        if self.drain_grace >= self.shutdown_timeout:
            raise ConfigError(
                variable="HEARTH_DRAIN_GRACE", reason="must be below HEARTH_SHUTDOWN_TIMEOUT"
            )
        if self.restart_max < self.restart_initial:
            raise ConfigError(
                variable="HEARTH_RESTART_MAX", reason="must not be below HEARTH_RESTART_INITIAL"
            )
        _check_dsn(self.database_url)
        if self.message_key:
            from app.crypto import parse_keys

            try:
                parse_keys(self.message_key)
            except ValueError as exc:
                raise ConfigError(variable="HEARTH_MESSAGE_KEY", reason=str(exc)) from None
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(variable="HEARTH_REDIS_URL", reason="must be a redis:// URL")
        self.sources()
        self.trusted_networks()

    def sources(self) -> list[Source]:
        """The status feeds: the built-in system feed first, then ``HEARTH_EVENT_SOURCES``.

        Raises `ConfigError` naming ``HEARTH_EVENT_SOURCES`` when it is invalid.
        """
        try:
            upstreams = parse_sources(
                self.event_sources,
                default_interval=self.event_interval,
                default_timeout=self.event_timeout,
            )
        except ValueError as exc:
            raise ConfigError(variable="HEARTH_EVENT_SOURCES", reason=str(exc)) from None
        return [system_source(interval=self.event_interval, timeout=self.event_timeout), *upstreams]

    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        """The networks of ``HEARTH_TRUSTED_PROXIES``; raises `ConfigError` when invalid."""
        try:
            return _parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(variable="HEARTH_TRUSTED_PROXIES", reason=str(exc)) from None

    def effective(self) -> list[tuple[str, str]]:
        """Return ``(variable, value)`` for every setting as in effect, secrets hidden.

        Values of secret-named variables (``HEARTH_MESSAGE_KEY``) become ``***`` when set;
        passwords inside the others (a DSN, a source URL) are masked by `redact_dsn`.
        """
        rows = []
        for f in dataclasses.fields(self):
            env, value = f.metadata["env"], getattr(self, f.name)
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if text and env.endswith(_SECRET_SUFFIXES):
                text = "***"
            rows.append((env, redact_dsn(text)))
        return rows

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """Return ``(variable, default, description)`` rows for the README table."""
        return [
            (f.metadata["env"], str(f.default), f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]


def known_variables() -> frozenset[str]:
    """The name of every ``HEARTH_*`` variable hearth reads."""
    return frozenset(f.metadata["env"] for f in dataclasses.fields(Settings))


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Return ``(variable, likely intended name or None)`` for each unknown ``HEARTH_*`` one.

    *environ* defaults to ``os.environ``. Such a variable is most likely a typo that leaves
    the setting it meant at its default, so it deserves a warning, not silence.
    """
    environ = os.environ if environ is None else environ
    known = known_variables()
    # Matched without the prefix every name shares, which would make anything look close.
    stems = {name.removeprefix(ENV_PREFIX): name for name in known}
    unknown = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), stems, n=1)
            unknown.append((name, stems[close[0]] if close else None))
    return unknown


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env = f.metadata["env"]
    kind: Any = type(f.default)
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            value: Any = lowered in ("1", "true", "yes", "on")
        else:
            value = kind(raw)
    except ValueError:
        raise ConfigError(variable=env, reason=f"must be a {kind.__name__}") from None
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise ConfigError(variable=env, reason=f"must be at least {minimum}")
    return value


# Cached: the client address of every login asks for these networks.
@functools.lru_cache(maxsize=8)
def _parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(part.strip()) for part in spec.split(",") if part.strip())


def _check_dsn(dsn: str) -> None:
    if "://" in dsn:
        if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                variable="HEARTH_DATABASE_URL", reason="must be a postgresql:// URL or libpq DSN"
            )
    elif "=" not in dsn:
        raise ConfigError(
            variable="HEARTH_DATABASE_URL", reason="must be a postgresql:// URL or libpq DSN"
        )


def effective_settings(settings: Settings) -> str:
    """Render *settings* as ``VARIABLE=value`` lines quoted for a POSIX shell, secrets hidden."""
    return "\n".join(f"{env}={shlex.quote(value)}" for env, value in settings.effective())


def settings_table() -> str:
    """The README's table of every setting, as reStructuredText."""
    rows = [
        (f"``{env}``", f"``{default}``" if default else "(empty)", doc)
        for env, default, doc in Settings.documented()
    ]
    widths = [
        max(len(row[i]) for row in [*rows, ("Variable", "Default", "Meaning")]) for i in range(3)
    ]
    rule = " ".join("=" * width for width in widths)
    header = " ".join(
        h.ljust(w) for h, w in zip(("Variable", "Default", "Meaning"), widths, strict=True)
    )
    lines = [rule, header.rstrip(), rule]
    lines += [
        " ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join([*lines, rule])
