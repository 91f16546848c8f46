"""Maintenance mode: an instance an operator took out of the load balancer's rotation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.log import get_logger, iso_utc

log = get_logger("maintenance")

#: The flag's file name inside HEARTH_SPOOL_DIR, beside the spool it outlives restarts with.
MAINTENANCE_FILE = "maintenance.json"
#: Longest reason kept; the flag is a note, not a document.
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class MaintenanceState:
    """Who turned maintenance on, when (ISO UTC) and why."""

    since: str
    by: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The state as JSON-ready fields."""
        return asdict(self)


class Maintenance:
    """Maintenance mode of one instance, kept as a small JSON file at *path*.

    While it is on, readiness answers 503 ``maintenance`` so the load balancer moves new
    clients elsewhere, and connected clients stay until the operator drains the instance.
    A file, not memory: it survives a restart (a restarted instance must not rejoin the
    rotation mid-maintenance), and ``python -m app maintenance on`` on the host switches a
    running server without credentials. Reading costs one ``stat`` per call.
    """

    def __init__(self, path: Path) -> None:
        #: Where the flag lives.
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._state: MaintenanceState | None = None
        self._complained = False

    def state(self) -> MaintenanceState | None:
        """The current state, or None when maintenance is off."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._state = None, None
            return None
        except OSError as exc:
            # A flag we cannot read may have been set on purpose: stay out of rotation.
            return self._unreadable(exc)
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature != self._seen:
            self._complained = False
            self._seen, self._state = signature, self._read()
        return self._state

    def turn_on(self, *, by: str, reason: str = "") -> MaintenanceState:
        """Turn maintenance on (or update who and why), logged as an admin action."""
        state = MaintenanceState(iso_utc(datetime.now(UTC)), _clean(by, 100), _clean(reason))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(self.path.name + ".tmp")
        with open(scratch, "w", encoding="utf-8") as file:
            json.dump(state.as_dict(), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, self.path)
        log.bind(admin_action="maintenance_on", by=state.by, reason=state.reason).warning(
            "maintenance mode on: readiness now answers 503"
        )
        return state

    def turn_off(self, *, by: str) -> bool:
        """Turn maintenance off; False when it was not on."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.bind(admin_action="maintenance_off", by=_clean(by, 100)).warning(
            "maintenance mode off: readiness follows the instance's health again"
        )
        return True

    def _read(self) -> MaintenanceState:
        try:
            fields = json.loads(self.path.read_text(encoding="utf-8"))
            return MaintenanceState(str(fields["since"]), str(fields["by"]), str(fields["reason"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return self._unreadable(exc)

    def _unreadable(self, exc: Exception) -> MaintenanceState:
        if not self._complained:  # once, not once per probe
            self._complained = True
            log.bind(path=str(self.path), error=type(exc).__name__).error(
                "maintenance flag unreadable; treating maintenance as on"
            )
        return MaintenanceState("", "unknown", "unreadable maintenance flag")


def _clean(text: str, limit: int = MAX_REASON) -> str:
    """*text* cut to *limit* characters, without control characters or lone surrogates."""
    kept = "".join(c for c in text[:limit] if c.isprintable())
    return kept.encode("utf-8", "replace").decode("utf-8")
