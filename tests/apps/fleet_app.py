"""One "host" of a fleet, run as a subprocess by the fleet tests.

It configures a handler from the environment (CIO_LOGGING_QUEUE_URL selects fleet
mode, CIO_LOGGING_QUEUE_DIR is this host's own spill directory), logs COUNT essential
events, printing each id once ``emit`` returned (then the event is the fleet's to
deliver), and stays up as a possible sender until stdin closes, then closes. It
prints ``done`` after its last event and ``emit-max <seconds>`` with the slowest emit.

Usage: python tests/apps/fleet_app.py COUNT [--pause SECONDS] [--lease SECONDS]
       [--reset-timeout SECONDS] [--batch-size N] [--exit-after] [--max-rps N]
       [--data-bytes N] [--poison-every N] [--max-in-flight N]
       [--max-event-age SECONDS]
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
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--reset-timeout", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--exit-after", action="store_true", help="close once logged")
    parser.add_argument("--max-rps", type=float, default=50)
    parser.add_argument("--data-bytes", type=int, default=0, help="pad each event's data")
    parser.add_argument("--poison-every", type=int, default=0, help="name every Nth event 'broken'")
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--max-event-age", type=float, default=72 * 3600.0)
    args = parser.parse_args()

    handler = CustomerIOHandler(
        flush_interval=0.05,
        max_backoff=0.5,
        request_timeout=2,
        flush_timeout=20,
        lease_seconds=args.lease,
        reset_timeout=args.reset_timeout,
        batch_size=args.batch_size,
        database_timeout=0.5,
        max_requests_per_second=args.max_rps,
        max_in_flight=args.max_in_flight,
        max_event_age=args.max_event_age,
    )
    logger = logging.getLogger("fleet.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    print("ready", flush=True)
    slowest = 0.0
    costs: list[float] = []
    for number in range(args.count):
        event_id = str(ULID())
        started = time.monotonic()
        poisoned = args.poison_every and number % args.poison_every == 0
        logger.info(
            "broken" if poisoned else "purchase",
            extra={
                "cio": {
                    "customer_id": f"host-{os.getpid()}",
                    "id": event_id,
                    "data": {"n": number, "pad": "x" * args.data_bytes},
                }
            },
        )
        costs.append(time.monotonic() - started)
        slowest = max(slowest, costs[-1])
        print(event_id, flush=True)
        if args.pause:
            time.sleep(args.pause)
    print(f"emit-max {slowest:.6f}", flush=True)
    if costs:
        costs.sort()
        print(f"emit-p99 {costs[int(len(costs) * 0.99)]:.6f}", flush=True)
    print("done", flush=True)
    if not args.exit_after:
        sys.stdin.read()  # a possible sender until the test lets it go
    handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
