"""Structured JSON logging on loguru: one redacted, flat JSON object per line on every sink."""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import secrets
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger, Record

__all__ = [
    "FATAL",
    "REDACTED",
    "get_logger",
    "install_loop_exception_handler",
    "iso_utc",
    "new_trace_id",
    "redact",
    "redact_dsn",
    "redact_text",
    "render_record",
    "setup_logging",
    "trace_context",
    "trace_id_var",
    "utc_now_iso",
]

#: Name of the level above CRITICAL for "the server must stop" events.
FATAL = "FATAL"
#: What a secret value is replaced with in every log line.
REDACTED = "[REDACTED]"

#: The trace id of the request or message being handled, if any.
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hearth_trace_id", default=None
)

#: Loguru level names mapped onto the five level names of the log format.
_LEVEL_NAMES = {
    "TRACE": "debug",
    "DEBUG": "debug",
    "INFO": "info",
    "SUCCESS": "info",
    "WARNING": "warn",
    "ERROR": "error",
    "CRITICAL": "fatal",
    FATAL: "fatal",
}
#: Extra key the rendered JSON line is parked under so loguru's ``str.format`` sees no braces.
_JSON_EXTRA = "_hearth_json"
#: Fields every line carries; bound extras with these names cannot overwrite them.
_CORE_FIELDS = ("ts", "level", "msg", "function")
#: Substrings that mark a key as holding a secret.
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "token",
    "secret",
    "authorization",
    "api_key",
    "apikey",
    "cookie",
)

#: ``scheme://user:password@`` credentials; the userinfo runs to the last ``@`` of the authority.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]*)@")
#: ``password=secret`` (libpq keyword form, query strings, JSON-ish ``"token": "x"``).
_KEYWORD_SECRET = re.compile(
    r"(?P<key>\b[\w-]*(?:password|passwd|pwd|token|secret|api_?key)[\w-]*[\"']?\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&'\"]+)",
    re.IGNORECASE,
)
#: A bearer credential, as in an ``Authorization`` header.
_BEARER_TOKEN = re.compile(r"\b(?P<scheme>[Bb]earer)\s+[^\s,;'\"]+")


def _ensure_fatal_level() -> None:
    # Loguru refuses to re-register a level, and levels outlive logger.remove().
    try:
        logger.level(FATAL)
    except ValueError:
        logger.level(FATAL, no=55)


_ensure_fatal_level()


def new_trace_id() -> str:
    """Return a fresh random trace id of 16 hex characters."""
    return secrets.token_hex(8)


@contextmanager
def trace_context(trace_id: str | None = None) -> Iterator[str]:
    """Make *trace_id* (or a new one when ``None``) the current trace id inside the block."""
    trace_id = trace_id or new_trace_id()
    token = trace_id_var.set(trace_id)
    try:
        yield trace_id
    finally:
        trace_id_var.reset(token)


