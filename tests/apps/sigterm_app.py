"""A small application run as a subprocess by tests/e2e/test_interrupts.py: SIGTERM.

Four threads log non-essential events as fast as they can. After each ``emit``
returns, a thread writes the event's sequence number into its slot of a shared,
file-backed memory map, which outlives the process however it ends: the parent reads
it just before it sends SIGTERM and knows which events were acknowledged by then.
Each thread also keeps, in a ring of RING slots, when (time.monotonic, the same clock
in every process) each of its recent events was acknowledged.

``--install`` calls ``handler.install_signal_handlers()``; without it SIGTERM has
Python's default action (the process ends at once, no ``logging.shutdown``). With
``--main-logs`` the main thread, where Python runs signal handlers, logs essential
events in slot 0 instead of sleeping: the signal then mostly lands inside a commit.

Usage: python tests/apps/sigterm_app.py ACK_MAP_PATH [--install] [--main-logs]
       [--commit-interval SECONDS]
"""

from __future__ import annotations

import argparse
import logging
import mmap
import struct
import sys
import threading
import time

from cio_logging import CustomerIOHandler, cio_event

THREADS = 4
RING = 1 << 16
#: Bytes of the memory map: the counters, then one ring of times per thread.
MAP_BYTES = 8 * THREADS + 8 * RING * THREADS


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ack_map")
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--main-logs", action="store_true")
    parser.add_argument("--commit-interval", type=float, default=0.05)
    args = parser.parse_args()
    handler = CustomerIOHandler(
        flush_interval=0.05, request_timeout=2, commit_interval=args.commit_interval
    )
    if args.install:
        handler.install_signal_handlers()
    logger = logging.getLogger("sigterm.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    with open(args.ack_map, "r+b") as file:
        acknowledged = mmap.mmap(file.fileno(), MAP_BYTES)

    def log_flat_out(slot: int, name: str = "page_viewed") -> None:
        number = 0
        while True:
            number += 1
            logger.info(name, extra=cio_event(f"thread-{slot}", seq=number))
            ring = 8 * THREADS + 8 * (RING * slot + number % RING)
            struct.pack_into("<d", acknowledged, ring, time.monotonic())
            struct.pack_into("<q", acknowledged, 8 * slot, number)

    first = 1 if args.main_logs else 0
    for slot in range(first, THREADS):
        threading.Thread(target=log_flat_out, args=(slot,), daemon=True).start()
    print("ready", flush=True)
    if args.main_logs:
        log_flat_out(0, "purchase")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
