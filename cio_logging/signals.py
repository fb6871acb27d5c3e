"""Committing buffered events when the process is told to stop (opt-in).

Python's default action for SIGTERM (and SIGHUP) ends the process on the spot:
``atexit`` and ``logging.shutdown`` never run, so the non-essential events still in
the commit buffer (at most ``commit_interval`` of them) are lost. Kubernetes, systemd
and most process managers stop a process with SIGTERM.

:func:`install_commit_on_signals` puts a handler in front of whatever handled the
signal before. It commits the buffer, then passes the signal on: to the previous
Python handler (a framework's graceful shutdown, ``sys.exit``), or, where the
previous disposition was the default action, to the default action itself, so the
process ends exactly as it would have, with the same exit status.

Once the signal arrived, every event is committed before ``emit`` returns: the process
may end by any path from then on. uvicorn, for one, finishes the requests in progress
and then raises SIGTERM again with Python's default action, without ``atexit``; its
worker's events logged in between would otherwise wait in memory and be lost. Under
uvicorn the handler installs this by itself (:func:`reraises_with_default_action`):
in front of uvicorn's own SIGTERM handler when it is already in place (``--workers``),
or, in a single uvicorn process, as the handler uvicorn finds, restores and raises the
signal into at the end.

A signal handler runs on the main thread between two bytecodes, possibly in the
middle of that thread's own commit (an essential emit, ``flush()``). Committing from
there could wait forever on a lock or a commit that thread itself holds. So when the
signal lands inside the committer it is deferred: the committer raises it again the
moment its thread leaves, and the handler then runs on clean ground.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from .commit import GroupCommitter

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def reraises_with_default_action(signum: int = signal.SIGTERM) -> bool:
    """Whether a server in this process ends its graceful shutdown by restoring the
    handler it found for ``signum`` and raising the signal again, with Python's default
    action when that is what it found: the process then ends without ``atexit`` or
    ``logging.shutdown()``.

    uvicorn (0.5x) does. Run with ``--workers N``, each worker imports the application
    after uvicorn installed its handler (``Server.handle_exit``), which is seen here;
    run as one process, it imports the application first and installs its handler
    later, so its module being loaded is the sign, while the default action is still
    in place.
    """
    current = signal.getsignal(signum)
    if current == signal.SIG_DFL:
        return "uvicorn.server" in sys.modules
    server = getattr(current, "__self__", None)
    return (
        getattr(current, "__name__", None) == "handle_exit"
        and server is not None
        and type(server).__module__.split(".")[0] == "uvicorn"
    )


def install_commit_on_signals(
    committer: GroupCommitter, timeout: float, signals: Iterable[int]
) -> None:
    """Install, for each of ``signals``, a handler that commits, then chains.

    Raises:
        ValueError: not on the main thread (``signal.signal``'s own rule).
    """
    for signum in signals:
        previous = signal.getsignal(signum)
        signal.signal(signum, _CommitThenChain(committer, timeout, previous))


class _CommitThenChain:
    """The installed handler: commit the buffer, then hand the signal on."""

    def __init__(self, committer: GroupCommitter, timeout: float, previous: SignalHandler) -> None:
        self._committer = committer
        self._timeout = timeout
        self._previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self._committer.inside_on_this_thread:
            self._committer.defer_signal(signum)
            return
        # From here on the process may end by any path, the default action included
        # (uvicorn re-raises the signal with it once its graceful shutdown is over): the
        # events logged meanwhile, by requests still being served, wait in no buffer.
        self._committer.stop_buffering()
        # A failing disk makes this return False at once; the signal goes on anyway.
        self._committer.commit(self._timeout)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL, or a handler installed outside Python: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
