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

A signal handler runs on the main thread between two bytecodes, possibly in the
middle of that thread's own commit (an essential emit, ``flush()``). Committing from
there could wait forever on a lock or a commit that thread itself holds. So when the
signal lands inside the committer it is deferred: the committer raises it again the
moment its thread leaves, and the handler then runs on clean ground.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from .commit import GroupCommitter

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


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