def iso_utc(moment: datetime) -> str:
    """Render *moment* as ISO-8601 UTC with milliseconds and a Z: ``2026-01-08T10:12:00.000Z``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def utc_now_iso() -> str:
    """Return the current time as ISO-8601 UTC with milliseconds and a ``Z``."""
    return iso_utc(datetime.now(UTC))


def get_logger(component: str) -> Logger:
    """Return the loguru logger bound to *component*.

    Pass extras with ``.bind(topic=..., duration_ms=...)`` rather than as keyword arguments:
    loguru runs ``str.format`` on a message that comes with keyword arguments, so a message
    holding user data with a ``{`` would raise.
    """
    return logger.bind(component=component)


def _is_secret_key(key: str) -> bool:
    name = key.lower()
    return name.endswith("key") or any(part in name for part in _SECRET_KEY_PARTS)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    if ":" not in userinfo:
        return match[0]
    user = userinfo.split(":", 1)[0]
    return f"{match['scheme']}{user}:***@"


def redact_text(text: str) -> str:
    """Mask credentials inside *text*: DSN passwords, ``password=...`` pairs and bearer tokens."""
    text = _URL_CREDENTIALS.sub(_mask_userinfo, text)
    text = _BEARER_TOKEN.sub(lambda match: f"{match['scheme']} ***", text)
    return _KEYWORD_SECRET.sub(lambda match: f"{match['key']}***", text)


def redact_dsn(dsn: str) -> str:
    """Return *dsn* (URL or libpq keyword form) with its password replaced by ``***``."""
    return redact_text(dsn)


def redact(value: Any, key: str | None = None) -> Any:
    """Return a JSON-safe copy of *value* with secrets masked.

    A value stored under a secret-sounding *key* becomes ``[REDACTED]``; dicts and lists are
    redacted recursively; every string, and the ``str()`` of any other object, has its embedded
    credentials masked.
    """
    if key is not None and _is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(value if isinstance(value, str) else str(value))


def render_record(record: Record) -> dict[str, Any]:
    """Build the flat, redacted log object for a loguru *record*."""
    extra = record["extra"]
    fields: dict[str, Any] = {
        key: redact(value, key)
        for key, value in extra.items()
        if key != _JSON_EXTRA and key not in _CORE_FIELDS
    }
    fields["component"] = redact(extra.get("component") or "app")
    trace_id = extra.get("trace_id") or trace_id_var.get()
    if trace_id is None:
        fields.pop("trace_id", None)
    else:
        fields["trace_id"] = redact(trace_id)
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        fields["error"] = redact_text(f"{exception.type.__name__}: {exception.value}")
        stack = traceback.format_exception(exception.type, exception.value, exception.traceback)
        fields["stack"] = redact_text("".join(stack))
    level = record["level"].name
    return {
        "ts": iso_utc(record["time"]),
        "level": _LEVEL_NAMES.get(level, level.lower()),
        "msg": redact_text(record["message"]),
        "function": record["function"],
        **fields,
    }


def _format(record: Record) -> str:
    # Every sink formats the same record, so the JSON is rendered once and shared.
    extra = record["extra"]
    if _JSON_EXTRA not in extra:
        # ASCII escapes keep U+2028 and friends from splitting a line for line-based readers.
        extra[_JSON_EXTRA] = json.dumps(render_record(record), default=str)
    return "{extra[" + _JSON_EXTRA + "]}\n"


def setup_logging(
    *,
    level: str | int = "INFO",
    log_dir: str | Path | None = None,
    rotation_bytes: int = 10 * 1024 * 1024,
    retention: int = 5,
    stream: TextIO | None = None,
) -> None:
    """Replace every loguru handler with the hearth JSON sinks.

    Lines at *level* and above go to *stream* (``sys.stdout`` when ``None``). With *log_dir*,
    they also go to ``hearth.log``, rotated every *rotation_bytes* keeping *retention* old
    files, and ERROR and above also go to ``errors.log``. Calling it again starts over.
    """
    _ensure_fatal_level()
    logger.remove()
    # diagnose would print local variable values, which may hold secrets.
    common: dict[str, Any] = {"format": _format, "backtrace": False, "diagnose": False}
    logger.add(stream or sys.stdout, level=level, colorize=False, **common)
    if log_dir is None:
        return
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    logger.add(
        directory / "hearth.log",
        level=level,
        rotation=rotation_bytes,
        retention=retention,
        encoding="utf-8",
        **common,
    )
    logger.add(
        directory / "errors.log",
        level="ERROR",
        rotation=rotation_bytes,
        retention=retention,
        encoding="utf-8",
        **common,
    )


def _qualname(value: Any) -> str:
    return str(getattr(value, "__qualname__", None) or type(value).__qualname__)


def _loop_context_fields(context: dict[str, Any]) -> dict[str, Any]:
    # Names and types only: the reprs of tasks, handles, connections and transports can show
    # arguments, addresses or DSNs. Tracebacks of where things were created are left out too.
    fields: dict[str, Any] = {}
    for key, value in context.items():
        if key in ("message", "exception", "source_traceback", "handle_traceback"):
            continue
        if isinstance(value, asyncio.Task):
            fields["task"] = value.get_name()
            fields["coroutine"] = _qualname(value.get_coro())
        elif isinstance(value, asyncio.Handle):
            # Handles have no public accessor for their callback.
            fields["callback"] = _qualname(getattr(value, "_callback", value))
        else:
            fields[key] = type(value).__qualname__
    return fields


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    log = get_logger("asyncio").bind(**_loop_context_fields(context))
    if isinstance(exception, BaseException):
        log = log.bind(error_type=type(exception).__name__).opt(exception=exception)
    log.error(str(context.get("message") or "unhandled exception in event loop"))


def install_loop_exception_handler(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Route *loop*'s unhandled exceptions into the JSON log instead of onto stderr.

    *loop* defaults to the running loop, so without it call this from a coroutine. Each
    report ("Task exception was never retrieved", a failed callback, a driver's
    ``call_exception_handler``) becomes one ERROR line with asyncio's message, the exception
    type and its redacted traceback, plus the task name and coroutine, never their reprs.
    """
    (loop or asyncio.get_running_loop()).set_exception_handler(_log_loop_exception)
