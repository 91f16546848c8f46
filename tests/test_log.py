"""Tests for app.log: JSON lines, levels, trace ids, file sinks and redaction."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from app.log import (
    get_logger,
    install_loop_exception_handler,
    new_trace_id,
    redact,
    redact_dsn,
    setup_logging,
    trace_context,
    trace_id_var,
    utc_now_iso,
)

#: Shape of the ``ts`` field: ISO-8601 UTC with milliseconds and a Z.
TS_PATTERN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
#: Fields every line must carry.
REQUIRED_FIELDS = {"ts", "level", "msg", "component", "function"}


@dataclass
class Captured:
    """Where one logging setup writes: a console stream and a log directory."""

    #: Stands in for stdout.
    console: io.StringIO
    #: Holds hearth.log and errors.log.
    log_dir: Path

    def console_text(self) -> str:
        return self.console.getvalue()

    def file_text(self, name: str) -> str:
        path = self.log_dir / name
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def console_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.console_text().splitlines()]

    def file_records(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.file_text(name).splitlines()]


@contextmanager
def captured_logging(level: str = "DEBUG") -> Iterator[Captured]:
    """Point hearth logging at a fresh stream and directory, and remove the sinks afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        captured = Captured(io.StringIO(), Path(directory))
        setup_logging(level=level, log_dir=captured.log_dir, stream=captured.console)
        try:
            yield captured
        finally:
            logger.remove()


@pytest.fixture
def logs() -> Iterator[Captured]:
    with captured_logging() as captured:
        yield captured


def test_line_is_one_json_object_with_required_fields(logs: Captured) -> None:
    """Each log line is a single JSON object carrying ts, level, msg, component and function."""
    get_logger("store").bind(topic="room:x", duration_ms=12.3).warning("slow query")

    (record,) = logs.console_records()
    assert REQUIRED_FIELDS <= record.keys()
    assert TS_PATTERN.match(record["ts"])
    assert record["msg"] == "slow query"
    assert record["component"] == "store"
    assert record["function"] == "test_line_is_one_json_object_with_required_fields"
    assert record["topic"] == "room:x"
    assert record["duration_ms"] == 12.3


def test_unbound_logger_uses_app_component(logs: Captured) -> None:
    """A record logged through the bare loguru logger gets component "app"."""
    logger.info("plain")

    assert logs.console_records()[0]["component"] == "app"


def test_keyword_extras_become_fields(logs: Captured) -> None:
    """Keyword arguments to a log call land as flat fields."""
    get_logger("store").warning("slow query", duration_ms=3, retry_count=2)

    record = logs.console_records()[0]
    assert (record["duration_ms"], record["retry_count"]) == (3, 2)


def test_braces_in_message_and_extras_survive(logs: Captured) -> None:
    """Braces from user data in the message or extras are written verbatim."""
    get_logger("ws").bind(body="{0} {name}").info("got {frame} {")

    record = logs.console_records()[0]
    assert (record["msg"], record["body"]) == ("got {frame} {", "{0} {name}")


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("trace", "debug"),
        ("debug", "debug"),
        ("info", "info"),
        ("success", "info"),
        ("warning", "warn"),
        ("error", "error"),
        ("critical", "fatal"),
    ],
)
def test_level_names(method: str, expected: str) -> None:
    """Loguru levels map onto the five lowercase level names of the format."""
    with captured_logging(level="TRACE") as logs:
        getattr(get_logger("app"), method)("event")

        assert logs.console_records()[0]["level"] == expected


def test_fatal_level(logs: Captured) -> None:
    """The custom FATAL level logs as "fatal" and survives a second setup."""
    setup_logging(level="DEBUG", log_dir=logs.log_dir, stream=logs.console)

    get_logger("app").log("FATAL", "port in use")

    record = logs.console_records()[0]
    assert (record["level"], record["msg"]) == ("fatal", "port in use")


def test_level_threshold_filters_console() -> None:
    """Records below the configured level are not written."""
    with captured_logging(level="WARNING") as logs:
        get_logger("app").info("chatty")
        get_logger("app").warning("worth seeing")

        assert [record["msg"] for record in logs.console_records()] == ["worth seeing"]


def test_trace_id_from_context(logs: Captured) -> None:
    """Inside trace_context every line carries its trace id, and none outside it."""
    with trace_context("abc123") as trace_id:
        get_logger("ws").info("inside")
    get_logger("ws").info("outside")

    inside, outside = logs.console_records()
    assert trace_id == "abc123"
    assert inside["trace_id"] == "abc123"
    assert "trace_id" not in outside


