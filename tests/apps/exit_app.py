"""A short-lived script run by tests/e2e/test_exit.py: it logs, then ends, and nothing else.

It builds its handler from the environment alone, logs COUNT events (non-essential
unless ``--essential``), prints each id once ``emit`` returned, and ends as ENDING says:

* ``normal``: the module runs to its end;
* ``exception``: an uncaught ``ValueError`` (Python prints its traceback, exit status 1);
* ``sys-exit``: ``sys.exit(3)``.

``--late`` also logs from the two places a script's last events come from after its
main code has ended: a non-daemon thread that logs once the main thread has finished,
and an ``atexit`` hook (registered after the handler, so it runs before
``logging.shutdown()``).

``threading.Thread.start`` is wrapped so that any thread started once the main thread
has finished (the interpreter's exit has begun) is reported on stderr: nothing may start
one then (Python 3.12 refuses, and a daemon thread started then is cut off at
finalization).

Usage: python tests/apps/exit_app.py COUNT ENDING [--essential] [--late]
"""

from __future__ import annotations

import argparse
import atexit
import logging
import sys
import threading
from typing import Any

from ulid import ULID

from cio_logging import CustomerIOHandler

logger = logging.getLogger("exit_app.events")


def log_one(name: str, number: int, where: str) -> None:
    event_id = str(ULID())
    logger.info(
        name,
        extra={"cio": {"customer_id": f"exit-{where}", "id": event_id, "data": {"n": number}}},
    )
    sys.stdout.write(f"{event_id}\n")
    sys.stdout.flush()


def report_threads_started_at_exit() -> None:
    start = threading.Thread.start

    def reporting_start(thread: threading.Thread, *args: Any, **kwargs: Any) -> None:
        if not threading.main_thread().is_alive():
            sys.stderr.write(f"a thread was started at interpreter exit: {thread.name}\n")
        start(thread, *args, **kwargs)

    threading.Thread.start = reporting_start  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("ending", choices=["normal", "exception", "sys-exit"])
    parser.add_argument("--essential", action="store_true")
    parser.add_argument("--late", action="store_true")
    args = parser.parse_args()
    name = "purchase" if args.essential else "page_viewed"
    report_threads_started_at_exit()

    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(CustomerIOHandler())
    for number in range(args.count):
        log_one(name, number, "main")
    if args.late:

        def after_main() -> None:
            threading.main_thread().join()
            for number in range(3):
                log_one(name, number, "thread")

        def at_exit() -> None:
            for number in range(3):
                log_one(name, number, "atexit")

        threading.Thread(target=after_main, name="outlives-main").start()
        atexit.register(at_exit)
    if args.ending == "exception":
        raise ValueError("the script failed")
    if args.ending == "sys-exit":
        sys.exit(3)


if __name__ == "__main__":
    main()
