"""The flush thread's view of due times in a process that does not deliver (no network)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cio_logging import worker as worker_module
from cio_logging.clock import WallClock
from cio_logging.config import Settings, resolve_settings
from cio_logging.store import DeadLetterStore, WriteAheadLog, encode_row
from cio_logging.transport import Failure
from cio_logging.worker import DeliveryWorker

from ..helpers import make_event


def make_settings(tmp_path: Path) -> Settings:
    return resolve_settings(
        "site",
        "key-123456",
        region=None,
        queue_dir=tmp_path / "queue",
        track_url="https://127.0.0.1:9",  # never reached: this worker does not deliver
        ca_bundle=None,
        options={"flush_interval": 0.02, "max_backoff": 60, "max_retry_after": 600},
        environ={},
    )


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[DeliveryWorker]:
    """A worker on a queue whose delivery lock another process holds (here, this test)."""
    settings = make_settings(tmp_path)
    wal = WriteAheadLog(settings.queue_dir / "wal")
    dead_letters = DeadLetterStore(settings.queue_dir / "dead")
    holder = os.open(settings.queue_dir / "delivery.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    made = DeliveryWorker(settings, wal, dead_letters)
    yield made
    made.close(2)
    os.close(holder)
    wal.close()
    dead_letters.close()


def plant(worker: DeliveryWorker, due_in: float, *, failed: bool) -> int:
    """A row due ``due_in`` seconds from now; ``failed``: it records an error (a retry).
    Returns its rowid, as flush() takes it."""
    event = make_event()
    value = (
        encode_row(event, attempts=1, last_error="HTTP 503")[2] if failed else encode_row(event)[2]
    )
    return worker._wal.append_rows([(event.id, time.time() + due_in, value, event.person)])


class TestFlushWhereAnotherProcessDelivers:
    """flush() stops waiting for a retry that cannot go yet, and only for that."""

    def test_a_retry_due_soon_ends_the_wait(self, worker: DeliveryWorker) -> None:
        """Waiting 30 s for a retry would only delay the exit: flush returns."""
        key = plant(worker, 30, failed=True)
        assert worker.flush(2.0, key)

    def test_a_fresh_row_due_later_is_not_a_retry(self, worker: DeliveryWorker) -> None:
        """A row never tried, stamped ahead (an older version wrote the record's time): wait."""
        key = plant(worker, 300, failed=False)
        started = time.monotonic()
        assert not worker.flush(0.5, key)
        assert time.monotonic() - started >= 0.45

    def test_a_retry_beyond_the_horizon_is_due(self, worker: DeliveryWorker) -> None:
        """An hour ahead cannot be a wait of ours (the clock stepped back): it is due."""
        key = plant(worker, 3600, failed=True)
        assert not worker.flush(0.5, key)


class TestErrorReports:
    """A repeated delivery error is logged again after a minute of steady time."""

    def test_a_step_back_does_not_silence_the_repeat(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """61 s later, the wall clock an hour back: the warning comes again."""
        wall, steady = [1_800_000_000.0], [5_000.0]
        monkeypatch.setattr(
            worker_module, "time", SimpleNamespace(monotonic=lambda: steady[0], time=time.time)
        )
        settings = make_settings(tmp_path)
        wal = WriteAheadLog(settings.queue_dir / "wal")
        dead_letters = DeadLetterStore(settings.queue_dir / "dead")
        clock = WallClock(wall=lambda: wall[0], steady=lambda: steady[0])
        worker = DeliveryWorker(settings, wal, dead_letters, clock=clock)
        failure = Failure(503, "http_503", "HTTP 503")
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            worker._report(failure, 1, logging.WARNING, "failed (%s); %d wait")
            wall[0] += 61 - 3600
            steady[0] += 61
            worker._report(failure, 1, logging.WARNING, "failed (%s); %d wait")
        assert [r.getMessage() for r in caplog.records].count("failed (HTTP 503); 1 wait") == 2
        wal.close()
        dead_letters.close()
