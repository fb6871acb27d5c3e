"""A long-running application for the operator CLI tests: it holds the delivery lock.

It configures a handler from the environment (plus ``-o NAME=VALUE`` options), logs
COUNT events, printing each id once ``emit`` returned, then keeps running, so its
worker keeps the queue directory's ``delivery.lock``, until stdin is closed. Then it
closes the handler (what is unsent stays on disk) and exits.

Usage: python tests/apps/live_app.py COUNT [--pause SECONDS] [--name NAME] [-o NAME=VALUE ...]
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
    parser.add_argument("--name", default="live_event")
    parser.add_argument("-o", dest="options", action="append", default=[])
    args = parser.parse_args()
    options = dict(option.split("=", 1) for option in args.options)
    options.setdefault("flush_interval", "0.05")
    options.setdefault("max_backoff", "0.2")
    options.setdefault("request_timeout", "2")

    handler = CustomerIOHandler(**options)
    logger = logging.getLogger("live.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    print("ready", flush=True)
    for number in range(args.count):
        event_id = str(ULID())
        logger.info(
            args.name,
            extra={
                "cio": {"customer_id": f"live-{os.getpid()}", "id": event_id, "data": {"n": number}}
            },
        )
        sys.stdout.write(f"{event_id}\n")
        sys.stdout.flush()
        if args.pause:
            time.sleep(args.pause)
    print("done", flush=True)
    sys.stdin.read()  # hold the queue directory until the parent closes our stdin
    handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
