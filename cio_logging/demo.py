"""``cio-logging demo``: the whole path, against the embedded Track API simulator.

No credentials, no set-up: it starts the simulator, configures logging through
``dictConfig`` as an application would, logs a stream of events, cuts Customer.io off
for a few seconds, and shows events waiting on disk and arriving after recovery.
"""

from __future__ import annotations

import logging
import logging.config
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .events import cio_event
from .handler import CustomerIOHandler

_EVENTS = ("signup", "page_viewed", "purchase", "subscription_changed", "search")


def run_demo(
    *, out: TextIO = sys.stdout, queue_dir: Path | None = None, outage_seconds: float = 4.0
) -> int:
    """Run the demo; returns the process exit code (0 when every event is accounted for)."""
    try:
        from .simulator import TrackAPISimulator
    except ImportError:
        print("the simulator needs trustme: pip install 'cio-logging[simulator]'", file=out)
        return 2

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=out, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="cio-logging-demo-"))
    directory = queue_dir or workdir / "queue"
    simulator = TrackAPISimulator(state_dir=workdir / "simulator")
    simulator.poison_names = {"poison_pill"}
    simulator.start()
    logger = logging.getLogger("demo.shop")
    try:
        say(f"Track API simulator listening on {simulator.url} (CA {simulator.ca_file})")
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {
                    "customerio": {
                        "class": "cio_logging.CustomerIOHandler",
                        "site_id": simulator.site_id,
                        "api_key": simulator.api_key,
                        "track_url": simulator.url,
                        "ca_bundle": simulator.ca_file,
                        "queue_dir": str(directory),
                        "flush_interval": 0.2,
                        "max_backoff": 1.0,
                        "request_timeout": 2,
                    },
                },
                "loggers": {
                    "demo.shop": {"handlers": ["customerio"], "level": "INFO", "propagate": False},
                },
            }
        )
        handler = next(h for h in logger.handlers if isinstance(h, CustomerIOHandler))
        say(f"handler configured with dictConfig; write-ahead log in {directory}")
        logged = 0

        def log_events(count: int, start: int) -> int:
            for number in range(start, start + count):
                name = _EVENTS[number % len(_EVENTS)]
                logger.info(
                    name,
                    extra=cio_event(
                        f"user-{number % 7}", order=number, amount=round(number * 1.5, 2)
                    ),
                )
            return count

        say("phase 1: Customer.io is up; logging 30 events")
        logged += log_events(30, 0)
        _wait_until(lambda: len(simulator.accepted) >= logged, 10)
        for event in simulator.accepted[:3]:
            say(
                f"  Customer.io received {event.name!r} for {event.customer_id} "
                f"(id {event.id}, data {event.data}, via {event.route})"
            )
        say(f"  delivered {len(simulator.accepted)}, queued on disk {handler.status()['queued']}")

        say(
            f"phase 2: outage (every request answered 503 for {outage_seconds:g} s); "
            "logging 30 more"
        )
        simulator.fail(503, duration=outage_seconds)
        outage_ends = time.monotonic() + outage_seconds
        logged += log_events(30, 30)
        while time.monotonic() < outage_ends:
            time.sleep(1.0)
            status = handler.status()
            say(
                f"  accepted so far {len(simulator.accepted)}, waiting on disk "
                f"{status['queued']}, last error: {status['last_error']}"
            )

        say("phase 3: Customer.io is back; the worker retries what waited on disk")
        logger.info(
            "poison_pill",
            extra=cio_event(
                "user-1", note="the simulator rejects this name: it goes to the dead-letter store"
            ),
        )
        logger.info("bad_data", extra=cio_event("user-1", ratio=float("nan")))
        logged += 1
        handler.flush()
        _wait_until(lambda: handler.status()["queued"] == 0, 15)
        status = handler.status()
        delivered = len(simulator.accepted)
        say(
            f"  accepted {delivered}, queued {status['queued']}, "
            f"dead-lettered {status['dead_letters']}"
        )
        print(file=out)
        print("summary", file=out)
        print(
            f"  logged          {logged + 1}  (one of them refused at emit: NaN in data)", file=out
        )
        print(f"  delivered       {delivered}", file=out)
        print(f"  queued on disk  {status['queued']}", file=out)
        print(f"  dead-lettered   {status['dead_letters']}", file=out)
        print(f"  refused at emit {sum(status['dropped'].values())}", file=out)
        accounted = delivered + status["dead_letters"] == logged and status["queued"] == 0
        print(f"  {'every event accounted for' if accounted else 'EVENTS MISSING'}", file=out)
        return 0 if accounted else 1
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        simulator.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
