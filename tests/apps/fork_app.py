"""Configures logging, then forks: run as a subprocess by the fork tests.

Usage: python tests/apps/fork_app.py MODE CHILDREN EVENTS_PER_CHILD
MODE: ``parent-logs-first`` (the parent's flush thread runs before the fork),
``parent-silent`` (no thread before the fork), ``mp-fork`` / ``mp-spawn``
(multiprocessing with that start method).
Prints every event id once its emit returned.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

from ulid import ULID

from cio_logging import CustomerIOHandler

logger = logging.getLogger("fork.events")


def configure() -> None:
    handler = CustomerIOHandler(
        flush_interval=0.05, max_backoff=0.2, request_timeout=2, flush_timeout=15
    )
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)


def log_events(label: str, count: int) -> None:
    for number in range(count):
        event_id = str(ULID())
        logger.info(
            "forked_event",
            extra={
                "cio": {
                    "customer_id": f"{label}-{os.getpid()}",
                    "id": event_id,
                    "data": {"n": number},
                }
            },
        )
        # One write per line: several processes share this pipe.
        sys.stdout.write(f"{event_id}\n")
        sys.stdout.flush()


def child_main(count: int) -> None:
    if not logger.handlers:  # spawn: a fresh interpreter configures logging itself
        configure()
    log_events("child", count)
    logging.shutdown()  # flush (bounded) and close, as interpreter exit would


def main() -> int:
    mode, children, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    configure()
    if mode == "parent-logs-first":
        log_events("parent", 1)
    if mode.startswith("mp-"):
        context = multiprocessing.get_context(mode[3:])
        processes: list[multiprocessing.process.BaseProcess] = [
            context.Process(target=child_main, args=(count,))  # type: ignore[attr-defined]
            for _ in range(children)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        failed = [p.exitcode for p in processes if p.exitcode != 0]
    else:
        pids = []
        for _ in range(children):
            pid = os.fork()
            if pid == 0:
                try:
                    child_main(count)
                finally:
                    os._exit(0)
            pids.append(pid)
        failed = [code for code in (os.waitpid(pid, 0)[1] for pid in pids) if code != 0]
    log_events("parent", 1)
    logging.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
