"""The wall clock, watched against a steady clock so that a step of it is noticed.

Due times in the write-ahead log are wall-clock times because they must outlive the
process: monotonic time means nothing to a restarted process (or after a reboot).
But the wall clock steps: an NTP correction, a VM resumed with a stale clock, an
operator's ``date -s``. A step back by an hour would hold every scheduled retry for
an extra hour, a step forward would make every backoff end at once and age every
queued event by the step.

:class:`WallClock` reads the wall clock together with a steady one (``CLOCK_BOOTTIME``
where there is one, which runs on while the machine is suspended, so a resume from
suspend is real time passing and not a step; else ``time.monotonic``). Their
difference only drifts slowly (NTP slews at most 0.5 ms a second); when it moves by
more than ``tolerance`` between two readings, the wall clock stepped by that much.
The delivering worker takes the step (:meth:`WallClock.take_step`) and moves the due
times it persisted by it, so every wait keeps its length in steady time; forward steps
are remembered so that they do not count towards an event's age
(:meth:`WallClock.uncounted_since`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

# Larger than any drift NTP slewing can build between two readings of a busy worker,
# far smaller than any step worth undoing.
STEP_TOLERANCE_SECONDS = 1.0
# Forward steps remembered for the age rule; a host that steps more often than this
# has worse problems, and memory stays bounded.
_REMEMBERED_STEPS = 64


def _steady_clock() -> Callable[[], float]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:  # declared but not supported by this kernel
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


class WallClock:
    """``time.time()`` that notices its own steps; safe to share between threads."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] | None = None,
        steady: Callable[[], float] | None = None,
        tolerance: float = STEP_TOLERANCE_SECONDS,
    ) -> None:
        # Looked up at each call, not bound here: ``time.time`` may be replaced (tests).
        self._wall = wall or (lambda: time.time())
        self._steady = steady or _steady_clock()
        self._tolerance = tolerance
        self._guard = threading.Lock()
        self._offset = self._wall() - self._steady()
        self._untaken = 0.0
        # (wall time the clock would have shown without the step, seconds forward)
        self._forward: deque[tuple[float, float]] = deque(maxlen=_REMEMBERED_STEPS)
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(reference))

    def __call__(self) -> float:
        """The wall clock now (Unix seconds); notes a step since the last reading."""
        with self._guard:
            now = self._wall()
            offset = now - self._steady()
            step = offset - self._offset
            self._offset = offset  # follows slow drift too: only jumps count
            if abs(step) >= self._tolerance:
                self._untaken += step
                if step > 0:
                    self._forward.append((now - step, step))
            return now

    def take_step(self) -> float:
        """Seconds the wall clock stepped (net, negative: back) since the last call."""
        self()  # a step that happened just now is taken now, not at the next reading
        with self._guard:
            step, self._untaken = self._untaken, 0.0
            return step

    def uncounted_since(self, moment: float) -> float:
        """Seconds of forward steps this clock noticed after wall time ``moment``.

        An event logged before a forward step did not age by it: subtract this from its
        wall-clock age. (Backward steps need nothing: they only make an age look shorter,
        so an event expires later, never suddenly.)
        """
        if not self._forward:
            # The common case, asked for every row read: no step was ever noticed.
            # Unlocked: a step noticed while this runs counts from the next question.
            return 0.0
        with self._guard:
            return sum(step for before, step in self._forward if moment < before)


def _reset_in_child(reference: weakref.ref[WallClock]) -> None:
    # A lock copied while another thread of the parent held it would stay held here.
    clock = reference()
    if clock is not None:
        clock._guard = threading.Lock()
