"""HTTP middleware: a trace id per request and one rendering for every error."""

from __future__ import annotations

import re

from aiohttp import web

from app.errors import AppError, log_error, render_error
from app.log import new_trace_id, trace_id_var

#: Trace ids a client may choose; anything else is replaced by a fresh one.
TRACE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def client_trace_id(value: str | None) -> str | None:
    """Return *value* when it is an acceptable trace id, else None."""
    if value and TRACE_ID_PATTERN.fullmatch(value):
        return value
    return None


@web.middleware
async def trace_middleware(request: web.Request, handler):
    """Run the handler inside a trace context and echo the id in ``X-Trace-ID``."""
    # Set and reset by hand rather than with `trace_context`: a WebSocket's request lasts
    # as long as its client, and a generator's frame per client is memory for nothing.
    trace_id = client_trace_id(request.headers.get("X-Trace-ID")) or new_trace_id()
    token = trace_id_var.set(trace_id)
    try:
        response = await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log_error(exc, component="http", endpoint=request.path, method=request.method)
        body = render_error(exc, None, trace_id=trace_id)
        status = exc.status if isinstance(exc, AppError) else 500
        response = web.json_response(body, status=status)
    finally:
        trace_id_var.reset(token)
    if not response.prepared:
        response.headers["X-Trace-ID"] = trace_id
    return response
