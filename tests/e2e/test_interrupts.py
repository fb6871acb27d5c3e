"""Interrupts at the edges: KeyboardInterrupt and SystemExit mid-commit, SIGTERM, flush.

Real signals, real subprocesses, real SQLite locks held by another process, the real
simulator over HTTPS. Every acknowledged event (its ``emit`` returned) is counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..apps import sigterm_app
from ..helpers import PROJECT_ROOT, PYTHON, HandlerFactory, child_environment, wait_for

INTERRUPT_APP = str(PROJECT_ROOT / "tests" / "apps" / "interrupt_app.py")

# Holds SQLite's write lock on a database for a while, from another process.
_LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""
# Takes the write lock once, briefly: fails if another connection kept it.
_WRITER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=float(sys.argv[2]))
connection.execute("BEGIN IMMEDIATE")
connection.execute("COMMIT")
print("wrote")
"""


def _queued_seqs(queue_dir: Path) -> set[int]:
    wal = WriteAheadLog(queue_dir / "wal", fsync=None)
    try:
        batch = wal.read_due(10**7, float("inf"))
        return {int(queued.event.data["seq"]) for queued in batch.events}
    finally:
        wal.close()


@pytest.fixture
def interrupt_on_alarm() -> Iterator[None]:
    """SIGALRM raises KeyboardInterrupt, as Ctrl-C would; restored afterwards."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _write_lock_held(database: Path, seconds: float) -> Iterator[None]:
    """Another process holds the write lock from now for ``seconds``; waited for at exit."""
    with subprocess.Popen(
        [PYTHON, "-c", _LOCKER, str(database), str(seconds)], stdout=subprocess.PIPE, text=True
    ) as locker:
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "locked"
        yield
        locker.wait(timeout=30)


def _interrupted(action: Callable[[], object]) -> None:
    """Run ``action`` until the pending alarm interrupts it (or, had it nothing to wait
    for, the sleep after it): either way the interrupt was raised in this process."""

    def act_then_wait() -> None:
        action()
        time.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        act_then_wait()


def _another_process_can_write(database: Path) -> bool:
    result = subprocess.run(
        [PYTHON, "-c", _WRITER, str(database), "2"], capture_output=True, text=True, timeout=30
    )
    return result.returncode == 0


class TestInterruptedCommit:
    """An interrupt that lands inside a commit loses no row and leaves no lock behind."""

    def _logger(self, handler: CustomerIOHandler) -> logging.Logger:
        logger = logging.getLogger(f"test.interrupts.{time.monotonic_ns()}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        return logger

    @pytest.mark.usefixtures("interrupt_on_alarm")
    def test_interrupt_as_a_transaction_begins_rolls_it_back(
        self, make_handler: HandlerFactory, queue_dir: Path, simulator: TrackAPISimulator
    ) -> None:
        """A group commit whose BEGIN returns into a KeyboardInterrupt keeps its rows
        buffered and releases the write lock; the next commit writes them all."""
        simulator.fail(503)  # keep delivered rows from leaving the log while we count
        handler = make_handler(commit_interval=10.0)
        logger = self._logger(handler)
        logger.info("page_viewed", extra=cio_event("user-1", seq=-1))
        assert handler.commit()  # the writer's first turn is over: this commit is ours
        for number in range(40):  # over 16 rows: the BEGIN ... COMMIT path
            logger.info("page_viewed", extra=cio_event("user-1", seq=number))
        database = queue_dir / "wal" / "cache.db"
        with _write_lock_held(database, 0.6):
            signal.setitimer(signal.ITIMER_REAL, 0.1)  # lands while BEGIN waits for the lock
            _interrupted(handler.commit)
        assert _another_process_can_write(database), "the interrupted commit kept the lock"
        assert handler.status()["buffered"] + len(_queued_seqs(queue_dir)) == 41
        assert handler.commit(timeout=10)
        assert handler.status()["buffered"] == 0
        assert _queued_seqs(queue_dir) == set(range(-1, 40))

    @pytest.mark.usefixtures("interrupt_on_alarm")
    def test_interrupt_after_an_essential_commit_keeps_the_count_right(
        self, make_handler: HandlerFactory, queue_dir: Path, simulator: TrackAPISimulator
    ) -> None:
        """An essential emit interrupted as its one-statement commit returns: the row is
        on disk, nothing is reported buffered for ever, and commit() succeeds."""
        simulator.fail(503)
        handler = make_handler()
        logger = self._logger(handler)
        database = queue_dir / "wal" / "cache.db"
        with _write_lock_held(database, 0.5):
            signal.setitimer(signal.ITIMER_REAL, 0.1)  # lands while the INSERT waits
            _interrupted(lambda: logger.info("purchase", extra=cio_event("user-1", seq=1)))
        assert handler.commit(timeout=10)
        assert handler.status()["buffered"] == 0
        assert _queued_seqs(queue_dir) == {1}
        assert _another_process_can_write(database)

    def test_close_cut_short_is_completed_by_the_next_close(
        self, make_handler: HandlerFactory, queue_dir: Path, simulator: TrackAPISimulator
    ) -> None:
        """close() interrupted before it committed: logging.shutdown's close finishes it."""
        simulator.fail(503)
        handler = make_handler(commit_interval=10.0)
        logger = self._logger(handler)
        for number in range(5):
            logger.info("page_viewed", extra=cio_event("user-1", seq=number))
        committer_close = handler._committer.close

        def interrupted_close(timeout: float) -> int:
            raise KeyboardInterrupt

        handler._committer.close = interrupted_close  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            handler.close()
        handler._committer.close = committer_close  # type: ignore[method-assign]
        handler.close()
        assert _queued_seqs(queue_dir) == set(range(5))


