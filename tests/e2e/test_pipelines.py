"""Every call on both APIs, end to end: real HTTPS to the simulator through the real
clients. Each call type arrives as the API's spec describes; the Pipelines API gets
strict mode on every request; a bad call is dead-lettered alone; credentials pause."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import requests

from cio_logging import (
    CustomerIOHandler,
    cio_delete,
    cio_event,
    cio_identify,
    cio_page,
    cio_screen,
    cio_suppress,
    cio_unsuppress,
)
from cio_logging.simulator import TrackAPISimulator
from cio_logging.transport.pipelines import SEMANTIC_EVENTS

from ..helpers import APIS, HandlerFactory, handler_settings, run_cli, wait_for
from ..spec_check import (
    ANONYMOUS_EVENTS_REQUEST,
    BATCH_BODY,
    PIPELINES_BATCH_BODY,
    PIPELINES_CALLS,
    PIPELINES_SEMANTIC,
    Spec,
    load_spec,
)


def _logger(handler: CustomerIOHandler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"test.pipelines.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    return logger


def _log_every_call(logger: logging.Logger, api: str) -> int:
    """One of each call (and the anonymous ones the API carries); how many."""
    logger.info("identify", extra=cio_identify("u-1", email="ann@example.com", plan="pro"))
    logger.info("purchase", extra=cio_event("u-1", amount=9.99, sku="A-1"))
    logger.info("page", extra=cio_page("u-1", "/pricing", referrer="ads"))
    logger.info("screen", extra=cio_screen("u-1", "Home", build=7))
    logger.info("suppress", extra=cio_suppress("u-2"))
    logger.info("unsuppress", extra=cio_unsuppress("u-2"))
    logger.info("delete", extra=cio_delete("u-3"))
    logger.info("visit", extra=cio_event(anonymous_id="anon-1", source="ad"))
    logger.info("landing", extra=cio_page(anonymous_id="anon-1", name="/"))
    count = 9
    if api == "pipelines":
        logger.info("identify", extra=cio_identify(anonymous_id="anon-2", plan="trial"))
        count += 1
    return count


@pytest.mark.parametrize("api", APIS)
def test_every_call_arrives_as_logged(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, api: str
) -> None:
    simulator.record_bodies = True
    handler = make_handler()
    count = _log_every_call(_logger(handler, f"every.{api}"), api)
    handler.flush()
    arrived = {
        (call.call, call.name, call.customer_id, call.anonymous_id) for call in simulator.accepted
    }
    assert len(simulator.accepted) == count, simulator.accepted
    assert {call.api for call in simulator.accepted} == {api}
    expected = {
        ("identify", "identify", "u-1", None),
        ("event", "purchase", "u-1", None),
        ("page", "/pricing", "u-1", None),
        ("screen", "Home", "u-1", None),
        ("suppress", "suppress", "u-2", None),
        ("unsuppress", "unsuppress", "u-2", None),
        ("delete", "delete", "u-3", None),
        ("event", "visit", None, "anon-1"),
        ("page", "/", None, "anon-1"),
    }
    assert expected <= arrived
    by_call = {call.call: call for call in simulator.accepted if call.customer_id == "u-1"}
    assert by_call["identify"].data == {"email": "ann@example.com", "plan": "pro"}
    assert by_call["event"].data == {"amount": 9.99, "sku": "A-1"}
    assert by_call["page"].data == {"referrer": "ads"}
    assert by_call["screen"].data == {"build": 7}
    # A person's calls arrived in the order they were logged.
    assert [call.call for call in simulator.history("u-1")] == [
        "identify",
        "event",
        "page",
        "screen",
    ]
    assert [call.call for call in simulator.history("u-2")] == ["suppress", "unsuppress"]
    if api == "pipelines":
        for request in simulator.requests:
            assert request.path == "/v1/batch"
            assert request.strict  # X-Strict-Mode: 1, every time
            for call in request.payload["batch"]:
                # An identify goes without a context: the published identify reads any
                # context as both mobile and non-mobile, and refuses it.
                if call["type"] == "identify":
                    assert "context" not in call
                else:
                    assert call["context"]["library"]["name"] == "cio_logging"
                assert call["timestamp"].endswith("Z")
                assert len(call["messageId"]) == 26


def test_pipelines_requests_are_basic_auth_with_the_key_and_a_blank_password(
    make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    handler = make_handler(api="pipelines", site_id=None)  # no site id needed
    _logger(handler, "auth").info("purchase", extra=cio_event("u-1"))
    handler.flush()
    assert len(simulator.accepted) == 1
    assert "site_id" not in repr(handler)
    assert simulator.api_key not in repr(handler)


def test_without_strict_mode_the_api_answers_200_and_drops_an_oversized_call(
    simulator: TrackAPISimulator, make_handler: HandlerFactory
) -> None:
    """Why the header matters: a 200 alone proves nothing. The handler never sends such
    a call (it is refused at emit) and always sends the header."""
    key = base64.b64encode(f"{simulator.api_key}:".encode()).decode()
    call = {"type": "track", "userId": "u-1", "event": "big", "properties": {"x": "y" * 40_000}}
    body = json.dumps({"batch": [call, {"type": "track", "userId": "u-1", "event": "small"}]})
    headers = {"Authorization": f"Basic {key}", "Content-Type": "application/json"}
    url = f"{simulator.url}/v1/batch"
    lax = requests.post(url, data=body, headers=headers, verify=simulator.ca_file, timeout=10)
    assert lax.status_code == 200
    assert simulator.silently_dropped == 1
    assert [c.name for c in simulator.accepted] == ["small"]
    strict = requests.post(
        url,
        data=body,
        headers={**headers, "X-Strict-Mode": "1"},
        verify=simulator.ca_file,
        timeout=10,
    )
    assert strict.status_code == 400

    handler = make_handler(api="pipelines")
    logger = _logger(handler, "strict")
    logger.info("big", extra=cio_event("u-1", x="y" * 40_000))
    assert handler.status()["refused"] == {"call_too_large": 1}
    assert handler.status()["queued"] == 0


@pytest.mark.parametrize("api", APIS)
def test_a_call_the_api_rejects_is_dead_lettered_alone(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, api: str
) -> None:
    simulator.poison("poison_pill")
    handler = make_handler(batch_size=10)
    logger = _logger(handler, f"poison.{api}")
    for number in range(6):
        logger.info("poison_pill" if number == 3 else "purchase", extra=cio_event(f"u-{number}"))
    handler.flush()
    assert wait_for(lambda: len(simulator.accepted) == 5)
    status = handler.status()
    assert status["dead_letters"] == 1
    assert status["queued"] == 0


def test_refused_credentials_pause_pipelines_delivery_and_dead_letter_nothing(
    tmp_path: Path, simulator: TrackAPISimulator
) -> None:
    settings: dict[str, Any] = {
        "api": "pipelines",
        "api_key": "not-the-key",
        "track_url": simulator.url,
        "ca_bundle": simulator.ca_file,
        "queue_dir": str(tmp_path / "queue"),
        "flush_interval": 0.05,
    }
    handler = CustomerIOHandler(**settings)
    try:
        _logger(handler, "refused").info("purchase", extra=cio_event("u-1"))
        assert wait_for(lambda: bool(handler.status()["delivery_paused"]))
        status = handler.status()
        assert status["dead_letters"] == 0
        assert status["queued"] == 1
        assert "401" in str(status["delivery_paused"])
    finally:
        handler.close()


def test_what_the_handler_sends_conforms_to_both_published_specs(
    simulator: TrackAPISimulator,
    spec: Spec,
    pipelines_spec: Spec,
    tmp_path: Path,
) -> None:
    """Every call type, through the real clients, against each API's own spec."""
    simulator.record_bodies = True
    for api in APIS:
        handler = CustomerIOHandler(
            **handler_settings(simulator, tmp_path / f"queue-{api}", api=api)
        )
        try:
            _log_every_call(_logger(handler, f"spec.{api}"), api)
            handler.flush()
        finally:
            handler.close()
    paths = set()
    for request in simulator.requests:
        assert request.status == 200, request
        paths.add(request.path)
        if request.path == "/v1/batch":
            assert pipelines_spec.errors(PIPELINES_BATCH_BODY, request.payload) == []
            for call in request.payload["batch"]:
                semantic = {v: k for k, v in SEMANTIC_EVENTS.items()}.get(call.get("event"))
                pointer = (
                    PIPELINES_SEMANTIC[semantic] if semantic else PIPELINES_CALLS[call["type"]]
                )
                assert pipelines_spec.errors(pointer, call) == [], call
        elif request.path == "/api/v2/batch":
            assert spec.errors(BATCH_BODY, request.payload) == []
        else:
            assert request.path == "/api/v1/events"
            # An anonymous page view matches two of its overlapping oneOf alternatives.
            lenient = load_spec(literal=False)
            assert lenient is not None
            assert lenient.errors(ANONYMOUS_EVENTS_REQUEST, request.payload) == []
    assert paths == {"/v1/batch", "/api/v2/batch", "/api/v1/events"}


def test_the_operator_cli_replays_and_drains_on_the_pipelines_api(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    """dlq replay and drain go through the Pipelines client with CIO_LOGGING_API set."""
    simulator.poison("poison_pill")
    handler = make_handler(api="pipelines")
    logger = _logger(handler, "cli")
    logger.info("poison_pill", extra=cio_event("u-1"))
    logger.info("purchase", extra=cio_event("u-2"))
    handler.flush()
    assert wait_for(lambda: handler.status()["dead_letters"] == 1)
    handler.close()
    simulator.clear_poison()
    replayed = run_cli(simulator, queue_dir, "dlq", "replay", api="pipelines")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert {call.name for call in simulator.accepted} == {"poison_pill", "purchase"}

    simulator.fail(503)  # an outage: what the next handler logs stays on disk
    later = make_handler(api="pipelines", max_attempts=1000)
    _logger(later, "cli-later").info("signup", extra=cio_event("u-3"))
    later.close()
    simulator.clear_faults()
    drained = run_cli(simulator, queue_dir, "drain", api="pipelines")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "signup" in {call.name for call in simulator.accepted}
    assert all(request.path == "/v1/batch" for request in simulator.requests)
