"""The group committer: when rows are committed, and by whom (a real WAL, a fake clock)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from cio_logging.commit import BUFFERED, COMMITTED, GroupCommitter
from cio_logging.events import Event
from cio_logging.store import Row, WriteAheadLog, encode_row


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _row(number: int) -> Row:
    event = Event(
        id=f"01JC{number:022d}",
        name="page_viewed",
        customer_id="user-1",
        anonymous_id=None,
        data_json="{}",
        timestamp=1_764_300_000,
        logged_at=1_764_300_000.0,
    )
    return encode_row(event)


class TestAgeBound:
    """No buffered row waits past commit_interval while callers keep logging."""

    def test_a_caller_commits_once_the_oldest_row_is_past_the_interval(
        self, tmp_path: Path
    ) -> None:
        """The writer is asleep (as when a busy thread keeps the GIL from it): the
        first caller to find the oldest row past the interval commits the buffer."""
        wal = WriteAheadLog(tmp_path / "wal")
        clock = FakeClock()
        committer = GroupCommitter(
            wal, interval=10.0, max_buffer_bytes=1 << 20, on_committed=lambda: None, clock=clock
        )
        try:
            assert committer.submit(_row(0), durable=True) == COMMITTED  # writer's first turn
            assert committer.submit(_row(1), durable=False) == BUFFERED
            clock.now += 9.9
            assert committer.submit(_row(2), durable=False) == BUFFERED
            clock.now += 0.2  # row 1 is now 10.1 s old
            assert committer.submit(_row(3), durable=False) == COMMITTED
            assert committer.buffered == 0
            assert len(wal) == 4
        finally:
            committer.close(5.0)
            wal.close()


class _GatedLog(WriteAheadLog):
    """A real log whose commits wait at a gate once ``hold`` is set, as a commit does
    whose thread is waiting for the GIL."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.hold = False
        self.inside = threading.Event()
        self.gate = threading.Event()

    def append_rows(self, rows: Sequence[Row]) -> int:
        if self.hold:
            self.inside.set()
            self.gate.wait(30)
        return super().append_rows(rows)


class TestNoWaitBehindACommit:
    def test_a_late_non_essential_row_does_not_wait_for_a_running_commit(
        self, tmp_path: Path
    ) -> None:
        """The oldest row is past the interval while another thread's commit runs: the
        caller returns at once (that commit ends the lag), it does not wait for it."""
        wal = _GatedLog(tmp_path / "wal")
        clock = FakeClock()
        committer = GroupCommitter(
            wal, interval=10.0, max_buffer_bytes=1 << 20, on_committed=lambda: None, clock=clock
        )
        try:
            assert committer.submit(_row(0), durable=True) == COMMITTED  # writer started
            wal.hold = True
            leader = threading.Thread(
                target=committer.submit, args=(_row(1),), kwargs={"durable": True}
            )
            leader.start()
            assert wal.inside.wait(10)  # row 1's commit is under way, and held
            assert committer.submit(_row(2), durable=False) == BUFFERED
            clock.now += 10.5  # row 2 is past the interval
            outcome: list[str] = []
            late = threading.Thread(
                target=lambda: outcome.append(committer.submit(_row(3), durable=False))
            )
            late.start()
            late.join(10)
            assert outcome == [BUFFERED], "the caller waited for the other thread's commit"
            wal.gate.set()
            leader.join(10)
            assert committer.commit(10)
            assert len(wal) == 4
        finally:
            wal.gate.set()
            committer.close(5.0)
            wal.close()


def test_the_writer_commits_at_half_the_interval(tmp_path: Path) -> None:
    """Ahead of the callers, which take over only at the full interval."""
    wal = WriteAheadLog(tmp_path / "wal")
    clock = FakeClock()
    committer = GroupCommitter(
        wal, interval=10.0, max_buffer_bytes=1 << 20, on_committed=lambda: None, clock=clock
    )
    try:
        assert committer.submit(_row(0), durable=False) == BUFFERED
        with committer._lock:
            assert not committer._due()
            clock.now += 5.0
            assert committer._due()
    finally:
        committer.close(5.0)
        wal.close()
