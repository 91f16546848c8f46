"""The room directory: every room's privacy and members in memory, so access needs no query."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import DatabaseError, NotFound, RoomAccessDenied
from app.log import get_logger
from app.models import RoomRecord

log = get_logger("directory")

__all__ = ["Member", "RoomDirectory"]


@dataclass(frozen=True, slots=True)
class Member:
    """Who asks for a room: the fields of an authenticated connection that access needs."""

    user_id: str
    is_admin: bool


class RoomDirectory:
    """Rooms by name, loaded at start and refreshed on change (LISTEN/NOTIFY).

    Only the DbMonitor writes it, from its handlers; sessions and room writers read it.
    While PostgreSQL is away every room known at the last refresh keeps working. *snapshot*
    is a file the last full load is saved to, so a restart during an outage still knows
    the rooms.
    """

    def __init__(self, snapshot: Path | None = None) -> None:
        #: Where the last full load is kept across restarts; None keeps nothing.
        self.snapshot = snapshot
        self._rooms: dict[str, RoomRecord] = {}
        #: Whether a full load (from PostgreSQL or the snapshot) has happened.
        self.loaded = False
        #: Full loads from PostgreSQL and single-room refreshes applied, for status.
        self.full_loads = 0
        self.refreshes = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, name: str) -> RoomRecord | None:
        """The room called *name*, or None."""
        return self._rooms.get(name)

    def visible_to(self, member: Member) -> list[RoomRecord]:
        """The rooms *member* may enter, by name: public ones, private ones they belong to,
        and every room for an admin. Raises `DatabaseError` before the first load."""
        if not self.loaded:
            raise DatabaseError("room directory not loaded yet")
        return [
            record
            for name, record in sorted(self._rooms.items())
            if not record.is_private or member.is_admin or member.user_id in record.members
        ]

    def check_access(self, member: Member, room: str) -> RoomRecord:
        """Return *room* when *member* may read and post there, else raise.

        `NotFound` for an unknown room, `RoomAccessDenied` for a private room *member* is
        not in (admins enter every room), and `DatabaseError` while the directory has never
        been loaded, since then nothing is known yet.
        """
        if not self.loaded:
            raise DatabaseError("room directory not loaded yet")
        record = self._rooms.get(room)
        if record is None:
            raise NotFound(f"room {room}", text="room not found")
        if record.is_private and not member.is_admin and member.user_id not in record.members:
            raise RoomAccessDenied(f"user {member.user_id} is not a member of private room {room}")
        return record

    # -- written by the DbMonitor only ----------------------------------------------------------

    def replace_all(self, records: Iterable[RoomRecord]) -> None:
        """Install a full load from PostgreSQL."""
        self._rooms = {record.name: record for record in records}
        self.loaded = True
        self.full_loads += 1

    def put(self, name: str, record: RoomRecord | None) -> None:
        """Apply a refresh of room *name*: its new *record*, or None when it is gone."""
        if record is None:
            self._rooms.pop(name, None)
        else:
            self._rooms[name] = record
        self.refreshes += 1

    def status(self) -> dict[str, Any]:
        """Counts for the dashboard."""
        return {
            "rooms": len(self._rooms),
            "loaded": self.loaded,
            "full_loads": self.full_loads,
            "refreshes": self.refreshes,
        }

    # -- the snapshot file (blocking I/O: call through asyncio.to_thread) ------------------------

    def save_snapshot(self) -> None:
        """Write the rooms to the snapshot file atomically."""
        if self.snapshot is None:
            return
        rooms = [
            {"name": r.name, "private": r.is_private, "last_seq": r.last_seq,
             "members": sorted(r.members)}
            for r in self._rooms.values()
        ]  # fmt: skip
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.snapshot.with_name(self.snapshot.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({"rooms": rooms}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.snapshot)

    def load_snapshot(self) -> int:
        """Load the snapshot file if there is one and nothing is loaded; return the rooms read."""
        if self.snapshot is None or self.loaded or not self.snapshot.exists():
            return 0
        try:
            rooms = json.loads(self.snapshot.read_text(encoding="utf-8"))["rooms"]
            records = [
                RoomRecord(
                    name=str(room["name"]), is_private=bool(room["private"]),
                    last_seq=int(room["last_seq"]), members=frozenset(map(str, room["members"])),
                )
                for room in rooms
            ]  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.bind(error=type(exc).__name__).warning("room directory snapshot unreadable")
            return 0
        self._rooms = {record.name: record for record in records}
        self.loaded = True
        return len(records)
