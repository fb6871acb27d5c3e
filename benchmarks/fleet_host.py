"""An idle fleet process for the takeover benchmark: a handler in fleet mode that logs
one event and then waits (as a possible sender) until it is killed.

    python -m benchmarks.fleet_host TRACK_URL CA_FILE QUEUE_URL LEASE_SECONDS
"""

from __future__ import annotations

import logging
import sys
import time

from cio_logging import CustomerIOHandler, cio_event

from .cases import SIMULATOR_API_KEY, SIMULATOR_SITE_ID


def main() -> None:
    track_url, ca_file, queue_url, lease = sys.argv[1:5]
    handler = CustomerIOHandler(
        SIMULATOR_SITE_ID,
        SIMULATOR_API_KEY,
        track_url=track_url,
        ca_bundle=ca_file,
        queue_url=queue_url,
        lease_seconds=float(lease),
        flush_interval=0.05,
    )
    logger = logging.getLogger("bench.fleet")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.info("page_viewed", extra=cio_event("idle"))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
