"""HTTP middleware: a trace id, one log line and metrics per request, one rendering for every error."""

from __future__ import annotations

import math
import re
import time
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web

from app import keys, metrics
from app.analytics import MAX_USER_AGENT, clean_text, device_type, record_error
from app.errors import STATUS_TEXTS, AppError, log_error, render_error
from app.log import get_logger, new_trace_id, trace_id_var

log = get_logger("http")

#: Trace ids a client may choose; anything else is replaced by a fresh one.
TRACE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: The route label of a request no route matched (404, and 405 for a known path).
UNMATCHED = "unmatched"
#: Routes polled every second or two (load balancers, Prometheus, an open dashboard): their
#: lines log at DEBUG unless they fail.
PROBE_ROUTES = frozenset({"/metrics", "/dashboard/snapshot.json"})
PROBE_PREFIX = "/health/"
#: The fallback transport's requests: counted in hearth_requests_total as ``sse`` by
#: app/sse.py, so not again here.
RPC_ROUTE = "/api/v1/rpc"
#: Methods counted by name; any other is counted as ``other``, to bound label cardinality.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Status of a request whose client went away before it was answered (nginx's convention).
CLIENT_CLOSED = 499
#: Headers of an aiohttp HTTPException that describe its body, replaced by ours.
_BODY_HEADERS = frozenset(
    {hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING, hdrs.TRANSFER_ENCODING}
)
#: Code and category of an aiohttp HTTPException by status; others by their class.
_HTTP_CODES: dict[int, tuple[str, str]] = {
    401: ("AUTH_REQUIRED", "auth"),
    403: ("FORBIDDEN", "auth"),
    404: ("NOT_FOUND", "not_found"),
    409: ("CONFLICT", "conflict"),
    410: ("GONE", "not_found"),
    413: ("MESSAGE_TOO_LONG", "validation"),
    429: ("RATE_LIMIT_EXCEEDED", "rate_limit"),
    502: ("RPC_FAILURE", "service"),
    503: ("SERVICE_ERROR", "service"),
    504: ("REQUEST_TIMEOUT", "service"),
}


class HttpStatusError(AppError):
    """An HTTP error aiohttp or a handler raised as an `web.HTTPException`, in the error
    model: a code and category for its *status*, and a fixed text (never the exception's
    own, which may describe internals); *detail* is for the logs."""

    def __init__(self, status: int, detail: str | None = None) -> None:
        super().__init__(detail)
        client_error = status < 500
        code, category = _HTTP_CODES.get(
            status,
            ("INVALID_MESSAGE", "validation") if client_error else ("INTERNAL_ERROR", "internal"),
        )
        self.status = status
        self.code = code
        self.category = category
        self.recoverable = status in (502, 503, 504)
        try:
            phrase = HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = STATUS_TEXTS[400 if client_error else 500]
        self.text = STATUS_TEXTS.get(status, phrase)


def client_trace_id(value: str | None) -> str | None:
    """Return *value* when it is an acceptable trace id, else None."""
    if value and TRACE_ID_PATTERN.fullmatch(value):
        return value
    return None


def request_trace_id(request: web.Request) -> str:
    """*request*'s ``X-Trace-ID``, else its ``X-Request-ID``, when well formed; else a new id."""
    headers = request.headers
    return (
        client_trace_id(headers.get("X-Trace-ID"))
        or client_trace_id(headers.get("X-Request-ID"))
        or new_trace_id()
    )


def route_of(request: web.Request) -> str:
    """*request*'s canonical route (``/api/v1/rooms/{name}/members``), or ``unmatched``."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


def is_probe(route: str) -> bool:
    """Whether *route* is polled by load balancers (``/health/*``, ``/metrics``)."""
    return route in PROBE_ROUTES or route.startswith(PROBE_PREFIX)


def error_response(exc: BaseException, trace_id: str, headers: Any = None) -> web.Response:
    """*exc* rendered as its ctrl error body with its status, carrying *trace_id*.

    *headers* (say, a 405's ``Allow``) are kept; an error with ``retry_after`` gets a
    ``Retry-After`` header unless *headers* has one.
    """
    body = render_error(exc, None, trace_id=trace_id)
    status = exc.status if isinstance(exc, AppError) else 500
    response = web.json_response(body, status=status)
    if headers:
        for name, value in headers.items():
            if name not in _BODY_HEADERS:
                response.headers.add(name, value)
    retry_after = exc.retry_after if isinstance(exc, AppError) else None
    if retry_after is not None and hdrs.RETRY_AFTER not in response.headers:
        response.headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(retry_after)))
    return response


@web.middleware
async def trace_middleware(request: web.Request, handler):
    """Serve *request* inside a trace context: errors as ctrl JSON, one log line, metrics.

    The trace id is echoed in ``X-Trace-ID`` (and ``X-Request-ID``) and in every error
    body. A WebSocket's line is logged when its socket ends, with the socket's life as
    its duration: one line per connection, with how it went.
    """
    # Set and reset by hand rather than with `trace_context`: a WebSocket's request lasts
    # as long as its client, and a generator's frame per client is memory for nothing.
    trace_id = request_trace_id(request)
    token = trace_id_var.set(trace_id)
    started = time.perf_counter()
    route = route_of(request)
    status = CLIENT_CLOSED
    error: BaseException | None = None
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                # Redirects and successes pass as they are, with the trace id.
                status = exc.status
                exc.headers["X-Trace-ID"] = trace_id
                raise
            error = HttpStatusError(exc.status, exc.text)
            response = error_response(error, trace_id, exc.headers)
        except Exception as exc:
            error = exc
            log_error(exc, component="http", endpoint=route, method=request.method)
            response = error_response(exc, trace_id)
        status = response.status
        if not response.prepared:
            response.headers["X-Trace-ID"] = trace_id
            response.headers["X-Request-ID"] = trace_id
        # /api/v1/rpc answers ctrls, counted and recorded by app/sse.py as transport sse.
        if status >= 400 and (error is not None or not is_probe(route)) and route != RPC_ROUTE:
            # A probe's own 503 is its answer, polled every second: not an error event.
            record_error(
                request.config_dict.get(keys.ERRORS),
                error or HttpStatusError(status),
                transport="http", endpoint=route, method=request.method, status=status,
                user_agent=request.headers.get(hdrs.USER_AGENT), trace_id=trace_id,
            )  # fmt: skip
        return response
    finally:
        _finish(request, route, status, time.perf_counter() - started)
        trace_id_var.reset(token)


def _finish(request: web.Request, route: str, status: int, elapsed: float) -> None:
    """Count *request* and log its one line (the trace id is still current)."""
    method = request.method if request.method in KNOWN_METHODS else "other"
    metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
    upgraded = status == 101
    if not upgraded:
        metrics.HTTP_REQUEST_SECONDS.labels(route).observe(elapsed)
        if route != RPC_ROUTE:
            metrics.count_request("http", status)
    if status >= 500:
        level = "WARNING"
    elif is_probe(route) and status < 400:
        level = "DEBUG"
    else:
        level = "INFO"
    user_agent = request.headers.get(hdrs.USER_AGENT)
    log.bind(
        method=clean_text(request.method, 16), route=route, status=status,
        duration_ms=round(elapsed * 1000, 2), device_type=device_type(user_agent),
        user_agent=clean_text(user_agent, MAX_USER_AGENT),
    ).log(level, "websocket closed" if upgraded else "request")  # fmt: skip
