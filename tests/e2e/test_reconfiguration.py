"""Reconfiguring logging (``dictConfig`` again) never stalls on the handler's threads."""

from __future__ import annotations

import gc
import logging
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from cio_logging import background
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    PROJECT_ROOT,
    PYTHON,
    HandlerFactory,
    HandlerInACycle,
    child_environment,
    collection_only_on_request,
    printed_ids,
    wait_for,
)

RECONFIGURE_APP = str(PROJECT_ROOT / "tests" / "apps" / "reconfigure_app.py")


class TestDictConfigAgain:
    """dictConfig flushes and closes the old handler holding logging's module lock."""

    @pytest.mark.timeout(240)
    def test_ten_reconfigurations_in_an_outage_are_quick_and_lose_nothing(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        """Each returns far under flush_timeout (5 s); every event arrives after recovery."""
        simulator.fail(503)
        child = subprocess.Popen(
            [PYTHON, RECONFIGURE_APP, "10", "20"],
            env=child_environment(simulator, queue_dir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdin is not None
        output: list[str] = []
        for line in child.stdout:
            output.append(line)
            if line.strip() == "waiting":
                break
        try:
            durations = [float(line.split()[1]) for line in output if line.startswith("reconf")]
            ids = printed_ids("".join(output))
            assert simulator.accepted_ids() == set()  # all of it happened in the outage
            assert any(request.status == 503 for request in simulator.requests)
            simulator.clear_faults()
            delivered = wait_for(lambda: simulator.accepted_ids() >= set(ids), timeout=60)
        finally:
            _, stderr = child.communicate("exit\n", timeout=60)
        assert len(durations) == 10, stderr
        assert max(durations) < 2.5, durations
        assert len(ids) == 200
        assert delivered, f"{len(set(ids) - simulator.accepted_ids())} of 200 not delivered"
        assert simulator.accepted_ids() == set(ids)
        assert child.returncode == 0, stderr
        assert "Traceback" not in stderr


def _holding_the_module_lock() -> threading.RLock:
    """logging's module lock, as dictConfig holds it (an RLock on 3.11 to 3.13)."""
    lock: threading.RLock = logging._lock  # type: ignore[attr-defined]
    return lock


class TestFlushAndCloseUnderTheModuleLock:
    """What dictConfig does, done by hand: flush and close with logging's lock held."""

    def test_flush_and_close_return_quickly_in_an_outage(
        self, simulator: TrackAPISimulator, make_handler: HandlerFactory
    ) -> None:
        """Caches cleared, lock held: the flush thread's request and warning must not wait."""
        simulator.fail(503)
        handler = make_handler(flush_timeout=5.0, close_timeout=3.0, max_attempts=1000)
        logger = logging.getLogger(f"test.reconfigure.{time.monotonic_ns()}")
        logger.propagate = False
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        for number in range(20):
            logger.info("purchase", extra={"cio": {"customer_id": "42", "data": {"n": number}}})
        with _holding_the_module_lock():
            logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
            started = time.monotonic()
            handler.flush()
            flushed = time.monotonic() - started
            handler.close()
            closed = time.monotonic() - started - flushed
        assert flushed < 2.5
        assert closed < 1.5
        assert wait_for(lambda: any(r.status == 503 for r in simulator.requests))
        assert len(handler._wal) == 20


class TestGarbageHandlersInAReconfiguration:
    """A handler left as garbage (by an earlier dictConfig) is freed by the caller.

    Freed on one of our threads, by a collection that happened to run there, logging's
    clean-up would wait for the lock the reconfiguration holds, and the reconfiguration
    for that thread: seen once in CI, flush taking its full 5 s.
    """

    @pytest.mark.parametrize("call", ["flush", "close"])
    def test_flush_and_close_free_garbage_handlers_on_the_calling_thread(
        self, call: str, simulator: TrackAPISimulator, make_handler: HandlerFactory
    ) -> None:
        handler = make_handler(flush_timeout=5.0, close_timeout=3.0)
        with collection_only_on_request():
            garbage = weakref.ref(HandlerInACycle())
            assert garbage() is not None
            with _holding_the_module_lock():
                getattr(handler, call)()
                freed_under_the_lock = garbage() is None
        assert freed_under_the_lock

    def test_nothing_is_collected_outside_a_reconfiguration(
        self, simulator: TrackAPISimulator, make_handler: HandlerFactory
    ) -> None:
        """A flush that does not hold logging's lock leaves collection to Python."""
        handler = make_handler(flush_timeout=5.0)
        with collection_only_on_request():
            garbage = weakref.ref(HandlerInACycle())
            handler.flush()
            assert garbage() is not None
        gc.collect()
        assert garbage() is None


class TestLevelChecksOnOurThreads:
    """On our threads a guarded logger's level check never takes the module lock."""

    def _run_marked(self, action: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            background.mark_current_thread()
            action()

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    @pytest.mark.parametrize("library", ["urllib3.connectionpool", "psycopg", "psycopg.pq"])
    def test_logging_on_our_thread_does_not_wait_for_the_lock(self, library: str) -> None:
        """Our logger and a library's (the HTTP client's, the PostgreSQL driver's), caches
        just cleared, while another thread holds the lock."""
        ours, theirs = logging.getLogger("cio_logging"), logging.getLogger(library)
        background.guard_loggers()

        def log() -> None:
            ours.warning("cio_logging: a test warning")
            theirs.debug("a test request")

        # A collection on the thread that frees a garbage handler takes the lock too;
        # that is the class above's case, kept out of this one.
        gc.collect()
        with collection_only_on_request(), _holding_the_module_lock():
            logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
            thread = self._run_marked(log)
            thread.join(2.0)
            stuck = thread.is_alive()
        thread.join(5.0)
        assert not stuck

    def test_levels_still_hold_and_records_still_reach_handlers(self) -> None:
        """A reconfiguration made between two calls is honoured: nothing stale is cached."""
        name = f"urllib3.test_{time.monotonic_ns()}"
        logger = logging.getLogger(name)
        logger.propagate = False
        seen: list[str] = []
        catcher = logging.Handler()
        catcher.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        logger.addHandler(catcher)
        background.guard_loggers()

        def log_at_debug(message: str) -> None:
            thread = self._run_marked(lambda: logger.debug(message))
            thread.join(5.0)

        logger.setLevel(logging.DEBUG)
        log_at_debug("shown")
        logger.setLevel(logging.WARNING)  # clears every cache, as dictConfig does
        log_at_debug("hidden")
        logger.setLevel(logging.DEBUG)
        log_at_debug("shown again")
        logger.disabled = True
        log_at_debug("disabled")
        assert seen == ["shown", "shown again"]

    def test_other_threads_keep_the_stdlib_check(self) -> None:
        """Off our threads the check is logging's own: it fills the cache as usual."""
        logger = logging.getLogger(f"requests.test_{time.monotonic_ns()}")
        background.guard_loggers()
        assert "isEnabledFor" in vars(logger)
        logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
        assert logger.isEnabledFor(logging.CRITICAL)
        assert logger._cache == {logging.CRITICAL: True}  # type: ignore[attr-defined]
