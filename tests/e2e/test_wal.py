"""The write-ahead log and dead-letter store on real diskcache: order, safety, permissions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import diskcache
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cio_logging.events import Event
from cio_logging.store import (
    DeadLetterHistory,
    DeadLetterReason,
    DeadLetterStore,
    Row,
    WriteAheadLog,
    encode_row,
)
from cio_logging.store.rows import decode_row

from ..helpers import PROJECT_ROOT, make_event


class TestWriteAheadLog:
    """Append, read in order, remove only what was delivered."""

    def test_append_read_remove(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        events = [make_event(n) for n in range(5)]
        for event in events:
            wal.append(event)
        batch = wal.read_due(10)
        # Oldest due first: for fresh events, logging order.
        assert [q.event for q in batch.events] == events
        assert all(q.attempts == 0 for q in batch.events)
        wal.remove([events[0].id, events[2].id])
        assert [q.event.id for q in wal.read_due(10).events] == [
            events[1].id,
            events[3].id,
            events[4].id,
        ]
        wal.close()

    def test_survives_reopen(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        event = make_event()
        wal.append(event)
        wal.close()
        assert WriteAheadLog(tmp_path / "wal").read_due(10).events[0].event == event

    def test_failures_are_recorded_and_delay_the_event(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        wal.append(make_event())
        queued = wal.read_due(10).events
        wal.record_failure([(queued[0], 2_000.0)], "HTTP 503", now=1_000.0)
        assert wal.read_due(10, now=1_500.0).events == []
        again = wal.read_due(10, now=2_000.0).events[0]
        assert (again.attempts, again.last_error, again.first_failure_at) == (
            1,
            "HTTP 503",
            1_000.0,
        )

    def test_failure_never_resurrects_a_delivered_event(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        wal.append(make_event())
        queued = wal.read_due(10).events
        wal.remove([queued[0].key])
        wal.record_failure([(queued[0], 0.0)], "late")
        assert len(wal) == 0

    def test_never_evicts(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        settings = diskcache.Cache(str(tmp_path / "wal"))
        assert settings.eviction_policy == "none"
        wal.close()
        settings.close()

    def test_stores_json_text_only(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        event = make_event()
        wal.append(event)
        raw = diskcache.Cache(str(tmp_path / "wal"))
        stored = raw.get(event.id)
        assert isinstance(stored, str)
        assert json.loads(stored) == [
            2,
            "purchase",
            "user-0",
            None,
            event.timestamp,
            event.logged_at,
            None,
            {"n": 0},
        ]
        raw.close()

    def test_a_retry_backlog_does_not_slow_reading_what_is_due(self, tmp_path: Path) -> None:
        """Due times are indexed: rows waiting for a retry are not scanned (review #7)."""
        wal = WriteAheadLog(tmp_path / "wal")
        waiting = [make_event(n) for n in range(20_000)]
        wal.append_rows([encode_row(event) for event in waiting])
        wal.record_failure([(q, 10_000_000_000.0) for q in wal.read_due(20_000).events], "503")
        fresh = make_event(99_999)
        wal.append(fresh)
        connection = wal._cache._con
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT value FROM Cache WHERE tag <= ? ORDER BY tag LIMIT 5",
            (1.0,),
        ).fetchall()
        assert "SEARCH Cache USING INDEX Cache_tag_rowid" in " ".join(str(step) for step in plan)
        assert [q.key for q in wal.read_due(5).events] == [fresh.id]
        wal.close()

    def test_rows_cost_little_more_than_the_event(self, tmp_path: Path) -> None:
        event = make_event()
        key, _, text, _ = encode_row(event)
        assert key == event.id
        assert len(text) < len(event.to_json())


def test_a_forked_child_appends_without_losing_anything(tmp_path: Path) -> None:
    """The child must not close the SQLite connection it inherited (that lost its writes)."""
    wal = WriteAheadLog(tmp_path / "wal")
    wal.append(make_event(0))
    pid = os.fork()
    if pid == 0:  # the child: append, then leave without any clean-up
        try:
            for number in range(1, 6):
                wal.append(make_event(number))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(wal) == 6
    fresh = WriteAheadLog(tmp_path / "wal")
    assert len(fresh.read_due(10).events) == 6


