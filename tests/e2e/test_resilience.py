"""The failure policies on their own: breaker, retry policy, rate cap (fake clocks)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pybreaker
import pytest

from cio_logging.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    DeliveryBreaker,
    RequestRateCap,
    RetryPolicy,
)


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def call(breaker: DeliveryBreaker, ok: bool) -> str:
    return breaker.call(lambda: "ok" if ok else "bad", failed=lambda result: result == "bad")


class TestDeliveryBreaker:
    """pybreaker's consecutive rule plus our error-rate rule."""

    def test_opens_after_consecutive_failures(self) -> None:
        transitions: list[tuple[str, str]] = []
        breaker = DeliveryBreaker(
            consecutive_failures=3,
            volume_threshold=100,
            on_transition=lambda old, new: transitions.append((old, new)),
        )
        for _ in range(2):
            assert call(breaker, ok=False) == "bad"
        assert breaker.state == CLOSED
        call(breaker, ok=False)
        assert breaker.state == OPEN
        assert transitions == [(CLOSED, OPEN)]
        with pytest.raises(pybreaker.CircuitBreakerError):
            call(breaker, ok=True)  # nothing is sent while open

    def test_opens_at_the_error_rate_once_the_volume_was_seen(self) -> None:
        clock = FakeClock()
        breaker = DeliveryBreaker(
            consecutive_failures=100, volume_threshold=10, error_threshold=0.5, clock=clock
        )
        # Alternate: never two failures in a row, so pybreaker alone would never trip.
        for number in range(9):
            call(breaker, ok=number % 2 == 0)
            clock.now += 0.1
        assert breaker.state == CLOSED  # 4 of 9 failed, and fewer than 10 calls seen
        call(breaker, ok=False)  # 5 of 10: 50%
        assert breaker.state == OPEN

    def test_old_outcomes_leave_the_window(self) -> None:
        clock = FakeClock()
        breaker = DeliveryBreaker(
            consecutive_failures=100,
            volume_threshold=4,
            error_threshold=0.5,
            window=10.0,
            clock=clock,
        )
        call(breaker, ok=False)
        call(breaker, ok=True)
        clock.now += 30  # the failure above is now outside the window
        call(breaker, ok=True)
        call(breaker, ok=True)
        call(breaker, ok=False)
        assert breaker.state == CLOSED  # 1 of 4 in the window

    def test_payload_errors_do_not_count(self) -> None:
        breaker = DeliveryBreaker(consecutive_failures=2)
        for _ in range(5):
            breaker.call(lambda: "rejected", failed=lambda result: False)
        assert breaker.state == CLOSED

    def test_half_open_probe_closes_or_reopens(self) -> None:
        transitions: list[tuple[str, str]] = []
        breaker = DeliveryBreaker(
            consecutive_failures=1,
            reset_timeout=0.05,
            on_transition=lambda old, new: transitions.append((old, new)),
        )
        call(breaker, ok=False)
        assert 0 < breaker.seconds_until_probe() <= 0.05
        time.sleep(0.06)
        assert breaker.seconds_until_probe() == 0
        call(breaker, ok=False)  # the probe fails: open again
        assert breaker.state == OPEN
        time.sleep(0.06)
        call(breaker, ok=True)  # the probe succeeds: closed
        assert breaker.state == CLOSED
        assert transitions == [
            (CLOSED, OPEN),
            (OPEN, HALF_OPEN),
            (HALF_OPEN, OPEN),
            (OPEN, HALF_OPEN),
            (HALF_OPEN, CLOSED),
        ]

    def test_probe_waits_on_the_injected_monotonic_clock(self) -> None:
        """reset_timeout is measured on the breaker's clock, not pybreaker's wall clock."""
        clock = FakeClock()
        breaker = DeliveryBreaker(consecutive_failures=1, reset_timeout=30, clock=clock)
        call(breaker, ok=False)
        clock.now += 29
        assert breaker.seconds_until_probe() == pytest.approx(1)
        with pytest.raises(pybreaker.CircuitBreakerError):
            call(breaker, ok=True)
        clock.now += 1
        assert breaker.seconds_until_probe() == 0
        assert call(breaker, ok=True) == "ok"  # the probe
        assert breaker.state == CLOSED

    @pytest.mark.parametrize("step", [-3600.0, 3600.0])
    def test_a_wall_clock_step_neither_holds_nor_hastens_the_probe(
        self, monkeypatch: pytest.MonkeyPatch, step: float
    ) -> None:
        """pybreaker's datetime.now() stepped either way: the probe still comes at 30 s."""
        offset = [0.0]

        class SteppedDatetime(dt.datetime):
            @classmethod
            def now(cls, tz: dt.tzinfo | None = None) -> SteppedDatetime:
                return cls.fromtimestamp(time.time() + offset[0], tz)

        monkeypatch.setattr(pybreaker, "datetime", SteppedDatetime)
        clock = FakeClock()
        breaker = DeliveryBreaker(consecutive_failures=1, reset_timeout=30, clock=clock)
        call(breaker, ok=False)
        offset[0] = step
        clock.now += 10
        assert breaker.seconds_until_probe() == pytest.approx(20)
        with pytest.raises(pybreaker.CircuitBreakerError):
            call(breaker, ok=True)  # not early after a step forward
        clock.now += 20
        assert breaker.seconds_until_probe() == 0
        assert call(breaker, ok=True) == "ok"  # not an hour late after a step back
        assert breaker.state == CLOSED

    def test_a_failing_listener_never_breaks_delivery(self) -> None:
        def explode(old: str, new: str) -> None:
            raise RuntimeError("listener bug")

        breaker = DeliveryBreaker(consecutive_failures=1, on_transition=explode)
        assert call(breaker, ok=False) == "bad"
        assert breaker.state == OPEN


