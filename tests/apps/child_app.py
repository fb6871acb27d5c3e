"""A small application run as a subprocess by the process tests.

It configures a handler from the environment alone and logs events, printing each
event's id on stdout once the durability promise covers it, so the parent knows
exactly which events must survive when it kills this process. An essential event
(the default name, "purchase") is covered once ``emit`` returns. With ``--mixed``
every other event is non-essential ("page_viewed"): it is printed as
``pending <id>`` after emit, and every few events the app calls
``handler.commit()`` and then prints the ids it made durable.

Usage: python tests/apps/child_app.py COUNT [--pause SECONDS] [--no-close] [--name NAME] [--mixed]
       [--non-essential] [--linger SECONDS]
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
    parser.add_argument("--name", default="purchase")
    parser.add_argument("--mixed", action="store_true", help="every other event non-essential")
    parser.add_argument("--non-essential", action="store_true", help="every event non-essential")
    parser.add_argument("--linger", type=float, default=0.0, help="sleep this long after 'done'")
    args = parser.parse_args()

    handler = CustomerIOHandler(
        flush_interval=0.05, max_backoff=0.2, request_timeout=2, flush_timeout=10
    )
    logger = logging.getLogger("child.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    print("ready", flush=True)
    pending: list[str] = []
    for number in range(args.count):
        non_essential = args.non_essential or (args.mixed and number % 2 == 1)
        # An explicit id (a ULID, as the handler would make) lets the parent match what
        # this process printed against what the simulator accepted.
        event_id = str(ULID())
        logger.info(
            "page_viewed" if non_essential else args.name,
            extra={
                "cio": {
                    "customer_id": f"child-{os.getpid()}",
                    "id": event_id,
                    "data": {"n": number},
                }
            },
        )
        # One write per line: several processes share this pipe.
        if non_essential:
            pending.append(event_id)
            sys.stdout.write(f"pending {event_id}\n")
        else:
            sys.stdout.write(f"{event_id}\n")
        if len(pending) >= 7 and handler.commit():
            sys.stdout.write("".join(f"{pending_id}\n" for pending_id in pending))
            pending.clear()
        sys.stdout.flush()
        if args.pause:
            time.sleep(args.pause)
    print("done", flush=True)
    time.sleep(args.linger)
    if args.no_close:
        os._exit(0)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
