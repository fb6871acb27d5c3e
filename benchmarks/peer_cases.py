"""Measurements of the peers, run with each peer's own virtual environment's interpreter.

    <peer venv>/bin/python -m benchmarks.peer_cases CASE JSON-ARGUMENTS

Standard library plus the peer only: these environments have neither cio_logging nor
its dependencies. The peer is imported by name at run time, so this module type-checks
without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from .workload import (
    NON_ESSENTIAL_NAME,
    Control,
    Prepared,
    attributes,
    closed_port,
    customer_id,
    memory_kib,
    reset_peak_rss,
    rss_figures,
    run_case,
    time_calls,
    wait_until,
)

CDP_WRITE_KEY = "bench-write-key"  # not region-prefixed: sent as HTTP Basic, never checked


def _cdp_client(host: str, **options: Any) -> Any:
    analytics = importlib.import_module("customerio.analytics")
    return analytics.Client(CDP_WRITE_KEY, host=host, **options)


def _cdp_version() -> str:
    return importlib.metadata.version("customerio-cdp-analytics")


def emit_cdp(arguments: dict[str, Any]) -> dict[str, Any]:
    """``Client.track`` cost on the caller's thread, delivering to the CDP stub."""
    runs = []
    for threads in arguments["threads"]:
        client = _cdp_client(arguments["url"], max_queue_size=arguments["calls"] + 1000)

        def prepare(number: int, client: Any = client) -> Prepared:
            user, data = customer_id(number), attributes(number)
            return lambda: client.track(user, arguments["name"], data)

        for number in range(200):
            prepare(number)()
        timing = time_calls(prepare, arguments["calls"], threads)
        client.flush()
        client.join()
        runs.append(timing.summary())
    return {"runs": runs, "version": _cdp_version()}


def delivery_cdp(arguments: dict[str, Any]) -> dict[str, Any]:
    """Enqueue N events, then time until the stub has counted all N (its own batching)."""
    control = Control(arguments["url"], arguments["ca_file"], "/_stub/")
    count = arguments["events"]
    # The default queue (10,000) would drop part of a burst: size it for the run.
    client = _cdp_client(arguments["url"], max_queue_size=count + 1)
    began = time.perf_counter()
    accepted = 0
    for number in range(count):
        accepted += bool(
            client.track(customer_id(number), NON_ESSENTIAL_NAME, attributes(number))[0]
        )
    logged = time.perf_counter() - began
    counted: dict[str, Any] = {}

    def done() -> bool:
        nonlocal counted
        counted = control.call("count")
        return bool(counted["events"] >= count)

    finished = wait_until(done, arguments.get("timeout", 600), interval=0.05)
    elapsed = time.perf_counter() - began
    client.join()
    return {
        "events": count,
        "enqueued": accepted,
        "delivered": counted["events"],
        "finished": finished,
        "log_seconds": logged,
        "seconds": elapsed,
        "events_per_s": counted["events"] / elapsed,
        "requests": counted["requests"],
        "version": _cdp_version(),
    }


def kill_cdp(arguments: dict[str, Any]) -> dict[str, Any]:
    """N ``Client.track`` calls, then SIGKILL this process as the last one returns.

    It never prints a result: the time the calls took goes to ``note_file``, written
    with one ``os.write`` between the last call and the kill.
    """
    client = _cdp_client(arguments["url"])
    note = os.open(arguments["note_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    began = time.perf_counter()
    for number in range(arguments["events"]):
        client.track(customer_id(number), arguments["name"], attributes(number))
    logged = time.perf_counter() - began
    os.write(note, json.dumps({"log_seconds": logged, "version": _cdp_version()}).encode())
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL returned")  # pragma: no cover


def rss_cdp(arguments: dict[str, Any]) -> dict[str, Any]:
    """N events during an outage (nothing listens on its host): RSS growth and drops."""
    client = _cdp_client(f"https://127.0.0.1:{closed_port()}")
    logging.getLogger("customerio").setLevel(logging.CRITICAL)  # one warning per drop
    for number in range(100):
        client.track(customer_id(number), NON_ESSENTIAL_NAME, attributes(number))
    peak_reset = reset_peak_rss()
    before = memory_kib()
    began = time.perf_counter()
    enqueued = 0
    for number in range(arguments["events"]):
        enqueued += bool(
            client.track(customer_id(number), NON_ESSENTIAL_NAME, attributes(number))[0]
        )
    seconds = time.perf_counter() - began
    after = memory_kib()
    return {
        **rss_figures(arguments["events"], before, after, peak_reset, seconds),
        "queued": client.queue.qsize(),
        "queue_bound": client.queue.maxsize,
        "dropped": arguments["events"] - enqueued,
        "version": _cdp_version(),
    }


def _logstash_handler(database: Path) -> logging.Handler:
    module = importlib.import_module("logstash_async.handler")
    handler: logging.Handler = module.AsynchronousLogstashHandler(
        "127.0.0.1", closed_port(), database_path=str(database)
    )
    return handler


def _logstash_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"bench.logstash.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def _logstash_extra(number: int) -> dict[str, Any]:
    return {"cio": {"customer_id": customer_id(number), "data": attributes(number)}}


def _logstash_version() -> str:
    return importlib.metadata.version("python-logstash-async")


def emit_logstash(arguments: dict[str, Any]) -> dict[str, Any]:
    """AsynchronousLogstashHandler with its SQLite database; nothing listens on its port.

    Its worker thread is one per process (a class attribute), so one handler serves
    every thread count; it is never closed, since closing waits for Logstash.
    """
    runs = []
    with tempfile.TemporaryDirectory(prefix="cio-bench-ls-") as work:
        logger = _logstash_logger(_logstash_handler(Path(work) / "events.db"))

        def prepare(number: int) -> Prepared:
            extra = _logstash_extra(number)
            return lambda: logger.info(arguments["name"], extra=extra)

        for number in range(200):
            prepare(number)()
        for threads in arguments["threads"]:
            runs.append(time_calls(prepare, arguments["calls"], threads).summary())
    return {"runs": runs, "version": _logstash_version()}


def rss_logstash(arguments: dict[str, Any]) -> dict[str, Any]:
    """N events while Logstash is unreachable: RSS growth, and where the events are."""
    module = importlib.import_module("logstash_async.handler")
    with tempfile.TemporaryDirectory(prefix="cio-bench-ls-") as work:
        database = Path(work) / "events.db"
        handler = _logstash_handler(database)
        logger = _logstash_logger(handler)
        for number in range(100):
            logger.info(NON_ESSENTIAL_NAME, extra=_logstash_extra(number))
        peak_reset = reset_peak_rss()
        before = memory_kib()
        began = time.perf_counter()
        for number in range(arguments["events"]):
            logger.info(NON_ESSENTIAL_NAME, extra=_logstash_extra(number))
        seconds = time.perf_counter() - began
        after = memory_kib()
        worker = module.AsynchronousLogstashHandler._worker_thread
        in_ram = worker._queue.qsize() if worker is not None else None
        database_bytes = sum(p.stat().st_size for p in Path(work).glob("events.db*"))
        return {
            **rss_figures(arguments["events"], before, after, peak_reset, seconds),
            "queued_in_ram": in_ram,
            "database_bytes": database_bytes,
            "dropped": 0,
            "version": _logstash_version(),
        }


CASES = {
    "emit_cdp": emit_cdp,
    "delivery_cdp": delivery_cdp,
    "kill_cdp": kill_cdp,
    "rss_cdp": rss_cdp,
    "emit_logstash": emit_logstash,
    "rss_logstash": rss_logstash,
}

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_case(CASES)