class TestRetryPolicy:
    """Exponential backoff with jitter, Retry-After, attempts and age limits."""

    def test_backoff_grows_and_is_capped(self) -> None:
        policy = RetryPolicy(max_backoff=10.0)
        delays = [policy.delay(attempts) for attempts in range(1, 8)]
        for attempts, delay in enumerate(delays, start=1):
            base = min(2 ** (attempts - 1), 10.0)
            assert base <= delay <= min(base + 1.0, 10.0)

    def test_retry_after_wins_when_longer_and_is_capped(self) -> None:
        policy = RetryPolicy(max_retry_after=30.0)
        assert policy.delay(1, retry_after=20.0) == 20.0
        assert policy.delay(1, retry_after=5_000.0) == 30.0
        assert policy.delay(1, retry_after=0.0) < 2.0

    def test_attempt_limit(self) -> None:
        policy = RetryPolicy(max_attempts=3)
        assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]

    def test_age_limit(self) -> None:
        policy = RetryPolicy(max_event_age=72 * 3600.0)
        logged = 1_000_000.0
        assert not policy.expired(logged, logged + 71 * 3600)
        assert policy.expired(logged, logged + 73 * 3600)

    def test_forward_clock_steps_are_not_age(self) -> None:
        """Logged, then the clock stepped 4 days forward: the event is minutes old."""
        policy = RetryPolicy(max_event_age=72 * 3600.0)
        logged = 1_000_000.0
        now = logged + 4 * 86400 + 60
        assert policy.expired(logged, now)
        assert not policy.expired(logged, now, uncounted=4 * 86400)

    def test_a_record_from_the_future_is_age_zero(self) -> None:
        """A logged_at ahead of the clock is neither expired nor old."""
        policy = RetryPolicy(max_event_age=1.0)
        assert not policy.expired(1_000_000.0 + 4 * 86400, 1_000_000.0)
        assert not policy.expired(1_000_000.0 + 10, 1_000_000.0, uncounted=5)

    def test_longest_delay_bounds_every_delay(self) -> None:
        """No wait the policy schedules is longer: due times past it are not ours."""
        policy = RetryPolicy(max_backoff=60.0, max_retry_after=600.0)
        assert policy.longest_delay == 600.0
        assert max(policy.delay(n, retry_after=10**6) for n in range(1, 20)) <= 600.0
        assert RetryPolicy(max_backoff=120.0, max_retry_after=0.0).longest_delay == 120.0


class TestRequestRateCap:
    """No sliding one-second window holds more than the cap."""

    def test_waits_for_the_oldest_request_to_leave_the_window(self) -> None:
        clock = FakeClock(0.0)

        class AdvancingStop(threading.Event):
            """A stop event whose waits move the fake clock instead of sleeping."""

            def __init__(self) -> None:
                super().__init__()
                self.waits: list[float] = []

            def wait(self, timeout: float | None = None) -> bool:
                self.waits.append(timeout or 0.0)
                clock.now += timeout or 0.0
                return False

        stop = AdvancingStop()
        cap = RequestRateCap(3, clock=clock, stop=stop)
        sent = []
        for _ in range(7):
            slot = cap.acquire()
            assert slot is not None
            sent.append(clock.now)
            clock.now += 0.1
            slot.release()  # answered at once
        for index, moment in enumerate(sent):
            in_window = [t for t in sent if moment <= t < moment + 1.0]
            assert len(in_window) <= 3, (index, sent)
        assert stop.waits  # it did wait

    def test_stop_cuts_the_wait_short(self) -> None:
        stop = threading.Event()
        cap = RequestRateCap(1, stop=stop)
        assert cap.acquire()
        stop.set()
        started = time.monotonic()
        assert cap.acquire() is None
        assert time.monotonic() - started < 0.5
