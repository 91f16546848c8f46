"""How late the event loop runs its callbacks: the one measure of loop lag."""

from __future__ import annotations

import asyncio
import time

#: How often the probe runs.
PROBE_INTERVAL = 0.25
#: How long a lag counts as recent: a single long block is reported for this long.
WINDOW = 5.0


class LoopLag:
    """A timer that re-arms itself every `PROBE_INTERVAL`; how late it fires is the lag.

    `recent` is the worst lag of the last `WINDOW` seconds, so a loop blocked once for
    seconds shows in liveness and status for a while, not only at the instant it ends.
    """

    def __init__(self) -> None:
        self.latest: float | None = None
        self._worst = 0.0
        self._worst_at = 0.0
        self._handle: asyncio.TimerHandle | None = None

    @property
    def recent(self) -> float | None:
        """The worst lag within the window (seconds); None before the first measure."""
        if self.latest is None:
            return None
        if time.monotonic() - self._worst_at > WINDOW:
            return self.latest
        return max(self._worst, self.latest)

    def start(self) -> None:
        """Arm the probe on the running loop."""
        if self._handle is None:
            self._arm(asyncio.get_running_loop())

    def stop(self) -> None:
        """Disarm it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + PROBE_INTERVAL
        self._handle = loop.call_at(due, self._fired, loop, due)

    def _fired(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        lag = max(0.0, loop.time() - due)
        self.latest = lag
        now = time.monotonic()
        if lag >= self._worst or now - self._worst_at > WINDOW:
            self._worst, self._worst_at = lag, now
        self._arm(loop)
