"""Failure policies: the circuit breaker, the retry policy and the request-rate cap.

* :class:`DeliveryBreaker` drives pybreaker's state machine (closed, open, half-open)
  with the reference design's rules: it opens after ``consecutive_failures`` failures in
  a row (pybreaker's own rule) *and* when the error rate over a rolling window reaches
  ``error_threshold`` once ``volume_threshold`` calls were seen (our rule on top,
  which pybreaker lacks). ``reset_timeout`` later one probe goes through; success
  closes it. That wait is timed here on the monotonic clock: pybreaker compares
  ``datetime.now()`` with the wall-clock time it opened, so a clock step back would
  hold the probe for as long as the step (and a step forward let it through at
  once). Only failures that are Customer.io's count: a payload rejected as invalid
  is a success for the breaker.
* :class:`RetryPolicy` decides, per event, when the next attempt is due and when to
  give up, from tenacity's wait and stop policies evaluated on the attempt count and
  first-failure time stored with the event in the write-ahead log (so a restart does
  not reset them). ``Retry-After`` wins when it asks for longer, up to a cap.
* :class:`RequestRateCap` keeps any one-second window at the server at or under
  ``max_requests_per_second`` requests (a slot is held from before a request goes out
  until a second after its answer; a token bucket would let twice the rate through a
  window), so recovery after an outage is not a burst. One process's handlers on one
  workspace share it.

All waits take an ``Event`` so ``close()`` cuts them short, and a clock, so tests
need no real time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable

import pybreaker
from tenacity import (
    RetryCallState,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .config import Settings

# At import: getLogger takes logging's module lock, which the flush thread must never
# wait for (see background.py).
_internal_log = logging.getLogger("cio_logging")

#: Breaker states as reported by ``status()`` and telemetry.
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CountedFailure(Exception):  # noqa: N818 - a signal to pybreaker, not an error to report
    """Raised inside a breaker call so pybreaker counts a failure; carries the result."""

    def __init__(self, result: object) -> None:
        super().__init__("delivery failed")
        self.result = result


class DeliveryBreaker:
    """pybreaker's circuit breaker plus an error-rate rule over a rolling window."""

    def __init__(
        self,
        *,
        error_threshold: float = 0.5,
        volume_threshold: int = 10,
        consecutive_failures: int = 5,
        reset_timeout: float = 30.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, str], None] | None = None,
    ) -> None:
        self._error_threshold = error_threshold
        self._volume_threshold = volume_threshold
        self._window = window
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._outcomes_guard = threading.Lock()
        self._on_transition = on_transition
        self._reset_timeout = reset_timeout
        self._opened_at = float("-inf")  # on self._clock, set on every move to open
        self._probe_guard = threading.Lock()
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=consecutive_failures,
            reset_timeout=reset_timeout,
            success_threshold=1,
            listeners=[_TransitionListener(self._notify)],
            name="customerio",
            # Re-raise our CountedFailure on a trip: the caller counts it.
            throw_new_error_on_trip=False,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, on_transition: Callable[[str, str], None] | None = None
    ) -> DeliveryBreaker:
        return cls(
            error_threshold=settings.error_threshold,
            volume_threshold=settings.volume_threshold,
            consecutive_failures=settings.consecutive_failures,
            reset_timeout=settings.reset_timeout,
            window=settings.breaker_window,
            on_transition=on_transition,
        )

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    def seconds_until_probe(self) -> float:
        """How long until an open breaker lets a probe through (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._reset_timeout - (self._clock() - self._opened_at))

    def open_for(self, seconds: float) -> None:
        """Open now, with the probe due in ``seconds`` (at most ``reset_timeout``): a
        process taking over an outage that the fleet's previous sender was probing."""
        if self.state != OPEN:
            self._breaker.open()
        self._opened_at = self._clock() - max(0.0, self._reset_timeout - seconds)

    def permits(self) -> bool:
        """Whether a request may go now: the breaker is closed, or it is open and its
        probe is due (it moves to half-open, and this request is the probe). While
        the probe is out (half-open), nothing else goes."""
        state = self.state
        if state == CLOSED:
            return True
        if state != OPEN or self.seconds_until_probe() > 0:
            return False
        with self._probe_guard:
            if self.state != OPEN:
                return False  # another thread took the probe
            # Half-open it ourselves: in the open state pybreaker would decide by the
            # wall clock (see the module docstring).
            self._breaker.half_open()
            return True

    def succeeded(self) -> None:
        """A request was answered: Customer.io works (a refused payload counts too)."""
        self._report(failed=False)

    def failed(self, count: int = 1) -> None:
        """``count`` requests failed for Customer.io's (or the network's) reasons."""
        for _ in range(count):
            if not self._report(failed=True):
                return

    def _report(self, *, failed: bool) -> bool:
        """Feed one outcome into pybreaker's state machine; False once it is open
        (another request in flight opened it meanwhile: nothing more to count)."""

        def outcome() -> None:
            if failed:
                raise CountedFailure(None)

        if self.state == OPEN:
            return False
        try:
            self._breaker.call(outcome)
        except CountedFailure:
            self._record(ok=False)
            return self.state != OPEN
        except pybreaker.CircuitBreakerError:
            return False
        self._record(ok=True)
        return True

    def _record(self, *, ok: bool) -> None:
        with self._outcomes_guard:
            now = self._clock()
            self._outcomes.append((now, ok))
            while self._outcomes and self._outcomes[0][0] < now - self._window:
                self._outcomes.popleft()
            if self.state != CLOSED or ok:
                return
            calls = len(self._outcomes)
            failures = sum(1 for _, succeeded in self._outcomes if not succeeded)
            trip = calls >= self._volume_threshold and failures / calls >= self._error_threshold
        if trip:
            self._breaker.open()

    def _notify(self, old: str, new: str) -> None:
        if new == OPEN:
            self._opened_at = self._clock()
        if new == CLOSED:
            self._outcomes.clear()  # a fresh start: old failures must not re-trip it
        if self._on_transition is not None:
            self._on_transition(old, new)


