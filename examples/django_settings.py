"""A Django ``LOGGING`` setting with the Customer.io handler (paste into settings.py).

Django passes LOGGING to ``logging.config.dictConfig`` at start-up, so a missing
credential stops the app there, not at the first event. In a view::

    import logging
    from cio_logging import cio_event

    events = logging.getLogger("app.events")
    events.info("purchase", extra=cio_event(str(request.user.pk), amount=order.total))

With gunicorn (``--preload`` or not), each worker process gets its own flush thread on
its first event; one process at a time delivers a queue directory (a file lock), so
events are never sent twice by several workers.
"""

from __future__ import annotations

import os
from typing import Any

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {
        "customerio": {
            "class": "cio_logging.CustomerIOHandler",
            "level": "INFO",
            # Read here explicitly to show the keys; the handler would also read these
            # variables by itself.
            "site_id": os.environ.get("CUSTOMERIO_SITE_ID"),
            "api_key": os.environ.get("CUSTOMERIO_API_KEY"),
            "queue_dir": os.environ.get("CIO_LOGGING_QUEUE_DIR"),
            "flush_timeout": 5,
        },
        "console": {"class": "logging.StreamHandler"},
    },
    "loggers": {
        "app.events": {"handlers": ["customerio"], "level": "INFO", "propagate": False},
        "cio_logging": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
