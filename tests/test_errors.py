"""Tests for app.errors: codes, safe client rendering, log levels and retryability."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import redis.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from app import errors
from app.errors import (
    ERROR_CODES,
    STATUS_TEXTS,
    ActorTimeout,
    AppError,
    AuthFailed,
    CircuitOpen,
    ConfigError,
    DatabaseError,
    DatabaseRejected,
    DatabaseTimeout,
    EncryptionError,
    InternalError,
    MessageTooLong,
    NotFound,
    RateLimited,
    RoomAccessDenied,
    ServerShutdown,
    SpoolFull,
    UpstreamTimeout,
    ValidationError,
    ctrl_frame,
    is_retryable,
    log_error,
    render_error,
)
from app.log import setup_logging, trace_context


def all_subclasses(cls: type) -> list[type]:
    """Return every subclass of *cls* defined in app.errors, recursively."""
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found.append(sub)
        found.extend(all_subclasses(sub))
    return found


#: Every AppError subclass of the error model that takes the standard constructor.
APP_ERRORS = [cls for cls in [AppError, *all_subclasses(AppError)] if cls is not ConfigError]
#: Safe texts a client may ever see.
SAFE_TEXTS = set(STATUS_TEXTS.values()) | {cls.text for cls in APP_ERRORS if cls.text}


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    setup_logging(level="DEBUG", stream=stream)
    yield stream
    logger.remove()


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_error_code_is_listed() -> None:
    """Each AppError subclass uses a code from ERROR_CODES and a status with a fixed text."""
    for cls in [*APP_ERRORS, ConfigError]:
        assert cls.code in ERROR_CODES, cls
        assert cls.status in STATUS_TEXTS, cls


def test_event_only_codes_are_listed() -> None:
    """Codes that appear only in events are part of ERROR_CODES too."""
    assert {"RPC_RECOVERED", "CLIENT_DISCONNECTED", "JSON_MARSHAL_ERROR"} <= ERROR_CODES


def test_actor_errors_keep_their_contract() -> None:
    """The actor runtime's errors keep their codes, and ActorTimeout is still a TimeoutError."""
    assert errors.MailboxFull.code == errors.ActorCrashed.code == "SERVICE_ERROR"
    assert issubclass(ActorTimeout, TimeoutError) and ActorTimeout.status == 504
    assert issubclass(UpstreamTimeout, TimeoutError) and UpstreamTimeout.status == 504


def test_database_errors_keep_their_contract() -> None:
    """The store's three errors: 503 DatabaseError and 504 DatabaseTimeout say retry in 2 s; DatabaseRejected is a 500 that will not heal."""
    assert (DatabaseError.status, DatabaseError.code, DatabaseError.retry_after) == (
        503,
        "DATABASE_ERROR",
        2,
    )
    assert issubclass(DatabaseTimeout, DatabaseError) and issubclass(DatabaseTimeout, TimeoutError)
    timeout = DatabaseTimeout("TimeoutError")
    assert (timeout.status, timeout.code, timeout.retry_after) == (504, "DATABASE_TIMEOUT", 2)
    assert timeout.recoverable and timeout.client_text == "timeout"
    rejected = DatabaseRejected("UniqueViolation:23505", pgcode="23505")
    assert (rejected.status, rejected.code, rejected.pgcode) == (500, "INTERNAL_ERROR", "23505")
    assert not rejected.recoverable and not isinstance(rejected, DatabaseError)
    assert DatabaseRejected().pgcode is None


def test_render_database_timeout_and_rejection() -> None:
    """A DatabaseTimeout renders as 504 with retry_after; a DatabaseRejected as a plain 500 without its pgcode."""
    ctrl = render_error(DatabaseTimeout("TimeoutError"), "r3")["ctrl"]
    assert (ctrl["code"], ctrl["text"]) == (504, "timeout")
    assert ctrl["params"] == {"error": "DATABASE_TIMEOUT", "retry_after": 2}
    ctrl = render_error(DatabaseRejected("NotNullViolation:23502", pgcode="23502"), "r4")["ctrl"]
    assert (ctrl["code"], ctrl["text"]) == (500, "internal error")
    assert ctrl["params"] == {"error": "INTERNAL_ERROR"}


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ValidationError("missing topic"), "bad request"),
        (MessageTooLong("70000 bytes"), "message too long"),
        (AuthFailed("no such user bob"), "authentication failed"),
        (RoomAccessDenied("user u1 room r2"), "forbidden"),
        (NotFound("room r9"), "not found"),
        (DatabaseError("connection refused"), "service unavailable"),
        (InternalError("bug"), "internal error"),
        (NotFound("room r9", text="room not found"), "room not found"),
    ],
)
def test_client_text(error: AppError, text: str) -> None:
    """Client text comes from the override, else the class, else the status; never the detail."""
    assert error.client_text == text


