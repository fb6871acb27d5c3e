"""``cio-logging demo``: the whole path, against the embedded simulator.

No credentials, no set-up: it starts the simulator (the Track API, or with
``--api pipelines`` the Data Pipelines API), configures logging through ``dictConfig``
as an application would, identifies a few people and logs a stream of their events
(each person's identify arrives before their events), cuts Customer.io off
(the breaker opens, events wait on disk, a probe finds recovery, the breaker closes),
runs a period of essential-only degradation, sends a poison event to the dead-letter
store, and ends with a summary in which every event is accounted for. The queue
directory is kept, with its dead letter, for the operator commands it suggests next.
"""

from __future__ import annotations

import logging
import logging.config
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .events import cio_event, cio_identify
from .handler import CustomerIOHandler
from .store import DeadLetterStore

_EVENTS = ("signup", "page_viewed", "purchase", "subscription_changed", "search")
_POISON = "poison_pill"


_PEOPLE = 7


def run_demo(
    *,
    out: TextIO = sys.stdout,
    outage_seconds: float = 4.0,
    directory: Path | None = None,
    api: str = "track",
) -> int:
    """Run the demo; returns the process exit code (0 when every event is accounted for).

    Args:
        out: where the story goes.
        outage_seconds: how long the simulated outage lasts.
        directory: where to keep the queue directory (``queue/`` in it); by default a new
            temporary directory. It is left in place for the operator commands.
        api: ``"track"`` or ``"pipelines"``: which of the simulator's APIs to send to.
    """
    from .simulator import SimulatorUnavailableError, TrackAPISimulator

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=out, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="cio-logging-demo-")) if directory is None else directory
    queue_dir = workdir / "queue"
    try:
        simulator = TrackAPISimulator(state_dir=workdir / "simulator")
        simulator.poison(_POISON)
        simulator.start()
    except SimulatorUnavailableError as exc:
        print(f"cio-logging demo: error: {exc}", file=sys.stderr, flush=True)
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    logger = logging.getLogger("demo.shop")
    logged = 0

    def log_events(count: int, start: int, people: int = _PEOPLE) -> None:
        nonlocal logged
        for number in range(start, start + count):
            name = _EVENTS[number % len(_EVENTS)]
            logger.info(
                name,
                extra=cio_event(f"user-{number % people}", order=number, amount=number * 1.5),
            )
            logged += 1

    try:
        which = "Pipelines API" if api == "pipelines" else "Track API"
        say(f"simulator listening on {simulator.url}; the handler speaks the {which}")
        say(
            f"  it was told to reject events named {_POISON!r}, as Customer.io rejects an "
            "invalid event: phase 4 logs one"
        )
        logging.config.dictConfig(_logging_config(simulator, queue_dir, api))
        handler = next(h for h in logger.handlers if isinstance(h, CustomerIOHandler))
        say(f"handler configured with dictConfig; write-ahead log in {queue_dir}")
        # A --dir used before holds that run's dead letters (and maybe events): count
        # this run's only.
        earlier = handler.status()
        dead_before, queued_before = earlier["dead_letters"] or 0, earlier["queued"] or 0
        if dead_before or queued_before:
            say(
                f"  the directory holds {dead_before} dead letter(s) and {queued_before} "
                "queued event(s) from an earlier run; the summary counts this run's"
            )

        def show(prefix: str) -> None:
            status = handler.status()
            say(
                f"  {prefix}breaker {status['breaker']}, accepted by Customer.io "
                f"{len(simulator.accepted)}, waiting on disk {status['queued']}"
            )

        say(f"phase 1: Customer.io is up; identifying {_PEOPLE} people, then logging 30 events")
        for number in range(_PEOPLE):
            logger.info("identify", extra=cio_identify(f"user-{number}", plan="trial"))
        logged += _PEOPLE
        log_events(30, 0)
        _wait_until(lambda: len(simulator.accepted) >= 30 + _PEOPLE, 10)
        for call in simulator.history("user-1")[:3]:
            # A person call's name is the call itself, and a Track identify has no id:
            # "identify 'identify' (id None, ...)" said nothing a reader could use.
            named = f" {call.name!r}" if call.name != call.call else ""
            ident = f"id {call.id}, " if call.id is not None else ""
            say(
                f"  Customer.io received {call.call}{named} for {call.customer_id} "
                f"({ident}data {call.data}, via {call.route})"
            )
        say("  (each person's calls arrive in the order they were logged)")
        show("")
        say(f"  phase 1 logged {_PEOPLE} identifies and 30 events")

        say(
            f"phase 2: outage (every request answered 503 for {outage_seconds:g} s); "
            "logging 30 more"
        )
        simulator.fail(503, duration=outage_seconds)
        outage_ends = time.monotonic() + outage_seconds
        for batch in range(3):
            # New people: a person's later calls wait behind their first failed one
            # (order per person), so seven people would stop sending at once.
            log_events(10, 30 + batch * 10, people=1000)
            time.sleep(0.2)
        show("")  # all 30 are on disk now: nothing gets through during the outage
        while time.monotonic() < outage_ends:
            time.sleep(1.0)
            show("")
        say("  the outage is over: the next probe finds Customer.io back and closes the breaker")
        _wait_until(lambda: handler.status()["queued"] == 0, 20)
        show("")
        say(
            f"  phase 2 logged 30 events ({_PEOPLE + 60} calls so far); all of them "
            "delivered after the outage"
        )

        say("phase 3: the operator switches to essential_only for a while; logging 10 events")
        handler.set_degradation("essential_only")
        log_events(10, 60)
        dropped_now = handler.status()["dropped"].get("degradation_essential_only", 0)
        say(
            f"  phase 3 logged 10 events: {10 - dropped_now} essential ones kept, "
            f"{dropped_now} others dropped at emit ({handler.status()['dropped']})"
        )
        handler.set_degradation("full")

        say(
            f"phase 4: 2 bad events: {_POISON!r} (the simulator rejects it: dead-lettered) "
            "and 'bad_data' (NaN in its data: refused at emit)"
        )
        logger.info(_POISON, extra=cio_event("user-1", note="the API rejects this name"))
        logger.info("bad_data", extra=cio_event("user-1", ratio=float("nan")))
        logged += 2
        handler.flush()
        _wait_until(lambda: handler.status()["queued"] == 0, 15)
        say("  phase 4 logged 2 events")

        status = handler.status()
        delivered = len(simulator.accepted)
        dropped = sum(status["dropped"].values())
        transitions = handler._sender.stats.breaker_transitions
        print(file=out)
        print("summary", file=out)
        print(f"  logged              {logged}", file=out)
        print(f"  delivered           {delivered}", file=out)
        print(f"  queued on disk      {status['queued']}", file=out)
        dead_lettered = (status["dead_letters"] or 0) - dead_before
        print(f"  dead-lettered       {dead_lettered}", file=out)
        print(f"  dropped at emit     {dropped}  {status['dropped']}", file=out)
        print(f"  breaker transitions {', '.join(f'{a}->{b}' for a, b in transitions)}", file=out)
        accounted = delivered + dead_lettered + dropped == logged + queued_before
        accounted = accounted and status["queued"] == 0
        print(f"  {'every event accounted for' if accounted else 'EVENTS MISSING'}", file=out)
        dead_letters = DeadLetterStore(queue_dir / "dead", fsync=None)
        try:
            dead = [letter.key for letter in dead_letters.select()]
        finally:
            dead_letters.close()
        _try_next(out, workdir, queue_dir, max(dead) if dead else None)  # ULIDs: the newest
        return 0 if accounted else 1
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        simulator.close()  # the queue directory stays; the simulator's CA is of no more use
        shutil.rmtree(workdir / "simulator", ignore_errors=True)


