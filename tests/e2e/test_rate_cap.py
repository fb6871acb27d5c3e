"""The request-rate cap holds where Customer.io measures it: at the server, by arrival."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

from cio_logging import CustomerIOHandler
from cio_logging.resilience import RequestRateCap
from cio_logging.simulator import TrackAPISimulator

from ..helpers import PYTHON, handler_settings, wait_for

CAP = 5
EVENTS = 200
BLOB = "x" * 30_000  # 30 KB: about 16 events a request, under 32 KB an item


def most_in_one_second(times: list[float]) -> int:
    """The most arrivals any sliding one-second window holds."""
    ordered = sorted(times)
    most = first = 0
    for last, moment in enumerate(ordered):
        while ordered[first] <= moment - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def log_large_events(handler: CustomerIOHandler, name: str) -> None:
    logger = logging.getLogger(f"test.rate.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for number in range(EVENTS):
        logger.info(
            "page_viewed",
            extra={"cio": {"customer_id": f"{name}-{number}", "data": {"blob": BLOB}}},
        )
    logger.removeHandler(handler)


class TestAtTheServer:
    """max_requests_per_second=5, 4 batches in flight, 200 events of 30 KB."""

    def _handler(self, simulator: TrackAPISimulator, queue_dir: Path) -> CustomerIOHandler:
        return CustomerIOHandler(
            **handler_settings(
                simulator,
                queue_dir,
                max_requests_per_second=CAP,
                max_in_flight=4,
                batch_size=16,
                flush_timeout=60.0,
            )
        )

    def test_one_handler(self, simulator: TrackAPISimulator, tmp_path: Path) -> None:
        """No one-second window of arrivals holds more than the cap."""
        handler = self._handler(simulator, tmp_path / "queue")
        try:
            log_large_events(handler, "one")
            assert simulator.wait_for_events(EVENTS, timeout=60)
        finally:
            handler.close()
        arrivals = [request.arrived_at for request in simulator.requests]
        assert len(arrivals) >= EVENTS // 16
        assert most_in_one_second(arrivals) <= CAP

    def test_two_handlers_on_one_workspace_share_the_cap(
        self, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        """Same site id and endpoint, two queues: together, still the cap."""
        handlers = [self._handler(simulator, tmp_path / f"queue-{n}") for n in range(2)]
        try:
            loggers = [
                threading.Thread(target=log_large_events, args=(handler, f"h{n}"))
                for n, handler in enumerate(handlers)
            ]
            for thread in loggers:
                thread.start()
            for thread in loggers:
                thread.join()
            assert simulator.wait_for_events(2 * EVENTS, timeout=90)
        finally:
            for handler in handlers:
                handler.close()
        arrivals = [request.arrived_at for request in simulator.requests]
        assert len({request.user_agent for request in simulator.requests}) == 1  # one process
        assert most_in_one_second(arrivals) <= CAP


class TestRetryAfterOnOneWorkspace:
    """Customer.io asked every client to wait: every handler of the process waits."""

    def test_a_retry_after_answered_to_one_handler_holds_the_other(
        self, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        handlers = [
            CustomerIOHandler(**handler_settings(simulator, tmp_path / f"queue-{n}"))
            for n in range(2)
        ]
        loggers = []
        for n, handler in enumerate(handlers):
            logger = logging.getLogger(f"test.rate.retry_after.{n}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            loggers.append(logger)
        try:
            simulator.fail(429, count=1, retry_after="2")
            loggers[0].info("purchase", extra={"cio": {"customer_id": "first", "data": {}}})
            worker = handlers[0]._worker
            assert wait_for(lambda: worker._held_until > time.monotonic())  # it was told
            loggers[1].info("purchase", extra={"cio": {"customer_id": "second", "data": {}}})
            assert simulator.wait_for_events(2, timeout=20)
        finally:
            for handler in handlers:
                handler.close()
        refused = next(r for r in simulator.requests if r.status == 429)
        later = [r for r in simulator.requests if r.arrived_at > refused.arrived_at]
        assert later
        assert min(r.arrived_at for r in later) > refused.arrived_at + 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NoWait(threading.Event):
    """A stop event that never sleeps: acquire() gives up where it would wait."""

    def wait(self, timeout: float | None = None) -> bool:
        return True


class TestSlots:
    """A slot counts from before the request goes out until a second after its answer."""

    def test_a_slot_is_held_while_in_flight_and_a_second_after_the_answer(self) -> None:
        clock = FakeClock()
        cap = RequestRateCap(1, clock=clock, stop=NoWait())
        slot = cap.acquire()
        assert slot is not None
        clock.now = 5.0  # a slow answer: still in flight, however long ago it was taken
        assert cap.acquire() is None
        slot.release()
        clock.now = 5.9
        assert cap.acquire() is None
        clock.now = 6.0
        assert cap.acquire() is not None

    def test_a_request_never_sent_frees_its_slot_at_once(self) -> None:
        cap = RequestRateCap(1, clock=FakeClock(), stop=NoWait())
        slot = cap.acquire()
        assert slot is not None
        slot.cancel()
        slot.release()  # idempotent: the first call decided
        assert cap.acquire() is not None

    def test_one_workspace_shares_slots_and_another_does_not(self) -> None:
        first = RequestRateCap(2, stop=NoWait(), workspace=("site-a", "https://x:1"))
        second = RequestRateCap(2, stop=NoWait(), workspace=("site-a", "https://x:1"))
        other = RequestRateCap(2, stop=NoWait(), workspace=("site-b", "https://x:1"))
        taken = [first.acquire(), second.acquire()]
        assert all(taken)
        assert first.acquire() is None
        assert second.acquire() is None
        assert other.acquire() is not None

    def test_a_forked_child_starts_with_no_slot_taken(self) -> None:
        """The parent's requests in flight are not the child's, nor its locks."""
        script = (
            "import os, threading\n"
            "from cio_logging.resilience import RequestRateCap\n"
            "class NoWait(threading.Event):\n"
            "    def wait(self, timeout=None): return True\n"
            "cap = RequestRateCap(1, stop=NoWait(), workspace=('s', 'u'))\n"
            "assert cap.acquire() is not None\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    child = RequestRateCap(1, stop=NoWait(), workspace=('s', 'u'))\n"
            "    os._exit(0 if child.acquire() is not None else 3)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "assert cap.acquire() is None\n"
            "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
        )
        result = subprocess.run(
            [PYTHON, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