def test_detail_is_the_exception_message() -> None:
    """The internal detail is what str() shows, so logs carry it."""
    assert str(DatabaseError("pool exhausted")) == "pool exhausted"
    assert DatabaseError().detail is None


def test_config_error_attributes() -> None:
    """ConfigError names the variable and the reason."""
    error = ConfigError("HEARTH_DB_DSN", "not a URL")

    assert (error.variable, error.reason, error.code) == (
        "HEARTH_DB_DSN",
        "not a URL",
        "CONFIG_ERROR",
    )


def test_ctrl_frame_omits_empty_params() -> None:
    """A success reply has id, code, text and ts, and no params when there are none."""
    frame = ctrl_frame("r1", 200, "ok")

    assert set(frame["ctrl"]) == {"id", "code", "text", "ts"}
    assert ctrl_frame("r1", 200, "ok", {"seq": 4})["ctrl"]["params"] == {"seq": 4}


def test_render_rate_limit() -> None:
    """A rate-limit error renders as 429 with its code and retry_after."""
    ctrl = render_error(RateLimited("u1 sent 50/s", retry_after=60), "r7")["ctrl"]

    assert (ctrl["id"], ctrl["code"], ctrl["text"]) == ("r7", 429, "rate limit exceeded")
    assert ctrl["params"] == {"error": "RATE_LIMIT_EXCEEDED", "retry_after": 60}


def test_render_class_retry_after_and_params() -> None:
    """A class-level retry_after and the error's own safe params reach the client."""
    ctrl = render_error(SpoolFull(params={"topic": "room:a"}), None)["ctrl"]

    assert ctrl["params"] == {"topic": "room:a", "error": "SPOOL_FULL", "retry_after": 5}


def test_params_cannot_override_error_code() -> None:
    """An error param named "error" does not replace the real code."""
    ctrl = render_error(NotFound(params={"error": "spoofed"}), "r1")["ctrl"]

    assert ctrl["params"]["error"] == "NOT_FOUND"


def test_render_unknown_exception() -> None:
    """Any non-AppError renders as 500 internal error with code INTERNAL_ERROR."""
    ctrl = render_error(KeyError("users.password_hash"), "r2")["ctrl"]

    assert (ctrl["code"], ctrl["text"]) == (500, "internal error")
    assert ctrl["params"] == {"error": "INTERNAL_ERROR"}


def test_render_adds_trace_id() -> None:
    """The trace id comes from the argument, or else from the current trace context."""
    assert render_error(NotFound(), "r", trace_id="t1")["ctrl"]["params"]["trace_id"] == "t1"
    with trace_context("t2"):
        assert render_error(NotFound(), "r")["ctrl"]["params"]["trace_id"] == "t2"


#: Strings that must never reach a client.
internal_strings = st.one_of(
    st.sampled_from(
        [
            "/etc/hearth/secrets.env",
            "/home/app/hearth/app/store.py",
            "10.0.0.5:5432",
            "192.168.1.20",
            "SELECT id, password_hash FROM users WHERE name = 'bob'",
            'Traceback (most recent call last):\n  File "x.py"',
            "postgresql://hearth:pw@db.internal/hearth",
        ]
    ),
    st.from_regex(r"[A-Za-z0-9/_.:]{12,30}", fullmatch=True).map(lambda s: f"Zq{s}"),
)
#: Exceptions whose messages carry internal details, of AppError kinds and foreign kinds.
planted_errors = st.tuples(
    st.sampled_from(APP_ERRORS + [ValueError, KeyError, OSError, RuntimeError, ConnectionError]),
    internal_strings,
)


@settings(max_examples=50, deadline=None)
@given(planted=planted_errors, request_id=st.none() | st.text(max_size=10))
def test_property_14_internal_details_never_rendered(
    planted: tuple[type[BaseException], str], request_id: str | None
) -> None:
    """Property 14: a path, IP, SQL, traceback or DSN inside an error never reaches the client."""
    kind, internal = planted
    rendered = json.dumps(render_error(kind(internal), request_id))

    assert internal not in rendered
    assert json.dumps(internal)[1:-1] not in rendered
    assert "Traceback" not in rendered and "SELECT" not in rendered


