"""The sender's defects found from outside (issue 20), each on both APIs against real
HTTPS to the simulator. Each of these failed on the sender this one replaced.

Self-contained on purpose (fixtures from conftest, helpers written here): the same file
ran against the old code to see it fail.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cio_logging import CustomerIOHandler, cio_delete, cio_event, cio_identify
from cio_logging.simulator import TrackAPISimulator

HandlerFactory = Callable[..., CustomerIOHandler]
APIS = ["track", "pipelines"]
PERSON = "p-1"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition`` came true within ``timeout`` (a bound, never a precondition)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"defects.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def cli(
    simulator: TrackAPISimulator, queue_dir: Path, api: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        {
            "CIO_LOGGING_API": api,
            "CUSTOMERIO_SITE_ID": simulator.site_id,
            "CUSTOMERIO_API_KEY": simulator.api_key,
            "CUSTOMERIO_CDP_API_KEY": simulator.api_key,
            "CIO_LOGGING_TRACK_URL": simulator.url,
            "CIO_LOGGING_CA_BUNDLE": simulator.ca_file,
            "CIO_LOGGING_QUEUE_DIR": str(queue_dir),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "cio_logging.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def calls_of(simulator: TrackAPISimulator, person: str) -> list[str]:
    """The person's calls as the server accepted them, in order: "event:name", "delete"."""
    return [
        f"event:{call.name}" if call.call == "event" else call.call
        for call in simulator.history(person)
    ]


