"""The WebSocket protocol: parsing client frames and building server frames (docs/protocol.rst)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from app.errors import ValidationError
from app.log import utc_now_iso
from app.models import ROOM_NAME, Message

#: Request ids and trace ids a client may send.
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
#: Status feed names: ``status:<source>``.
SOURCE_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
#: Largest page of history a client may ask for.
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50

#: Fields each op takes: name -> (accepted types, required).
OPS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "auth": {"token": ((str,), True)},
    "sub": {"topic": ((str,), True), "since": ((int,), False)},
    "unsub": {"topic": ((str,), True)},
    "pub": {
        "topic": ((str,), True),
        "content": ((object,), True),
        "client_msg_id": ((object,), True),
    },
    "history": {
        "topic": ((str,), True),
        "since": ((int,), False),
        "before": ((int,), False),
        "limit": ((int,), False),
    },
    "presence": {"topic": ((str,), True)},
    "ping": {},
}


class BadFrame(ValidationError):
    """A client frame that cannot be served; carries the request id when one was readable."""

    def __init__(self, text: str, request_id: str | None = None) -> None:
        super().__init__(text=text)
        #: The frame's id, so the 400 still answers the right request.
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: ``room:<name>`` or ``status:<source>``."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def is_room(self) -> bool:
        """Whether this is a chat room rather than a status feed."""
        return self.kind == "room"


@dataclass(frozen=True, slots=True)
class Request:
    """One validated client request."""

    op: str
    id: str
    trace_id: str | None
    fields: dict[str, Any]

    def topic(self) -> Topic:
        """The request's topic, parsed (every op with a topic has validated it already)."""
        return parse_topic(self.fields["topic"], self.id)


def parse_topic(raw: str, request_id: str | None = None) -> Topic:
    """Parse *raw* into a `Topic`, raising `BadFrame` when it names neither a room nor a feed."""
    kind, _, name = raw.partition(":")
    if kind == "room" and ROOM_NAME.fullmatch(name):
        return Topic("room", name)
    if kind == "status" and SOURCE_NAME.fullmatch(name):
        return Topic("status", name)
    raise BadFrame("invalid topic", request_id)


def parse_request(text: str) -> Request:
    """Parse and validate one client text frame; raises `BadFrame` with a specific text."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise BadFrame("invalid JSON") from None
    if not isinstance(frame, dict):
        raise BadFrame("frame must be a JSON object")
    request_id = frame.get("id")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise BadFrame("missing or invalid id")
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadFrame("missing field: op", request_id)
    spec = OPS.get(op)
    if spec is None:
        raise BadFrame("unknown op", request_id)
    trace_id = frame.get("trace_id")
    if trace_id is not None and (
        not isinstance(trace_id, str) or not REQUEST_ID.fullmatch(trace_id)
    ):
        raise BadFrame("trace_id must be a short string", request_id)
    fields: dict[str, Any] = {}
    for name, (types, required) in spec.items():
        if name not in frame or frame[name] is None:
            if required:
                raise BadFrame(f"missing field: {name}", request_id)
            continue
        value = frame[name]
        # bool is an int in Python, never a seq or a limit in JSON.
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            raise BadFrame(
                f"{name} must be {'an integer' if int in types else 'a string'}", request_id
            )
        fields[name] = value
    request = Request(op=op, id=request_id, trace_id=trace_id, fields=fields)
    if "topic" in fields:
        request.topic()
    _check_numbers(request)
    return request


def _check_numbers(request: Request) -> None:
    fields = request.fields
    for name in ("since", "before"):
        if name in fields and fields[name] < 0:
            raise BadFrame(f"{name} must not be negative", request.id)
    if "since" in fields and "before" in fields:
        raise BadFrame("give since or before, not both", request.id)
    if "limit" in fields and not 1 <= fields["limit"] <= MAX_HISTORY_LIMIT:
        raise BadFrame(f"limit must be 1..{MAX_HISTORY_LIMIT}", request.id)


def encode(frame: dict[str, Any]) -> str:
    """Serialise a server frame once, compactly."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def text_frame(text: str) -> bytes:
    """*text* as one unmasked WebSocket text frame (RFC 6455 §5.2), as a server sends it.

    Built once per broadcast, it is written to every idle client's socket as it is.
    """
    payload = text.encode()
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def data_frame(message: Message) -> dict[str, Any]:
    """The ``data`` frame announcing *message* to subscribers."""
    data: dict[str, Any] = {
        "topic": f"room:{message.room}",
        "id": message.id,
        "seq": message.seq,
        "from": message.sender,
        "content": message.content,
        "ts": message.created_at,
        "client_msg_id": message.client_msg_id,
    }
    if message.flags:
        data["flags"] = list(message.flags)
    return {"data": data}


def event_frame(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """A typed ``event`` frame."""
    return {"event": {"type": event_type, "ts": utc_now_iso(), "data": data}}


def error_event(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An ``error`` event frame; *code*, *message* and *fields* are as for :func:`error_data`."""
    return event_frame("error", error_data(code, message, **fields))


def error_data(
    code: str,
    message: str,
    *,
    component: str,
    severity: str = "error",
    recoverable: bool = True,
    retry_after_ms: int | None = None,
    trace_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``data`` of an ``error`` event: *code* is a string code such as ``SLOW_CLIENT``.

    *message* is safe text for clients, *component* the part of hearth reporting it,
    *severity* one of info, warning, error or critical, *recoverable* whether retrying
    later may help; *retry_after_ms*, *trace_id* and *extra* fields are added when given.
    """
    data: dict[str, Any] = {
        "code": code,
        "message": message,
        "component": component,
        "severity": severity,
        "recoverable": recoverable,
    }
    if retry_after_ms is not None:
        data["retry_after_ms"] = retry_after_ms
    if trace_id is not None:
        data["trace_id"] = trace_id
    data.update(extra)
    return data
