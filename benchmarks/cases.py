"""Measurements that run in the project's own environment, one fresh process per case.

    python -m benchmarks.cases CASE JSON-ARGUMENTS

Each case prints one JSON result line (see ``workload.run_case``). The orchestration,
the servers and the report are in ``benchmarks.__main__``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import signal
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import diskcache
from customerio import CustomerIO
from ulid import ULID

import cio_logging
from cio_logging import ConfigurationError, CustomerIOHandler, cio_event
from cio_logging.events import event_from_record

from .workload import (
    ESSENTIAL_NAME,
    NON_ESSENTIAL_NAME,
    Control,
    Prepared,
    attributes,
    customer_id,
    memory_kib,
    reset_peak_rss,
    rss_figures,
    run_case,
    time_calls,
    wait_until,
)

#: Options the emit-path rewrite adds; passed only when the installed handler knows them.
_NEWER_OPTIONS = ("commit_interval", "max_in_flight")
SIMULATOR_SITE_ID, SIMULATOR_API_KEY = "sim-site", "sim-key"  # run_from_command_line defaults
PIPELINES_API_KEY = "bench-pipelines-key"  # sent as HTTP Basic; the CDP stub checks nothing


def credentials(api: str) -> dict[str, Any]:
    """The handler's credential arguments for ``api``: the Track API or the Pipelines API."""
    if api == "pipelines":
        return {"api": "pipelines", "api_key": PIPELINES_API_KEY}
    return {"site_id": SIMULATOR_SITE_ID, "api_key": SIMULATOR_API_KEY}


def build_handler(
    url: str, ca_file: str, queue_dir: Path, options: dict[str, Any], api: str = "track"
) -> tuple[CustomerIOHandler, list[str]]:
    """A handler against ``url``; newer options this version refuses are left out and named."""
    wanted, left_out = dict(options), []
    while True:
        try:
            handler = CustomerIOHandler(
                **credentials(api),
                queue_dir=queue_dir,
                track_url=url,
                ca_bundle=ca_file,
                **wanted,
            )
        except ConfigurationError as exc:
            message = str(exc).split(";", 1)[0]
            refused = [n for n in _NEWER_OPTIONS if n in wanted and n in message]
            if not message.startswith("unknown option") or not refused:
                raise
            for name in refused:
                del wanted[name]
                left_out.append(name)
            continue
        return handler, left_out


def commit(handler: CustomerIOHandler, timeout: float = 120.0) -> bool | None:
    """Wait until every event emitted so far is on disk; None when the handler has no commit()."""
    method = getattr(handler, "commit", None)
    if method is None:
        return None  # this version commits inside emit
    return bool(method(timeout=timeout))


def event_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"bench.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def log_events(
    logger: logging.Logger,
    name: str,
    count: int,
    offset: int = 0,
    customers: int | None = None,
    numbered: bool = False,
) -> None:
    """Log ``count`` events; ``numbered`` adds the call's number as ``seq`` to its data."""
    people = {} if customers is None else {"customers": customers}
    for number in range(offset, offset + count):
        data = attributes(number) | ({"seq": number} if numbered else {})
        logger.info(name, extra=cio_event(customer_id(number, **people), **data))


def logging_prepare(logger: logging.Logger, name: str) -> Any:
    def prepare(number: int) -> Prepared:
        extra = cio_event(customer_id(number), **attributes(number))
        return lambda: logger.info(name, extra=extra)

    return prepare


