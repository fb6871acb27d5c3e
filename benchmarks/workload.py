"""What every contender is fed and how a call is timed: standard library only.

This module is imported by the measurement processes of every virtual environment,
including the peers' own (which have neither cio_logging nor its dependencies), so it
must not import anything outside the standard library.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The three attributes every event carries, whoever sends it.
ATTRIBUTES: dict[str, Any] = {"amount": 9.99, "sku": "A-1", "currency": "EUR"}
ESSENTIAL_NAME = "purchase"
NON_ESSENTIAL_NAME = "page_viewed"
CUSTOMERS = 1000

#: A call made ready outside the timed region: only calling it is timed.
Prepared = Callable[[], object]


def customer_id(number: int, customers: int = CUSTOMERS) -> str:
    """The person of call ``number``: ``customers`` distinct ids, taken round-robin."""
    return f"user-{number % customers}"


def attributes(number: int) -> dict[str, Any]:
    return {**ATTRIBUTES, "amount": round(9.99 + number % 7, 2)}


@dataclass
class Timing:
    """Per-call costs of one run, and the wall time from the start signal to the last call."""

    costs_ns: list[int]
    wall_seconds: float
    threads: int

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.costs_ns)
        return {
            "threads": self.threads,
            "calls": len(ordered),
            "median_us": statistics.median(ordered) / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
            "wall_s": self.wall_seconds,
            "events_per_s": len(ordered) / self.wall_seconds if self.wall_seconds else 0.0,
        }


def time_calls(prepare: Callable[[int], Prepared], total: int, threads: int) -> Timing:
    """Call ``prepare(n)()`` for n in range(total), split over ``threads`` threads.

    Each call is timed alone with ``perf_counter_ns``; building its arguments is not.
    """
    results: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        costs = results[index]
        start.wait()
        for number in range(index, total, threads):
            call = prepare(number)
            began = time.perf_counter_ns()
            call()
            costs.append(time.perf_counter_ns() - began)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - began
    return Timing([cost for costs in results for cost in costs], wall, threads)


def memory_kib() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and the RSS split of this process, in KiB (/proc/self/status).

    RssFile counts file pages mapped in, such as SQLite's memory-mapped database pages:
    the kernel can drop them at will, unlike RssAnon.
    """
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                found[key] = int(value.split()[0])
    return found


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def run_case(cases: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Entry point of a measurement process: ``CASE JSON-ARGUMENTS`` in, one JSON line out."""
    name, arguments = sys.argv[1], json.loads(sys.argv[2])
    result = cases[name](arguments)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\n@@RESULT@@" + json.dumps(result) + "\n").encode())
    # A peer's atexit hook may wait for its sender to give up on an outage (minutes):
    # the result is out, so leave without running exit hooks.
    os._exit(0)


class Control:
    """Calls to a local HTTPS server's unauthenticated control routes (simulator or stub)."""

    def __init__(self, base_url: str, ca_file: str, prefix: str) -> None:
        import ssl

        self._base = base_url.rstrip("/") + prefix
        self._context = ssl.create_default_context(cafile=ca_file)

    def call(self, action: str, body: dict[str, Any] | None = None) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - an https URL we built
            self._base + action,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=self._context, timeout=30) as answer:  # noqa: S310
            return json.loads(answer.read() or b"null")


def rss_figures(
    events: int, before: dict[str, int], after: dict[str, int], peak_reset: bool, seconds: float
) -> dict[str, Any]:
    """The memory figures of one RSS case, from /proc/self/status read before and after."""
    return {
        "events": events,
        "rss_before_kib": before["VmRSS"],
        "peak_kib": after["VmHWM"],
        "growth_kib": after["VmHWM"] - before["VmRSS"],
        "anon_growth_kib": after.get("RssAnon", 0) - before.get("RssAnon", 0),
        "file_growth_kib": after.get("RssFile", 0) - before.get("RssFile", 0),
        "peak_reset": peak_reset,
        "seconds": seconds,
    }
