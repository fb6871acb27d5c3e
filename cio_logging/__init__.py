"""Send Customer.io events through Python's standard logging, and never lose one.

::

    import logging
    from cio_logging import CustomerIOHandler, cio_event

    log = logging.getLogger("app.events")
    log.setLevel(logging.INFO)  # the root's WARNING would drop log.info
    log.addHandler(CustomerIOHandler())
    log.info("purchase", extra=cio_event("user-42", amount=9.99, sku="A-1"))
"""

from __future__ import annotations

from .adapter import CioAdapter
from .errors import (
    CIOLoggingError,
    ConfigurationError,
    CorruptEntryError,
    InvalidEventError,
    QueueError,
    UnreadableTagError,
)
from .events import (
    cio_add_device,
    cio_add_relationships,
    cio_alias,
    cio_delete,
    cio_delete_device,
    cio_delete_relationships,
    cio_event,
    cio_group,
    cio_identify,
    cio_merge,
    cio_page,
    cio_screen,
    cio_suppress,
    cio_unsuppress,
)
from .handler import CustomerIOHandler
from .metadata import PACKAGE_VERSION

#: The installed distribution's version ("unknown" when run from a bare source tree).
__version__ = PACKAGE_VERSION

__all__ = [
    "CIOLoggingError",
    "CioAdapter",
    "ConfigurationError",
    "CorruptEntryError",
    "CustomerIOHandler",
    "InvalidEventError",
    "QueueError",
    "UnreadableTagError",
    "__version__",
    "cio_add_device",
    "cio_add_relationships",
    "cio_alias",
    "cio_delete",
    "cio_delete_device",
    "cio_delete_relationships",
    "cio_event",
    "cio_group",
    "cio_identify",
    "cio_merge",
    "cio_page",
    "cio_screen",
    "cio_suppress",
    "cio_unsuppress",
]
