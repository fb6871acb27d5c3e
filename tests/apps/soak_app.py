"""A steady-rate application for the outage soak in tests/e2e/test_soak.py.

It configures a handler from the environment and logs essential events ("purchase":
emit returns once each is committed) at RATE events per second until its stdin is
closed, printing each id once emit returned and, every few seconds, a ``status`` line
with ``handler.status()`` as JSON. Breaker transitions, from the ``cio_logging``
logger, go to stderr. Then it shuts logging down (flush, close) and exits.

Usage: python tests/apps/soak_app.py RATE
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

from ulid import ULID

from cio_logging import CustomerIOHandler

STATUS_EVERY = 5.0


def main() -> int:
    rate = float(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("cio_logging").setLevel(logging.INFO)  # half-open is an INFO
    handler = CustomerIOHandler(
        flush_interval=0.2,
        max_backoff=5,
        request_timeout=2,
        flush_timeout=60,
        reset_timeout=5,
    )
    logger = logging.getLogger("soak.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    stop = threading.Event()

    def wait_for_stdin_to_close() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_to_close, daemon=True).start()
    print("ready", flush=True)
    started = time.monotonic()
    reported = started
    number = 0
    while not stop.is_set():
        event_id = str(ULID())
        logger.info(
            "purchase",
            extra={
                "cio": {"customer_id": f"soak-{os.getpid()}", "id": event_id, "data": {"n": number}}
            },
        )
        number += 1
        lines = [event_id]
        now = time.monotonic()
        if now - reported >= STATUS_EVERY:
            reported = now
            lines.append("status " + json.dumps(handler.status(), default=str))
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        sys.stdout.flush()
        stop.wait(max(0.0, started + number / rate - time.monotonic()))  # a steady rate
    print("done", flush=True)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
