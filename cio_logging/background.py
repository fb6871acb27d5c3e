"""Our background threads never wait for ``logging``'s module lock.

``logging.config.dictConfig`` (and ``fileConfig``) flush and close the old handlers
while holding logging's module lock. Our ``flush`` waits for the flush thread, our
``close`` for it to stop, both for the commit thread. Were one of those threads itself
waiting for the module lock, a reconfiguration would stall for ``flush_timeout`` plus
``close_timeout`` (seen: 15 s per ``dictConfig`` during an outage).

The stdlib takes that lock in ``Logger.isEnabledFor`` whenever the logger's level cache
misses, and every reconfiguration (any ``setLevel``) empties the caches; it takes it in
``getLogger`` too. Our threads call urllib3's ``log.debug`` on every request and our
own ``cio_logging`` logger on failures. A ``logging.Filter`` cannot help: the level
check runs before filters.

So the loggers these threads use (:data:`GUARDED_PREFIXES`) get a level check of their
own, set on the logger instance: on a thread marked with :func:`mark_current_thread`
it reads the cache, or on a miss works the level out without the lock and without
storing it (a value stored unlocked could outlive the reconfiguration that cleared the
cache, and hide records the new configuration asks for); on every other thread it is
the stdlib's own check, unchanged. Records that pass still reach the application's
handlers, so someone who turns on urllib3's debug output still sees our requests;
silencing these loggers on our threads would have hidden that. Those handlers' own
locks are no risk: a reconfiguration holds only the lock of the handler it is flushing,
and ours takes none in ``handle``. And nothing these threads run calls ``getLogger``.

One path to the lock is not in any code: the garbage collector. A ``logging.Handler``
that has become garbage in a reference cycle is freed by whichever thread the next
collection runs on, and freeing it runs logging's clean-up, which takes the module
lock. On one of our threads, in the middle of a reconfiguration, that stalls the
thread until the reconfiguration is over, and the reconfiguration waits for the
thread. An application that reconfigures twice leaves such garbage: the first
``dictConfig`` drops the handlers it replaced. So before flush or close waits for our
threads under the module lock, :func:`collect_garbage_here` collects on the calling
thread, which holds the lock already and frees the garbage at once.

Interpreter exit is the other place where a thread of ours is not to be counted on.
Once the main thread has finished, ``threading``'s shutdown has run: ``concurrent.futures``
executors refuse work, and on Python 3.12 so does ``Thread.start`` ("can't create new
thread at interpreter shutdown"). ``logging.shutdown()`` runs after that, from
``atexit``. :func:`interpreter_exiting` tells the code that would start a thread to do
the work on the calling thread instead, on every Python alike.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Callable

#: Set on the commit thread, the flush thread and delivery's sender threads.
marker = threading.local()

#: The loggers our threads log to, themselves or through the libraries they call, and
#: their children.
GUARDED_PREFIXES = (
    "cio_logging",
    "urllib3",
    "requests",
    "customerio",
    "charset_normalizer",
    "chardet",
    "opentelemetry",
    "psycopg",  # fleet mode: the driver logs on every connect
)


def holding_logging_lock() -> bool:
    """Whether the calling thread holds ``logging``'s module lock, as ``dictConfig``
    and ``fileConfig`` do while they flush and close the handlers they replace."""
    is_owned = getattr(getattr(logging, "_lock", None), "_is_owned", None)
    return bool(is_owned()) if callable(is_owned) else False


def collect_garbage_here() -> None:
    """Inside a reconfiguration, collect garbage on the calling thread (see above).

    Only while the caller holds logging's lock, and only if the application has
    automatic collection on: with it off, no collection runs on our threads either.
    """
    if gc.isenabled() and holding_logging_lock():
        gc.collect()


def mark_current_thread() -> None:
    """Mark the calling thread as one of ours (a daemon thread the library started)."""
    marker.active = True


def on_our_thread() -> bool:
    return bool(getattr(marker, "active", False))


def interpreter_exiting() -> bool:
    """Whether the interpreter has begun to exit (the main thread has finished).

    From then on no thread of ours is started: thread pools refuse work on every
    Python, new threads on 3.12, and a daemon thread started now would be cut off at
    finalization anyway. Threads already running go on until then.
    """
    return not threading.main_thread().is_alive()


class _LevelCheck:
    """A logger's ``isEnabledFor`` that never takes the module lock on our threads."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def __call__(self, level: int) -> bool:
        logger = self._logger
        if not getattr(marker, "active", False):
            return type(logger).isEnabledFor(logger, level)
        if logger.disabled:
            return False
        cached: bool | None = logger._cache.get(level)  # type: ignore[attr-defined]
        if cached is not None:
            return cached
        if logger.manager.disable >= level:
            return False
        return level >= logger.getEffectiveLevel()


def guard_loggers() -> None:
    """Give every existing logger under :data:`GUARDED_PREFIXES` the lock-free check.

    Reads the logger registry without the module lock (``getLogger`` would take it),
    so it is safe on our threads too. Loggers created later are guarded by the next
    call: each commit thread and each delivery client calls it when it starts.
    """
    with contextlib.suppress(RuntimeError):  # the registry changed size meanwhile
        loggers = list(logging.Logger.manager.loggerDict.items())
        for name, logger in loggers:
            if not isinstance(logger, logging.Logger) or not _guarded_name(name):
                continue
            if not isinstance(vars(logger).get("isEnabledFor"), _LevelCheck):
                vars(logger)["isEnabledFor"] = _LevelCheck(logger)


def _guarded_name(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in GUARDED_PREFIXES)


class OwnThread:
    """One background thread of ours, started on demand and again in a forked child.

    A forked child has none of its parent's threads, only copies of their objects. So
    rather than an at-fork hook per module, whoever owns a thread asks
    :meth:`ensure_started` when it needs it: it compares the process id it started the
    thread in with this one (sentry-python's worker does the same), and in a child it
    forgets the parent's thread and starts a fresh one. ``on_fork`` runs first, in the
    child, to reset what the owner keeps beside the thread (its events and locks may
    have been copied held).

    No thread is started once the interpreter exits (:func:`interpreter_exiting`):
    :meth:`ensure_started` returns False, and the owner does the work on the calling
    thread instead.
    """

    def __init__(
        self,
        target: Callable[[], None],
        name: str,
        *,
        on_fork: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._name = name
        self._on_fork = on_fork
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def forked(self) -> bool:
        """Whether this is a forked child of the process that made this object; if so,
        forget the parent's thread (and reset the owner's state) now."""
        if self._pid == os.getpid():
            return False
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._thread = None
        if self._on_fork is not None:
            self._on_fork()
        return True

    @property
    def thread(self) -> threading.Thread | None:
        self.forked()
        return self._thread

    def is_alive(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    def ensure_started(self, *, stopped: bool = False) -> bool:
        """Start the thread unless it runs; whether it runs now. False when
        ``stopped``, at interpreter exit, or when Python refuses a new thread."""
        if self.is_alive():
            return True
        with self._guard:
            # Under the guard: another thread may be starting it right now, and the
            # caller that gave up on it would do the thread's work beside it.
            thread = self._thread
            if thread is not None and thread.is_alive():
                return True
            if stopped or interpreter_exiting():
                return False
            # start() waits for the new thread to say it runs. Under dictConfig, a
            # collection on that thread freeing a garbage handler would wait for the
            # lock the caller holds: both would wait for good.
            collect_garbage_here()
            thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                return False
            self._thread = thread
            return True

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; whether it has (True when none runs)."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()
