"""The sender's measurements (issue 20), each run in a fresh process by benchmarks/sender.py.

- ``drain``: a backlog of N events for P people, queued while nothing sent
  (``deliver="none"``), then delivered by one sender in this process, with the
  simulator adding ``latency`` to every answer: delivered events/s and this process's
  CPU per delivered event (it does nothing else meanwhile: the main thread sleeps
  between cheap status reads). Both APIs, the diskcache store or PostgreSQL.
- ``read_cost``: what the store's batch read costs per call, with the order rule and
  without it (the anchor), reading and acknowledging a backlog batch after batch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import cio_logging
from cio_logging import cio_event
from cio_logging.store import BatchQuery, WriteAheadLog, encode_row
from cio_logging.store import local as local_store
from cio_logging.transport.pipelines import TEMPLATES as PIPELINES_TEMPLATES
from cio_logging.transport.track import TEMPLATES as TRACK_TEMPLATES

from .cases import SIMULATOR_API_KEY, SIMULATOR_SITE_ID, commit, event_logger
from .workload import ATTRIBUTES, NON_ESSENTIAL_NAME, Control, run_case, wait_until


def _cpu() -> float:
    return time.process_time()


def _fill(handler: cio_logging.CustomerIOHandler, events: int, people: int) -> None:
    logger = event_logger(handler)
    for number in range(events):
        logger.info(NON_ESSENTIAL_NAME, extra=cio_event(f"user-{number % people}", **ATTRIBUTES))
    commit(handler)


def _handler(
    url: str, ca_file: str, queue_dir: Path, api: str, options: dict[str, Any]
) -> cio_logging.CustomerIOHandler:
    """A handler of ``api`` on the simulator (its key serves both APIs)."""
    return cio_logging.CustomerIOHandler(
        None if api == "pipelines" else SIMULATOR_SITE_ID,
        SIMULATOR_API_KEY,
        api=api,
        queue_dir=queue_dir,
        track_url=url,
        ca_bundle=ca_file,
        **options,
    )


def drain(arguments: dict[str, Any]) -> dict[str, Any]:
    """Delivered events/s and CPU per delivered event, draining a backlog."""
    url, ca_file = arguments["url"], arguments["ca_file"]
    events, people = int(arguments["events"]), int(arguments["people"])
    api = arguments.get("api", "track")
    options = dict(arguments.get("options", {}))
    control = Control(url, ca_file, "/_simulator/")
    control.call("faults", {"latency": float(arguments["latency"])})
    with tempfile.TemporaryDirectory(prefix="cio-bench-sender-") as work:
        queue_dir = Path(work)
        filler = _handler(url, ca_file, queue_dir, api, {**options, "deliver": "none"})
        _fill(filler, events, people)
        filler.close()
        handler = _handler(url, ca_file, queue_dir, api, options)
        cpu_before, began = _cpu(), time.perf_counter()
        handler.start_delivery()
        # The sender's own counter: status() would count the queue's rows each time.
        finished = wait_until(
            lambda: handler._sender.stats.delivered >= events, arguments.get("timeout", 600), 0.05
        )
        seconds, cpu = time.perf_counter() - began, _cpu() - cpu_before
        status = handler.status()
        handler.close()
    accepted = control.call("events")
    return {
        "api": api,
        "events": events,
        "people": people,
        "delivered": status["delivered"],
        "dead_lettered": status["dead_lettered"],
        "requests": status["requests"],
        "accepted": len(accepted.get("events", [])),
        "finished": finished,
        "seconds": seconds,
        "events_per_s": status["delivered"] / seconds if seconds else 0.0,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / max(status["delivered"], 1) * 1e6,
        "cio_logging_file": cio_logging.__file__,
    }


def read_cost(arguments: dict[str, Any]) -> dict[str, Any]:
    """CPU per call of reading and acknowledging a backlog, batch after batch, with the
    order rule and (the anchor) without it, on the same rows."""
    events, people = int(arguments["events"]), int(arguments["people"])
    templates = PIPELINES_TEMPLATES if arguments.get("api") == "pipelines" else TRACK_TEMPLATES
    logger = logging.getLogger("bench.rows")
    results: dict[str, Any] = {}
    for label, order in (("order rule", True), ("no order rule", False)):
        with tempfile.TemporaryDirectory(prefix="cio-bench-read-") as work:
            wal = WriteAheadLog(Path(work) / "wal")
            rows = []
            for number in range(events):
                record = logger.makeRecord(
                    "bench", logging.INFO, "f", 1, NON_ESSENTIAL_NAME, (), None,
                    extra=cio_event(f"user-{number % people}", **ATTRIBUTES),
                )  # fmt: skip
                event = cio_logging.events.event_from_record(record)
                assert event is not None
                rows.append(encode_row(event))
            for start in range(0, len(rows), 1000):
                wal.append_rows(rows[start : start + 1000])
            sql = local_store._build_next_batch_sql(templates, order=order)
            original = local_store._next_batch_sql

            def fixed(_templates: object, _lane: bool = False, sql: str = sql) -> str:
                return sql

            local_store._next_batch_sql = fixed  # type: ignore[assignment]
            try:
                query = BatchQuery(
                    now=time.time() + 60, limit=1000, budget=496 * 1024, item_limit=32768
                )
                cpu_before = _cpu()
                read = 0
                while True:
                    batch = wal.next_batch(query, templates)
                    if not batch:
                        break
                    read += len(batch)
                    wal.acknowledge(batch.positions)
                cpu = _cpu() - cpu_before
            finally:
                local_store._next_batch_sql = original
                wal.close()
        results[label] = {"calls": read, "cpu_us_per_call": cpu / max(read, 1) * 1e6}
    return {"events": events, "people": people, "reads": results}


CASES = {"drain": drain, "read_cost": read_cost}

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_case(CASES)
