"""Hostile input, generated: the caller never sees an exception, and every event is either
refused at emit with a message, or delivered as JSON the published spec accepts."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cio_logging import CustomerIOHandler
from cio_logging.simulator import TrackAPISimulator

from ..helpers import HandlerFactory
from ..spec_check import ANONYMOUS_EVENTS_REQUEST, BATCH_BODY, EVENTS_REQUEST, Spec


class _Opaque:
    """An object JSON cannot encode."""


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.builds(_Opaque),
    st.sampled_from(["\ud800", "x" * 40_000, "é" * 3]),
)
payloads = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4)
    ),
    max_leaves=12,
)
identifiers = st.one_of(
    st.none(),
    st.text(max_size=160),
    st.integers(),
    st.booleans(),
    st.floats(),
    st.sampled_from(["user/42", "../..", "a?b#c d", "", "   "]),
)
# Valid-looking events with awkward content: unicode and reserved characters in
# identifiers and names, nested JSON data. They must arrive intact and spec-valid.
json_only = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**53), max_value=2**53),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
non_blank = st.text(min_size=1, max_size=40).filter(lambda text: bool(text.strip()))
plausible = st.fixed_dictionaries(
    {"customer_id": st.one_of(non_blank, st.integers(min_value=0))},
    optional={
        "name": non_blank,
        "data": st.dictionaries(st.text(max_size=10), json_only, max_size=5),
    },
)
tags = st.one_of(
    plausible,
    st.fixed_dictionaries(
        {},
        optional={
            "customer_id": identifiers,
            "anonymous_id": identifiers,
            "name": st.one_of(st.text(max_size=120), st.integers(), st.none()),
            "data": st.one_of(
                st.dictionaries(st.text(max_size=10), payloads, max_size=4), payloads
            ),
            "timestamp": st.one_of(st.integers(), st.floats(), st.text(max_size=5)),
            "id": st.one_of(
                st.text(max_size=30), st.integers(), st.just("01ARZ3NDEKTSV4RRFFQ69G5FAV")
            ),
            "unexpected": st.integers(),
        },
    ),
    payloads,
)


@pytest.fixture
def quiet_handler(make_handler: HandlerFactory, simulator: TrackAPISimulator) -> CustomerIOHandler:
    simulator.record_bodies = True
    return make_handler()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tag=tags)
def test_hostile_tags_never_raise_and_are_accounted_for(
    quiet_handler: CustomerIOHandler, tag: Any
) -> None:
    logger = logging.getLogger("hostile")
    logger.propagate = False
    if quiet_handler not in logger.handlers:
        logger.addHandler(quiet_handler)
    before = quiet_handler.status()
    logger.warning("hostile %s", "event", extra={"cio": tag})  # must never raise
    after = quiet_handler.status()
    refused = after["dropped"].get("invalid_event", 0) - before["dropped"].get("invalid_event", 0)
    queued = after["enqueued"] - before["enqueued"]
    if tag is None:  # extra={"cio": None} means "not an event" (README: Tagging events)
        assert refused + queued == 0
    else:  # refused with a message, or on disk: never both, never neither
        assert refused + queued == 1


def test_whatever_was_queued_was_delivered_as_valid_json(
    quiet_handler: CustomerIOHandler, simulator: TrackAPISimulator, spec: Spec
) -> None:
    """Run the generator, then check every request that reached the simulator."""
    logger = logging.getLogger("hostile.delivery")
    logger.propagate = False
    logger.addHandler(quiet_handler)

    @settings(max_examples=150, deadline=None)
    @given(tag=tags)
    def log_one(tag: Any) -> None:
        logger.warning("hostile", extra={"cio": tag})

    log_one()
    quiet_handler.flush()
    deadline = time.monotonic() + 20
    while quiet_handler.status()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    status = quiet_handler.status()
    assert status["queued"] == 0
    # Not vacuous: the generator produces valid events as well as hostile ones.
    assert status["enqueued"] >= 10
    assert len(simulator.accepted) >= 10
    accepted_or_dead = len(simulator.accepted) + simulator.duplicates + status["dead_letters"]
    assert accepted_or_dead >= status["enqueued"] - status["dead_letters"]
    schemas = {"/api/v2/batch": BATCH_BODY, "/api/v1/events": ANONYMOUS_EVENTS_REQUEST}
    for request in simulator.requests:
        schema = schemas.get(request.path, EVENTS_REQUEST)
        assert spec.errors(schema, request.payload) == [], request.path
    for event in simulator.accepted:
        assert _finite(event.data)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True