def handler_options(arguments: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = dict(arguments.get("options", {}))
    return options


# -- caller-thread cost ------------------------------------------------------------------


def emit_cio(arguments: dict[str, Any]) -> dict[str, Any]:
    """cio_logging against the simulator: per-call cost, then how long until on disk."""
    runs, notes = [], []
    for threads in arguments["threads"]:
        with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
            handler, left_out = build_handler(
                arguments["url"],
                arguments["ca_file"],
                Path(work),
                handler_options(arguments),
                arguments.get("api", "track"),
            )
            notes = [f"option {name} not supported by this version" for name in left_out]
            logger = event_logger(handler)
            log_events(logger, arguments["name"], 200, offset=10**6)  # warm-up, starts threads
            commit(handler)
            handler.flush()
            timing = time_calls(
                logging_prepare(logger, arguments["name"]), arguments["calls"], threads
            )
            began = time.perf_counter()
            committed = commit(handler)
            summary = timing.summary()
            summary["commit_wait_s"] = time.perf_counter() - began if committed else None
            summary["dropped"] = handler.status()["dropped"]
            handler.close()
            runs.append(summary)
    return {"runs": runs, "notes": notes}


def emit_queue_handler(arguments: dict[str, Any]) -> dict[str, Any]:
    """The stdlib anchor: QueueHandler into a queue.Queue drained by a QueueListener."""
    runs = []
    for threads in arguments["threads"]:
        events: queue.Queue[logging.LogRecord] = queue.Queue()
        listener = logging.handlers.QueueListener(events, logging.NullHandler())
        listener.start()
        logger = event_logger(logging.handlers.QueueHandler(events))
        log_events(logger, arguments["name"], 200)
        runs.append(
            time_calls(
                logging_prepare(logger, arguments["name"]), arguments["calls"], threads
            ).summary()
        )
        listener.stop()
    return {"runs": runs}


def open_push_cache(directory: Path) -> diskcache.Cache:
    """A diskcache queue with cio_logging's settings: synchronous NORMAL, never evicting."""
    return diskcache.Cache(
        str(directory),
        sqlite_synchronous=1,
        eviction_policy="none",
        size_limit=2**62,
        cull_limit=0,
        statistics=0,
        tag_index=0,
    )


def event_json(event_id: str, name: str, customer: str, data: dict[str, Any]) -> str:
    """The event as the bare diskcache push stores it: one compact JSON object."""
    return json.dumps(
        {
            "id": event_id,
            "name": name,
            "customer_id": customer,
            "timestamp": int(time.time()),
            "data": data,
        },
        separators=(",", ":"),
    )


def emit_diskcache_push(arguments: dict[str, Any]) -> dict[str, Any]:
    """One diskcache push (one committed transaction) of the event's JSON per event."""
    runs = []
    for threads in arguments["threads"]:
        with tempfile.TemporaryDirectory(prefix="cio-bench-dc-") as work:
            cache = open_push_cache(Path(work))

            def prepare(number: int, cache: diskcache.Cache = cache) -> Prepared:
                text = event_json(
                    str(ULID()), arguments["name"], customer_id(number), attributes(number)
                )
                return lambda: cache.push(text)

            for number in range(200):
                prepare(number)()
            runs.append(time_calls(prepare, arguments["calls"], threads).summary())
            cache.close()
    return {"runs": runs}


def sdk_client(url: str, ca_file: str) -> Any:
    """The official SDK pointed at the simulator, as in the reference design (no retries)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    client = CustomerIO(SIMULATOR_SITE_ID, SIMULATOR_API_KEY, host=host, port=int(port), retries=0)
    client.http.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
    client.http.verify = ca_file
    return client


def emit_direct_track(arguments: dict[str, Any]) -> dict[str, Any]:
    """The reference design: one SDK ``track()`` (one HTTPS round trip) per event."""
    runs = []
    for threads in arguments["threads"]:
        clients = [sdk_client(arguments["url"], arguments["ca_file"]) for _ in range(threads)]
        for client in clients:
            client.track(customer_id(0), arguments["name"], attributes(0))

        def prepare(number: int, clients: list[Any] = clients) -> Prepared:
            client = clients[number % len(clients)]
            user, data = customer_id(number), attributes(number)
            return lambda: client.track(user, arguments["name"], data)

        runs.append(time_calls(prepare, arguments["calls"], threads).summary())
    return {"runs": runs}


# -- delivery ------------------------------------------------------------------------------


def accepted_by_simulator(control: Control) -> tuple[int, list[float]]:
    """Events in 200 answers so far, and the arrival time of every request."""
    records = control.call("requests")["requests"]
    accepted = sum(r["item_count"] for r in records if r["status"] == 200)
    return accepted, [r["time"] for r in records]


def peak_per_second(times: list[float]) -> int:
    """The most requests that arrived within any one-second window."""
    ordered, best, first = sorted(times), 0, 0
    for last, arrived in enumerate(ordered):
        while arrived - ordered[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def unique_accepted(control: Control) -> int:
    answer = control.call("events")
    return len({event["id"] for event in answer["events"]})


def overtaken(events: list[dict[str, Any]]) -> dict[str, int]:
    """Events the simulator accepted after a later-logged event of the same person.

    ``events`` in the order accepted, each carrying its log call's number as ``seq``.
    """
    latest: dict[str | None, int] = {}
    late = 0
    people: set[str | None] = set()
    for event in events:
        person, seq = event["customer_id"], int(event["data"]["seq"])
        if seq < latest.get(person, -1):
            late += 1
            people.add(person)
        else:
            latest[person] = seq
    return {"overtaken_events": late, "overtaken_people": len(people)}


def delivery_cio(arguments: dict[str, Any]) -> dict[str, Any]:
    """Log N events as fast as possible; time until the simulator accepted all of them.

    ``customers`` (optional) spreads them round-robin over that many people;
    ``check_order`` numbers them and counts those accepted out of their person's order.
    """
    control = Control(arguments["url"], arguments["ca_file"], "/_simulator/")
    count: int = arguments["events"]
    check_order = bool(arguments.get("check_order"))
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        handler, left_out = build_handler(
            arguments["url"], arguments["ca_file"], Path(work), handler_options(arguments)
        )
        logger = event_logger(handler)
        began = time.perf_counter()
        log_events(
            logger,
            NON_ESSENTIAL_NAME,
            count,
            customers=arguments.get("customers"),
            numbered=check_order,
        )
        logged = time.perf_counter() - began
        accepted_when_logged = accepted_by_simulator(control)[0]
        accepted = 0
        times: list[float] = []

        def done() -> bool:
            nonlocal accepted, times
            accepted, times = accepted_by_simulator(control)
            return accepted >= count

        finished = wait_until(done, arguments.get("timeout", 600), interval=0.05)
        elapsed = time.perf_counter() - began
        status = handler.status()
        handler.close()
    span = max(times) - min(times) if len(times) > 1 else 0.0
    accepted_events = control.call("events")["events"]
    return {
        "events": count,
        "accepted": accepted,
        "unique_accepted": len({event["id"] for event in accepted_events}),
        **(overtaken(accepted_events) if check_order else {}),
        "cio_logging_file": cio_logging.__file__,
        "finished": finished,
        "log_seconds": logged,
        "seconds": elapsed,
        "events_per_s": accepted / elapsed,
        "accepted_when_logged": accepted_when_logged,
        "events_per_s_after_logging": (accepted - accepted_when_logged) / (elapsed - logged),
        "requests": len(times),
        "requests_per_s_mean": len(times) / span if span else float(len(times)),
        "requests_per_s_peak": peak_per_second(times),
        "max_requests_per_second": getattr(handler.settings, "max_requests_per_second", None),
        "max_in_flight": getattr(handler.settings, "max_in_flight", None),
        "batch_size": getattr(handler.settings, "batch_size", None),
        "failed_requests": status.get("failed_requests"),
        "notes": [f"option {name} not supported by this version" for name in left_out],
    }


def delivery_pipelines(arguments: dict[str, Any]) -> dict[str, Any]:
    """``api="pipelines"``: log N events, time until the CDP stub has counted all N."""
    control = Control(arguments["url"], arguments["ca_file"], "/_stub/")
    count: int = arguments["events"]
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        handler, _ = build_handler(
            arguments["url"],
            arguments["ca_file"],
            Path(work),
            handler_options(arguments),
            "pipelines",
        )
        logger = event_logger(handler)
        began = time.perf_counter()
        log_events(logger, NON_ESSENTIAL_NAME, count)
        logged = time.perf_counter() - began
        counted: dict[str, Any] = {}

        def done() -> bool:
            nonlocal counted
            counted = control.call("count")
            return bool(counted["events"] >= count)

        finished = wait_until(done, arguments.get("timeout", 600), interval=0.05)
        elapsed = time.perf_counter() - began
        status = handler.status()
        handler.close()
    return {
        "events": count,
        "delivered": counted["events"],
        "unique": counted["unique"],
        "without_id": counted["without_id"],
        "finished": finished,
        "log_seconds": logged,
        "seconds": elapsed,
        "events_per_s": counted["events"] / elapsed,
        "requests": counted["requests"],
        "batch_size": getattr(handler.settings, "batch_size", None),
        "max_in_flight": getattr(handler.settings, "max_in_flight", None),
        "failed_requests": status.get("failed_requests"),
    }


def log_then_sigkill(arguments: dict[str, Any]) -> dict[str, Any]:
    """Log N events into ``queue_dir``, then SIGKILL this process as the last call returns.

    It never prints a result: the time the logging took goes to ``note_file``, written
    with one ``os.write`` between the last call and the kill.
    """
    handler, _ = build_handler(
        arguments["url"],
        arguments["ca_file"],
        Path(arguments["queue_dir"]),
        handler_options(arguments),
        arguments.get("api", "track"),
    )
    logger = event_logger(handler)
    note = os.open(arguments["note_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    began = time.perf_counter()
    log_events(logger, arguments["name"], arguments["events"])
    logged = time.perf_counter() - began
    os.write(note, json.dumps({"log_seconds": logged}).encode())
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL returned")  # pragma: no cover


def drain_queue(arguments: dict[str, Any]) -> dict[str, Any]:
    """A second process on a dead one's ``queue_dir``: what ``cio-logging drain`` runs."""
    from cio_logging.operations import drain

    handler_arguments = {
        **credentials(arguments.get("api", "track")),
        "track_url": arguments["url"],
        "ca_bundle": arguments["ca_file"],
        **handler_options(arguments),
    }
    began = time.perf_counter()
    report = drain(
        handler_arguments, Path(arguments["queue_dir"]), timeout=arguments.get("timeout", 120)
    )
    result: dict[str, Any] = report.to_dict()
    result["seconds"] = time.perf_counter() - began
    return result


def delivery_direct_track(arguments: dict[str, Any]) -> dict[str, Any]:
    """One SDK ``track()`` per event from one thread, as the reference design sends."""
    client = sdk_client(arguments["url"], arguments["ca_file"])
    client.track(customer_id(0), NON_ESSENTIAL_NAME, attributes(0))
    began = time.perf_counter()
    for number in range(arguments["events"]):
        client.track(customer_id(number), NON_ESSENTIAL_NAME, attributes(number))
    elapsed = time.perf_counter() - began
    return {
        "events": arguments["events"],
        "seconds": elapsed,
        "events_per_s": arguments["events"] / elapsed,
    }


def drain_cio(arguments: dict[str, Any]) -> dict[str, Any]:
    """N events queued while the simulator answers 503 (breaker open), then the outage ends."""
    control = Control(arguments["url"], arguments["ca_file"], "/_simulator/")
    latency, count = float(arguments["latency"]), int(arguments["events"])
    control.call("faults", {"status": 503, "latency": latency})
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        handler, left_out = build_handler(
            arguments["url"], arguments["ca_file"], Path(work), handler_options(arguments)
        )
        logger = event_logger(handler)
        began = time.perf_counter()
        log_events(logger, NON_ESSENTIAL_NAME, count)
        commit(handler)
        logged = time.perf_counter() - began
        opened = wait_until(lambda: handler.status()["breaker"] == "open", 120)
        queued = handler.status()["queued"]
        outage_ended = time.perf_counter()
        control.call("clear_faults", {})
        control.call("faults", {"latency": latency})
        first_accepted: float | None = None
        accepted = 0

        def done() -> bool:
            nonlocal accepted, first_accepted
            accepted = accepted_by_simulator(control)[0]
            if accepted and first_accepted is None:
                first_accepted = time.perf_counter()
            return accepted >= count

        finished = wait_until(done, arguments.get("timeout", 600), interval=0.05)
        drained = time.perf_counter()
        status = handler.status()
        handler.close()
    return {
        "events": count,
        "log_seconds": logged,
        "breaker_opened": opened,
        "queued_at_outage_end": queued,
        "accepted": accepted,
        "unique_accepted": unique_accepted(control),
        "finished": finished,
        "drain_seconds": drained - outage_ended,
        "first_accept_after_s": None if first_accepted is None else first_accepted - outage_ended,
        "dead_lettered": status.get("dead_lettered"),
        "notes": [f"option {name} not supported by this version" for name in left_out],
    }


# -- memory and disk -----------------------------------------------------------------------


def rss_cio(arguments: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS growth while N events wait during an outage (the simulator answers 503)."""
    control = Control(arguments["url"], arguments["ca_file"], "/_simulator/")
    control.call("faults", {"status": 503})
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        handler, _ = build_handler(
            arguments["url"], arguments["ca_file"], Path(work), handler_options(arguments)
        )
        logger = event_logger(handler)
        log_events(logger, NON_ESSENTIAL_NAME, 1000, offset=10**7)
        commit(handler)
        peak_reset = reset_peak_rss()
        before = memory_kib()
        began = time.perf_counter()
        log_events(logger, NON_ESSENTIAL_NAME, arguments["events"])
        committed = commit(handler)
        seconds = time.perf_counter() - began
        after = memory_kib()
        status = handler.status()
        handler.close()
    return {
        **rss_figures(arguments["events"], before, after, peak_reset, seconds),
        "rss_after_kib": after["VmRSS"],
        "committed": committed,
        "queued": status["queued"],
        "enqueued": status["enqueued"],
        "dropped": sum(status["dropped"].values()),
        "drop_reasons": status["dropped"],
        "queue_bytes": status["queue_bytes"],
    }


def rss_queue_handler(arguments: dict[str, Any]) -> dict[str, Any]:
    """QueueHandler whose listener is stalled: every record waits in RAM."""
    events: queue.Queue[logging.LogRecord] = queue.Queue()
    logger = event_logger(logging.handlers.QueueHandler(events))
    log_events(logger, NON_ESSENTIAL_NAME, 1000, offset=10**7)
    peak_reset = reset_peak_rss()
    before = memory_kib()
    began = time.perf_counter()
    log_events(logger, NON_ESSENTIAL_NAME, arguments["events"])
    seconds = time.perf_counter() - began
    after = memory_kib()
    return {
        **rss_figures(arguments["events"], before, after, peak_reset, seconds),
        "queued": events.qsize(),
        "dropped": 0,
    }


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def wal_size(arguments: dict[str, Any]) -> dict[str, Any]:
    """WAL bytes per event after a checkpoint, beside the v2 batch item bytes as sent."""
    control = Control(arguments["url"], arguments["ca_file"], "/_simulator/")
    count: int = arguments["events"]
    control.call("faults", {"status": 503})
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        queue_dir = Path(work) / "queue"
        handler, _ = build_handler(
            arguments["url"], arguments["ca_file"], queue_dir, handler_options(arguments)
        )
        log_events(event_logger(handler), NON_ESSENTIAL_NAME, count)
        commit(handler)
        queued = handler.status()["queued"]
        handler.close()
        database = queue_dir / "wal" / diskcache.core.DBNAME
        with sqlite3.connect(database) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        wal_bytes, total_bytes = _directory_bytes(queue_dir / "wal"), _directory_bytes(queue_dir)
        # Now let them through and read what went over the wire.
        control.call("clear_faults", {})
        control.call("clear", {})
        handler, _ = build_handler(
            arguments["url"], arguments["ca_file"], queue_dir, handler_options(arguments)
        )
        wait_until(lambda: accepted_by_simulator(control)[0] >= count, 300)
        handler.close()
    records = [r for r in control.call("requests")["requests"] if r["status"] == 200]
    sent_items = sum(r["item_count"] for r in records)
    sent_bytes = sum(r["body_bytes"] for r in records)
    return {
        "events": count,
        "queued": queued,
        "wal_bytes": wal_bytes,
        "queue_dir_bytes": total_bytes,
        "wal_bytes_per_event": wal_bytes / count,
        "sent_items": sent_items,
        "sent_bytes_per_event": sent_bytes / sent_items if sent_items else None,
        "item_bytes_per_event": _v2_item_bytes(count),
    }


def _v2_item_bytes(count: int) -> float:
    """Mean size of the compact v2 batch item JSON for the workload's events."""
    total = 0
    for number in range(count):
        item = {
            "type": "person",
            "identifiers": {"id": customer_id(number)},
            "action": "event",
            "name": NON_ESSENTIAL_NAME,
            "id": str(ULID()),
            "timestamp": int(time.time()),
            "attributes": attributes(number),
        }
        total += len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())
    return total / count


def fleet_log(arguments: dict[str, Any]) -> dict[str, Any]:
    """One fleet process: log N non-essential events into PostgreSQL, then stay up (a
    possible sender) until the orchestrator creates ``release_file`` (every event
    was accepted)."""
    release = Path(arguments["release_file"])
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        options = {"queue_url": arguments["queue_url"], "flush_interval": 0.05}
        handler, _ = build_handler(arguments["url"], arguments["ca_file"], Path(work), options)
        logger = event_logger(handler)
        started_at = time.time()
        began = time.perf_counter()
        log_events(logger, NON_ESSENTIAL_NAME, arguments["events"])
        logged = time.perf_counter() - began
        commit(handler)
        wait_until(release.exists, 600, interval=0.1)
        sender = handler.status()["delivering_process"]
        handler.close()
    return {"log_seconds": logged, "started_at": started_at, "sender": sender}


def fleet_log_timed(arguments: dict[str, Any]) -> dict[str, Any]:
    """One of a fleet's processes (issue 21's eight): log N events (``rate`` a second, or
    flat out) timing each call (an essential one is committed into PostgreSQL before the
    call returns), write the time logging ended into ``logged_file``, then stay up as a
    possible sender until the orchestrator creates ``release_file``."""
    release = Path(arguments["release_file"])
    name = arguments.get("name", ESSENTIAL_NAME)
    offset = int(arguments.get("offset", 0))
    with tempfile.TemporaryDirectory(prefix="cio-bench-q-") as work:
        options = {"queue_url": arguments["queue_url"], "flush_interval": 0.05}
        handler, _ = build_handler(arguments["url"], arguments["ca_file"], Path(work), options)
        logger = event_logger(handler)
        costs: list[float] = []
        # Paced (events/s of this process), or flat out (0).
        interval = 1.0 / arguments["rate"] if arguments.get("rate") else 0.0
        started_at = time.time()
        next_at = time.perf_counter()
        for number in range(offset, offset + arguments["events"]):
            extra = cio_event(customer_id(number), **attributes(number))
            if interval:
                next_at += interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
            began = time.perf_counter()
            logger.info(name, extra=extra)
            costs.append(time.perf_counter() - began)
        ended_at = time.time()
        commit(handler)
        Path(arguments["logged_file"]).write_text(repr(ended_at))
        wait_until(release.exists, 1800, interval=0.1)
        sender = handler.status()["delivering_process"]
        handler.close()
    costs.sort()
    return {
        "started_at": started_at,
        "ended_at": ended_at,
        "p50_ms": costs[len(costs) // 2] * 1000,
        "p99_ms": costs[int(len(costs) * 0.99)] * 1000,
        "max_ms": costs[-1] * 1000,
        "sender": sender,
    }


def fleet_large_rows(arguments: dict[str, Any]) -> dict[str, Any]:
    """Large events (issue 21): N events of about 99 KB committed into PostgreSQL by
    groups of ten, and the same rows moved into another database from a spill."""
    from cio_logging.store import WriteAheadLog, encode_row
    from cio_logging.store.postgres import Database, PostgresLog

    logger = logging.getLogger("bench.large")
    rows = []
    for number in range(arguments["events"]):
        extra = cio_event(customer_id(number), pad="x" * 99_000)
        record = logger.makeRecord(
            "bench", logging.INFO, "f", 1, ESSENTIAL_NAME, (), None, extra=extra
        )
        event = event_from_record(record)
        assert event is not None
        rows.append(encode_row(event))
    timings = {}
    for label, url in (("direct", arguments["direct_url"]), ("spill", arguments["spill_url"])):
        with tempfile.TemporaryDirectory(prefix="cio-bench-large-") as work:
            database = Database(url, timeout=5.0)
            log = PostgresLog(database, "bench", WriteAheadLog(Path(work) / "spill"), timeout=5.0)
            if label == "direct":
                began = time.perf_counter()
                for start in range(0, len(rows), 10):
                    log.append_rows(rows[start : start + 10])
            else:
                log.spill.append_rows(rows)
                began = time.perf_counter()
                left = log.settle(600)
                assert left == 0, left
            timings[label] = time.perf_counter() - began
            assert len(log) == len(rows)
            log.close()
            database.close()
    return timings


CASES = {
    "fleet_large_rows": fleet_large_rows,
    "fleet_log": fleet_log,
    "fleet_log_timed": fleet_log_timed,
    "emit_cio": emit_cio,
    "emit_queue_handler": emit_queue_handler,
    "emit_diskcache_push": emit_diskcache_push,
    "emit_direct_track": emit_direct_track,
    "delivery_cio": delivery_cio,
    "delivery_pipelines": delivery_pipelines,
    "log_then_sigkill": log_then_sigkill,
    "drain_queue": drain_queue,
    "delivery_direct_track": delivery_direct_track,
    "drain_cio": drain_cio,
    "rss_cio": rss_cio,
    "rss_queue_handler": rss_queue_handler,
    "wal_size": wal_size,
}

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_case(CASES)
