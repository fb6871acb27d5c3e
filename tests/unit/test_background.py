"""Our background threads: started once, not doubled at exit, not stalled by dictConfig."""

from __future__ import annotations

import logging
import threading
import weakref

import pytest

from cio_logging import background

from ..helpers import HandlerInACycle, collection_only_on_request


def test_a_thread_being_started_elsewhere_is_not_given_up_on_at_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The committer's thread starts the sender's thread just as the interpreter begins
    to exit; logging.shutdown's flush asks meanwhile. It must be told the thread runs
    (and wait for it), not that none does: it then delivered on its own thread beside
    the sender's, and both took the same batch's rows out (an IndexError in CI)."""
    release = threading.Event()

    def work() -> None:
        release.wait(30)

    own = background.OwnThread(work, "cio-test-own-thread")
    starting, go_on = threading.Event(), threading.Event()
    real_start = threading.Thread.start

    def slow_start(thread: threading.Thread) -> None:
        real_start(thread)
        if thread.name == "cio-test-own-thread":
            starting.set()
            go_on.wait(30)  # started, but not yet recorded as ours

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    starter = threading.Thread(target=own.ensure_started)
    starter.start()
    assert starting.wait(30)
    monkeypatch.setattr(background, "interpreter_exiting", lambda: True)
    answers: list[bool] = []
    asker = threading.Thread(target=lambda: answers.append(own.ensure_started()))
    asker.start()
    asker.join(0.5)  # the old code answered at once; the new one waits for the starter
    go_on.set()
    asker.join(30)
    starter.join(30)
    try:
        assert answers == [True]
    finally:
        release.set()
        assert own.join(30)


def test_no_thread_starts_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background, "interpreter_exiting", lambda: True)
    own = background.OwnThread(lambda: None, "cio-test-exit")
    assert own.ensure_started() is False
    assert own.thread is None


def test_holding_logging_lock_is_true_only_for_the_thread_that_holds_it() -> None:
    """What tells flush and close they run inside dictConfig or fileConfig."""
    assert not background.holding_logging_lock()
    elsewhere: list[bool] = []
    with logging._lock:  # type: ignore[attr-defined]
        assert background.holding_logging_lock()
        other = threading.Thread(target=lambda: elsewhere.append(background.holding_logging_lock()))
        other.start()
        other.join(30)
    assert elsewhere == [False]
    assert not background.holding_logging_lock()


def test_a_thread_started_under_logging_lock_leaves_no_garbage_handler_to_free() -> None:
    """A handler created inside dictConfig may start a thread. Thread.start() waits for
    the thread to say it runs; had a collection there freed a garbage handler, freeing
    it would wait for the lock dictConfig holds, and both would wait for good. So the
    starter collects first, on its own thread."""
    release = threading.Event()

    def work() -> None:
        release.wait(30)

    own = background.OwnThread(work, "cio-test-under-the-lock")
    try:
        with collection_only_on_request():  # no collection but the ones asked for
            garbage = weakref.ref(HandlerInACycle())
            assert garbage() is not None
            with logging._lock:  # type: ignore[attr-defined]
                assert own.ensure_started()
                freed_before_the_start = garbage() is None
    finally:
        release.set()
        own.join(30)
    assert freed_before_the_start
