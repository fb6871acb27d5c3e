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

Interpreter exit is the other place where a thread of ours is not to be counted on.
Once the main thread has finished, ``threading``'s shutdown has run: ``concurrent.futures``
executors refuse work, and on Python 3.12 so does ``Thread.start`` ("can't create new
thread at interpreter shutdown"). ``logging.shutdown()`` runs after that, from
``atexit``. :func:`interpreter_exiting` tells the code that would start a thread to do
the work on the calling thread instead, on every Python alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading

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
)


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