@pytest.mark.parametrize("api", APIS)
class TestReplayKeepsAPersonsOrder:
    """``dlq replay`` went around the order rule: an identify dead-lettered before a
    person's events and delete was replayed after them, re-creating a deleted person."""

    def test_a_call_is_not_replayed_after_a_delete_of_its_person(
        self,
        api: str,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        queue_dir: Path,
    ) -> None:
        handler = make_handler()
        logger = attach(handler)
        # The identify is refused (a 400 naming a field): dead-lettered alone.
        simulator.fail(400, count=1, body={"meta": {"errors": ["email: invalid"]}})
        logger.info("identify", extra=cio_identify(PERSON, email="bad"))
        assert wait_for(lambda: handler.status()["dead_letters"] == 1)
        # Then the person's events and a delete go through.
        logger.info("first", extra=cio_event(PERSON))
        logger.info("second", extra=cio_event(PERSON))
        logger.info("delete", extra=cio_delete(PERSON))
        assert wait_for(lambda: len(calls_of(simulator, PERSON)) == 3)
        handler.close()
        result = cli(simulator, queue_dir, api, "dlq", "replay", "--event", "identify")
        # The identify would now land after the delete: not replayed, and said so,
        # with what it would land behind.
        assert calls_of(simulator, PERSON) == ["event:first", "event:second", "delete"]
        assert result.returncode == 1, result.stdout + result.stderr
        assert "delete" in result.stdout
        assert "--after-delete" in result.stdout + result.stderr

    def test_a_replayed_call_goes_ahead_of_its_persons_queued_calls(
        self,
        api: str,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        queue_dir: Path,
    ) -> None:
        handler = make_handler()
        logger = attach(handler)
        simulator.fail(400, count=1, body={"meta": {"errors": ["email: invalid"]}})
        logger.info("identify", extra=cio_identify(PERSON, email="bad"))
        assert wait_for(lambda: handler.status()["dead_letters"] == 1)
        handler.close()
        # The person's next calls are logged where nothing sends (deliver="none").
        quiet = make_handler(deliver="none")
        logger = attach(quiet)
        logger.info("first", extra=cio_event(PERSON))
        logger.info("second", extra=cio_event(PERSON))
        quiet.close()
        result = cli(simulator, queue_dir, api, "dlq", "replay", "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ahead of 2 queued call(s)" in result.stdout
        drained = cli(simulator, queue_dir, api, "drain", "--timeout", "60")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert calls_of(simulator, PERSON) == ["identify", "event:first", "event:second"]


@pytest.mark.parametrize("api", APIS)
def test_a_storm_of_400s_no_call_explains_dead_letters_nothing(
    api: str, make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    """Every request answered ``400 {"meta":{"error":"Bad Request"}}`` (a proxy, a bad
    deploy): nothing is dead-lettered, the breaker opens, and everything is delivered
    once the storm ends. (All 110 calls were dead-lettered as http_400, after 218
    requests bisecting down to single calls; the breaker stayed closed.)"""
    handler = make_handler(consecutive_failures=5, reset_timeout=1.0, max_attempts=8)
    logger = attach(handler)
    simulator.fail(400, body={"meta": {"error": "Bad Request"}})
    for number in range(110):
        logger.info("purchase", extra=cio_event(f"u{number % 7}", n=number))
    # Until the breaker opens, or (as before) calls are dead-lettered one by one.
    assert wait_for(
        lambda: handler.status()["breaker"] == "open" or handler.status()["dead_letters"] > 0
    )
    assert handler.status()["dead_letters"] == 0
    storm_requests = len(simulator.requests)
    simulator.clear_faults()
    assert wait_for(lambda: len(simulator.accepted) == 110, 60), len(simulator.accepted)
    assert handler.status()["dead_letters"] == 0
    assert storm_requests < 60  # not a bisection down to every single call


@pytest.mark.parametrize("api", APIS)
def test_one_invalid_call_among_a_thousand_is_dead_lettered_alone(
    api: str, make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    """The bisection still finds a genuinely invalid call, in about 20 requests."""
    simulator.poison("poison_pill")
    handler = make_handler(batch_size=1000, deliver="none")
    logger = attach(handler)
    for number in range(1000):
        name = "poison_pill" if number == 617 else "purchase"
        logger.info(name, extra=cio_event(f"u{number % 50}", n=number))
    handler.close()
    sender = make_handler(batch_size=1000, max_requests_per_second=1000)
    assert wait_for(lambda: len(simulator.accepted) == 999, 60)
    assert wait_for(lambda: sender.status()["dead_letters"] == 1)
    assert [letter.event_name for letter in sender._dead_letters] == ["poison_pill"]
    assert len(simulator.requests) <= 22


def test_a_207_whose_errors_name_no_call_dead_letters_nothing(
    make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    """A 207 with a batch_index that is not an integer: the server accepted the
    request. (It was resent 20 times, then its calls dead-lettered as max_attempts.)
    The Track API's answer only: the Pipelines API answers a batch whole."""
    simulator.fail(
        207,
        body={"errors": [{"batch_index": "0", "reason": "invalid", "field": "name"}]},
        accept=True,
    )
    # All five on disk before anything sends, so they go in one request whatever the
    # machine's speed (a sender reading while they were logged could split them).
    filler = make_handler(deliver="none")
    logger = attach(filler)
    for number in range(5):
        logger.info("purchase", extra=cio_event(f"u{number}"))
    logger.removeHandler(filler)
    filler.close()
    handler = make_handler(max_attempts=3)
    handler.start_delivery()
    assert wait_for(lambda: handler.status()["queued"] == 0)
    assert len(simulator.accepted) == 5
    assert handler.status()["dead_letters"] == 0
    assert len(simulator.requests) == 1  # nothing resent
    assert handler.status()["uncertain"] == 1  # counted, and reported


@pytest.mark.parametrize("api", APIS)
def test_a_long_retry_after_is_a_hold_seen_everywhere(
    api: str, make_handler: HandlerFactory, simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    """A 429 with Retry-After: 3600 stalled delivery for 10 minutes (max_retry_after)
    unseen: status() showed no hold, `cio-logging status` "delivery paused no",
    state.json nothing, and flush() returned at once as if all were well."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    simulator.fail(429, count=1, retry_after="3600")
    handler = make_handler(meter_provider=MeterProvider(metric_readers=[reader]))
    logger = attach(handler)
    logger.info("purchase", extra=cio_event("u1"))
    assert wait_for(lambda: len(simulator.requests) == 1)
    started = time.monotonic()
    assert handler.flush() is False  # the event waits behind the hold
    assert time.monotonic() - started < 5
    hold = handler.status()["hold"]
    assert hold is not None
    assert hold["reason"] == "retry_after"
    assert 500 < hold["seconds"] <= 600  # capped by max_retry_after
    state = json.loads((queue_dir / "state.json").read_text())
    assert state["hold"]["reason"] == "retry_after"
    shown = cli(simulator, queue_dir, api, "status", "--json")
    assert json.loads(shown.stdout)["hold"]["reason"] == "retry_after"
    text = cli(simulator, queue_dir, api, "status")
    assert "held" in text.stdout, text.stdout
    assert "retry_after" in text.stdout, text.stdout
    data = reader.get_metrics_data()
    assert data is not None
    holds = [
        getattr(point, "value", 0)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "cio.delivery.hold"
        for point in metric.data.data_points
    ]
    assert holds
    assert max(holds) > 500


@pytest.mark.parametrize("api", APIS)
def test_a_connection_error_through_a_proxy_names_the_proxy(
    api: str,
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTPS_PROXY set, "connection refused" may be the proxy's: say so."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:proxy-secret@127.0.0.1:{port}")
    handler = make_handler()
    attach(handler).info("purchase", extra=cio_event("u1"))
    assert wait_for(lambda: handler.status()["last_error"] is not None)
    error = handler.status()["last_error"]
    assert f"http://127.0.0.1:{port}" in error
    assert "HTTPS_PROXY" in error
    assert "proxy-secret" not in error
