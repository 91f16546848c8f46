"""Parsing client frames: every malformed frame gets a specific 400, valid ones parse."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import render_error
from app.protocol import BadFrame, Topic, parse_request, parse_topic, text_frame


def frame(**fields) -> str:
    """A JSON text frame with *fields*."""
    return json.dumps(fields)


@pytest.mark.parametrize(
    ("text", "reason", "request_id"),
    [
        ("not json", "invalid JSON", None),
        ("[1, 2]", "frame must be a JSON object", None),
        (frame(op="ping"), "missing or invalid id", None),
        (frame(op="ping", id=""), "missing or invalid id", None),
        (frame(op="ping", id=7), "missing or invalid id", None),
        (frame(id="1"), "missing field: op", "1"),
        (frame(op="dance", id="1"), "unknown op", "1"),
        (frame(op="sub", id="1"), "missing field: topic", "1"),
        (frame(op="sub", id="1", topic=5), "topic must be a string", "1"),
        (frame(op="sub", id="1", topic="room:"), "invalid topic", "1"),
        (frame(op="sub", id="1", topic="chan:x"), "invalid topic", "1"),
        (frame(op="sub", id="1", topic="room:a", since="3"), "since must be an integer", "1"),
        (frame(op="sub", id="1", topic="room:a", since=True), "since must be an integer", "1"),
        (frame(op="sub", id="1", topic="room:a", since=-1), "since must not be negative", "1"),
        (frame(op="history", id="1", topic="room:a", limit=101), "limit must be 1..100", "1"),
        (
            frame(op="history", id="1", topic="room:a", since=1, before=5),
            "give since or before, not both",
            "1",
        ),
        (frame(op="pub", id="1", topic="room:a", content="x"), "missing field: client_msg_id", "1"),
        (frame(op="auth", id="1", token=["x"]), "token must be a string", "1"),
        (frame(op="ping", id="1", trace_id={"a": 1}), "trace_id must be a short string", "1"),
    ],
)
def test_malformed_frames_get_specific_texts(text, reason, request_id):
    """Each kind of malformed frame is refused with its own text and keeps a readable id."""
    with pytest.raises(BadFrame) as caught:
        parse_request(text)
    assert caught.value.client_text == reason
    assert caught.value.request_id == request_id
    assert caught.value.status == 400


def test_valid_frames_parse():
    """A well-formed sub parses into op, id, trace id, fields and topic."""
    request = parse_request(frame(op="sub", id="r1", trace_id="t-9", topic="room:lobby", since=4))
    assert (request.op, request.id, request.trace_id) == ("sub", "r1", "t-9")
    assert request.fields == {"topic": "room:lobby", "since": 4}
    assert request.topic() == Topic("room", "lobby")
    assert parse_topic("status:system").is_room is False


@given(st.text(max_size=300))
def test_any_text_parses_or_gets_a_400(text):
    """Arbitrary text either parses or raises BadFrame rendering as a 400 ctrl, never anything else."""
    try:
        parse_request(text)
    except BadFrame as exc:
        rendered = render_error(exc, exc.request_id)["ctrl"]
        assert rendered["code"] == 400
        assert rendered["params"]["error"] == "INVALID_MESSAGE"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "op",
                "id",
                "topic",
                "since",
                "before",
                "limit",
                "content",
                "client_msg_id",
                "token",
                "trace_id",
            ]
        ),
        json_values,
    )
)
def test_any_json_object_parses_or_gets_a_400(fields):
    """Any JSON object over the protocol's field names parses or is a 400, never a crash."""
    try:
        parse_request(json.dumps(fields))
    except BadFrame as exc:
        assert exc.status == 400


class _Capture:
    """A transport that keeps what is written, for aiohttp's own WebSocket writer."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks) -> None:
        self.written += b"".join(chunks)

    def is_closing(self) -> bool:
        return False


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=200) | st.sampled_from(["x" * 125, "x" * 126, "é" * 40_000, "y" * 70_000])
)
async def test_text_frame_is_the_frame_aiohttp_would_write(text):
    """text_frame builds, byte for byte, the unmasked text frame aiohttp's own writer sends, at every length class."""
    from aiohttp import WSMsgType
    from aiohttp._websocket.writer import WebSocketWriter

    transport = _Capture()
    writer = WebSocketWriter(None, transport, use_mask=False)  # type: ignore[arg-type]
    await writer.send_frame(text.encode(), WSMsgType.TEXT)
    assert text_frame(text) == transport.written
