"""The error model: one AppError base, its subclasses, and how they render for clients."""

from __future__ import annotations

from typing import Any

import psycopg2
import redis.exceptions

from app.log import get_logger, trace_id_var, utc_now_iso

#: The only texts a client sees for each status; they never carry internal details.
STATUS_TEXTS: dict[int, str] = {
    400: "bad request",
    401: "authentication required",
    403: "forbidden",
    404: "not found",
    409: "conflict",
    410: "gone",
    413: "message too long",
    429: "rate limit exceeded",
    500: "internal error",
    502: "service unavailable",
    503: "service unavailable",
    504: "timeout",
}

#: Every error code a client may see, in ctrl replies or in events.
ERROR_CODES: frozenset[str] = frozenset(
    {
        "ACTOR_STALLED",
        "AUTH_FAILED",
        "AUTH_REQUIRED",
        "CIRCUIT_OPEN",
        "CLIENT_DISCONNECTED",
        "CONFIG_ERROR",
        "CONFLICT",
        "DATABASE_ERROR",
        "DATABASE_TIMEOUT",
        "ENCRYPTION_ERROR",
        "FORBIDDEN",
        "GONE",
        "INTERNAL_ERROR",
        "INVALID_MESSAGE",
        "JSON_MARSHAL_ERROR",
        "MESSAGE_TOO_LONG",
        "NOT_FOUND",
        "RATE_LIMIT_EXCEEDED",
        "REQUEST_TIMEOUT",
        "ROOM_ACCESS_DENIED",
        "RPC_FAILURE",
        "RPC_RECOVERED",
        "RPC_UNAVAILABLE",
        "SERVER_SHUTDOWN",
        "SERVICE_ERROR",
        "SLOW_CLIENT",
        "SPOOL_FULL",
    }
)

#: PostgreSQL SQLSTATEs that mean "run the transaction again": serialization failure, deadlock.
RETRYABLE_PGCODES = frozenset({"40001", "40P01"})
#: Client statuses worth a warning because they may signal abuse.
_WARN_STATUSES = frozenset({401, 403, 429})


