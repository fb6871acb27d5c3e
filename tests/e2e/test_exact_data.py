"""Data arrives exactly as logged: the sender splices the stored JSON text into request
bodies (never decoding it), so what Customer.io decodes must equal what was logged."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from cio_logging import cio_event, cio_identify
from cio_logging.simulator import TrackAPISimulator

from ..helpers import APIS, HandlerFactory

#: Values that a careless re-encoding would change: non-ASCII text (two, three and
#: four bytes in UTF-8), JSON's escapes, separators inside strings, integers past
#: 2**53 and 2**64, floats at the edges, and nesting.
AWKWARD: dict[str, Any] = {
    "text": "Zoë café 東京 🎉",
    "escapes": 'quote " backslash \\ newline \n tab \t nul \x00 line-sep \u2028',
    "looks_like_json": '{"a": [1, 2]}, "b": 3',
    "big": 2**70,
    "negative_big": -(2**64) - 1,
    "past_double": 9_007_199_254_740_993,
    "tiny": 5e-324,
    "huge": 1.7976931348623157e308,
    "tenth": 0.1,
    "flags": [True, False, None],
    "nested": {"deeper": {"list": [1, [2, [3, {"é": "ü"}]]], "empty": {}, "none": []}},
    "ключ": "значение",
}


@pytest.fixture
def logger() -> logging.Logger:
    logger = logging.getLogger(f"test.exact.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


@pytest.mark.parametrize("api", APIS)
class TestDataArrivesAsLogged:
    """Over real HTTPS to the simulator, on both APIs."""

    def test_event_data_is_received_as_logged(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        logger: logging.Logger,
        api: str,
    ) -> None:
        """Unicode, escapes, large numbers and nesting survive the splice."""
        handler = make_handler()
        logger.addHandler(handler)
        try:
            logger.info("déjà_vu 🎉", extra=cio_event("user-ü-1", **AWKWARD))
            logger.info("plain", extra=cio_event("user-2", seq=2))
            handler.flush()
        finally:
            logger.removeHandler(handler)
        by_person = {call.customer_id: call for call in simulator.accepted}
        assert set(by_person) == {"user-ü-1", "user-2"}
        assert by_person["user-ü-1"].name == "déjà_vu 🎉"
        assert by_person["user-ü-1"].data == AWKWARD
        assert by_person["user-2"].data == {"seq": 2}

    def test_person_call_traits_are_received_as_logged(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        logger: logging.Logger,
        api: str,
    ) -> None:
        """An identify's attributes (traits) take the same path."""
        handler = make_handler()
        logger.addHandler(handler)
        try:
            logger.info("identify", extra=cio_identify("user-3", **AWKWARD))
            handler.flush()
        finally:
            logger.removeHandler(handler)
        (call,) = simulator.accepted
        assert (call.customer_id, call.data) == ("user-3", AWKWARD)
