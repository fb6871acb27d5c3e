"""The sender's view of due times in a process that does not deliver (no network)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cio_logging.clock import WallClock
from cio_logging.config import Settings, resolve_settings
from cio_logging.resilience import RequestRateCap, RetryPolicy
from cio_logging.sender import Sender, StateFile
from cio_logging.sender import effects as effects_module
from cio_logging.sender.effects import Effects
from cio_logging.sender.outcome import Reason
from cio_logging.sender.state import DeliveryStats, Holds
from cio_logging.store import DeadLetterStore, WriteAheadLog, encode_row

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
def worker(tmp_path: Path) -> Iterator[Sender]:
    """A sender on a queue whose delivery lock another process holds (here, this test)."""
    settings = make_settings(tmp_path)
    wal = WriteAheadLog(settings.queue_dir / "wal")
    dead_letters = DeadLetterStore(settings.queue_dir / "dead")
    holder = os.open(settings.queue_dir / "delivery.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    made = Sender(settings, wal, wal, wal, dead_letters, record=StateFile(settings.queue_dir))
    made.wal = wal  # type: ignore[attr-defined]  # for plant()
    yield made
    made.close(2)
    os.close(holder)
    wal.close()
    dead_letters.close()


def plant(worker: Sender, due_in: float, *, failed: bool) -> int:
    """A row due ``due_in`` seconds from now; ``failed``: it waits for a retry.
    Returns its position, as flush() takes it."""
    event = make_event()
    wal: WriteAheadLog = worker.wal  # type: ignore[attr-defined]
    position = wal.append_rows([encode_row(event)])
    if failed:
        wal.schedule_retries(
            [position],
            count_attempt=True,
            delays=[due_in],
            now=time.time(),
            error="HTTP 503",
            max_attempts=8,
        )
    return position


class TestFlushWhereAnotherProcessDelivers:
    """flush() stops waiting for a retry that cannot go yet, and only for that."""

    def test_a_retry_due_soon_ends_the_wait(self, worker: Sender) -> None:
        """Waiting 30 s for a retry would only delay the exit: flush returns at once,
        saying the event still waits."""
        key = plant(worker, 30, failed=True)
        started = time.monotonic()
        assert not worker.flush(20.0, key)
        assert time.monotonic() - started < 15.0

    def test_a_row_never_tried_is_waited_for(self, worker: Sender) -> None:
        """A row never tried is due at once: flush waits for the sending process."""
        key = plant(worker, 300, failed=False)
        started = time.monotonic()
        assert not worker.flush(0.5, key)
        assert time.monotonic() - started >= 0.45

    def test_a_retry_beyond_the_horizon_is_due(self, worker: Sender) -> None:
        """An hour ahead cannot be a wait of ours (the clock stepped back): it is due."""
        key = plant(worker, 3600, failed=True)
        started = time.monotonic()
        assert not worker.flush(0.5, key)
        assert time.monotonic() - started >= 0.45


class TestErrorReports:
    """A repeated delivery error is logged again after a minute of steady time."""

    def test_a_step_back_does_not_silence_the_repeat(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """61 s later, the wall clock an hour back: the warning comes again."""
        wall, steady = [1_800_000_000.0], [5_000.0]
        monkeypatch.setattr(
            effects_module, "time", SimpleNamespace(monotonic=lambda: steady[0], time=time.time)
        )
        settings = make_settings(tmp_path)
        wal = WriteAheadLog(settings.queue_dir / "wal")
        dead_letters = DeadLetterStore(settings.queue_dir / "dead")
        clock = WallClock(wall=lambda: wall[0], steady=lambda: steady[0])
        cap = RequestRateCap(10)
        effects = Effects(
            settings,
            wal,
            dead_letters,
            retry=RetryPolicy.from_settings(settings),
            holds=Holds(breaker_wait=lambda: 0.0, shared_wait=cap.seconds_on_hold),
            rate_cap=cap,
            stats=DeliveryStats(),
            clock=clock,
        )
        failure = Reason("http_503", 503, "HTTP 503")
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            effects._log_failure(failure, logging.WARNING, "failed (%s); %s wait")
            wall[0] += 61 - 3600
            steady[0] += 61
            effects._log_failure(failure, logging.WARNING, "failed (%s); %s wait")
        assert [r.getMessage() for r in caplog.records].count("failed (HTTP 503); 0 wait") == 2
        wal.close()
        dead_letters.close()
