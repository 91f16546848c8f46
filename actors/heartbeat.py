"""Heartbeat: a heartbeat event to every client on an interval, whatever else is failing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.base import Actor
from actors.hub import Announce, Hub
from app.errors import MailboxFull
from app.log import get_logger, utc_now_iso

log = get_logger("heartbeat")


@dataclass(frozen=True, slots=True)
class Beat:
    """Time to send a heartbeat."""


class Heartbeat(Actor):
    """Announces ``heartbeat {timestamp, clients_connected, feeds}`` through the hub.

    *interval* is in seconds; *feeds* returns each status feed's last successful poll
    time, so a client can tell a quiet feed from a frozen one. It touches neither
    PostgreSQL nor Redis, so it keeps beating while they fail.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        interval: float = 10.0,
        feeds: Callable[[], dict[str, Any]] = dict,
        **actor_options: Any,
    ) -> None:
        super().__init__("heartbeat", **actor_options)
        self.hub = hub
        self.interval = interval
        self.feeds = feeds
        #: Heartbeats handed to the hub.
        self.beats = 0

    async def on_start(self) -> None:
        self.send_every(self.interval, Beat)

    def extra_status(self) -> dict[str, Any]:
        return {"beats": self.beats, "interval": self.interval}

    async def _handle_beat(self, message: Beat) -> None:
        data = {
            "timestamp": utc_now_iso(),
            "clients_connected": len(self.hub.registry.connections),
            "feeds": self.feeds(),
        }
        try:
            self.hub.cast(Announce("heartbeat", data, conflate_key="heartbeat"))
        except MailboxFull:
            log.warning("hub mailbox full; heartbeat skipped")
            return
        self.beats += 1
