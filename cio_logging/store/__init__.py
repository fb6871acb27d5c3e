"""Where events wait: the store roles, their row types, and the implementations.

Each user of a store sees it only through the role it needs (``typing.Protocol`` s):

* :class:`EventSink`: the committer appends rows (and asks the disk to recover);
* :class:`QueueView`: ``status()``, the CLI and ``flush()`` in a process that does not
  send look at the queue;
* :class:`SenderQueue`: the sender reads batches, acknowledges, schedules retries,
  moves due times on a clock step and puts replayed calls back;
* :class:`DeadLetterWriter`: the sender writes dead letters (and notes later calls of
  their people); :class:`DeadLetterArchive`: the CLI reads, purges, replays them.

Features that only one store has are roles of their own, handed over explicitly,
never looked up with ``getattr``: :class:`Spilling` (fleet mode's local spill) and
:class:`LegacyRows` (rows an earlier version left in diskcache's own table).

Implementations:

* :mod:`.local`: SQLite through diskcache in the queue directory (the default);
* :mod:`.postgres`: PostgreSQL, shared by a fleet of processes and hosts
  (``queue_url="postgresql://..."``), with a local spill;
* :mod:`.memory`: in memory, for unit tests (``cio_logging.testing.InMemoryStore``).

All keep the same texts (see :mod:`.rows`), so an event moves between them unchanged;
one contract suite (``tests/contract``) runs against all three.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

from ..events import Event
from ..templates import Templates
from ._sqlite import inherited_owner, secure_directory, secure_file
from .local import DeadLetterStore, WriteAheadLog
from .rows import (
    LANES,
    Batch,
    BatchQuery,
    CorruptEntry,
    DeadLetter,
    DeadLetterHistory,
    DeadLetterReason,
    LaterCall,
    QueuedEvent,
    ReplayRecord,
    Row,
    SendBatch,
    encode_row,
)

__all__ = [
    "LANES",
    "Batch",
    "BatchQuery",
    "CorruptEntry",
    "DeadLetter",
    "DeadLetterArchive",
    "DeadLetterHistory",
    "DeadLetterReason",
    "DeadLetterStore",
    "DeadLetterWriter",
    "EventSink",
    "LaterCall",
    "LegacyRows",
    "QueueView",
    "QueuedEvent",
    "ReplayRecord",
    "Row",
    "SendBatch",
    "SenderQueue",
    "Spilling",
    "WriteAheadLog",
    "encode_row",
    "inherited_owner",
    "secure_directory",
    "secure_file",
]


class EventSink(Protocol):
    """What the committer writes to: rows appended durably, in commit order."""

    #: A local directory the store's files live in (the spill directory for a shared
    #: store); named in messages about the disk.
    directory: Path

    def append_rows(self, rows: Sequence[Row]) -> int:
        """Commit rows made by :func:`encode_row` together; a row whose id is already
        queued is left as it is. Returns a position that every row of ``rows`` is at
        or before (see :meth:`QueueView.sendable_through`). Raises when nothing was
        written."""

    def volume(self) -> int:
        """Bytes the waiting rows take on this host's disk (for the shedding limits)."""

    def replaced_on_disk(self, *, at_most_every: float = 0.0) -> bool:
        """Whether the local file written is gone or replaced (see :meth:`recover`)."""

    def recover(self, error: BaseException | None) -> str | None:
        """Try to make the local file writable again after ``error``; says what it did."""


