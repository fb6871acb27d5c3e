"""A stop asked for by SIGINT or SIGTERM, for the long-running commands.

A Python signal handler runs on the main thread between two bytecodes, and may land
while that thread holds the lock of the very :class:`threading.Event` the handler
would set: inside ``Event.wait`` re-taking its lock, or inside a first handler's
``set()`` when a second signal follows (a parent's death signal, then the supervisor's
SIGTERM). ``set()`` then waits for a lock its own thread holds, for ever. This was
seen: ``cio-logging deliver`` hung after two signals 2 ms apart.

So the handler takes no lock and starts nothing: it records the request (a plain
attribute write). :meth:`StopRequest.wait` and :meth:`StopRequest.is_set` read it, and
every loop that waits for a stop wakes at least twice a second, so the stop is seen
within one such wait.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(threading.Event):
    """An event that a signal handler may set safely (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: int | None = None

    def request_from_signal(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler: record the request, take no lock."""
        if self.signal is None:
            self.signal = signum

    def is_set(self) -> bool:
        return self.signal is not None or super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(timeout) or self.signal is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the yielded :class:`StopRequest`; the handlers found
    before are put back on the way out."""
    stop = StopRequest()
    previous = {number: signal.signal(number, stop.request_from_signal) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
