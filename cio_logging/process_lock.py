"""One delivering process per queue directory, chosen by an advisory file lock.

Any number of processes may append to a queue directory; only the holder of
``delivery.lock`` reads and sends. That is how several processes (gunicorn workers,
a CLI drain) share one directory without sending an event twice: the lock is
``flock(2)``, so the kernel releases it when its holder exits or is killed, and another
process takes over on its next poll.

A forked child inherits the parent's open lock file and, with it, the parent's lock.
The child closes its copy at once (which does not release the parent's lock) and
competes for a fresh one, so a child never blocks its parent's delivery and never
delivers while the parent does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from pathlib import Path

from .store import secure_file


class DeliveryLock:
    """A non-blocking, fork-aware exclusive lock on a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor: int | None = None
        self._guard = threading.Lock()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(reference))

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks.

        Raises:
            PermissionError: the lock file is another user's and not writable by this
                one (left by a command run as root, say).
        """
        with self._guard:
            if self._descriptor is not None:
                return True
            secure_file(self.path)
            # Never through a link: the pid is written into what this opens.
            descriptor = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(descriptor)
                return False
            self._descriptor = descriptor  # held from here on, whatever happens next
            with contextlib.suppress(OSError):  # the pid is advisory: a full disk is fine
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
            return True

    def release(self) -> None:
        with self._guard:
            if self._descriptor is not None:
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
                os.close(self._descriptor)
                self._descriptor = None

    def _forget(self) -> None:
        # In a forked child: close our copy without LOCK_UN, which would release the
        # parent's lock too (flock locks belong to the shared open file description).
        self._guard = threading.Lock()
        if self._descriptor is not None:
            # EBADF: another thread of the parent was releasing it at the fork (closed,
            # not yet forgotten).
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None


def _forget_in_child(reference: weakref.ref[DeliveryLock]) -> None:
    lock = reference()
    if lock is not None:
        lock._forget()
