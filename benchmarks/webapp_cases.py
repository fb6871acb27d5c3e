"""Measurements of issue 14's web-like process, one fresh process per case.

    python -m benchmarks.webapp_cases CASE JSON-ARGUMENTS

``webapp``: request threads that each do a little Python work and log one event, with
the handler (or the stdlib QueueHandler, or nothing) delivering in the same process.
``drain_cpu``: the CPU seconds the delivering process spends per delivered event while
it drains a backlog. Both run in this checkout's environment and, ``drain_cpu``, in an
earlier release's (``benchmarks.baseline``): they use only what that release has too.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache

import cio_logging
from cio_logging import cio_event
from cio_logging.events import new_event_id

from .cases import (
    accepted_by_simulator,
    build_handler,
    commit,
    event_json,
    event_logger,
    handler_options,
    log_events,
    open_push_cache,
    unique_accepted,
)
from .workload import NON_ESSENTIAL_NAME, Control, attributes, customer_id, run_case, wait_until

#: Loop rounds of one request's own work: about 150 us of Python on the machine this
#: was written on (2,000 multiply-and-modulo steps), the order of a small view.
WORK_ROUNDS = 2_000


def request_work(rounds: int = WORK_ROUNDS) -> int:
    """The request's own CPU work: pure Python, so it needs the GIL like a view does."""
    total = 0
    for step in range(rounds):
        total += step * step % 7
    return total


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread included."""
    times = os.times()
    return times.user + times.system


def _quantile(ordered: list[int], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1000


def _serve(
    log: Callable[[str, dict[str, Any]], None] | None, name: str, requests: int, threads: int
) -> dict[str, Any]:
    """``requests`` requests over ``threads`` threads; each one's logging call timed."""
    costs: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        timed = costs[index]
        start.wait()
        for number in range(index, requests, threads):
            request_work()
            extra = cio_event(customer_id(number), **attributes(number))
            began = time.perf_counter_ns()
            if log is not None:
                log(name, extra)
            timed.append(time.perf_counter_ns() - began)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    cpu_before, began = cpu_seconds(), time.perf_counter()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - began, cpu_seconds() - cpu_before
    ordered = sorted(cost for timed in costs for cost in timed)
    return {
        "requests": requests,
        "threads": threads,
        "wall_s": wall,
        "cpu_s": cpu,
        "requests_per_s": requests / wall,
        "median_us": _quantile(ordered, 0.5),
        "p99_us": _quantile(ordered, 0.99),
        "p999_us": _quantile(ordered, 0.999),
        "max_us": ordered[-1] / 1000,
    }


def _pusher(cache: diskcache.Cache) -> Callable[[str, dict[str, Any]], None]:
    """The anchor for essential events: one committed diskcache push of the event's JSON
    per call (the encoding included, as an emit has to do it too)."""

    def push(name: str, extra: dict[str, Any]) -> None:
        tag = extra["cio"]
        cache.push(event_json(new_event_id(), name, tag["customer_id"], tag["data"]))

    return push


