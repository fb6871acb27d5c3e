"""How an application tests the events it logs, with cio_logging's testing helpers.

Run with ``pytest examples/testing`` once cio-logging is installed with the ``testing``
extra, which provides ``capture_cio_events`` and the ``cio_simulator`` fixture.
"""

from __future__ import annotations

import logging

import pytest
import shop

from cio_logging.testing import CioSimulator, capture_cio_events


def test_checkout_logs_a_purchase() -> None:
    # level=: this test does not configure logging, so shop.events would drop INFO.
    with capture_cio_events("shop.events", level=logging.INFO) as captured:
        shop.checkout("user-42", amount=9.99)
    assert [(e.name, e.customer_id, e.data) for e in captured.events] == [
        ("purchase", "user-42", {"amount": 9.99})
    ]
    assert captured.refusals == []


def test_a_bad_amount_would_be_refused() -> None:
    with capture_cio_events("shop.events", level=logging.INFO) as captured:
        shop.checkout("user-42", amount=float("nan"))
    assert captured.events == []
    (refusal,) = captured.refusals
    assert "Out of range float" in refusal.reason


def test_checkout_reaches_customerio(
    cio_simulator: CioSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shop.events")  # restored after the test
    handler = cio_simulator.handler()  # closed and detached when the test ends
    shop.events.addHandler(handler)
    shop.checkout("user-42", amount=9.99)
    handler.flush()  # waits until the simulator has the event
    assert [(e.name, e.customer_id, e.data) for e in cio_simulator.events] == [
        ("purchase", "user-42", {"amount": 9.99})
    ]
