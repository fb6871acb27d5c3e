"""A small application run as a subprocess by the process tests.

It configures a handler from the environment alone and logs events, printing each
event's id on stdout once ``emit`` has returned, so the parent knows exactly which
events the durability promise covers when it kills this process.

Usage: python tests/child_app.py COUNT [--pause SECONDS] [--no-close] [--name NAME]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ulid import ULID

from cio_logging import CustomerIOHandler


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument(
        "--no-close", action="store_true", help="leave without flush/close (os._exit), like a crash"
    )
    parser.add_argument("--name", default="child_event")
    args = parser.parse_args()

    handler = CustomerIOHandler(
        flush_interval=0.05, max_backoff=0.2, request_timeout=2, flush_timeout=10
    )
    logger = logging.getLogger("child.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    print("ready", flush=True)
    for number in range(args.count):
        # An explicit id (a ULID, as the handler would make) lets the parent match what
        # this process printed against what the simulator accepted.
        event_id = str(ULID())
        logger.info(
            args.name,
            extra={
                "cio": {
                    "customer_id": f"child-{os.getpid()}",
                    "id": event_id,
                    "data": {"n": number},
                }
            },
        )
        # One write per line: several processes share this pipe.
        sys.stdout.write(f"{event_id}\n")
        sys.stdout.flush()
        if args.pause:
            time.sleep(args.pause)
    print("done", flush=True)
    if args.no_close:
        os._exit(0)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
