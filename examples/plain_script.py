"""The smallest use: one handler, configured in code, credentials from the environment.

    export CUSTOMERIO_SITE_ID=... CUSTOMERIO_API_KEY=...
    python examples/plain_script.py

Against the local simulator instead of Customer.io, run ``cio-logging simulator`` in
another terminal and export the four variables it prints.
"""

from __future__ import annotations

import logging

from cio_logging import CustomerIOHandler, cio_event

log = logging.getLogger("app.events")


def main() -> None:
    log.setLevel(logging.INFO)
    log.addHandler(CustomerIOHandler())  # site id, key, queue dir... from the environment

    log.info("signup", extra=cio_event("user-42", plan="pro"))
    log.info("purchase", extra=cio_event("user-42", amount=9.99, sku="A-1"))
    log.info("viewed_pricing", extra=cio_event(anonymous_id="visitor-7", source="ad"))
    log.info("an ordinary log line: not an event, ignored by the handler")
    # No flush needed: logging.shutdown() at exit flushes (bounded by flush_timeout),
    # and whatever could not be sent waits on disk for the next run.


if __name__ == "__main__":
    main()
