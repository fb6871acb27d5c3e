"""What the sender knows and shows: its holds, its counters, and the one state record.

A *hold* is a reason nothing may be sent for a while: Customer.io's ``Retry-After`` (or
a 429 naming none), the pause after refused credentials or a TLS failure, the open
breaker until its probe. :class:`Holds` keeps them on the monotonic clock and says
which one ends last; the handler's ``status()``, the state record (``state.json`` or
the fleet's row), ``cio-logging status`` and the ``cio.delivery.hold`` gauge all show
the same :class:`Hold`, and ``flush()`` returns False while events wait behind one.

:class:`StateRecord` is where the sender writes its state for other processes: a
:class:`StateFile` (``state.json`` in the queue directory) or the fleet's row in
PostgreSQL (``store/postgres.py``'s ``SenderState``), the same dictionary either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..state_record import read_state, write_state

#: Hold reasons, as every view names them.
RETRY_AFTER, AUTH_PAUSE, CONFIG_PAUSE, BREAKER_OPEN = "retry_after", "auth", "config", "breaker"


class StateRecord(Protocol):
    """Where the sending process records its state for everyone else."""

    def write(self, state: dict[str, Any]) -> None:
        """Replace the record (advisory: a failure is not an error)."""

    def read(self) -> dict[str, Any] | None:
        """The last record, or None."""


class StateFile:
    """``state.json`` in a queue directory (see ``state_record.py``)."""

    def __init__(self, queue_dir: Path) -> None:
        self.queue_dir = queue_dir

    def write(self, state: dict[str, Any]) -> None:
        write_state(self.queue_dir, state)

    def read(self) -> dict[str, Any] | None:
        return read_state(self.queue_dir)


@dataclass(frozen=True, slots=True)
class Hold:
    """Why nothing is sent now, and until when (``until``: Unix time)."""

    reason: str
    seconds: float
    until: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "until": self.until,
            "message": self.message,
        }


class Holds:
    """The sender's holds, on the monotonic clock; thread-safe.

    ``breaker_wait``: seconds until the breaker lets a probe through (0 when closed);
    ``shared_wait``: a Retry-After answered to another handler of this process on the
    same workspace (the rate cap carries it).
    """

    def __init__(
        self,
        *,
        breaker_wait: Callable[[], float],
        shared_wait: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._breaker_wait = breaker_wait
        self._shared_wait = shared_wait
        self._clock = clock
        self._wall = wall
        self._guard = threading.Lock()
        self._until: dict[str, tuple[float, str]] = {}  # reason -> (monotonic end, message)

    def hold(self, reason: str, seconds: float, message: str) -> None:
        """Hold for ``seconds`` more (a longer hold of the same reason wins)."""
        end = self._clock() + max(0.0, seconds)
        with self._guard:
            current = self._until.get(reason)
            if current is None or current[0] < end:
                self._until[reason] = (end, message)

    def release(self, *reasons: str) -> None:
        """End these holds now (credentials accepted again, an operator's call)."""
        with self._guard:
            for reason in reasons:
                self._until.pop(reason, None)

    def seconds_left(self) -> float:
        """How long nothing may be sent (0: send)."""
        current = self.current()
        return 0.0 if current is None else current.seconds

    def current(self) -> Hold | None:
        """The hold that ends last, or None."""
        now = self._clock()
        candidates: list[tuple[float, str, str]] = []
        with self._guard:
            for reason, (end, message) in list(self._until.items()):
                if end <= now:
                    del self._until[reason]
                else:
                    candidates.append((end - now, reason, message))
        breaker = self._breaker_wait()
        if breaker > 0:
            candidates.append((breaker, BREAKER_OPEN, "the circuit breaker is open"))
        shared = self._shared_wait()
        if shared > 0:
            candidates.append((shared, RETRY_AFTER, "Customer.io asked for a pause (Retry-After)"))
        if not candidates:
            return None
        seconds, reason, message = max(candidates)
        return Hold(reason, seconds, self._wall() + seconds, message)

    def remaining(self, reason: str) -> float:
        """Seconds left of the hold ``reason`` alone (0: none)."""
        with self._guard:
            found = self._until.get(reason)
        return 0.0 if found is None else max(0.0, found[0] - self._clock())


@dataclass
class DeliveryStats:
    """What this process's sender did; read by ``handler.status()``."""

    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0
    failed_requests: int = 0
    retries_scheduled: int = 0
    # Calls in requests answered 207 whose errors named no call of the request: the
    # server took the request, and some of its calls may have been refused unseen.
    uncertain: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    delivery_paused: str | None = None
    breaker_transitions: list[tuple[str, str]] = field(default_factory=list)

    def did_anything(self) -> bool:
        """Has this process's sender anything of its own to record?"""
        return bool(
            self.requests
            or self.delivered
            or self.dead_lettered
            or self.breaker_transitions
            or self.last_error
            or self.delivery_paused
        )
