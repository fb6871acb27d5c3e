"""The sender's housekeeping between batches: clock steps, spill, recovery, old rows.

* **Clock steps.** Due times in the store are wall-clock times (they outlive the
  process). Every turn takes the step the :class:`~cio_logging.clock.WallClock` noticed
  (in every process: a step noticed while another process sent was that one's to
  apply); the sending process moves the stored due times by it, and makes due those
  too far ahead to be ours (on the first turn, then every second).
* **Spill** (fleet mode): rows committed to the local spill while the database was
  away are moved into it by the holder of the queue directory's ``delivery.lock``.
* **Recovery**: a database file deleted under a process that only sends (no commit
  would notice) is recreated, and what the old file still holds moved in; after an
  unexpected error the store may repair itself (quarantine a corrupt file).
* **Old rows**: rows an earlier version left in diskcache's own table move into the
  queue (and rows there that are not ours become dead letters).
"""

from __future__ import annotations

import logging
import pwd
import sys
import time
from collections.abc import Callable

from ..clock import WallClock
from ..errors import DatabaseError
from ..process_lock import DeliveryLock
from ..store import CorruptEntry, EventSink, LegacyRows, SenderQueue, Spilling

internal_log = logging.getLogger("cio_logging")

# Look for due times too far ahead to be ours at most this often.
_DUE_CHECK_SECONDS = 1.0
# Look for an earlier version's rows, and for the database file being replaced, at most
# this often.
_LEGACY_CHECK_SECONDS = 1.0
_REPLACED_CHECK_SECONDS = 1.0
# Report a lock file this process cannot open at most this often.
_FOREIGN_LOCK_REPEAT_SECONDS = 60.0


class Upkeep:
    """Housekeeping for one sender."""

    def __init__(
        self,
        queue: SenderQueue,
        sink: EventSink,
        *,
        clock: WallClock,
        horizon: float,
        local_lock: DeliveryLock,
        stopped: Callable[[], bool],
        spill: Spilling | None = None,
        legacy: LegacyRows | None = None,
        corrupt: Callable[[list[CorruptEntry]], None] | None = None,
    ) -> None:
        self._queue = queue
        self._sink = sink
        self._clock = clock
        self._horizon = horizon
        self._local_lock = local_lock
        self._stopped = stopped
        self._spill = spill
        self._legacy = legacy
        self._corrupt = corrupt
        self._due_checked_at = float("-inf")
        self._foreign_lock_reported_at = float("-inf")

    def take_step(self) -> float:
        """The wall clock's step since the last turn (taken in every process)."""
        return self._clock.take_step()

    def move_spilled(self) -> None:
        """Fleet mode: move rows spilled while the database was away (by this process
        or an earlier one using this queue directory) into it. One local process does
        it: the holder of the directory's delivery.lock."""
        if self._spill is None:
            return
        try:
            if not self._spill.probe() or not self._local_lock.try_acquire():
                return
            while not self._stopped() and self._spill.move_spilled() > 0:
                pass
        except PermissionError as exc:
            self.report_foreign_lock(exc, self._local_lock)
        except DatabaseError as exc:
            internal_log.debug("spilled rows not moved yet: %s", exc)

    def tidy(self, step: float) -> None:
        """The sending process, every turn: due times, old rows, a replaced file."""
        self._keep_due_times(step)
        if self._legacy is not None:
            _, refused = self._legacy.move_legacy_rows(at_most_every=_LEGACY_CHECK_SECONDS)
            if refused and self._corrupt is not None:
                self._corrupt(refused)
        if self._sink.replaced_on_disk(at_most_every=_REPLACED_CHECK_SECONDS):
            # Deleted under a process that only delivers (it never logs, so no commit
            # would notice): it would go on reading the unlinked file.
            action = self._sink.recover(None)
            if action is not None:
                internal_log.error("%s", action)

    def _keep_due_times(self, step: float) -> None:
        """Move stored due times by a wall-clock step, and make due those too far
        ahead to be ours (on the first turn, then every _DUE_CHECK_SECONDS)."""
        moment = time.monotonic()
        if not step and moment - self._due_checked_at < _DUE_CHECK_SECONDS:
            return
        self._due_checked_at = moment
        now = self._clock()
        moved = self._queue.adjust_due_times(step, now, self._horizon)
        if step:
            internal_log.warning(
                "the wall clock stepped %+.1f s; moved %d due time(s) in the "
                "queue by it, so retries keep their wait",
                step,
                moved,
            )
        elif moved:
            internal_log.warning(
                "%d event(s) were due more than %g s ahead (written under "
                "another clock); they are due now",
                moved,
                self._horizon,
            )

    def recover(self) -> None:
        """After an unexpected error: a corrupt or deleted database fails every read,
        and the store may repair itself (quarantine, a fresh file)."""
        error = sys.exc_info()[1]
        try:
            action = self._sink.recover(error)
        except Exception as exc:  # the disk is not back yet: the next turn tries again
            internal_log.debug("queue recovery failed: %r", exc)
            return
        if action is not None:
            internal_log.error("%s", action)

    def report_foreign_lock(self, error: PermissionError, lock: object) -> None:
        """A root shell ran the CLI here with an older version and left the lock as
        root's: this process can log (events wait on disk) but never deliver."""
        now = time.monotonic()
        if now - self._foreign_lock_reported_at < _FOREIGN_LOCK_REPEAT_SECONDS:
            return
        self._foreign_lock_reported_at = now
        path = getattr(lock, "path", None)
        try:
            owner = pwd.getpwuid(path.stat().st_uid).pw_name if path is not None else ""
        except (OSError, KeyError):
            owner = "another user"
        internal_log.error(
            "cannot open %s (%s): it belongs to %s, so this process "
            "cannot deliver from this queue; events wait on disk. Give it back to "
            "the queue directory's owner (chown)",
            path,
            error.strerror,
            owner or "another user",
        )
