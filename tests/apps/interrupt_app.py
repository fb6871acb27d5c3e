"""A small application run as a subprocess by tests/e2e/test_interrupts.py.

Its main thread logs as fast as it can (mostly essential events, committed before
``emit`` returns; some non-essential ones; now and then ``handler.commit()``) while a
thread sends the process real signals at random moments: SIGINT (Python raises
KeyboardInterrupt) and SIGTERM (whose handler calls ``sys.exit``, the common
Kubernetes pattern). Another thread holds SQLite's write lock on the queue in short
random bursts, so commits wait for it and signals land inside them.

Every event whose ``emit`` returned normally is acknowledged; its sequence number is
recorded. The signals stop by themselves after SECONDS; half a second later the app
closes the handler as an application exits and writes a JSON report: the
acknowledged numbers, the interrupts caught and what ``status()`` said.

Usage: python tests/apps/interrupt_app.py SECONDS REPORT_PATH
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from cio_logging import CustomerIOHandler, cio_event


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(3)


def send_signals(go: threading.Event, deadline: float, counts: dict[str, int]) -> None:
    chooser = random.Random(os.getpid())
    go.wait()
    while time.monotonic() < deadline:
        signum = signal.SIGINT if chooser.random() < 0.5 else signal.SIGTERM
        os.kill(os.getpid(), signum)
        counts["sent"] += 1
        time.sleep(chooser.uniform(0.0, 0.004))


def hold_write_lock(database: Path, stop: threading.Event) -> None:
    chooser = random.Random(os.getpid() + 1)
    connection = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        while not stop.is_set():
            connection.execute("BEGIN IMMEDIATE")
            time.sleep(chooser.uniform(0.0, 0.003))
            connection.execute("COMMIT")
            time.sleep(chooser.uniform(0.0, 0.003))
    finally:
        connection.close()


def main() -> int:
    seconds, report_path = float(sys.argv[1]), Path(sys.argv[2])
    handler = CustomerIOHandler(
        flush_interval=0.05, max_backoff=0.2, request_timeout=2, flush_timeout=20
    )
    logger = logging.getLogger("interrupt.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    signal.signal(signal.SIGTERM, exit_on_sigterm)

    go, stop = threading.Event(), threading.Event()
    counts = {"sent": 0}
    # The signals stop by themselves at the deadline, and the main thread goes on
    # catching them a while after: nothing it does after that can be interrupted.
    deadline = time.monotonic() + seconds
    database = Path(handler.settings.queue_dir) / "wal" / "cache.db"
    threads = [
        threading.Thread(target=send_signals, args=(go, deadline, counts), daemon=True),
        threading.Thread(target=hold_write_lock, args=(database, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    go.set()
    acknowledged: list[int] = []
    interrupts = 0
    number = 0
    settled = deadline + 0.5

    def storm() -> None:
        nonlocal number
        while time.monotonic() < settled:
            number += 1
            if number % 10 == 0:
                handler.commit()
            name = "page_viewed" if number % 5 == 0 else "purchase"
            logger.info(name, extra=cio_event("storm-user", seq=number))
            acknowledged.append(number)

    # Two levels of catching: a second signal landing while the first is being
    # caught (the inner handler and its loop) is caught by the outer one.
    finished = False
    while not finished:
        try:
            while not finished:
                try:
                    storm()
                    finished = True
                except (KeyboardInterrupt, SystemExit):
                    interrupts += 1
        except (KeyboardInterrupt, SystemExit):
            interrupts += 1
    stop.set()
    for thread in threads:
        thread.join()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    status = handler.status()
    handler.flush()
    logging.shutdown()
    report = {
        "acknowledged": acknowledged,
        "interrupts": interrupts,
        "signals_sent": counts["sent"],
        "status_after_storm": {key: status[key] for key in ("buffered", "disk_error")},
        "dropped": status["dropped"],
    }
    report_path.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