class QueueView(Protocol):
    """The queue as people and non-sending processes see it."""

    directory: Path

    def __len__(self) -> int:
        """How many calls wait."""

    def __contains__(self, key: object) -> bool:
        """Whether the call with this id waits."""

    def get(self, key: str) -> QueuedEvent | None:
        """One waiting call by id, or None."""

    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting call was logged."""

    def volume(self) -> int:
        """Bytes the waiting rows take (for the shedding limits)."""

    def delivered_total(self) -> int | None:
        """Calls delivered from this queue so far, by any process (None: not counted,
        as in fleet mode, where the sender's row counts them)."""

    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row at or before position ``rowid`` still waits and can go now
        (never tried, its retry due, or due beyond ``horizon``: a stepped clock)."""

    def close(self) -> None:
        """Release what this process holds open; a later call reopens."""


class SenderQueue(Protocol):
    """What the sender needs, per batch: the database does the per-call work."""

    def next_batch(self, query: BatchQuery, templates: Templates) -> SendBatch:
        """The calls that may go now, in the order they must go, with their batch
        items built from the stored text (see :class:`SendBatch`): due, no person of
        theirs busy, and no earlier call of their people waiting for a retry."""

    def rows(self, positions: Sequence[str | int]) -> tuple[list[QueuedEvent], list[CorruptEntry]]:
        """The rows at ``positions``, decoded (the slow path), and those unreadable."""

    def acknowledge(self, positions: Sequence[str | int], *, delivered: int = 0) -> None:
        """Take rows out (delivered, or dead-lettered first): one statement; ``delivered``
        of them were accepted (counted in :meth:`QueueView.delivered_total`)."""

    def schedule_retries(
        self,
        positions: Sequence[str | int],
        *,
        count_attempt: bool,
        delays: Sequence[float],
        now: float,
        error: str,
        max_attempts: int,
    ) -> list[QueuedEvent]:
        """Record a failed attempt and when each row is next due (``delays`` by attempt
        count), in one statement; returns, unchanged, the rows that reach
        ``max_attempts`` (to be dead-lettered)."""

    def next_due(self, after: float) -> float | None:
        """When the earliest retry due after ``after`` is due; None when none is."""

    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        """Move due times by a wall-clock step; returns how many moved."""

    def requeue(self, rows: Sequence[Row]) -> list[int]:
        """Put replayed rows ahead of every queued row, in this order; their positions."""

    def queued_calls_of(self, person: str) -> int:
        """How many calls of ``person`` wait (for a replay's report)."""

    def __len__(self) -> int:
        """How many calls wait."""


class Spilling(Protocol):
    """Fleet mode: rows committed to a local spill while the database was away."""

    def probe(self) -> bool:
        """Whether the database answers (then commits go to it again)."""

    def move_spilled(self, limit: int = 500) -> int:
        """Move up to ``limit`` spilled rows to the database; how many moved."""

    def available(self) -> bool:
        """Whether commits go to the database now (False: to the spill)."""

    def settle(self, timeout: float) -> int:
        """Move the spill to the database within ``timeout``; the rows left in it."""

    @property
    def moved_through(self) -> int:
        """A position every row moved from the spill by this process is at or before."""

    def spilled(self) -> int:
        """Rows in the local spill now."""


class LegacyRows(Protocol):
    """The local store: rows an earlier version left in diskcache's own table."""

    def move_legacy_rows(
        self, limit: int = 500, *, at_most_every: float = 0.0
    ) -> tuple[int, list[CorruptEntry]]:
        """Move them into the queue; returns how many moved and those refused."""


class DeadLetterWriter(Protocol):
    """What the sender writes dead letters with."""

    def add(
        self,
        key: str,
        event: Event | None,
        *,
        status: int | None,
        error_type: str,
        message: str,
        attempts: int,
        first_failure_at: float | None = None,
        now: float | None = None,
        original: DeadLetterReason | None = None,
        replays: Sequence[ReplayRecord] = (),
        replay_count: int | None = None,
    ) -> None:
        """Store (or overwrite) the entry ``key`` with this reason as the latest."""

    def people(self) -> dict[str, list[str]]:
        """The ids of the entries of each person (``Event.person``)."""

    def note_later_calls(self, key: str, calls: Sequence[LaterCall]) -> int:
        """Record calls of the entry's person delivered after it was dead-lettered;
        returns how many it has noted in all (0: no such entry)."""


class DeadLetterArchive(DeadLetterWriter, Protocol):
    """Events that failed for good, with their reasons and replay history."""

    directory: Path

    def __iter__(self) -> Iterator[DeadLetter]:
        """Every entry, oldest key first."""

    def get(self, key: str) -> DeadLetter | None:
        """One entry by event id, or None."""

    def select(
        self,
        *,
        event: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        before: float | None = None,
        keys: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries matching every filter given, oldest key first."""

    def purge(self, letters: Iterable[DeadLetter]) -> int:
        """Delete entries for good (or once replayed into the queue); returns how many."""

    def count(self, by: Literal["event", "reason"] | None = None) -> Counter[str]:
        """Count entries, in all or by event name or error type."""

    def __len__(self) -> int:
        """How many entries there are."""

    def close(self) -> None:
        """Release what this process holds open."""


class EventLog(EventSink, QueueView, SenderQueue, Protocol):
    """A whole queue store: every role a handler wires to its users."""

    def append(
        self,
        event: Event,
        *,
        replayed_at: float | None = None,
        dead_letter: DeadLetterHistory | None = None,
    ) -> None:
        """Write one event durably before returning (one row of :meth:`append_rows`)."""
