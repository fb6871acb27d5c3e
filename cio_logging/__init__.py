"""Send Customer.io events through Python's standard logging, and never lose one.

::

    import logging
    from cio_logging import CustomerIOHandler, cio_event

    logging.getLogger("app.events").addHandler(CustomerIOHandler())
    logging.getLogger("app.events").info(
        "purchase", extra=cio_event("user-42", amount=9.99, sku="A-1"))
"""

from __future__ import annotations

from .errors import (
    CIOLoggingError,
    ConfigurationError,
    CorruptEntryError,
    InvalidEventError,
    QueueError,
    UnreadableTagError,
)
from .events import cio_event
from .handler import CustomerIOHandler

__all__ = [
    "CIOLoggingError",
    "ConfigurationError",
    "CorruptEntryError",
    "CustomerIOHandler",
    "InvalidEventError",
    "QueueError",
    "UnreadableTagError",
    "cio_event",
]