def webapp(arguments: dict[str, Any]) -> dict[str, Any]:
    """One contender: ``none``, ``queue_handler``, or cio_logging delivering to the
    simulator while this process serves: ``non_essential`` / ``essential`` from this
    process, ``non_essential_process`` from the ``cio-logging deliver`` child the
    handler starts (its CPU is not this process's, and is not measured), or
    ``diskcache_push``: one committed push per call, no delivery."""
    contender, threads = arguments["contender"], int(arguments["threads"])
    requests = int(arguments["requests"])
    name = NON_ESSENTIAL_NAME if contender != "essential" else arguments["essential_name"]
    with tempfile.TemporaryDirectory(prefix="cio-bench-web-") as work:
        handler: logging.Handler | None = None
        listener: logging.handlers.QueueListener | None = None
        if contender == "queue_handler":
            records: queue.Queue[logging.LogRecord] = queue.Queue()
            listener = logging.handlers.QueueListener(records, logging.NullHandler())
            listener.start()
            handler = logging.handlers.QueueHandler(records)
        elif contender in ("non_essential", "essential", "non_essential_process"):
            options = handler_options(arguments)
            if contender == "non_essential_process":
                options["deliver"] = "process"  # a `cio-logging deliver` child sends
            handler, _ = build_handler(arguments["url"], arguments["ca_file"], Path(work), options)
        log: Callable[[str, dict[str, Any]], None] | None = None
        cache: diskcache.Cache | None = None
        if handler is not None:
            logger = event_logger(handler)
            log_events(logger, name, 200, offset=10**6)  # warm-up: threads, connections
            if isinstance(handler, cio_logging.CustomerIOHandler):
                commit(handler)

            def log(name: str, extra: dict[str, Any], logger: logging.Logger = logger) -> None:
                logger.info(name, extra=extra)

        elif contender == "diskcache_push":
            cache = open_push_cache(Path(work))
            log = _pusher(cache)
            for number in range(200):
                log(name, cio_event(customer_id(number), **attributes(number)))
        request_work()
        commits_before = _commits(handler)
        result = _serve(log, name, requests, threads)
        commits_after = _commits(handler)
        if commits_before is not None and commits_after is not None:
            transactions = commits_after["transactions"] - commits_before["transactions"]
            rows = commits_after["rows"] - commits_before["rows"]
            result["rows_per_commit"] = rows / transactions if transactions else None
        if cache is not None:
            cache.close()
        result["contender"] = contender
        if isinstance(handler, cio_logging.CustomerIOHandler):
            status = handler.status()
            result |= {"dropped": status["dropped"], "sender_requests": status["requests"]}
            result["delivered_during"] = status["delivered"]
            handler.close()
        if listener is not None:
            listener.stop()
    return result


def _commits(handler: logging.Handler | None) -> dict[str, int] | None:
    """The group committer's transactions and rows so far (None: no such counter)."""
    if not isinstance(handler, cio_logging.CustomerIOHandler):
        return None
    commits: dict[str, int] | None = handler.status().get("commits")
    return commits


def drain_cpu(arguments: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds per delivered event while this process drains a backlog.

    N events are logged while the simulator answers 503 (the breaker opens, so nothing
    more is sent), then the outage ends, with ``latency`` kept on every answer. From
    then until the handler has delivered all N, this process does nothing but deliver
    (the main thread sleeps between cheap status reads): its user + system CPU over
    that span, divided by N, is the sender's cost per event.
    """
    control = Control(arguments["url"], arguments["ca_file"], "/_simulator/")
    latency, count = float(arguments["latency"]), int(arguments["events"])
    control.call("faults", {"status": 503, "latency": latency})
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        options = {"reset_timeout": 1.0, **handler_options(arguments)}
        handler, _ = build_handler(arguments["url"], arguments["ca_file"], Path(work), options)
        logger = event_logger(handler)
        log_events(logger, NON_ESSENTIAL_NAME, count)
        commit(handler)
        wait_until(lambda: handler.status()["breaker"] == "open", 120)
        time.sleep(0.2)  # let the failed request's thread settle
        control.call("clear_faults", {})
        control.call("faults", {"latency": latency})
        cpu_before, began = cpu_seconds(), time.perf_counter()
        finished = wait_until(
            lambda: handler.status()["delivered"] >= count, arguments.get("timeout", 600), 0.1
        )
        cpu, seconds = cpu_seconds() - cpu_before, time.perf_counter() - began
        delivered = handler.status()["delivered"]
        handler.close()
    return {
        "events": count,
        "delivered": delivered,
        "accepted": accepted_by_simulator(control)[0],
        "unique_accepted": unique_accepted(control),
        "finished": finished,
        "cpu_s": cpu,
        "seconds": seconds,
        "cpu_us_per_event": cpu / count * 1e6,
        "cio_logging_file": cio_logging.__file__,
    }


CASES = {"webapp": webapp, "drain_cpu": drain_cpu}

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_case(CASES)