def test_fork_waits_for_threads_inside_sqlite(tmp_path: Path) -> None:
    """A child must not inherit SQLite's mutexes held: fork waits for the section to end."""
    import threading
    import time

    from cio_logging.store._sqlite import FORK_GATE as _FORK_GATE

    entered = threading.Event()

    def busy_in_sqlite() -> None:
        with _FORK_GATE.inside():
            entered.set()
            time.sleep(0.5)

    thread = threading.Thread(target=busy_in_sqlite)
    thread.start()
    entered.wait()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    waited = time.monotonic() - started
    os.waitpid(pid, 0)
    thread.join()
    assert waited >= 0.4
    # and the gate is open again afterwards, in the parent
    wal = WriteAheadLog(tmp_path / "wal")
    wal.append(make_event())
    assert len(wal) == 1


def test_another_process_closing_does_not_pull_the_log_away(tmp_path: Path) -> None:
    """Opening the log must keep this process's SQLite locks (an os.close dropped them)."""
    wal = WriteAheadLog(tmp_path / "wal")
    for number in range(3):
        wal.append(make_event(number))
    script = textwrap.dedent(f"""
        import logging
        from pathlib import Path
        from cio_logging import cio_event
        from cio_logging.events import event_from_record
        from cio_logging.store import WriteAheadLog
        wal = WriteAheadLog(Path({str(tmp_path / "wal")!r}))
        record = logging.getLogger().makeRecord("t", 20, "f", 1, "m", (), None,
                                                 extra=cio_event("other"))
        wal.append(event_from_record(record))
        wal.close()
    """)
    for _ in range(3):
        subprocess.run(
            [sys.executable, "-c", script],
            check=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
    assert len(wal.read_due(10).events) == 6
    wal.append(make_event(9))
    assert len(WriteAheadLog(tmp_path / "wal").read_due(10).events) == 7


class _PlantedPickle:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pickle ran"))


def ahead_of_the_clock(seconds: float) -> Event:
    """An event whose record is stamped ``seconds`` after this clock."""
    return make_event()._replace(logged_at=time.time() + seconds)


class TestDueTimesAcrossClockSteps:
    """Persisted due times keep steady time across wall-clock steps (the worker's calls)."""

    def test_a_record_stamped_ahead_of_the_clock_is_due_now(self, tmp_path: Path) -> None:
        """Fresh rows are due at min(logged_at, now): a fast sender's clock delays nothing."""
        wal = WriteAheadLog(tmp_path / "wal")
        event = ahead_of_the_clock(600)
        wal.append(event)
        assert [q.key for q in wal.read_due(10).events] == [event.id]
        assert wal.read_due(10).events[0].event.logged_at == event.logged_at  # kept as is

    def _fresh_and_waiting(self, wal: WriteAheadLog, now: float) -> tuple[str, str]:
        fresh, waiting = make_event(1), make_event(2)
        wal.append_rows([(fresh.id, now, encode_row(fresh)[2], fresh.person)])
        wal.append_rows([(waiting.id, now, encode_row(waiting)[2], waiting.person)])
        (queued,) = [q for q in wal.read_due(10, now=now).events if q.key == waiting.id]
        wal.record_failure([(queued, now + 30)], "HTTP 503", now=now)
        return fresh.id, waiting.id

    def due_at(self, wal: WriteAheadLog, moment: float) -> set[str]:
        return {q.key for q in wal.read_due(100, now=moment).events}

    def test_a_step_back_keeps_every_wait(self, tmp_path: Path) -> None:
        """Back an hour: the fresh row is due again, the retry still 30 s away."""
        wal = WriteAheadLog(tmp_path / "wal")
        now = 1_800_000_000.0
        fresh, waiting = self._fresh_and_waiting(wal, now)
        stepped = now - 3600 + 1
        assert self.due_at(wal, stepped) == set()  # what the old code saw: an hour's stall
        assert wal.adjust_due_times(-3600, stepped, horizon=600) == 2
        assert self.due_at(wal, stepped + 28) == {fresh}
        assert self.due_at(wal, stepped + 29) == {fresh, waiting}  # 1 s passed before

    def test_a_step_forward_keeps_retries_waiting_and_new_rows_due(self, tmp_path: Path) -> None:
        """Forward an hour: the retry keeps its 30 s; a row logged after the step stays due."""
        wal = WriteAheadLog(tmp_path / "wal")
        now = 1_800_000_000.0
        fresh, waiting = self._fresh_and_waiting(wal, now)
        stepped = now + 3600 + 1
        newer = make_event(3)
        wal.append_rows([(newer.id, stepped, encode_row(newer)[2], newer.person)])
        assert wal.adjust_due_times(3600, stepped, horizon=600) == 1
        assert self.due_at(wal, stepped) == {fresh, newer.id}
        assert self.due_at(wal, stepped + 28) == {fresh, newer.id}
        assert self.due_at(wal, stepped + 29) == {fresh, newer.id, waiting}

    def test_due_times_beyond_the_horizon_are_due_now(self, tmp_path: Path) -> None:
        """No step seen (a restart after it, an older writer): too far ahead means due now."""
        wal = WriteAheadLog(tmp_path / "wal")
        now = 1_800_000_000.0
        far, near = make_event(1), make_event(2)
        wal.append_rows([(far.id, now + 3600, encode_row(far)[2], far.person)])
        wal.append_rows([(near.id, now + 300, encode_row(near)[2], near.person)])
        assert wal.adjust_due_times(0, now, horizon=600) == 1
        assert self.due_at(wal, now) == {far.id}
        assert wal.adjust_due_times(0, now, horizon=600) == 0

    def test_a_damaged_row_does_not_stop_the_adjustment(self, tmp_path: Path) -> None:
        """A row that is not JSON is left for read_due to quarantine."""
        wal = WriteAheadLog(tmp_path / "wal")
        now = 1_800_000_000.0
        _, waiting = self._fresh_and_waiting(wal, now)
        wal.append_rows([("01J0000000000000000000BAD0", now + 10, "{not json", None)])
        assert wal.adjust_due_times(3600, now + 3600, horizon=600) == 1
        assert waiting not in self.due_at(wal, now + 3600 + 29)
        assert waiting in self.due_at(wal, now + 3600 + 30)


class TestRefusesPickles:
    """A pickled row planted in the queue is refused and never loaded."""

    def test_planted_pickle_in_wal_is_quarantined_not_loaded(self, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"
        wal = WriteAheadLog(tmp_path / "wal")
        good = make_event()
        wal.append(good)
        planter = diskcache.Cache(str(tmp_path / "wal"))  # the stock Disk pickles objects
        planter.set("00000000000000000000000000", _PlantedPickle(marker))
        planter.close()

        batch = wal.read_due(10)
        assert not marker.exists()
        assert [c.key for c in batch.corrupt] == ["00000000000000000000000000"]
        assert "not decoded" in batch.corrupt[0].reason
        assert [q.event for q in batch.events] == [good]
        assert "00000000000000000000000000" not in wal

    def test_planted_pickle_in_dead_letters_is_refused(self, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"
        store = DeadLetterStore(tmp_path / "dead")
        planter = diskcache.Cache(str(tmp_path / "dead"))
        planter.set("k", _PlantedPickle(marker))
        planter.close()
        (letter,) = list(store)  # listed as unreadable, never decoded
        assert not marker.exists()
        assert (letter.key, letter.event, letter.error_type) == ("k", None, "corrupt_entry")
        assert "not decoded" in letter.message
        assert store.count(by="reason") == {"corrupt_entry": 1}
        assert store.purge([letter]) == 1  # and an operator can remove it
        assert len(store) == 0


class TestDeadLetterStore:
    """Entries keep the event, the reason and the attempts."""

    def test_get_and_select_take_a_key_in_either_case(self, tmp_path: Path) -> None:
        store = DeadLetterStore(tmp_path / "dead")
        event = make_event(1, "purchase")
        store.add(event.id, event, status=400, error_type="http_400", message="x", attempts=1)
        letter = store.get(event.id.lower())
        assert letter is not None
        assert letter.key == event.id
        assert [x.key for x in store.select(keys=[event.id.lower()])] == [event.id]
        store.close()

    def test_add_list_count(self, tmp_path: Path) -> None:
        store = DeadLetterStore(tmp_path / "dead")
        first, second = make_event(1, "purchase"), make_event(2, "signup")
        store.add(
            first.id,
            first,
            status=400,
            error_type="http_400",
            message="HTTP 400",
            attempts=1,
            now=10.0,
        )
        store.add(
            second.id,
            second,
            status=207,
            error_type="item_rejected",
            message="rejected",
            attempts=3,
            first_failure_at=5.0,
            now=12.0,
        )
        letters = {letter.key: letter for letter in store}
        assert letters[second.id].event == json.loads(second.to_json())
        assert (
            letters[second.id].attempts,
            letters[second.id].first_failure_at,
            letters[second.id].last_failure_at,
        ) == (3, 5.0, 12.0)
        assert store.count(by="event") == {"purchase": 1, "signup": 1}
        assert store.count(by="reason") == {"http_400": 1, "item_rejected": 1}
        assert len(store) == 2

    def test_an_entry_from_before_replay_history_reads_as_never_replayed(
        self, tmp_path: Path
    ) -> None:
        """A version 1 entry without original or replays: its reason is the original."""
        store = DeadLetterStore(tmp_path / "dead")
        event = make_event(1)
        old = {
            "v": 1,
            "key": event.id,
            "event": json.loads(event.to_json()),
            "status": None,
            "error_type": "max_attempts",
            "message": "gave up after 5 attempts",
            "attempts": 5,
            "first_failure_at": 5.0,
            "last_failure_at": 9.0,
        }
        store._cache.set(event.id, json.dumps(old))
        letter = store.get(event.id)
        assert letter is not None
        assert letter.original == DeadLetterReason("max_attempts", None, old["message"], 9.0)
        assert (letter.replays, letter.replay_count) == ((), 0)
        assert store.select(reason="max_attempts") == [letter]

    def test_adding_again_keeps_the_first_reason(self, tmp_path: Path) -> None:
        """An event dead-lettered twice (in the log and here after a crash) keeps the first."""
        store = DeadLetterStore(tmp_path / "dead")
        event = make_event(1)
        for error_type, now in (("item_rejected", 10.0), ("http_400", 20.0)):
            store.add(
                event.id,
                event,
                status=None,
                error_type=error_type,
                message=error_type,
                attempts=1,
                now=now,
            )
        letter = store.get(event.id)
        assert letter is not None
        assert letter.error_type == "http_400"
        assert letter.original == DeadLetterReason("item_rejected", None, "item_rejected", 10.0)

    def test_a_log_row_without_dead_letter_history_still_reads(self, tmp_path: Path) -> None:
        """Rows replayed by an earlier version (replayed_at only) read and deliver as before."""
        wal = WriteAheadLog(tmp_path / "wal")
        event = make_event(1)
        wal.append(event, replayed_at=50.0)
        queued = wal.get(event.id)
        assert queued is not None
        assert (queued.replayed_at, queued.dead_letter) == (50.0, None)
        history = DeadLetterHistory(
            DeadLetterReason("expired", None, "too old", 40.0), (), 0, 30.0, 3
        )
        wal.record_failure([(queued._replace(dead_letter=history), 60.0)], "HTTP 503", 55.0)
        retried = wal.get(event.id)
        assert retried is not None
        assert retried.dead_letter == history  # a retry keeps it
        wal.close()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_permissions_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Directories 0700, files 0600: checked in a child so the umask is really in force."""
    queue = tmp_path / "queue"
    script = textwrap.dedent(f"""
        import os, logging
        os.umask({umask})
        from cio_logging.store import WriteAheadLog, DeadLetterStore
        from cio_logging.process_lock import DeliveryLock
        from cio_logging import cio_event
        from cio_logging.events import event_from_record
        from pathlib import Path
        q = Path({str(queue)!r})
        wal = WriteAheadLog(q / "wal")
        record = logging.getLogger().makeRecord("t", 20, "f", 1, "m", (), None,
                                                 extra=cio_event("u"))
        wal.append(event_from_record(record))
        DeadLetterStore(q / "dead")
        assert DeliveryLock(q / "delivery.lock").try_acquire()
    """)
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    seen = 0
    for path in [queue, *queue.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, f"{path} is {oct(mode)}"
        seen += 1
    assert seen >= 6  # queue, wal, dead, two databases with their -wal/-shm, the lock


def _rows(count: int, prefix: str) -> list[Row]:
    return [encode_row(make_event(number, name=f"{prefix}_event")) for number in range(count)]


def test_a_forked_child_salvages_a_deleted_log(tmp_path: Path) -> None:
    """The connection kept for salvage is the parent's: a child opens its own (review)."""
    wal = WriteAheadLog(tmp_path / "queue" / "wal")
    wal.append_rows(_rows(20, "parent"))  # a backlog committed before the fork
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: commit, lose the directory, recover; report, leave
        try:
            wal.append_rows(_rows(30, "child"))
            doomed = tmp_path / "gone"
            (tmp_path / "queue").rename(doomed)
            shutil.rmtree(doomed)
            action = wal.recover(None) or ""
            os.write(writer, f"{len(wal)}|{action}".encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        count, action = pipe.read().split("|", 1)
    os.waitpid(pid, 0)
    assert "moved 50 waiting event(s)" in action
    assert count == "50"


def test_one_damaged_page_loses_only_its_rows(tmp_path: Path) -> None:
    """A full scan fails on one bad page; salvage reads around it (review)."""
    directory = tmp_path / "wal"
    wal = WriteAheadLog(directory)
    padded = [make_event(number) for number in range(3000)]
    wal.append_rows([encode_row(event._replace(data_json='{"pad":"' + "x" * 200 + '"}'))
                     for event in padded])  # fmt: skip
    database = directory / "cache.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
    with database.open("r+b") as handle:  # one page in the middle of the file
        handle.seek(page_size * (pages // 2))
        handle.write(b"\xff" * page_size)
    with pytest.raises(sqlite3.DatabaseError) as failure:
        wal.read_due(5000, now=1e12)
    action = wal.recover(failure.value) or ""
    assert "quarantined" in action
    assert 2900 <= len(wal) < 3000  # everything but the damaged page's rows
    assert len(wal.read_due(5000, now=1e12).events) == len(wal)


def test_rows_without_a_due_time_are_not_read_twice_while_in_flight(tmp_path: Path) -> None:
    """Rows an older version wrote have no due time; a pipelined read moves past them."""
    wal = WriteAheadLog(tmp_path / "wal")
    wal.append_rows(_rows(10, "legacy"))
    wal._cache._sql("UPDATE Cache SET tag = NULL")
    first = wal.read_due(6, now=1e12)
    second = wal.read_due(6, now=1e12, after=first.cursor)
    taken = [queued.key for queued in first.events + second.events]
    assert len(first.events) == 6
    assert len(taken) == len(set(taken)) == 10


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(min_size=1, max_size=30),
    person=st.text(min_size=1, max_size=30),
    anonymous=st.booleans(),
    logged_at=st.floats(min_value=0, max_value=2**32, allow_nan=False),
)
def test_a_fresh_rows_text_is_what_the_json_encoder_writes(
    name: str, person: str, anonymous: bool, logged_at: float
) -> None:
    """The row of an event never tried is built without a second JSON encoding; it must
    be, byte for byte, what the encoder writes (quotes, control characters, unicode)."""
    event = Event(
        id="01J0000000000000000000000A",
        name=name,
        customer_id=None if anonymous else person,
        anonymous_id=person if anonymous else None,
        data_json='{"k":"v"}',
        timestamp=int(logged_at),
        logged_at=logged_at,
    )
    head = [2, name, event.customer_id, event.anonymous_id, int(logged_at), logged_at, None]
    expected = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',{"k":"v"}]'
    assert encode_row(event)[2] == expected
    assert decode_row(event.id, 0.0, expected).event == event