class AppError(Exception):
    """Base of every error hearth raises on purpose.

    *detail* is for logs only. Clients get :attr:`client_text`: *text* when given, else the
    class's ``text``, else the fixed text for its status. *retry_after* overrides the class
    default, and *params* are extra safe fields for the client reply.
    """

    #: String code clients switch on, e.g. ``DATABASE_ERROR``.
    code: str = "INTERNAL_ERROR"
    #: One of auth, validation, service, rate_limit, not_found, conflict, config, internal.
    category: str = "internal"
    #: HTTP-style status number.
    status: int = 500
    #: Whether retrying later may succeed.
    recoverable: bool = False
    #: Seconds a client should wait before retrying, when known.
    retry_after: float | None = None
    #: Safe client text for this condition; ``None`` means the text for :attr:`status`.
    text: str | None = None

    def __init__(
        self,
        detail: str | None = None,
        *,
        text: str | None = None,
        retry_after: float | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        args = () if detail is None else (detail,)
        super().__init__(*args)
        #: Internal description for the logs; never sent to clients.
        self.detail = detail
        #: Extra fields for the client reply; callers put only safe values here.
        self.params: dict[str, Any] = dict(params or {})
        if text is not None:
            self.text = text
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def client_text(self) -> str:
        """The text a client may see."""
        return self.text or STATUS_TEXTS.get(self.status, STATUS_TEXTS[500])


class ValidationError(AppError):
    """A frame or field was malformed or missing.

    *fields* maps each offending field to why it was refused (safe texts only: never the
    value); they reach the client as ``params.details``, a list of ``{field, reason}``.
    """

    code = "INVALID_MESSAGE"
    category = "validation"
    status = 400

    def __init__(
        self,
        detail: str | None = None,
        *,
        text: str | None = None,
        retry_after: float | None = None,
        params: dict[str, Any] | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail, text=text, retry_after=retry_after, params=params)
        #: Field name -> why it was refused, for the client's ``params.details``.
        self.fields: dict[str, str] = dict(fields or {})
        if self.fields:
            self.params["details"] = [
                {"field": name, "reason": reason} for name, reason in self.fields.items()
            ]


class MessageTooLong(ValidationError):
    """A message exceeded the size limit."""

    code = "MESSAGE_TOO_LONG"
    text = "message too long"


class AuthRequired(AppError):
    """The request needs an authenticated session."""

    code = "AUTH_REQUIRED"
    category = "auth"
    status = 401
    text = "authentication required"


class AuthFailed(AppError):
    """Credentials were wrong; deliberately silent about which part."""

    code = "AUTH_FAILED"
    category = "auth"
    status = 401
    text = "authentication failed"


class Forbidden(AppError):
    """The caller is authenticated but not permitted."""

    code = "FORBIDDEN"
    category = "auth"
    status = 403


class RoomAccessDenied(Forbidden):
    """The caller may not read or post in a room."""

    code = "ROOM_ACCESS_DENIED"


class NotFound(AppError):
    """The resource does not exist."""

    code = "NOT_FOUND"
    category = "not_found"
    status = 404


class Gone(AppError):
    """The resource existed but was deleted."""

    code = "GONE"
    category = "not_found"
    status = 410


class Conflict(AppError):
    """The resource already exists or changed underneath the caller."""

    code = "CONFLICT"
    category = "conflict"
    status = 409


class RateLimited(AppError):
    """The caller sent too much too fast."""

    code = "RATE_LIMIT_EXCEEDED"
    category = "rate_limit"
    status = 429
    recoverable = True


class ServiceUnavailable(AppError):
    """A backing service cannot serve right now; retrying later may work."""

    code = "SERVICE_ERROR"
    category = "service"
    status = 503
    recoverable = True


class DatabaseError(ServiceUnavailable):
    """PostgreSQL failed or is unreachable; the store raises it for every lost connection."""

    code = "DATABASE_ERROR"
    retry_after = 2


class DatabaseTimeout(DatabaseError, TimeoutError):
    """PostgreSQL did not finish an operation within its deadline (ours or the server's)."""

    code = "DATABASE_TIMEOUT"
    status = 504
    text = "timeout"


class DatabaseRejected(AppError):
    """PostgreSQL refused a statement for a reason that retrying will not fix.

    Integrity, data and programming errors, and parameters the driver could not adapt (a
    lone surrogate in a string, for example). *pgcode* is the SQLSTATE, None when the
    statement never reached the server.
    """

    code = "INTERNAL_ERROR"
    status = 500

    def __init__(
        self,
        detail: str | None = None,
        *,
        pgcode: str | None = None,
        text: str | None = None,
        retry_after: float | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, text=text, retry_after=retry_after, params=params)
        #: SQLSTATE of the refusal, e.g. ``23505``; None when the driver refused first.
        self.pgcode = pgcode


class AtCapacity(ServiceUnavailable):
    """The instance holds as many connections as it may (HEARTH_MAX_CONNECTIONS)."""

    text = "server at capacity"
    retry_after = 5


class SpoolFull(ServiceUnavailable):
    """The outage spool has no room for another message."""

    code = "SPOOL_FULL"
    retry_after = 5


class RpcFailure(AppError):
    """An upstream call broke on us."""

    code = "RPC_FAILURE"
    category = "service"
    status = 502
    recoverable = True


class RpcUnavailable(AppError):
    """An upstream is known to be down."""

    code = "RPC_UNAVAILABLE"
    category = "service"
    status = 503
    recoverable = True


class CircuitOpen(RpcUnavailable):
    """A circuit breaker refused the call without trying it."""

    code = "CIRCUIT_OPEN"


class UpstreamTimeout(RpcFailure, TimeoutError):
    """An upstream call did not answer in time."""

    status = 504


class SlowClient(AppError):
    """We dropped a client that could not keep up with its outbound queue."""

    code = "SLOW_CLIENT"
    category = "service"
    status = 503


class ServerShutdown(AppError):
    """We are closing connections because the server is stopping."""

    code = "SERVER_SHUTDOWN"
    category = "service"
    status = 503
    recoverable = True


class EncryptionError(AppError):
    """Encrypting or decrypting a message failed."""

    code = "ENCRYPTION_ERROR"
    status = 500


class InternalError(AppError):
    """A bug: something that should not happen did."""

    code = "INTERNAL_ERROR"
    status = 500


class ConfigError(AppError):
    """A configuration variable is missing or invalid."""

    code = "CONFIG_ERROR"
    category = "config"
    status = 500

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        #: Name of the offending environment variable.
        self.variable = variable
        #: Why its value was rejected.
        self.reason = reason


class ActorError(AppError):
    """An actor could not take or answer a message; the supervisor heals it, so retry soon."""

    code = "SERVICE_ERROR"
    category = "service"
    status = 503
    recoverable = True
    retry_after = 1


class MailboxFull(ActorError):
    """An actor's bounded mailbox refused a message."""


class ActorTimeout(ActorError, TimeoutError):
    """An actor did not answer a call in time."""

    status = 504


class RequestTimeout(ActorError, TimeoutError):
    """A client request outran its one deadline; it is answered 504, never left hanging."""

    code = "REQUEST_TIMEOUT"
    status = 504


class ActorCrashed(ActorError):
    """An actor crashed while handling a call."""


class ActorStalled(ActorError):
    """An actor sat on a backlog without progress and the watchdog restarted it."""

    code = "ACTOR_STALLED"


class ActorRestarted(ActorError):
    """An operator restarted the actor (dashboard or diagnostics API); not a crash."""


def ctrl_frame(
    request_id: str | None, code: int, text: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build a ``{"ctrl": ...}`` reply to request *request_id* with status *code* and *text*.

    *params* is included only when non-empty. Used for successes and errors alike.
    """
    ctrl: dict[str, Any] = {"id": request_id, "code": code, "text": text, "ts": utc_now_iso()}
    if params:
        ctrl["params"] = params
    return {"ctrl": ctrl}


def render_error(
    exc: BaseException, request_id: str | None, *, trace_id: str | None = None
) -> dict[str, Any]:
    """Render *exc* as a ctrl frame answering *request_id*, with only fixed safe texts.

    An :class:`AppError` gives its status, client text, code, ``retry_after`` and params;
    anything else is a 500 ``internal error``. *trace_id* (default: the current one) is added
    so support can find the logs.
    """
    if isinstance(exc, AppError):
        status, text = exc.status, exc.client_text
        params: dict[str, Any] = {**exc.params, "error": exc.code}
        if exc.retry_after is not None:
            params["retry_after"] = exc.retry_after
    else:
        status, text = 500, STATUS_TEXTS[500]
        params = {"error": InternalError.code}
    trace_id = trace_id or trace_id_var.get()
    if trace_id:
        params["trace_id"] = trace_id
    return ctrl_frame(request_id, status, text, params)


def log_error(exc: BaseException, *, component: str, **context: Any) -> None:
    """Log *exc* for *component* with *context* fields, at the level its kind deserves.

    Expected client errors (status below 500) log at info, or warn for 401/403/429;
    recoverable server errors (a database outage, a shutdown) at warn, since whatever
    caused them is logged where it happened; other server errors and unknown exceptions
    log at error with their traceback.
    """
    log = get_logger(component).bind(**context)
    if isinstance(exc, AppError) and (exc.status < 500 or exc.recoverable):
        level = "WARNING" if exc.status in _WARN_STATUSES or exc.status >= 500 else "INFO"
        log = log.bind(error_code=exc.code, status=exc.status)
        if exc.detail is not None:
            log = log.bind(detail=exc.detail)
        # depth=1 credits the line to our caller, not to this helper.
        log.opt(depth=1).log(level, exc.client_text)
        return
    if isinstance(exc, AppError):
        log = log.bind(error_code=exc.code, status=exc.status)
        message = exc.client_text
    else:
        log = log.bind(error_code=InternalError.code, status=500)
        message = "unhandled error"
    log.opt(depth=1, exception=exc).error(message)


def is_retryable(exc: BaseException) -> bool:
    """Tell whether the operation that raised *exc* may succeed if simply tried again."""
    if isinstance(exc, AppError):
        return exc.recoverable
    if isinstance(exc, psycopg2.Error):
        return exc.pgcode in RETRYABLE_PGCODES or isinstance(
            exc, psycopg2.OperationalError | psycopg2.InterfaceError
        )
    # ConnectionError and TimeoutError (asyncio's included) are both OSError subclasses.
    return isinstance(
        exc, OSError | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
    )
