"""A multiprocessing.Pool application, run as a subprocess by tests/e2e/test_servers.py.

The module level configures the handler (so forked children inherit it and spawned
ones configure their own on import). The parent logs a backlog, then runs TASKS tasks
on a pool of 3 processes, each logging EVENTS essential events. Pool workers end with
``os._exit`` (and ``with Pool()`` terminates them with SIGTERM): they never run
``logging.shutdown``, so what they logged is only on disk when they go.

Usage: python tests/apps/pool_app.py START_METHOD BACKLOG TASKS EVENTS
Prints ``parent <id> <pid>`` and ``child <id> <pid>`` once each emit returned.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

from ulid import ULID

from cio_logging import CustomerIOHandler

logger = logging.getLogger("pool_app.events")
if not logger.handlers:
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(
        CustomerIOHandler(
            flush_interval=0.05,
            max_backoff=0.2,
            request_timeout=2,
            flush_timeout=15,
            reset_timeout=0.5,
            max_attempts=1000,
        )
    )


def log_purchase(who: str, number: int) -> str:
    event_id = str(ULID())
    logger.info(
        "purchase",
        extra={
            "cio": {"customer_id": f"{who}-{os.getpid()}", "id": event_id, "data": {"n": number}}
        },
    )
    return event_id


def task(count: int) -> tuple[list[str], int]:
    return [log_purchase("child", number) for number in range(count)], os.getpid()


def main() -> int:
    start_method, backlog, tasks, events = sys.argv[1], *map(int, sys.argv[2:5])
    for number in range(backlog):
        print(f"parent {log_purchase('parent', number)} {os.getpid()}", flush=True)
    context = multiprocessing.get_context(start_method)
    with context.Pool(3) as pool:
        for ids, pid in pool.imap_unordered(task, [events] * tasks):
            for event_id in ids:
                print(f"child {event_id} {pid}", flush=True)
    print(f"parent {log_purchase('parent', backlog)} {os.getpid()}", flush=True)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
