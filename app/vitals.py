"""What the diagnostics sampler saw last: the recent traffic and the alerts firing.

Apart from app/diagnostics.py so that app/keys.py can name its type without importing the
module that reads the keys.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from app.alerts import Alert

#: Rate points kept for the dashboard's charts: two minutes at one a second.
RATE_POINTS = 120


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One second of traffic, for the dashboard's charts."""

    #: Unix time of the sample.
    at: float
    connections: int
    #: Publishes taken in, per second.
    messages_in: float
    #: Messages leaving through the outlet, per second.
    messages_out: float
    #: Frames routed to clients, per second.
    deliveries: float
    #: Requests answered (both transports), per second.
    requests: float
    #: Of those, answered with a server error, per second.
    server_errors: float


@dataclass(slots=True)
class Vitals:
    """The last `RATE_POINTS` seconds of traffic and the alerts of the last sample; written
    only by the sampler."""

    rates: deque[RatePoint] = field(default_factory=lambda: deque(maxlen=RATE_POINTS))
    alerts: tuple[Alert, ...] = ()