class _TransitionListener(pybreaker.CircuitBreakerListener):
    """Forwards state changes; never raises (pybreaker passes listener errors to callers)."""

    def __init__(self, notify: Callable[[str, str], None]) -> None:
        self._notify = notify

    def state_change(self, cb: object, old_state: object, new_state: object) -> None:
        try:
            self._notify(getattr(old_state, "name", CLOSED), getattr(new_state, "name", ""))
        except Exception:  # reporting a transition must never break delivery
            _internal_log.exception("breaker listener failed")


class RetryPolicy:
    """When an event's next attempt is due, and when to give up on it."""

    def __init__(
        self,
        *,
        max_attempts: int = 8,
        max_event_age: float = 72 * 3600.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_retry_after: float = 600.0,
    ) -> None:
        self._wait = wait_exponential_jitter(
            initial=initial_backoff, max=max_backoff, jitter=initial_backoff
        )
        self._stop_attempts = stop_after_attempt(max_attempts)
        self._max_attempts = max_attempts
        self._max_event_age = float(max_event_age)
        self._max_retry_after = max_retry_after
        self._max_backoff = max_backoff

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            max_event_age=settings.max_event_age,
            max_backoff=settings.max_backoff,
            max_retry_after=settings.max_retry_after,
        )

    def exhausted(self, attempts: int) -> bool:
        """Whether an event that failed ``attempts`` times must be dead-lettered."""
        return bool(self._stop_attempts(_retry_state(attempts, 0.0)))

    def expired(self, logged_at: float, now: float, *, uncounted: float = 0.0) -> bool:
        """Older than ``max_event_age``: Customer.io would no longer trigger campaigns.

        ``uncounted``: seconds of wall-clock steps forward since ``logged_at``, which
        the event did not live through. A ``logged_at`` ahead of ``now`` is age 0.
        """
        # Compared here rather than through tenacity's stop_after_delay (same rule:
        # age >= the limit): the sender asks this of every row it reads, and building
        # a RetryCallState for each was a tenth of its CPU.
        return max(0.0, now - logged_at - uncounted) >= self._max_event_age

    @property
    def longest_delay(self) -> float:
        """The longest wait :meth:`delay` can ever return."""
        return max(self._max_backoff, self._max_retry_after)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempts + 1``."""
        delay = float(self._wait(_retry_state(attempts, 0.0)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_retry_after))
        return delay

    def delays(self, retry_after: float | None = None) -> list[float]:
        """:meth:`delay` for every attempt count a call can have (index: attempts so
        far, the last for more): a batch's retries are scheduled from it in one
        statement. One jitter draw per count: calls that failed together in one
        request are retried together."""
        return [
            self.delay(max(attempts, 1), retry_after) for attempts in range(self.max_attempts + 1)
        ]

    @property
    def max_attempts(self) -> int:
        return self._max_attempts

    @property
    def max_event_age(self) -> float:
        return self._max_event_age


def _retry_state(attempts: int, elapsed: float) -> RetryCallState:
    # tenacity's policies read only these two fields; the rest of the state belongs
    # to its own retry loop, which we do not use: attempts live in the WAL instead.
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(attempts, 1)
    state.outcome_timestamp = state.start_time + elapsed
    return state


class RateSlot:
    """One request's place under a :class:`RequestRateCap`.

    Taken before the request goes out; :meth:`release` once its answer (or its
    failure) is in, and the slot stays taken one second more; :meth:`cancel` if
    nothing was sent after all. Either is idempotent.
    """

    __slots__ = ("_done", "_window")

    def __init__(self, window: _SlotWindow) -> None:
        self._window = window
        self._done = False

    def release(self) -> None:
        """The answer arrived: the slot frees one second from now."""
        if not self._done:
            self._done = True
            self._window.give_back(sent=True)

    def cancel(self) -> None:
        """Nothing was sent: the slot frees at once."""
        if not self._done:
            self._done = True
            self._window.give_back(sent=False)


class _SlotWindow:
    """The slots taken for one workspace in this process, with when each frees."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._guard = threading.Lock()
        self._in_flight = 0
        self._freed_at: deque[float] = deque()  # answered: free at these times (ascending)
        self.held_until = float("-inf")  # Customer.io asked for a pause (Retry-After)

    def try_take(self, limit: int) -> float:
        """Take a slot if fewer than ``limit`` are taken (0.0), else how long to wait."""
        with self._guard:
            now = self._clock()
            while self._freed_at and self._freed_at[0] <= now:
                self._freed_at.popleft()
            if self._in_flight + len(self._freed_at) < limit:
                self._in_flight += 1
                return 0.0
            # All taken. The first to free is the first answered one; with every
            # slot still in flight, none frees sooner than a second from now.
            return self._freed_at[0] - now if self._freed_at else 1.0

    def give_back(self, *, sent: bool) -> None:
        with self._guard:
            self._in_flight -= 1
            if sent:
                self._freed_at.append(self._clock() + 1.0)

    def hold(self, seconds: float) -> None:
        with self._guard:
            self.held_until = max(self.held_until, self._clock() + seconds)

    def seconds_on_hold(self) -> float:
        return max(0.0, self.held_until - self._clock())


