"""Disk faults under a live handler: full, read-only, deleted, corrupt.

The application never sees an exception; events wait in a bounded memory buffer while
the disk fails, the failure is reported loudly, a corrupt file is quarantined, and
everything is delivered once the disk recovers. The full and read-only cases mount a
small tmpfs, which needs root (the suite runs as root here and in CI).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store.local import WriteAheadLog

from ..helpers import HandlerFactory, handler_settings, wait_for


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"the disk-fault tests need {name} (and root)")
    return path


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2M") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        [tool("mount"), "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the disk-fault tests need root): {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run([tool("umount"), "-l", str(path)], check=False)


def attach(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"disk.{name}.{id(handler)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def log_numbered(logger: logging.Logger, numbers: range, name: str = "purchase") -> None:
    for number in numbers:
        logger.info(name, extra=cio_event(f"user-{number}", n=number, pad="x" * 200))


def delivered_numbers(simulator: TrackAPISimulator) -> set[int]:
    return {int(event.data["n"]) for event in simulator.accepted}


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem holding ``directory``."""
    filler = directory / "filler"
    # Unbuffered writes, down to single bytes: a buffered file would keep the bytes that
    # did not fit and raise ENOSPC again from close(), and a large chunk that no longer
    # fits would leave the last few kilobytes free for SQLite to use.
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = 65536
        while chunk:
            try:
                if os.write(descriptor, b"\0" * chunk) < chunk:
                    chunk //= 2
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_holds_events_in_memory_and_recovers(
    tmp_path: Path,
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 8 MB: once the filler goes, the backlog (about 700 kB) is written to the -wal
    # file and deleted from it as it is delivered; SQLite folds that file into the
    # database only every 4 MB. On 2 MB the deletes filled the disk again.
    with small_tmpfs(tmp_path / "mnt", size="8M") as mount:
        simulator.fail(503)  # nothing leaves the queue: it must grow on disk
        handler = CustomerIOHandler(
            **handler_settings(
                simulator,
                mount / "queue",
                consecutive_failures=1,
                max_attempts=1000,
                reset_timeout=0.3,
            )
        )
        logger = attach(handler, "full")
        log_numbered(logger, range(20))
        assert handler.commit(5)
        filler = fill(mount)
        with caplog.at_level(logging.ERROR, logger="cio_logging"):
            log_numbered(logger, range(20, 2020))  # must not raise, essential or not
            log_numbered(logger, range(2020, 2100), name="page_viewed")
        status = handler.status()
        assert status["buffered"] > 0
        assert "full" in (status["disk_error"] or "")
        assert status["dropped"] == {}
        assert any("NOT safe from a crash" in r.getMessage() for r in caplog.records)
        filler.unlink()  # the disk recovers
        assert wait_for(lambda: handler.status()["buffered"] == 0, 15)
        assert handler.status()["disk_error"] is None
        simulator.clear_faults()
        assert wait_for(lambda: delivered_numbers(simulator) == set(range(2100)), 30), (
            sorted(set(range(2100)) - delivered_numbers(simulator))[:20],
            handler.status(),
        )
        assert simulator.duplicates == 0  # none sent twice
        handler.close()


def test_a_sent_call_whose_row_cannot_be_taken_out_is_never_sent_again(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Customer.io accepted the calls, then the disk filled before their rows could be
    deleted: the sender must not send them again on every turn (it did, once a second,
    for as long as the disk stayed full) nor anything else until the rows are out."""
    disk_full = threading.Event()
    disk_full.set()
    tries: list[int] = []
    deleting = WriteAheadLog.acknowledge

    def acknowledge(self: WriteAheadLog, positions: list[int], *, delivered: int = 0) -> None:
        if disk_full.is_set() and positions:
            tries.append(len(positions))
            raise sqlite3.OperationalError("database or disk is full")
        deleting(self, positions, delivered=delivered)

    monkeypatch.setattr(WriteAheadLog, "acknowledge", acknowledge)
    handler = make_handler()
    logger = attach(handler, "unremovable")
    with caplog.at_level(logging.ERROR, logger="cio_logging"):
        log_numbered(logger, range(5))
        assert wait_for(lambda: len(tries) >= 3, 30)  # three turns of the sender at least
        log_numbered(logger, range(5, 8))
        assert wait_for(lambda: len(tries) >= 5, 30)
    # The first request may hold all five or fewer (the sender may read while they are
    # logged); either way nothing goes after it, and nothing twice.
    sent = delivered_numbers(simulator)
    assert simulator.duplicates == 0, "a call was sent again while its row stayed queued"
    assert len(simulator.accepted) == len(sent)
    assert sent, "nothing was sent"
    assert sent <= set(range(5)), sent
    message = f"cannot take out {len(sent)} call(s)"
    assert any(message in r.getMessage() for r in caplog.records)
    disk_full.clear()
    assert wait_for(lambda: handler.status()["queued"] == 0, 30), handler.status()
    assert sorted(delivered_numbers(simulator)) == list(range(8))
    assert len(simulator.accepted) == 8
    assert simulator.duplicates == 0
    assert handler.status()["delivered"] == 8


def test_the_memory_buffer_is_bounded_and_sheds_by_importance(
    tmp_path: Path, make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    with small_tmpfs(tmp_path / "mnt") as mount:
        simulator.fail(503)
        handler = CustomerIOHandler(
            **handler_settings(simulator, mount / "queue", max_buffer_bytes=64 * 1024)
        )
        logger = attach(handler, "bounded")
        log_numbered(logger, range(5))
        assert handler.commit(5)
        filler = fill(mount)
        log_numbered(logger, range(1000, 1600), name="page_viewed")
        log_numbered(logger, range(2000, 2600))
        dropped = handler.status()["dropped"]
        # Non-essential events stop at the budget, essential ones at twice it.
        assert dropped["buffer_full"] > 600
        assert handler._committer.buffered_bytes <= 2 * 64 * 1024
        assert handler.status()["buffered"] < 600
        filler.unlink()
        assert wait_for(lambda: handler.status()["buffered"] == 0, 15)
        simulator.clear_faults()
        kept = handler.status()["enqueued"]
        assert wait_for(lambda: len(simulator.accepted) == kept, 30)
        assert kept + dropped["buffer_full"] == 1205
        handler.close()


def test_a_read_only_filesystem_holds_events_and_recovers(
    tmp_path: Path, simulator: TrackAPISimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The volume under the queue is swapped for a read-only one, then made writable.

    A filesystem cannot be remounted read-only while SQLite holds files open for
    writing; a volume detached and remounted read-only (as an operator or the kernel
    after an I/O error would) is what a running application meets instead.
    """
    mount = tmp_path / "mnt"
    with small_tmpfs(mount):
        handler = CustomerIOHandler(**handler_settings(simulator, mount / "queue"))
        logger = attach(handler, "readonly")
        log_numbered(logger, range(10))
        handler.flush()
        subprocess.run([tool("umount"), "-l", str(mount)], check=True)  # the old volume, detached
        subprocess.run(
            [tool("mount"), "-t", "tmpfs", "-o", "size=2M,mode=0700,ro", "tmpfs", str(mount)],
            check=True,
        )
        try:
            with caplog.at_level(logging.ERROR, logger="cio_logging"):
                log_numbered(logger, range(10, 60))  # must not raise
                assert wait_for(
                    lambda: "Read-only file system" in (handler.status()["disk_error"] or ""), 10
                ), handler.status()["disk_error"]
                log_numbered(logger, range(60, 70))
                assert handler.status()["buffered"] >= 10
        finally:
            subprocess.run([tool("mount"), "-o", "remount,rw", str(mount)], check=True)
        # Rows committed to the detached volume before the swap was noticed are read
        # back through the connection kept to it.
        assert wait_for(lambda: delivered_numbers(simulator) == set(range(70)), 30)
        assert simulator.duplicates == 0
        handler.close()


def test_a_deleted_queue_directory_is_recreated_and_nothing_committed_is_lost(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    queue_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator.fail(503)  # the first events wait in the log when it is deleted
    handler = make_handler(consecutive_failures=1, max_attempts=1000, reset_timeout=0.3)
    logger = attach(handler, "deleted")
    log_numbered(logger, range(30))
    assert handler.commit(5)
    with caplog.at_level(logging.ERROR, logger="cio_logging"):
        # Renamed away first so the path vanishes at once: a plain rmtree could race
        # with the handler recreating the directory.
        doomed = queue_dir.with_name("deleted")
        queue_dir.rename(doomed)
        shutil.rmtree(doomed)
        log_numbered(logger, range(30, 60), name="page_viewed")
        log_numbered(logger, range(60, 90))
        assert wait_for(
            lambda: any("gone or replaced" in r.getMessage() for r in caplog.records), 10
        )
    assert wait_for(lambda: handler.status()["disk_error"] is None, 10)
    assert stat.S_IMODE((queue_dir / "wal").stat().st_mode) == 0o700
    simulator.clear_faults()
    assert wait_for(lambda: delivered_numbers(simulator) == set(range(90)), 30)
    # The events committed before the deletion came from the unlinked database.
    handler.close()
    assert (
        CustomerIOHandler(
            simulator.site_id,
            simulator.api_key,
            queue_dir=queue_dir,
            track_url=simulator.url,
            ca_bundle=simulator.ca_file,
        ).status()["queued"]
        == 0
    )


def corrupt(database: Path) -> None:
    with database.open("r+b") as handle:
        handle.write(b"this is not an SQLite database, it was overwritten" * 40)


def test_a_corrupt_database_is_quarantined_at_start(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    queue_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator.fail(503)
    first = make_handler(consecutive_failures=1, max_attempts=1000)
    log_numbered(attach(first, "corrupt-1"), range(5))
    first.close()
    corrupt(queue_dir / "wal" / "cache.db")
    with caplog.at_level(logging.ERROR, logger="cio_logging"):
        second = make_handler()  # must not raise: the corrupt file is set aside
    assert any("quarantined" in r.getMessage() for r in caplog.records)
    quarantined = sorted(p.name for p in (queue_dir / "wal").iterdir() if ".corrupt-" in p.name)
    assert quarantined
    assert all(
        stat.S_IMODE((queue_dir / "wal" / name).stat().st_mode) == 0o600 for name in quarantined
    )
    simulator.clear_faults()
    log_numbered(attach(second, "corrupt-2"), range(100, 110))
    second.flush()
    assert wait_for(lambda: delivered_numbers(simulator) == set(range(100, 110)), 10)


def test_a_database_corrupted_while_running_is_quarantined_and_logging_goes_on(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    queue_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = make_handler()
    logger = attach(handler, "corrupt-live")
    log_numbered(logger, range(5))
    handler.flush()
    with caplog.at_level(logging.ERROR, logger="cio_logging"):
        corrupt(queue_dir / "wal" / "cache.db")
        # Connections already open may go on from SQLite's cache; a thread that logs
        # for the first time opens a new one and meets the damage. Its events wait in
        # memory while the file is quarantined and a fresh one started.
        worker = threading.Thread(target=log_numbered, args=(logger, range(100, 140)))
        worker.start()
        worker.join()
        assert wait_for(lambda: any("quarantined" in r.getMessage() for r in caplog.records), 10)
    assert wait_for(lambda: delivered_numbers(simulator) >= set(range(100, 140)), 30)
    assert any(".corrupt-" in path.name for path in (queue_dir / "wal").iterdir())
    handler.close()
