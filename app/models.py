"""Validated value objects shared by the protocol, the actors and the store."""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from app.errors import MessageTooLong, ValidationError
from app.log import utc_now_iso

#: Room names: short, URL-safe, and the same rule as the rooms table CHECK.
ROOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Client message ids are opaque but bounded.
CLIENT_MSG_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
#: Default cap on message content, in characters.
MAX_CONTENT_LENGTH = 4096


def check_room_name(name: Any) -> str:
    """Return *name* when it is a valid room name, else raise `ValidationError`."""
    if not isinstance(name, str) or not ROOM_NAME.fullmatch(name):
        raise ValidationError(text="invalid room name")
    return name


@dataclass(frozen=True, slots=True)
class Message:
    """A room message as accepted from a client; ``seq`` is set once stored."""

    #: Server-assigned UUID, fixed at acceptance so every retry is idempotent.
    id: str
    room: str
    sender: str
    client_msg_id: str
    #: None only when a stored row failed to decrypt.
    content: str | None
    #: ISO-8601 UTC acceptance time.
    created_at: str
    seq: int | None = None
    flags: tuple[str, ...] = field(default=())
    #: Trace of the publish, so the spool drain logs under the same id.
    trace_id: str | None = None

    @classmethod
    def accept(
        cls,
        *,
        room: Any,
        sender: str,
        content: Any,
        client_msg_id: Any,
        max_length: int = MAX_CONTENT_LENGTH,
        trace_id: str | None = None,
    ) -> Message:
        """Validate a publish and stamp it with a fresh id and time.

        Raises `ValidationError` for a bad *room*, *content* or *client_msg_id*, and
        `MessageTooLong` when *content* exceeds *max_length* characters.
        """
        check_room_name(room)
        if not isinstance(content, str):
            raise ValidationError(text="content must be a string")
        if not content.strip():
            raise ValidationError(text="content must not be empty")
        if len(content) > max_length:
            raise MessageTooLong(params={"max_length": max_length})
        if "\x00" in content:
            raise ValidationError(text="content must not contain NUL")
        if not content.isascii():
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:
                # Valid JSON ("\\ud800") but no UTF-8: PostgreSQL could never store it.
                raise ValidationError(text="content must not contain lone surrogates") from None
        if not isinstance(client_msg_id, str) or not CLIENT_MSG_ID.fullmatch(client_msg_id):
            raise ValidationError(text="client_msg_id must be 1-64 printable ASCII characters")
        return cls(
            id=str(uuid.uuid4()),
            room=room,
            sender=sender,
            client_msg_id=client_msg_id,
            content=content,
            created_at=utc_now_iso(),
            trace_id=trace_id,
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict, as kept in the spool."""
        record = asdict(self)
        record["flags"] = list(self.flags)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Message:
        """Rebuild a message from `to_record` output (extra keys are ignored)."""
        names = cls.__dataclass_fields__
        values = {key: value for key, value in record.items() if key in names}
        values["flags"] = tuple(values.get("flags") or ())
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as the in-memory directory knows it: privacy, position and members."""

    name: str
    is_private: bool
    #: Highest seq stored in the room when the record was read.
    last_seq: int
    #: User ids (UUIDs as text) of the room's members.
    members: frozenset[str]
