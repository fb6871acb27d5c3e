"""Python 3.12 and 3.13: every SQLite connection is closed, none left to the collector."""

from __future__ import annotations

import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, printed_ids

THREADS_APP = str(PROJECT_ROOT / "tests" / "apps" / "threads_app.py")


def _open_connections(wal: WriteAheadLog) -> int:
    return sum(1 for connection in wal._cache._open_connections if not connection.closed)


class TestAStrictApplication:
    """An application run with -W error::ResourceWarning -X dev."""

    def test_short_lived_threads_then_close_leave_nothing_open(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        """No ResourceWarning on any Python; no queue file still open once closed."""
        result = subprocess.run(
            [PYTHON, "-W", "error::ResourceWarning", "-X", "dev", THREADS_APP, "8", "5"],
            env=child_environment(simulator, queue_dir),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert "ResourceWarning" not in result.stderr, result.stderr
        assert "unclosed" not in result.stderr, result.stderr
        assert "open 0" in result.stdout.splitlines(), result.stdout
        ids = printed_ids(result.stdout)
        assert len(ids) == 40
        assert simulator.accepted_ids() == set(ids)


class TestConnectionsAreClosed:
    """Each thread's connection closes as the thread ends, or when the store closes."""

    def test_a_thread_closes_its_connection_as_it_ends(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        try:
            before = _open_connections(wal)
            thread = threading.Thread(target=wal.__len__)
            thread.start()
            thread.join()
            assert _open_connections(wal) == before
        finally:
            wal.close()

    def test_close_closes_every_threads_connection(self, tmp_path: Path) -> None:
        wal = WriteAheadLog(tmp_path / "wal")
        used, release = threading.Event(), threading.Event()

        def use_and_linger() -> None:
            len(wal)
            used.set()
            release.wait(10)
            len(wal)  # after close: reopens, as an emit after close does

        thread = threading.Thread(target=use_and_linger)
        thread.start()
        try:
            assert used.wait(10)
            assert _open_connections(wal) == 2  # this thread's (from opening) and its
            wal.close()
            assert _open_connections(wal) == 0
        finally:
            release.set()
            thread.join()
        assert _open_connections(wal) == 0  # the reopened one closed as the thread ended
        wal.close()


def test_the_supported_pythons_are_declared() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in project["classifiers"]
    assert sys.version_info >= (3, 11)


def test_a_log_collected_unclosed_leaves_no_connection_to_the_collector(tmp_path: Path) -> None:
    """Its thread closes the connection at its next open (3.13 would warn otherwise)."""
    import gc
    import weakref

    wal = WriteAheadLog(tmp_path / "first")
    connection = weakref.ref(wal._cache._con)
    del wal
    gc.collect()
    other = WriteAheadLog(tmp_path / "second")
    try:
        left = connection()
        assert left is None or left.closed
    finally:
        other.close()