class RequestRateCap:
    """At most ``per_second`` requests in any one-second window, where the server
    counts them.

    A request reaches the server at some moment between taking its slot (before it
    is sent) and its answer. So a slot is held from before the request goes out
    until its answer plus one second, and at most ``per_second`` slots are held at
    once. Were more than ``per_second`` requests to arrive within one window from
    ``t`` to ``t + 1``, each one's slot would be held at ``t + 1`` (taken before it
    arrived, freed a second after its answer, which came after ``t``): impossible.
    Counting from when a request was prepared instead let 8 requests into one
    second under a cap of 5, as preparation times vary. The price is a slot held for
    the request's latency on top of the second.

    ``workspace``: handlers of one process that send to one workspace (site id and
    endpoint) share one set of slots, so together they keep the cap; each waits
    until fewer than its own ``per_second`` are taken. They share a Retry-After
    pause too (:meth:`hold`). Without it, the cap is this object's own. A forked
    child starts with no slot taken and no pause.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
        workspace: Hashable | None = None,
    ) -> None:
        self._limit = max(1, int(per_second))
        self._stop = stop or threading.Event()
        self._window = _SlotWindow(clock) if workspace is None else _SHARED.window(workspace)

    def hold(self, seconds: float) -> None:
        """Customer.io asked every client to wait (Retry-After): so must the others."""
        self._window.hold(seconds)

    def close(self) -> None:
        """Let go of the workspace's shared window (this cap's sender stopped); a cap
        closed keeps working alone."""
        self._window = _SlotWindow(time.monotonic)

    def seconds_on_hold(self) -> float:
        """How long the workspace's pause (see :meth:`hold`) still lasts; 0 if none."""
        return self._window.seconds_on_hold()

    def acquire(self) -> RateSlot | None:
        """Wait for a slot; None if stopped meanwhile (then send nothing)."""
        while True:
            wait = self._window.try_take(self._limit)
            if wait <= 0:
                return RateSlot(self._window)
            if self._stop.wait(wait):
                return None


class _SharedWindows:
    """The slot windows of this process, one per workspace, shared by the caps on it.

    Weakly held: a window lives while a cap uses it (a closed cap lets go of it, see
    :meth:`RequestRateCap.close`), so nothing here outlives the handlers using it and
    nothing needs resetting. Keyed by process id too: a forked child never shares its
    parent's window, whose slots are the parent's requests.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._windows: weakref.WeakValueDictionary[tuple[int, Hashable], _SlotWindow] = (
            weakref.WeakValueDictionary()
        )

    def window(self, workspace: Hashable) -> _SlotWindow:
        key = (os.getpid(), workspace)
        with self._guard:
            window = self._windows.get(key)
            if window is None:
                window = _SlotWindow(time.monotonic)
                self._windows[key] = window
            return window


_SHARED = _SharedWindows()
