"""Wall-clock steps in a real process: delivery neither stalls nor dead-letters.

Each test runs tests/apps/clock_app.py, whose wall clock (``time.time``, ``datetime.now``)
the test steps through stdin while the monotonic clock runs on, as an NTP step or a
resumed VM does. The child delivers over HTTPS to the simulator; nothing is faked
between them. The numbers each test measured are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import email.utils
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, HandlerFactory, child_environment, wait_for

CLOCK_APP = str(PROJECT_ROOT / "tests" / "apps" / "clock_app.py")
HOUR = 3600.0
DAY = 24 * HOUR


class ClockChild:
    """tests/apps/clock_app.py, driven line by line."""

    def __init__(
        self, sim: TrackAPISimulator, queue_dir: Path, offset: float = 0.0, **options: Any
    ) -> None:
        settings = {"flush_interval": 0.05, "request_timeout": 2, "flush_timeout": 10, **options}
        self.process = subprocess.Popen(
            [PYTHON, CLOCK_APP, json.dumps(settings)],
            env=child_environment(sim, queue_dir, CLOCK_APP_OFFSET=str(offset)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask() == ["ready"]

    def ask(self, command: str | None = None) -> list[str]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        words = line.split()
        assert words[:1] == ["ok"], f"child answered {line!r} to {command!r}"
        return words[1:]

    def step(self, seconds: float) -> None:
        self.ask(f"step {seconds}")

    def log(self, count: int, ahead: float = 0.0) -> list[str]:
        return self.ask(f"log {count} {ahead}")

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(" ".join(self.ask("status")))
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask("exit")
                self.process.wait(15)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def start_child(simulator: TrackAPISimulator, queue_dir: Path) -> Iterator[Any]:
    children: list[ClockChild] = []

    def start(offset: float = 0.0, **options: Any) -> ClockChild:
        child = ClockChild(simulator, queue_dir, offset, **options)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def seconds_until_delivered(sim: TrackAPISimulator, ids: list[str], timeout: float) -> float:
    """How long until ``sim`` has accepted every id; fails the test past ``timeout``."""
    started = time.monotonic()
    delivered = wait_for(lambda: sim.accepted_ids() >= set(ids), timeout)
    elapsed = time.monotonic() - started
    assert delivered, (
        f"{len(set(ids) - sim.accepted_ids())} of {len(ids)} events still undelivered "
        f"after {elapsed:.1f} s"
    )
    return elapsed


class TestBreakerProbe:
    """The open breaker's probe waits reset_timeout of monotonic time, whatever the wall clock."""

    @pytest.mark.parametrize("step", [-HOUR, HOUR])
    def test_probe_follows_recovery_after_a_step(
        self, simulator: TrackAPISimulator, start_child: Any, step: float
    ) -> None:
        """Open, step the clock, recover: one probe after reset_timeout, then everything."""
        simulator.fail(503)
        child = start_child(consecutive_failures=2, reset_timeout=2.0, max_backoff=0.2)
        ids = child.log(5)
        assert wait_for(lambda: child.status()["breaker"] == "open", 10)
        child.step(step)
        simulator.clear_faults()
        elapsed = seconds_until_delivered(simulator, ids, 15)
        requests = simulator.requests
        tripped = max(r.time for r in requests if r.status == 503)
        probe = min(r.time for r in requests if r.status == 200)
        print(
            f"step {step:+.0f} s: delivered {elapsed:.2f} s after recovery, "
            f"probe {probe - tripped:.2f} s after the breaker opened"
        )
        # Not early either: a forward step must not let pybreaker probe at once.
        assert probe - tripped >= 2.0 - 0.05
        assert elapsed < 8