def test_bound_trace_id_wins_over_context(logs: Captured) -> None:
    """A trace id bound on the logger takes precedence over the context variable."""
    with trace_context("from-context"):
        get_logger("ws").bind(trace_id="from-bind").info("event")

    assert logs.console_records()[0]["trace_id"] == "from-bind"


def test_trace_context_generates_and_restores() -> None:
    """trace_context without an id makes a 16-hex-character one and restores the old value."""
    with trace_context("outer"):
        with trace_context() as generated:
            assert re.fullmatch(r"[0-9a-f]{16}", generated)
            assert trace_id_var.get() == generated
        assert trace_id_var.get() == "outer"
    assert trace_id_var.get() is None
    assert new_trace_id() != new_trace_id()


def test_file_sinks_receive_lines(logs: Captured) -> None:
    """hearth.log gets every line and errors.log only ERROR and above."""
    log = get_logger("store")
    log.info("routine")
    log.warning("slow")
    log.error("failed")
    log.log("FATAL", "stopping")

    assert [r["msg"] for r in logs.file_records("hearth.log")] == [
        "routine",
        "slow",
        "failed",
        "stopping",
    ]
    assert [r["msg"] for r in logs.file_records("errors.log")] == ["failed", "stopping"]


def test_hearth_log_rotates_by_size() -> None:
    """hearth.log rotates once it reaches the size limit, keeping at most *retention* old files."""
    with tempfile.TemporaryDirectory() as directory:
        setup_logging(log_dir=directory, rotation_bytes=400, retention=2, stream=io.StringIO())
        try:
            for number in range(40):
                get_logger("app").info(f"line {number}")
        finally:
            logger.remove()
        rotated = [p for p in Path(directory).iterdir() if p.name.startswith("hearth.")]
        assert 2 <= len(rotated) <= 3


def test_exception_adds_error_and_stack(logs: Captured) -> None:
    """An attached exception adds error as "Type: message" and the traceback as stack."""
    try:
        raise ValueError("bad frame")
    except ValueError:
        get_logger("ws").exception("handler failed")

    record = logs.console_records()[0]
    assert record["error"] == "ValueError: bad frame"
    assert "Traceback" in record["stack"] and "raise ValueError" in record["stack"]


def test_core_fields_cannot_be_overwritten_by_extras(logs: Captured) -> None:
    """A bound extra named like a core field does not replace it."""
    get_logger("app").bind(level="nope", msg="nope", ts="nope").info("real")

    record = logs.console_records()[0]
    assert (record["level"], record["msg"]) == ("info", "real")
    assert TS_PATTERN.match(record["ts"])


def test_utc_now_iso_format() -> None:
    """utc_now_iso renders UTC with milliseconds and a Z."""
    assert TS_PATTERN.match(utc_now_iso())


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://hearth:pw@db:5432/hearth", "postgresql://hearth:***@db:5432/hearth"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgres://u:p@ss@host/db", "postgres://u:***@host/db"),
        (
            "host=db user=hearth password=secret dbname=x",
            "host=db user=hearth password=*** dbname=x",
        ),
        ("postgresql://hearth@db/hearth", "postgresql://hearth@db/hearth"),
        ("redis://cache:6379", "redis://cache:6379"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    """redact_dsn masks the password of URL and keyword DSNs and leaves the rest alone."""
    assert redact_dsn(dsn) == expected


def test_redact_keys_recursively() -> None:
    """Values under secret-sounding keys are replaced at any depth, and bearer tokens masked."""
    value = {
        "user_id": "u1",
        "db": {"password": "a", "hosts": [{"api_key": "b"}]},
        "Authorization": "Bearer c",
        "message_key": "d",
        "header": "Bearer abc.def",
    }

    assert redact(value) == {
        "user_id": "u1",
        "db": {"password": "[REDACTED]", "hosts": [{"api_key": "[REDACTED]"}]},
        "Authorization": "[REDACTED]",
        "message_key": "[REDACTED]",
        "header": "Bearer ***",
    }


#: Text that may show up in messages: unicode, braces, quotes, newlines.
any_text = st.text(max_size=40)
#: Extra field names a caller might bind; underscores are loguru-internal territory.
extra_keys = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True).filter(
    lambda key: key not in {"ts", "level", "msg", "function", "component"}
)
#: JSON-ish extra values, including nested ones.
extra_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=50, deadline=None)
@given(
    message=any_text,
    extras=st.dictionaries(extra_keys, extra_values, max_size=5),
    method=st.sampled_from(["debug", "info", "warning", "error", "critical"]),
)
def test_property_10_every_record_is_complete_json(
    message: str, extras: dict[str, Any], method: str
) -> None:
    """Property 10: any message and extras give exactly one JSON line with the required fields."""
    with captured_logging() as logs:
        getattr(get_logger("prop").bind(**extras), method)(message)

        lines = logs.console_text().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert REQUIRED_FIELDS <= record.keys()
        assert TS_PATTERN.match(record["ts"])
        assert record["level"] in {"debug", "info", "warn", "error", "fatal"}
        assert record["component"] == "prop"
        assert record["function"] == "test_property_10_every_record_is_complete_json"
        assert set(extras) <= record.keys()


