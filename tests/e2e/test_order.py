"""Order per person, end to end: real processes, real HTTPS, an outage and a SIGKILL.

A person's calls are accepted in the order they were logged in one process, whatever
happens between them; calls of different people go concurrently (``max_in_flight``).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from cio_logging import cio_event
from cio_logging.events import Event, event_from_record
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog, encode_row

from ..helpers import APIS, PROJECT_ROOT, PYTHON, HandlerFactory, child_environment, wait_for

ORDER_APP = str(PROJECT_ROOT / "tests" / "apps" / "order_app.py")
PEOPLE = 1000
CALLS = PEOPLE * 4 + PEOPLE // 10  # an identify and 3 events each, a delete every tenth


def _observed(simulator: TrackAPISimulator, person: str) -> list[str]:
    """What arrived for ``person``, first arrivals only (a resend after the kill arrives
    again later), as the refs the app printed ("delete" for the delete, which has none)."""
    seen: list[str] = []
    for call in simulator.history(person):
        key = "delete" if call.call == "delete" else str(call.data.get("ref"))
        if key not in seen:
            seen.append(key)
    return seen


@pytest.mark.parametrize("api", APIS)
def test_every_persons_calls_arrive_in_logging_order_through_an_outage_and_a_kill(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory, api: str
) -> None:
    simulator.set_latency(0.2)
    child = subprocess.Popen(
        [PYTHON, ORDER_APP, str(PEOPLE), "7", "0.0005"],
        env=child_environment(simulator, queue_dir, api),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    logged: dict[str, list[str]] = defaultdict(list)

    def take(line: str) -> None:
        person, call, ref = line.split()
        logged[person].append("delete" if call == "delete" else ref)

    for lines, line in enumerate(child.stdout, 1):
        if line.strip() == "done":
            break
        take(line)
        if lines == 800:  # every request fails for a second (breaker, retries)
            simulator.fail(503, duration=1.0)
        if lines == 3000:  # the outage is over; the child sends its backlog as it dies
            break
    child.send_signal(signal.SIGKILL)
    # Read on through the same text stream: lines the loop above had already buffered
    # are there (communicate() with a timeout reads the pipe's file descriptor and would
    # skip them, and their calls would look as if they arrived unprinted).
    rest = child.stdout.read()
    child.stdout.close()
    child.wait(timeout=30)
    # Whole lines only: the kill may cut the last one short (that call may then arrive
    # unprinted, as the person's last: see below).
    for line in rest.split("\n")[:-1]:
        if line.strip() and line.strip() != "done":
            take(line)
    assert child.returncode == -signal.SIGKILL
    delivered_before_restart = len(simulator.accepted)
    assert delivered_before_restart > 0

    make_handler(max_in_flight=4, batch_size=50)  # the restart, on the same queue

    def missing() -> int:
        return sum(
            len(set(refs) - set(_observed(simulator, person))) for person, refs in logged.items()
        )

    assert wait_for(lambda: missing() == 0, 90), f"{missing()} call(s) lost"
    assert sum(len(refs) for refs in logged.values()) >= 3000
    out_of_order = []
    for person, refs in logged.items():
        observed = _observed(simulator, person)
        # A call whose emit the kill interrupted after its commit may arrive unprinted:
        # only ever as the person's last call.
        if observed[: len(refs)] != refs or len(observed) > len(refs) + 1:
            out_of_order.append((person, refs, observed))
    assert not out_of_order, f"{len(out_of_order)} people out of order, e.g. {out_of_order[0]}"
    calls = {call.call for call in simulator.accepted}
    assert {"identify", "event", "delete"} <= calls
    assert len(logged) > PEOPLE // 2  # many people at once, not one after another


def test_a_retried_call_due_behind_its_persons_newer_calls_goes_first(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    """A person's retry comes due after their newer calls (by due time) and a whole read
    of those is held back behind it: the sender reads on, sends the retry, then the rest.
    (The first order check stopped at such a read and sent nothing, ever.)"""
    now = time.time()
    calls = [_call(number) for number in range(4)]
    wal = WriteAheadLog(queue_dir / "wal")
    first_key, _, first_text, person = encode_row(calls[0], attempts=1, last_error="HTTP 503")
    wal.append_rows([(first_key, now - 5, first_text, person)])  # the retry, due 5 s ago
    for number, call in enumerate(calls[1:]):
        wal.append_rows([encode_row(call._replace(logged_at=now - 30 + number))])
    wal.close()
    make_handler(batch_size=2)
    assert wait_for(lambda: len(simulator.accepted) == 4, 15), simulator.accepted
    assert [call.id for call in simulator.history("p-1")] == [call.id for call in calls]


def _call(number: int) -> Event:
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, "step", (), None, extra=cio_event("p-1", n=number)
    )
    event = event_from_record(record)
    assert event is not None
    return event


def test_an_earlier_call_due_last_goes_first_without_reading_the_backlog_to_it(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    """One person's first call is due after all of their 30,000 later ones (a retry, or
    a commit that came after newer records'). Every read then starts with calls held
    back behind it: the sender fetches it ahead of them instead of reading the whole
    backlog to reach it (the previous check did, listing ever more rows at every read:
    21 s here against 10 s; in a web-like benchmark, with several threads logging
    for one person, it gave up each pass after a second and delivered ~230 calls/s)."""
    now = time.time()
    calls = [_call(number) for number in range(30_000)]
    wal = WriteAheadLog(queue_dir / "wal")
    key, _, text, person = encode_row(calls[0])
    wal.append_rows([(key, now - 1, text, person)])  # due last of all
    rows = [encode_row(call._replace(logged_at=now - 3600 + n)) for n, call in enumerate(calls)]
    wal.append_rows(rows[1:])
    wal.close()
    make_handler(batch_size=50, max_requests_per_second=1000)
    assert wait_for(lambda: len(simulator.accepted) == len(calls), 90), len(simulator.accepted)
    assert [call.id for call in simulator.history("p-1")] == [call.id for call in calls]


def test_a_person_held_back_by_a_retry_waits_and_then_goes_in_order(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    make_handler: HandlerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A person's first call waits for a retry 3 s away, with 1,000 of their later calls
    due now behind it: the store's batch query holds them all back (none is sent while
    the retry waits, however many reads meet them), then they go in order after it."""
    reads = 0
    next_batch = WriteAheadLog.next_batch

    def counted_read(self: WriteAheadLog, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return next_batch(self, *args, **kwargs)

    monkeypatch.setattr(WriteAheadLog, "next_batch", counted_read)
    now = time.time()
    calls = [_call(number) for number in range(1_001)]
    wal = WriteAheadLog(queue_dir / "wal")
    position = wal.append_rows([encode_row(calls[0])])
    wal.schedule_retries(
        [position], count_attempt=True, delays=[3.0], now=now, error="HTTP 503", max_attempts=8
    )
    wal.append_rows([encode_row(call._replace(logged_at=now - 60)) for call in calls[1:]])
    wal.close()
    make_handler(batch_size=10, max_requests_per_second=1000)
    assert wait_for(lambda: reads >= 3, 10), reads
    if time.time() < now + 3:  # still held (on a slow machine the retry may be due already)
        assert not simulator.accepted
    assert wait_for(lambda: len(simulator.accepted) == len(calls), 30), len(simulator.accepted)
    assert [call.id for call in simulator.history("p-1")] == [call.id for call in calls]