class TestRetrySchedule:
    """A scheduled retry keeps its monotonic wait across a step."""

    def test_retry_after_a_backward_step(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """Fail once, step back an hour: the retry still goes within its backoff."""
        simulator.fail(503, count=1)
        child = start_child(consecutive_failures=100, volume_threshold=1000, max_backoff=1.5)
        ids = child.log(3)
        # Under load the first request may carry only some of the three: those wait.
        assert wait_for(lambda: child.status()["retries_scheduled"] >= 1, 10)
        child.step(-HOUR)
        elapsed = seconds_until_delivered(simulator, ids, 15)
        print(f"retry delivered {elapsed:.2f} s after a -1 h step")
        assert elapsed < 6

    def test_retry_after_a_forward_step_is_not_early(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """Fail once, step forward an hour: the retry waits out its backoff, no burst."""
        simulator.fail(503, count=1)
        child = start_child(consecutive_failures=100, volume_threshold=1000, max_backoff=3)
        ids = child.log(1)
        assert wait_for(lambda: child.status()["retries_scheduled"] >= 1, 10)
        failed_at = simulator.requests[0].time
        child.step(HOUR)
        seconds_until_delivered(simulator, ids, 15)
        retried_at = simulator.requests[-1].time
        print(f"retry sent {retried_at - failed_at:.2f} s after the failure (+1 h step)")
        assert retried_at - failed_at >= 1.0  # the shortest backoff is 1 s


class TestFutureRecords:
    """A record stamped ahead of the clock is sent at once, and flush() waits for it."""

    def test_records_ten_minutes_ahead(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """flush() returns with them delivered, not still queued."""
        child = start_child()
        ids = child.log(5, ahead=600)
        seconds, queued = child.ask("flush")
        print(f"flush took {seconds} s; {queued} queued after it")
        assert simulator.accepted_ids() >= set(ids)
        assert queued == "0"

    def test_records_logged_before_a_backward_step(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """Queued during an outage, then the clock steps back a day: sent on recovery."""
        simulator.fail(503)
        child = start_child(consecutive_failures=100, volume_threshold=1000, max_backoff=0.5)
        ids = child.log(5)
        assert wait_for(lambda: child.status()["retries_scheduled"] >= 5, 10)
        child.step(-DAY)
        simulator.clear_faults()
        elapsed = seconds_until_delivered(simulator, ids, 15)
        print(f"delivered {elapsed:.2f} s after recovery (-1 day step)")
        assert elapsed < 6

    def test_flush_in_a_process_that_does_not_deliver(
        self, simulator: TrackAPISimulator, start_child: Any, make_handler: HandlerFactory
    ) -> None:
        """Another process delivers: flush() still waits until the record is sent."""
        child = start_child()
        seconds_until_delivered(simulator, child.log(1), 10)
        assert child.status()["delivering_process"]
        handler = make_handler()
        assert not handler.status()["delivering_process"]
        logger = logging.getLogger("test.clock.flush")
        logger.propagate = False
        logger.addHandler(handler)
        record = logger.makeRecord(logger.name, logging.INFO, "app.py", 1, "purchase", (), None)
        record.created += 600  # forwarded from a host whose clock is 10 minutes fast
        record.cio = {"customer_id": "fast-host", "id": "01J0000000000000000000FA57"}
        logger.handle(record)
        started = time.monotonic()
        handler.flush()
        print(f"flush took {time.monotonic() - started:.2f} s")
        assert "01J0000000000000000000FA57" in simulator.accepted_ids()


class TestRetryAfterDate:
    """A Retry-After given as an HTTP date is read on the server's clock, not ours."""

    def test_our_clock_an_hour_behind(self, simulator: TrackAPISimulator, start_child: Any) -> None:
        """ "Retry at <server time + 2 s>" holds delivery ~2 s, not max_retry_after."""
        child = start_child(consecutive_failures=100, volume_threshold=1000, max_in_flight=1)
        child.step(-HOUR)
        simulator.fail(
            429, count=1, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True)
        )
        ids = child.log(3)
        elapsed = seconds_until_delivered(simulator, ids, 15)
        first, second = simulator.requests[0], simulator.requests[1]
        print(f"delivered {elapsed:.2f} s after logging; held {second.time - first.time:.2f} s")
        assert first.status == 429
        assert second.time - first.time < 5


class TestExpiry:
    """max_event_age is not reached by a clock step."""

    def test_forward_step_of_four_days(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """Queued during an outage, the clock steps 4 days forward: delivered, not expired."""
        simulator.fail(503)
        child = start_child(consecutive_failures=100, volume_threshold=1000, max_backoff=0.5)
        ids = child.log(5)
        assert wait_for(lambda: child.status()["retries_scheduled"] >= 5, 10)
        child.step(4 * DAY)
        simulator.clear_faults()
        seconds_until_delivered(simulator, ids, 15)
        assert child.status()["dead_lettered"] == 0


class TestRestart:
    """Due times are persisted as wall-clock times; a restart under a stepped clock copes."""

    def test_restart_with_the_clock_an_hour_back(
        self, simulator: TrackAPISimulator, start_child: Any
    ) -> None:
        """Retries scheduled, process gone, clock back an hour: the next process sends them."""
        simulator.fail(503)
        first = start_child(consecutive_failures=100, volume_threshold=1000, max_backoff=0.5)
        ids = first.log(5)
        assert wait_for(lambda: first.status()["retries_scheduled"] >= 5, 10)
        first.close()
        simulator.clear_faults()
        second = start_child(offset=-HOUR)
        started = time.monotonic()
        seconds, queued = second.ask("flush")
        elapsed = seconds_until_delivered(simulator, ids, 15)
        total = time.monotonic() - started
        print(f"after the restart: flush {seconds} s, all delivered in {total:.2f} s")
        assert queued == "0"
        assert elapsed < 6
