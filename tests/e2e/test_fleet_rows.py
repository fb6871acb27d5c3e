"""Rows PostgreSQL's types cannot hold as they are: a NUL character (valid in JSON and in
the local store, refused by PostgreSQL's text and jsonb) in an event name, an
identifier, a data value or a data key. Both stores keep such an event exactly; it
never holds up its person's other calls, and nothing is sent again while idle. The
spill's move never stalls behind a row the database refuses. ``dlq show`` with an
argument that is not text prints one line."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.events import Event, event_from_dict, event_from_record
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import DeadLetterStore, WriteAheadLog, encode_row

from ..helpers import CLI, HandlerFactory, child_environment, wait_for

#: Where the NUL goes: (event name, customer id, data).
PLACES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "name": ("pur\x00chase", "person", {"plan": "pro"}),
    "identifier": ("purchase", "per\x00son", {"plan": "pro"}),
    "data value": ("purchase", "person", {"plan": "p\x00ro"}),
    "data key": ("purchase", "person", {"pl\x00an": "pro"}),
}


def _event(name: str, customer_id: str, data: dict[str, Any]) -> Event:
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, name, (), None, extra=cio_event(customer_id, **data)
    )
    event = event_from_record(record)
    assert event is not None
    return event


def _attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"test.rows.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


@pytest.mark.postgres
class TestStoredExactly:
    """The PostgreSQL store keeps such an event as logged: queued, and dead-lettered."""

    @pytest.mark.parametrize("place", list(PLACES))
    def test_queue_and_dead_letters_round_trip(
        self, fleet_url: str, tmp_path: Path, place: str
    ) -> None:
        from cio_logging.store.postgres import Database, PostgresDeadLetters, PostgresLog

        database = Database(fleet_url)
        workspace = f"site-{uuid.uuid4().hex[:8]}@https://track.example"
        log = PostgresLog(database, workspace, WriteAheadLog(tmp_path / "spill"))
        dead = PostgresDeadLetters(database, workspace, tmp_path)
        event = _event(*PLACES[place])
        log.append(event)
        assert len(log.spill) == 0  # it went to the database, not to the spill
        (queued,) = log.read_due(10).events
        assert queued.event == event
        assert log.earlier_rows([event.person], queued.position)[0][0] == event.person
        assert log.person_counts([event.person], queued.position) == {event.person: 1}
        log.record_failure([(queued, time.time() - 1)], "HTTP 400: bad \x00 name")
        assert log.read_due(10).events[0].last_error == "HTTP 400: bad \x00 name"
        dead.add(event.id, event, status=400, error_type="invalid", message="m", attempts=1)
        letter = dead.get(event.id)
        assert letter is not None
        assert letter.event is not None
        assert event_from_dict(letter.event) == event
        log.close()
        database.close()


class TestLocalStore:
    """The diskcache store keeps them too (its rows may move into PostgreSQL through
    fleet mode's spill, which is the same store)."""

    @pytest.mark.parametrize("place", list(PLACES))
    def test_round_trip(self, tmp_path: Path, place: str) -> None:
        log = WriteAheadLog(tmp_path / "wal")
        dead = DeadLetterStore(tmp_path / "dead")
        event = _event(*PLACES[place])
        log.append_rows([encode_row(event)])
        assert log.read_due(10).events[0].event == event
        dead.add(event.id, event, status=400, error_type="invalid", message="m", attempts=1)
        letter = dead.get(event.id)
        assert letter is not None
        assert letter.event is not None
        assert event_from_dict(letter.event) == event
        log.close()
        dead.close()


@pytest.mark.postgres
class TestDelivered:
    """End to end on the fleet store: delivered as logged, the person's later calls not
    held up, nothing sent again while idle."""

    def test_each_place(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, fleet_url: str
    ) -> None:
        handler = make_handler(queue_url=fleet_url)
        logger = _attach(handler)
        for place, (name, customer_id, data) in PLACES.items():
            logger.info(name, extra=cio_event(customer_id, **data))
            # The same person's next calls, behind it.
            for number in range(3):
                logger.info("page_viewed", extra=cio_event(customer_id, place=place, n=number))
        handler.flush()
        assert simulator.wait_for_events(4 * 4, timeout=30), simulator.accepted
        names = {event.name for event in simulator.accepted}
        assert "pur\x00chase" in names
        ids = {event.customer_id for event in simulator.accepted}
        assert "per\x00son" in ids
        assert handler.status()["queued"] == 0
        assert handler.status()["dead_letters"] == 0
        requests = len(simulator.requests)
        time.sleep(3.0)  # idle: nothing is due, nothing goes
        assert len(simulator.requests) == requests
        handler.close()


@pytest.mark.postgres
class TestSpillNeverStalls:
    """A row the database refuses, first in the spill, holds up nothing behind it."""

    def test_a_refused_row_is_dead_lettered_and_the_rest_move(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        pg_url: str,
        queue_dir: Path,
    ) -> None:
        good = [_event("purchase", f"user-{n}", {"n": n}) for n in range(50)]
        spill = WriteAheadLog(queue_dir / "spill")
        # A row of a kind the database refuses (an id with a NUL: no event of ours has
        # one, ids are ULIDs; a damaged or foreign spill might), ahead of the others.
        first = encode_row(good[0])
        spill.append_rows([("01BAD\x00ROW", first[1] - 1, first[2], first[3])])
        spill.append_rows([encode_row(event) for event in good])
        spill.close()
        handler = make_handler(queue_url=pg_url)
        try:
            handler.flush()
            assert simulator.wait_for_events(50, timeout=60)
            assert {event.id for event in good} <= simulator.accepted_ids()
            assert wait_for(lambda: handler.status()["spilled"] == 0)
            assert wait_for(lambda: handler.status()["dead_letters"] == 1)
        finally:
            handler.close()


class TestDeadLetterCommand:
    """``dlq show`` with bytes that are not UTF-8 (a pasted binary id): one line."""

    @pytest.mark.parametrize("store", ["local", pytest.param("fleet", marks=pytest.mark.postgres)])
    def test_an_undecodable_argument(
        self,
        simulator: TrackAPISimulator,
        tmp_path: Path,
        store: str,
        request: pytest.FixtureRequest,
    ) -> None:
        queue_dir = tmp_path / "q"
        extra: dict[str, str] = {}
        if store == "fleet":
            extra["CIO_LOGGING_QUEUE_URL"] = request.getfixturevalue("pg_url")
        CustomerIOHandler(
            site_id=simulator.site_id,
            api_key=simulator.api_key,
            track_url=simulator.url,
            ca_bundle=simulator.ca_file,
            queue_dir=queue_dir,
            queue_url=extra.get("CIO_LOGGING_QUEUE_URL"),
        ).close()
        env = child_environment(simulator, queue_dir, **extra)
        for argument in (b"\xff\xfe", b"bad\x01id", b"x" * 300):
            result = subprocess.run(
                [*(os.fsencode(part) for part in CLI), b"dlq", b"show", argument],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
            stderr = result.stderr.decode("utf-8", "replace")
            assert "Traceback" not in stderr, stderr
            assert result.returncode != 0
            assert len(stderr.strip().splitlines()) == 1, stderr
