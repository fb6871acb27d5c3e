"""A tiny application whose tests (``test_shop.py`` beside it) check the events it logs."""

from __future__ import annotations

import logging

from cio_logging import cio_event

events = logging.getLogger("shop.events")


def checkout(customer_id: str, amount: float) -> None:
    """Take the payment (not shown) and tell Customer.io."""
    events.info("purchase", extra=cio_event(customer_id, amount=amount))