#: A secret that cannot be confused with anything else in a log line.
secrets_to_plant = st.from_regex(r"[A-Za-z0-9]{8,20}", fullmatch=True).map(lambda s: f"Zq{s}")
#: Keys under which a secret must be redacted.
secret_keys = st.sampled_from(
    ["password", "db_password", "token", "access_token", "secret", "client_secret",
     "authorization", "api_key", "message_key", "cookie"]
)  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    secret=secrets_to_plant,
    key=secret_keys,
    placement=st.sampled_from(["key", "nested", "dsn", "message", "bearer", "exception"]),
    marker=st.uuids().map(str),
)
def test_property_9_secrets_never_reach_any_sink(
    secret: str, key: str, placement: str, marker: str
) -> None:
    """Property 9: a planted secret is in no sink, while its line is in console and both files."""
    log = get_logger("prop").bind(marker=marker)
    dsn = f"postgresql://hearth:{secret}@db.internal:5432/hearth"
    with captured_logging() as logs:
        if placement == "key":
            log.bind(**{key: secret}).error("login attempt")
        elif placement == "nested":
            log.bind(config={"db": {key: secret}}).error("config loaded")
        elif placement == "dsn":
            log.bind(dsn=dsn).error("cannot connect")
        elif placement == "message":
            log.error(f"connecting with host=db password={secret} dbname=x")
        elif placement == "bearer":
            log.bind(header=f"Bearer {secret}").error("rejected request")
        else:
            log.opt(exception=ConnectionError(f"cannot reach {dsn}")).error("connect failed")

        for text in (
            logs.console_text(),
            logs.file_text("hearth.log"),
            logs.file_text("errors.log"),
        ):
            assert marker in text
            assert secret not in text


async def test_loop_handler_logs_a_dropped_failed_task(logs: Captured, capfd) -> None:
    """A task that fails unobserved gives one redacted JSON ERROR line and nothing on stderr."""
    install_loop_exception_handler()
    dsn = "postgresql://hearth:Zqhunter2@db.internal/hearth"

    async def doomed() -> None:
        raise ConnectionError(f"cannot reach {dsn}")

    task = asyncio.create_task(doomed(), name="doomed-task")
    await asyncio.wait([task])
    del task
    gc.collect()

    (record,) = logs.file_records("errors.log")
    assert record["level"] == "error"
    assert record["msg"] == "Task exception was never retrieved"
    assert (record["task"], record["error_type"]) == ("doomed-task", "ConnectionError")
    assert record["coroutine"].endswith("doomed")
    assert 'raise ConnectionError(f"cannot reach {dsn}")' in record["stack"]
    assert "Zqhunter2" not in logs.console_text() + logs.file_text("errors.log")
    assert capfd.readouterr().err == ""


async def test_loop_handler_logs_context_objects_by_type_only(logs: Captured, capfd) -> None:
    """A driver's call_exception_handler context shows its objects' type names, not reprs."""

    class Connection:
        def __repr__(self) -> str:
            return "<Connection dsn=host=db password=Zqhunter2>"

    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)
    loop.call_exception_handler({"message": "connection lost", "connection": Connection()})

    (record,) = logs.console_records()
    assert (record["level"], record["msg"]) == ("error", "connection lost")
    assert record["connection"] == Connection.__qualname__
    assert "Zqhunter2" not in logs.console_text()
    assert capfd.readouterr().err == ""
