"""Customer.io's 72-hour window: events stamped earlier are recorded but trigger nothing.

Customer.io starts campaigns only from events whose ``timestamp`` lies within the 72
hours before it receives them. A backlog (an outage, a paused sender) or a replay of
old dead letters may deliver events past that window: every one is accepted, and none
starts a campaign. Nothing fails, so nothing would say so; this module counts them and
warns, before they are sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from .events import Event

#: Customer.io triggers campaigns only from events at most this old when received.
WINDOW_SECONDS = 72 * 3600

internal_log = logging.getLogger("cio_logging")

# At most one warning a minute: a backlog goes out in many requests.
_WARN_EVERY_SECONDS = 60.0


def past_window(events: Iterable[Event], now: float) -> list[Event]:
    """The events stamped more than :data:`WINDOW_SECONDS` before ``now``."""
    cutoff = now - WINDOW_SECONDS
    return [event for event in events if event.timestamp < cutoff]


def hours(seconds: float) -> str:
    """A duration in hours for the warnings: ``"80.5 h"``."""
    return f"{seconds / 3600:.1f} h"


class WindowWatch:
    """Counts the events about to be sent past the window, and warns (once a minute at
    most, with the counts since the last warning).

    ``count``: called with the number found in each check (a metric counter).
    """

    def __init__(
        self,
        count: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count, self._clock, self._monotonic = count, clock, monotonic
        self._guard = threading.Lock()
        self._warned_at = float("-inf")
        self._unreported = 0
        self._oldest: float | None = None
        #: Events sent past the window since this watch was made.
        self.total = 0

    def check(self, events: Iterable[Event]) -> int:
        """Count the events of a delivery that are past the window; warn about them."""
        now = self._clock()
        late = past_window(events, now)
        if not late:
            return 0
        oldest: float = min(event.timestamp for event in late)
        with self._guard:
            self.total += len(late)
            self._unreported += len(late)
            self._oldest = oldest if self._oldest is None else min(self._oldest, oldest)
            moment = self._monotonic()
            if moment - self._warned_at < _WARN_EVERY_SECONDS:
                unreported = 0
            else:
                self._warned_at = moment
                unreported, self._unreported = self._unreported, 0
                oldest, self._oldest = self._oldest or oldest, None
        if self._count is not None:
            self._count(len(late))
        if unreported:
            internal_log.warning(
                "%d event(s) about to be sent are past Customer.io's 72-hour window (the "
                "oldest was stamped %s ago): Customer.io records them, but they trigger no "
                "campaign",
                unreported,
                hours(now - oldest),
            )
        return len(late)
