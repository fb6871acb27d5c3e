"""Failure handling end to end, driven by the simulator's fault injection over HTTPS."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cio_logging import ConfigurationError, CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator
from cio_logging.state_record import read_state
from cio_logging.store import WriteAheadLog

from ..helpers import HandlerFactory, replay_into, wait_for


def attach(handler: CustomerIOHandler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"failures.{name}.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def log_events(logger: logging.Logger, count: int, name: str = "purchase", **data: Any) -> None:
    for number in range(count):
        logger.info(name, extra=cio_event(f"user-{number}", n=number, **data))


class TestCircuitBreaker:
    """Outages open the breaker; sending stops; a half-open probe finds recovery."""

    @pytest.mark.parametrize("outage", ["503", "timeout", "refused"])
    def test_outage_opens_then_recovery_closes(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, outage: str
    ) -> None:
        handler = make_handler(
            batch_size=1,
            max_in_flight=1,  # exactly three requests open it (more could be in flight)
            consecutive_failures=3,
            reset_timeout=2.0,  # no probe during the checks below, however slow the machine
            request_timeout=0.3,
            max_backoff=0.05,
            max_attempts=1000,
        )
        logger = attach(handler, outage)
        if outage == "503":
            simulator.fail(503)
        elif outage == "timeout":
            simulator.set_latency(1.0)  # slower than request_timeout
        else:
            simulator.refuse_connections()
        log_events(logger, 20)
        # pybreaker reports "open" a moment before the worker counts that last failure.
        assert wait_for(
            lambda: (
                handler.status()["breaker"] == "open" and handler.status()["failed_requests"] >= 3
            ),
            10,
        )
        opened = handler.status()
        # The delivering process records the transition for `cio-logging status`.
        recorded = read_state(Path(opened["queue_dir"]))
        assert recorded is not None
        assert recorded["breaker"] == "open"
        assert recorded["pid"] == os.getpid()
        # Opened within its threshold: three failed requests in a row.
        assert opened["failed_requests"] == 3
        # While open, nothing is sent (the rejected calls never reach the network).
        # The simulator records a request when it answers, after its latency, so with
        # timeouts the client's own count is the one to watch.
        requests_when_opened = len(simulator.requests)
        time.sleep(0.3)
        if outage != "timeout":
            assert len(simulator.requests) == requests_when_opened
        assert handler.status()["failed_requests"] == 3
        # Recovery: the next probe succeeds and the breaker closes; everything arrives.
        simulator.clear_faults()
        simulator.set_latency(0)
        if outage == "refused":
            simulator.start()
        assert wait_for(lambda: len(simulator.accepted) == 20, 20)
        assert handler.status()["breaker"] == "closed"
        transitions = handler._sender.stats.breaker_transitions
        assert transitions[0] == ("closed", "open")
        assert ("open", "half-open") in transitions
        assert transitions[-1] == ("half-open", "closed")
        assert handler.status()["dead_letters"] == 0
        assert sorted(e.data["n"] for e in simulator.accepted) == list(range(20))

    def test_failing_probe_reopens_and_the_worker_waits_instead_of_spinning(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(
            batch_size=1,
            max_in_flight=1,  # exactly two requests open it (more could be in flight)
            consecutive_failures=2,
            reset_timeout=0.5,
            max_backoff=0.05,
            max_attempts=1000,
        )
        logger = attach(handler, "probe")
        simulator.fail(503)
        log_events(logger, 10)
        time.sleep(2.2)  # ~4 reset periods of a broken Customer.io

        def probes() -> int:
            return len(simulator.requests) - 2  # after the two that opened it

        # One probe per reset_timeout, not a busy loop (a busy machine makes fewer).
        assert probes() <= 5
        assert wait_for(lambda: probes() >= 2, 10)  # and it goes on probing
        # Each failed probe opened it again. The simulator records a request before it
        # answers and the client its transition after, so the two may briefly differ.
        transitions = handler._sender.stats.breaker_transitions
        assert wait_for(lambda: transitions.count(("half-open", "open")) == probes(), 5)
        simulator.clear_faults()
        assert wait_for(lambda: len(simulator.accepted) == 10, 10)

    def test_payload_errors_do_not_open_the_breaker(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(batch_size=1, consecutive_failures=2)
        logger = attach(handler, "payload")
        simulator.poison_names = {"poison"}
        log_events(logger, 6, name="poison")
        log_events(logger, 2, name="fine")
        handler.flush()
        status = handler.status()
        assert status["breaker"] == "closed"
        assert (status["dead_letters"], len(simulator.accepted)) == (6, 2)


class TestRetries:
    """429, Retry-After, slow answers; attempt and age limits; persistence."""

    def test_429_with_retry_after_waits_that_long(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(max_in_flight=1)  # a request already out is not recalled
        logger = attach(handler, "retry_after")
        simulator.fail(429, count=1, retry_after="1")
        log_events(logger, 5)
        assert wait_for(lambda: len(simulator.accepted) == 5, 10)
        first, second = simulator.requests[0], simulator.requests[1]
        assert first.status == 429
        assert second.time - first.time >= 0.95

    def test_429_without_retry_after_backs_off_and_delivers(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(max_backoff=0.3)
        logger = attach(handler, "no_retry_after")
        simulator.fail(429, count=2)
        log_events(logger, 5)
        assert wait_for(lambda: len(simulator.accepted) == 5, 10)
        assert [r.status for r in simulator.requests[:2]] == [429, 429]
        assert handler.status()["dead_letters"] == 0

    def test_answers_slower_than_request_timeout_are_retried(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(request_timeout=0.3, max_backoff=0.1)
        logger = attach(handler, "slow")
        simulator.set_latency(0.8)
        log_events(logger, 3)
        assert wait_for(lambda: handler.status()["failed_requests"] >= 1, 10)
        assert "no answer within 0.3 s" in str(handler.status()["last_error"])
        simulator.set_latency(0)
        assert wait_for(lambda: len(simulator.accepted) == 3, 10)

    def test_attempt_limit_dead_letters_with_the_last_error(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(
            max_attempts=3, max_backoff=0.05, consecutive_failures=1000, volume_threshold=1000
        )
        logger = attach(handler, "attempts")
        simulator.fail(503)
        log_events(logger, 2)
        assert wait_for(lambda: handler.status()["dead_letters"] == 2, 15)
        for letter in handler._dead_letters:
            assert (letter.error_type, letter.attempts, letter.status) == ("max_attempts", 3, 503)
            assert "HTTP 503" in letter.message
        assert handler.status()["queued"] == 0

    def test_age_limit_dead_letters_an_event_logged_too_long_ago(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(max_event_age=3600)
        logger = attach(handler, "age")
        old = logger.makeRecord(
            logger.name, logging.INFO, "app.py", 1, "purchase", (), None, extra=cio_event("user-1")
        )
        old.created -= 2 * 3600  # the clock the age rule reads: the record's own time
        logger.handle(old)
        log_events(logger, 1, name="fresh")
        handler.flush()
        assert [e.name for e in simulator.accepted] == ["fresh"]
        (letter,) = list(handler._dead_letters)
        assert letter.error_type == "expired"
        assert "max_event_age" in letter.message

    def test_attempt_counts_survive_a_restart(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        options = {
            "max_attempts": 5,
            "max_backoff": 0.05,
            "consecutive_failures": 1000,
            "volume_threshold": 1000,
        }
        simulator.fail(503)
        first = make_handler(**options)
        attach(first, "restart").info("purchase", extra=cio_event("user-1"))

        def attempts_on_disk() -> int:
            events = WriteAheadLog(queue_dir / "wal").read_due(10, now=float("inf")).events
            return events[0].attempts if events else -1

        assert wait_for(lambda: attempts_on_disk() >= 2, 10)
        first.close()
        carried = attempts_on_disk()
        assert 2 <= carried < 5
        second = make_handler(**options)
        assert wait_for(lambda: second.status()["dead_letters"] == 1, 15)
        (letter,) = list(second._dead_letters)
        assert letter.attempts == 5  # counted on from where the first process left off


class TestShutdownDuringWaits:
    """close() cuts every wait short: Retry-After holds, open breakers, rate-cap slots."""

    @pytest.mark.parametrize("wait", ["retry_after", "breaker_open"])
    def test_close_is_prompt(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, wait: str
    ) -> None:
        handler = make_handler(consecutive_failures=1, reset_timeout=60, max_retry_after=600)
        logger = attach(handler, wait)
        if wait == "retry_after":
            simulator.fail(429, retry_after="300")
        else:
            simulator.fail(503)
        log_events(logger, 3)
        assert wait_for(lambda: handler.status()["failed_requests"] >= 1, 10)
        started = time.monotonic()
        handler.close()
        assert time.monotonic() - started < 1.0
        assert handler.status()["queued"] == 3  # left on disk for the next process


class TestCredentials:
    """401/403 pause delivery without dead-lettering; it resumes by itself."""

    @pytest.mark.parametrize("how", ["401", "403"])
    def test_wrong_credentials_pause_then_resume(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        how: str,
    ) -> None:
        handler = make_handler(auth_retry_interval=0.2, max_attempts=2)
        logger = attach(handler, f"auth{how}")
        key_in_use = simulator.api_key
        if how == "401":  # the key was rotated on Customer.io's side
            simulator.set_credentials(simulator.site_id, "a-rotated-key")
        else:
            simulator.fail(403)
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            log_events(logger, 5)
            assert wait_for(lambda: handler.status()["failed_requests"] >= 4, 10)
            status = handler.status()
            assert status["dead_letters"] == 0  # more failures than max_attempts, none lost
            assert status["queued"] == 5
            assert f"HTTP {how}" in str(status["delivery_paused"])
            assert status["breaker"] == "closed"
            if how == "401":
                simulator.set_credentials(simulator.site_id, key_in_use)
            simulator.clear_faults()
            assert wait_for(lambda: len(simulator.accepted) == 5, 10)
            # The simulator records before its answer leaves; the worker logs after.
            assert wait_for(lambda: handler.status()["delivery_paused"] is None, 10)
        refusals = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert len(refusals) == 1  # one clear message, not one per retry
        assert refusals[0].levelno == logging.ERROR
        assert any("delivery resumed" in r.getMessage() for r in caplog.records)
        assert handler.status()["delivery_paused"] is None


class TestDegradation:
    """full, essential_only, disabled; and disk shedding. Every drop is counted."""

    def test_levels_at_run_time(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        logger = attach(handler, "levels")
        handler.set_degradation("essential_only")
        logger.info("purchase", extra=cio_event("u1"))
        logger.info("page_viewed", extra=cio_event("u1"))
        handler.set_degradation("disabled")
        logger.info("signup", extra=cio_event("u2"))
        handler.set_degradation("full")
        logger.info("page_viewed", extra=cio_event("u3"))
        handler.flush()
        assert sorted((e.name, e.customer_id) for e in simulator.accepted) == [
            ("page_viewed", "u3"),
            ("purchase", "u1"),
        ]
        status = handler.status()
        assert status["dropped"] == {"degradation_essential_only": 1, "degradation_disabled": 1}
        assert status["degradation"] == "full"

    def test_custom_essential_events_and_environment(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("CIO_LOGGING_DEGRADATION", "essential_only")
        handler = make_handler(essential_events=["checkout"])
        logger = attach(handler, "custom")
        logger.info("checkout", extra=cio_event("u1"))
        logger.info("purchase", extra=cio_event("u1"))
        handler.flush()
        assert [e.name for e in simulator.accepted] == ["checkout"]
        assert handler.status()["degradation"] == "essential_only"

    def test_bad_level_is_refused(self, make_handler: HandlerFactory) -> None:
        handler = make_handler()
        with pytest.raises(ConfigurationError, match="degradation"):
            handler.set_degradation("half")
        with pytest.raises(ConfigurationError, match="degradation"):
            make_handler(degradation="sometimes")

    def test_disk_limits_shed_non_essential_first_and_never_block(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        simulator.fail(503)  # nothing leaves the queue
        mib = 1 << 20
        handler = make_handler(
            max_queue_bytes=mib, hard_max_queue_bytes=2 * mib, max_attempts=1000, reset_timeout=0.2
        )
        logger = attach(handler, "disk")
        blob = "x" * 90_000
        log_events(logger, 14, name="page_viewed", blob=blob)  # ~1.3 MB: past the soft limit
        # The commit thread re-reads the size at most every 0.5 s after commits.
        assert wait_for(lambda: handler._committer.queue_bytes >= mib, 5)
        started = time.monotonic()
        logger.info("page_viewed", extra=cio_event("late", blob=blob))
        logger.info("purchase", extra=cio_event("late", blob=blob))
        assert time.monotonic() - started < 1.0
        assert handler.status()["dropped"] == {"disk_limit_non_essential": 1}
        log_events(logger, 12, name="purchase", blob=blob)  # past the hard limit
        assert wait_for(lambda: handler._committer.queue_bytes >= 2 * mib, 5)
        logger.info("purchase", extra=cio_event("very-late", blob=blob))
        assert handler.status()["dropped"]["disk_limit_hard"] >= 1
        simulator.clear_faults()
        queued = handler.status()["queued"]
        assert wait_for(lambda: len(simulator.accepted) == queued, 20)
        accepted = {e.customer_id for e in simulator.accepted if e.name == "purchase"}
        assert "late" in accepted
        assert "very-late" not in accepted


class TestRateCap:
    """Recovery is paced: never more than max_requests_per_second."""

    def test_requests_per_second_measured_at_the_simulator(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler(max_requests_per_second=5)
        logger = attach(handler, "rate")
        for number in range(16):  # anonymous events: one v1 request each
            logger.info("visit", extra=cio_event(anonymous_id=f"a{number}"))
        assert wait_for(lambda: len(simulator.accepted) == 16, 15)
        times = sorted(r.time for r in simulator.requests)
        busiest = max(sum(1 for t in times if start <= t < start + 0.95) for start in times)
        assert busiest <= 5
        assert times[-1] - times[0] >= 2.5  # 16 requests at 5/s take at least 3 windows


class TestDeadLetterAPI:
    """Count, list, replay (keeping the id) and purge."""

    def test_select_replay_purge(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        logger = attach(handler, "dlq")
        simulator.poison_names = {"bad_a", "bad_b"}
        log_events(logger, 3, name="bad_a")
        log_events(logger, 2, name="bad_b")
        handler.flush()
        store = handler._dead_letters
        assert store.count(by="event") == {"bad_a": 3, "bad_b": 2}
        assert store.count(by="reason") == {"item_rejected": 5}
        assert len(store.select(event="bad_a")) == 3
        assert len(store.select(reason="invalid name", limit=2)) == 2
        assert store.select(since=time.time() + 60) == []
        replayed = store.select(event="bad_a")
        simulator.poison_names = set()  # say the payload problem was fixed upstream
        assert replay_into(store, replayed, handler._wal) == 3
        handler._sender.notify()
        assert wait_for(lambda: len(simulator.accepted) == 3, 10)
        assert {e.id for e in simulator.accepted} == {letter.key for letter in replayed}
        assert store.purge(store.select(event="bad_b")) == 2
        assert len(store) == 0

    def test_an_event_replayed_into_the_log_fails_again_with_its_first_reason(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        """Replayed through the log in an outage: dead-lettered again with the first reason."""
        handler = make_handler(max_attempts=2, consecutive_failures=50)
        logger = attach(handler, "dlq-again")
        simulator.poison_names = {"bad_a"}
        log_events(logger, 2, name="bad_a")
        handler.flush()
        store = handler._dead_letters
        first = {letter.key: letter for letter in store.select()}
        assert {letter.error_type for letter in first.values()} == {"item_rejected"}
        simulator.clear_faults()
        simulator.fail(503)  # the outage: each is retried once, then given up on
        replayed_at = time.time()
        assert replay_into(store, list(first.values()), handler._wal) == 2
        handler._sender.notify()
        assert wait_for(lambda: len(store) == 2, 20)
        for letter in store.select():
            assert letter.error_type == "max_attempts"  # the latest reason
            assert letter.original == first[letter.key].latest  # the first, and its time
            assert letter.matches_reason("item_rejected")
            assert letter.replay_count == 1
            (record,) = letter.replays
            assert record.at >= replayed_at
            assert record.error_type == "max_attempts"
            assert record.failed_at >= record.at
            # Attempts add up; the first failure stays the first.
            assert letter.attempts == first[letter.key].attempts + 2
            assert letter.first_failure_at == first[letter.key].first_failure_at
        assert len(store.select(reason="item_rejected")) == 2
