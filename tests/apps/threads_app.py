"""An application that logs from short-lived threads, then closes its handler.

Run under ``python -W error::ResourceWarning -X dev``, as a strict test suite would.
The handler is configured from the environment (see ``child_environment``). Each
thread logs essential events (committed on that thread), one reads ``status()`` and
one calls ``flush()``; then the handler is closed and garbage collected. Prints each
event id, then ``open N``: how many files of the queue directory the process still
has open (0 when every SQLite connection was closed).

Usage: python -W error::ResourceWarning -X dev tests/apps/threads_app.py THREADS EVENTS_PER_THREAD
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading

from ulid import ULID

from cio_logging import CustomerIOHandler


def open_queue_files(queue_dir: str) -> list[str]:
    names = []
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(queue_dir):
            names.append(target)
    return names


def main() -> int:
    threads, per_thread = int(sys.argv[1]), int(sys.argv[2])
    handler = CustomerIOHandler(flush_interval=0.05, request_timeout=2, flush_timeout=10)
    logger = logging.getLogger("app.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    printed = threading.Lock()

    def log_events(number: int) -> None:
        ids = [str(ULID()) for _ in range(per_thread)]
        for event_id in ids:
            logger.info(
                "purchase",
                extra={"cio": {"customer_id": f"t{number}", "id": event_id, "data": {}}},
            )
        with printed:
            print("\n".join(ids), flush=True)

    workers = [threading.Thread(target=log_events, args=(n,)) for n in range(threads)]
    workers.append(threading.Thread(target=handler.status))
    workers.append(threading.Thread(target=handler.flush))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    handler.flush()
    logger.removeHandler(handler)
    handler.close()
    del handler
    gc.collect()
    print(f"open {len(open_queue_files(os.environ['CIO_LOGGING_QUEUE_DIR']))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