class TestSignalStorm:
    """Real SIGINT and SIGTERM at random moments, thousands of times, lose nothing."""

    def test_every_acknowledged_event_arrives(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        """Essential emits, non-essential emits and commits, with another connection
        holding the write lock in bursts: every event whose emit returned is delivered
        (or still on disk), and the queue is never left locked."""
        report_path = tmp_path / "report.json"
        result = subprocess.run(
            [PYTHON, INTERRUPT_APP, "4", str(report_path)],
            env=child_environment(simulator, queue_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(report_path.read_text())
        acknowledged = set(report["acknowledged"])
        delivered = {int(event.data["seq"]) for event in simulator.accepted if "seq" in event.data}
        lost = acknowledged - delivered - _queued_seqs(queue_dir)
        print(
            f"signals sent {report['signals_sent']}, interrupts caught {report['interrupts']}, "
            f"acknowledged {len(acknowledged)}, delivered {len(delivered)}, lost {len(lost)}"
        )
        assert report["interrupts"] >= 100, "the storm did not happen"
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged events lost"
        assert report["status_after_storm"]["disk_error"] is None
        assert "database is locked" not in result.stderr
        assert report["dropped"] == {}


class TestFlushInAProcessThatDoesNotDeliver:
    """flush() beside another delivering handler waits for every event it logged."""

    def test_an_id_that_sorts_high_does_not_end_the_wait(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        """The first event carries the largest possible ULID; flush still waits for
        the 2,999 after it."""
        simulator.set_latency(0.05)
        delivering = make_handler(batch_size=100, max_in_flight=1)
        delivering.flush()  # its flush thread now holds the delivery lock
        assert delivering.status()["delivering_process"]
        handler = make_handler()
        logger = logging.getLogger(f"test.interrupts.flush.{time.monotonic_ns()}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.info(
            "page_viewed",
            extra={"cio": {"customer_id": "u", "id": "7ZZZZZZZZZZZZZZZZZZZZZZZZZ", "data": {}}},
        )
        for number in range(2_999):
            logger.info("page_viewed", extra=cio_event("u", seq=number))
        handler.flush()
        assert not handler.status()["delivering_process"]
        assert len(simulator.accepted_ids()) == 3_000


SIGTERM_APP = str(PROJECT_ROOT / "tests" / "apps" / "sigterm_app.py")


def _signal_run(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    tmp_path: Path,
    *options: str,
    signum: int = signal.SIGTERM,
    at_least: tuple[int, ...] = (101, 101, 101, 101),
) -> tuple[int, dict[str, int], dict[str, set[int]], bytes, float]:
    """Run tests/apps/sigterm_app.py and send it ``signum`` mid-flow, once each thread
    has acknowledged at least its number in ``at_least`` (and 1.5 s have passed).
    Returns the exit status, what each thread had acknowledged just before the signal,
    what of each thread's events is on disk or delivered, the app's memory map and
    when (monotonic) the signal was sent."""
    ack_map = tmp_path / "acknowledged.bin"
    ack_map.write_bytes(bytes(sigterm_app.MAP_BYTES))
    with subprocess.Popen(
        [PYTHON, SIGTERM_APP, str(ack_map), *options],
        env=child_environment(simulator, queue_dir),
        stdout=subprocess.PIPE,
        text=True,
    ) as app:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "ready"
        time.sleep(1.5)

        def counts() -> list[int]:
            raw = ack_map.read_bytes()
            return [int.from_bytes(raw[8 * n : 8 * n + 8], "little") for n in range(len(at_least))]

        # Not a number of events in a fixed time: on a busy machine the main thread
        # may get little of the GIL beside three threads logging flat out.
        assert wait_for(lambda: all(map(operator.ge, counts(), at_least)), 60), counts()
        raw = ack_map.read_bytes()
        sent_at = time.monotonic()
        app.send_signal(signum)
        status = app.wait(timeout=60)
    acknowledged = {
        f"thread-{slot}": int.from_bytes(raw[8 * slot : 8 * slot + 8], "little")
        for slot in range(sigterm_app.THREADS)
    }
    kept: dict[str, set[int]] = {name: set() for name in acknowledged}
    for event in simulator.accepted:
        kept[str(event.customer_id)].add(int(event.data["seq"]))
    wal = WriteAheadLog(queue_dir / "wal", fsync=None)
    try:
        for queued in wal.read_due(10**7, float("inf")).events:
            kept[str(queued.event.customer_id)].add(int(queued.event.data["seq"]))
    finally:
        wal.close()
    return status, acknowledged, kept, raw, sent_at


def _sigterm_run(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    tmp_path: Path,
    *options: str,
    at_least: tuple[int, ...] = (101, 101, 101, 101),
) -> tuple[int, dict[str, int], dict[str, set[int]]]:
    status, acknowledged, kept, _, _ = _signal_run(
        simulator, queue_dir, tmp_path, *options, at_least=at_least
    )
    return status, acknowledged, kept


class TestSigterm:
    """What a SIGTERM does to events whose emit returned."""

    def test_installed_handler_commits_then_ends_the_process_as_before(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        """With install_signal_handlers(), every event acknowledged before SIGTERM is on
        disk or delivered, and the process still ends by SIGTERM's default action.
        A commit interval of 5 s makes the buffer hold seconds of events at the signal."""
        status, acknowledged, kept = _sigterm_run(
            simulator, queue_dir, tmp_path, "--install", "--commit-interval", "5"
        )
        assert status == -signal.SIGTERM
        assert all(count > 100 for count in acknowledged.values()), acknowledged
        lost = {
            name: sorted(set(range(1, count + 1)) - kept[name])[:5]
            for name, count in acknowledged.items()
            if set(range(1, count + 1)) - kept[name]
        }
        assert not lost, lost

    def test_a_signal_landing_inside_a_commit_is_deferred_not_lost(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        """The main thread logs essential events, so SIGTERM mostly lands inside its
        own commit: the handler defers it until the thread leaves, then commits."""
        status, acknowledged, kept = _sigterm_run(
            simulator,
            queue_dir,
            tmp_path,
            "--install",
            "--main-logs",
            "--commit-interval",
            "5",
            at_least=(11, 101, 101, 101),
        )
        assert status == -signal.SIGTERM
        assert acknowledged["thread-0"] > 10, acknowledged
        for name, count in acknowledged.items():
            assert not set(range(1, count + 1)) - kept[name], name

    def test_without_it_the_default_action_loses_the_buffer(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        """Python's default SIGTERM ends the process without logging.shutdown: the
        events of the last commit interval are lost (documented, and why the option
        exists). Here the interval is 5 s, so the loss is certain."""
        status, acknowledged, kept = _sigterm_run(
            simulator, queue_dir, tmp_path, "--commit-interval", "5"
        )
        assert status == -signal.SIGTERM
        missing = sum(
            len(set(range(1, count + 1)) - kept[name]) for name, count in acknowledged.items()
        )
        assert missing > 0


@pytest.mark.slow
class TestSigkillUnderLoad:
    """With threads logging flat out, a SIGKILL loses only the newest events."""

    @pytest.mark.parametrize("run", range(5))
    def test_only_a_tail_younger_than_the_interval_is_lost(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path, run: int
    ) -> None:
        """Four threads, commit_interval 50 ms: what a SIGKILL loses of each thread is a
        tail of its newest events (no gap before it); prints how old the oldest was."""
        _, acknowledged, kept, raw, killed_at = _signal_run(
            simulator, queue_dir, tmp_path, signum=signal.SIGKILL
        )
        oldest = 0.0
        lost_total = 0
        for slot in range(sigterm_app.THREADS):
            count = acknowledged[f"thread-{slot}"]
            lost = sorted(set(range(1, count + 1)) - kept[f"thread-{slot}"])
            lost_total += len(lost)
            if lost:
                assert lost == list(range(lost[0], count + 1)), "a gap before the lost tail"
                offset = 8 * sigterm_app.THREADS + 8 * (
                    sigterm_app.RING * slot + lost[0] % sigterm_app.RING
                )
                (acknowledged_at,) = struct.unpack_from("<d", raw, offset)
                oldest = max(oldest, killed_at - acknowledged_at)
        print(
            f"acknowledged {sum(acknowledged.values())}, lost {lost_total}, "
            f"oldest lost acknowledged {oldest * 1000:.0f} ms before the SIGKILL"
        )