def _try_next(out: TextIO, workdir: Path, queue_dir: Path, dead_letter: str | None) -> None:
    where = shlex.quote(str(queue_dir))
    command = _this_command()
    commands = [
        f"{command} status --queue-dir {where}",
        f"{command} dlq count --by reason --queue-dir {where}",
        f"{command} dlq list --queue-dir {where}",
    ]
    if dead_letter is not None:
        commands.append(f"{command} dlq show {dead_letter} --queue-dir {where}")
    print(file=out)
    print(f"the queue directory is kept: {queue_dir}", file=out)
    print("try the operator commands on it next (no credentials needed to read):", file=out)
    for command in commands:
        print(f"  {command}", file=out)
    print(f"when done: rm -rf {shlex.quote(str(workdir))}", file=out, flush=True)


def _this_command() -> str:
    """How to run this installation's ``cio-logging`` from the shell the demo ran in.

    Plain ``cio-logging`` when the PATH finds this very script; its full path when it
    does not (``.venv/bin/cio-logging demo`` with the virtual environment not active);
    ``python -m cio_logging`` with this interpreter's full path when there is no
    script beside it.
    """
    candidates = [Path(sys.argv[0]), Path(sys.executable).parent / "cio-logging"]
    script = next((c for c in candidates if c.name == "cio-logging" and c.is_file()), None)
    if script is None:
        return f"{shlex.quote(sys.executable)} -m cio_logging"
    found = shutil.which("cio-logging")
    if found is not None and Path(found).resolve() == script.resolve():
        return "cio-logging"
    return shlex.quote(str(script.absolute()))


def _logging_config(simulator: Any, queue_dir: Path, api: str) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "customerio": {
                "class": "cio_logging.CustomerIOHandler",
                "api": api,
                "site_id": simulator.site_id,
                "api_key": simulator.api_key,
                "track_url": simulator.url,
                "ca_bundle": simulator.ca_file,
                "queue_dir": str(queue_dir),
                # Quick settings so the demo fits in seconds; the defaults are the
                # reference design's (5 failures, 30 s before a probe).
                "flush_interval": 0.2,
                "batch_size": 10,
                "consecutive_failures": 3,
                "reset_timeout": 1.5,
                "max_backoff": 1.0,
                "request_timeout": 2,
            },
        },
        "loggers": {
            "demo.shop": {"handlers": ["customerio"], "level": "INFO", "propagate": False},
        },
    }


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