@settings(max_examples=50, deadline=None)
@given(planted=planted_errors, request_id=st.none() | st.text(max_size=10))
def test_property_13_rendered_errors_share_one_format(
    planted: tuple[type[BaseException], str], request_id: str | None
) -> None:
    """Property 13: every rendered error has id, int code 400-504, a safe text, ts and a code."""
    kind, internal = planted
    ctrl = render_error(kind(internal), request_id)["ctrl"]

    assert ctrl["id"] == request_id
    assert isinstance(ctrl["code"], int) and 400 <= ctrl["code"] <= 504
    assert ctrl["text"] in SAFE_TEXTS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ctrl["ts"])
    assert ctrl["params"]["error"] in ERROR_CODES


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (ValidationError("missing topic"), "info"),
        (NotFound("room r9"), "info"),
        (AuthFailed("bad password for bob"), "warn"),
        (RateLimited("u1"), "warn"),
        (DatabaseError("connection refused"), "warn"),
        (DatabaseTimeout("TimeoutError"), "warn"),
        (DatabaseRejected("UniqueViolation:23505", pgcode="23505"), "error"),
        (ServerShutdown(), "warn"),
        (EncryptionError("cipher broke"), "error"),
        (ValueError("unexpected"), "error"),
    ],
)
def test_log_error_levels(console: io.StringIO, error: BaseException, level: str) -> None:
    """Client errors log below error level; server errors and unknown exceptions log as error."""
    log_error(error, component="ws", user_id="u1")

    (record,) = records(console)
    assert record["level"] == level
    assert (record["component"], record["user_id"]) == ("ws", "u1")
    assert record["function"] == "test_log_error_levels"


def test_log_error_keeps_whole_story(console: io.StringIO) -> None:
    """An unexpected exception is logged with its message and traceback."""
    try:
        {}["missing"]
    except KeyError as error:
        log_error(error, component="store", topic="room:a")

    (record,) = records(console)
    assert record["error"] == "KeyError: 'missing'"
    assert "Traceback" in record["stack"]
    assert (record["error_code"], record["topic"]) == ("INTERNAL_ERROR", "room:a")


def test_log_error_records_client_error_detail(console: io.StringIO) -> None:
    """A client error's internal detail and code go to the log, with no stack."""
    log_error(AuthFailed("no such user bob"), component="auth")

    (record,) = records(console)
    assert (record["detail"], record["error_code"]) == ("no such user bob", "AUTH_FAILED")
    assert "stack" not in record


class ServerConflict(psycopg2.DatabaseError):
    """A psycopg2 error of a generic class whose SQLSTATE says the transaction conflicted."""

    #: Only the server sets pgcode on real errors, so the class stands in for it.
    pgcode = "40001"


class ServerDeadlock(ServerConflict):
    """Same, for a detected deadlock."""

    pgcode = "40P01"


class ServerUniqueViolation(ServerConflict):
    """Same, for a duplicate key, which retrying cannot fix."""

    pgcode = "23505"


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ConnectionError("refused"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError("network unreachable"), True),
        (psycopg2.OperationalError("server closed the connection"), True),
        (psycopg2.InterfaceError("connection already closed"), True),
        (psycopg2.errors.SerializationFailure(), True),
        (psycopg2.errors.DeadlockDetected(), True),
        (ServerConflict(), True),
        (ServerDeadlock(), True),
        (ServerUniqueViolation(), False),
        (psycopg2.IntegrityError("duplicate key"), False),
        (psycopg2.ProgrammingError("syntax error"), False),
        (redis.exceptions.ConnectionError("reset"), True),
        (redis.exceptions.TimeoutError(), True),
        (redis.exceptions.ResponseError("WRONGTYPE"), False),
        (DatabaseError(), True),
        (DatabaseTimeout(), True),
        (DatabaseRejected(pgcode="23505"), False),
        (RateLimited(), True),
        (CircuitOpen(), True),
        (AuthFailed(), False),
        (ValidationError(), False),
        (ValueError(), False),
        (KeyError(), False),
    ],
)
def test_is_retryable(error: BaseException, retryable: bool) -> None:
    """Transient connection, timeout and transaction-conflict errors are retryable; others not."""
    assert is_retryable(error) is retryable
