"""Where events wait: the store interface, its row types, and the two implementations.

The committer, the worker, replay, the CLI and ``status()`` see a store only through
the two protocols here:

* :class:`EventLog`, the events waiting for Customer.io (the write-ahead log);
* :class:`DeadLetterArchive`, the events that failed for good.

Implementations:

* :mod:`.local`: diskcache in the queue directory (the embedded default);
* :mod:`.postgres`: PostgreSQL, shared by a fleet of processes and hosts
  (``queue_url="postgresql://..."``), with a local diskcache spill.

Both keep the same texts (see :mod:`.rows`), so an event moves between them unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

from ..events import Event
from ._sqlite import inherited_owner, secure_directory, secure_file
from .local import DeadLetterStore, WriteAheadLog
from .rows import (
    Batch,
    CorruptEntry,
    DeadLetter,
    DeadLetterHistory,
    DeadLetterReason,
    QueuedEvent,
    ReplayRecord,
    Row,
    encode_row,
)

__all__ = [
    "Batch",
    "CorruptEntry",
    "DeadLetter",
    "DeadLetterArchive",
    "DeadLetterHistory",
    "DeadLetterReason",
    "DeadLetterStore",
    "EventLog",
    "QueuedEvent",
    "ReplayRecord",
    "Row",
    "WriteAheadLog",
    "encode_row",
    "inherited_owner",
    "secure_directory",
    "secure_file",
]


class EventLog(Protocol):
    """Events waiting for Customer.io, oldest due first; at-least-once.

    A row is appended before ``emit`` returns (or within ``commit_interval``) and
    removed only once Customer.io accepted it or it is in the dead-letter archive.
    """

    #: A local directory the log's files live in (the spill directory for a shared
    #: store); named in messages about the disk.
    directory: Path

    def append(
        self,
        event: Event,
        *,
        replayed_at: float | None = None,
        dead_letter: DeadLetterHistory | None = None,
    ) -> None:
        """Write one event durably before returning."""

    def append_rows(self, rows: Sequence[Row]) -> int:
        """Commit rows made by :func:`encode_row` together; a row whose id is already
        queued is left as it is. Returns a position that every row of ``rows`` is at
        or before (see :meth:`sendable_through`). Raises when nothing was written."""

    def read_due(
        self, limit: int, now: float | None = None, *, after: tuple[float, int] | None = None
    ) -> Batch:
        """Up to ``limit`` events due at ``now``, longest due first, after the cursor
        ``after`` of an earlier read; unreadable rows come back as corrupt entries."""

    def earlier_rows(
        self, people: Collection[str], through: int
    ) -> list[tuple[str, int, float, str]]:
        """``(person, position, due time, key)`` of every waiting row of ``people`` at
        or before position ``through`` (see :attr:`QueuedEvent.position`), in commit
        order. The sender sends a person's call only once each of these before it is
        accounted for: sent, in flight, or ahead of it in the same request."""

    def person_counts(self, people: Collection[str], through: int) -> dict[str, int]:
        """How many waiting rows each of ``people`` has at or before ``through``."""

    def remove(self, keys: Iterable[str], *, delivered: int = 0) -> None:
        """Acknowledge: delete delivered (or dead-lettered) events; ``delivered`` of them
        were accepted by Customer.io, and are counted with the deletion."""

    def delivered_total(self) -> int | None:
        """Events delivered from this queue since it was created (None: not counted)."""

    def record_failure(
        self,
        failures: Iterable[tuple[QueuedEvent, float]],
        error: str,
        now: float | None = None,
        *,
        count_attempt: bool = True,
    ) -> None:
        """Count a failed attempt on each event and set when it is next due."""

    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        """Move due times by a wall-clock step; returns how many moved."""

    def get(self, key: str) -> QueuedEvent | None:
        """One waiting event by id, or None."""

    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        """Whether a row at or before ``rowid`` is still waiting and can go now."""

    def oldest_logged_at(self) -> float | None:
        """When the oldest waiting event was logged."""

    def volume(self) -> int:
        """Bytes the waiting rows take (for the shedding limits)."""

    def replaced_on_disk(self, *, at_most_every: float = 0.0) -> bool:
        """Whether the local file written is gone or replaced (see :meth:`recover`)."""

    def recover(self, error: BaseException | None) -> str | None:
        """Try to make the log writable again after ``error``; says what it did."""

    def __len__(self) -> int:
        """How many events wait."""

    def __contains__(self, key: object) -> bool:
        """Whether the event with this id waits."""

    def close(self) -> None:
        """Release what this process holds open; a later call reopens."""


class DeadLetterArchive(Protocol):
    """Events that failed for good, with their reasons and replay history."""

    directory: Path

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

    def replay(self, letters: Iterable[DeadLetter], wal: EventLog) -> int:
        """Move entries back into ``wal`` (appended first, then removed here)."""

    def purge(self, letters: Iterable[DeadLetter]) -> int:
        """Delete entries for good; returns how many."""

    def count(self, by: Literal["event", "reason"] | None = None) -> Counter[str]:
        """Count entries, in all or by event name or error type."""

    def __len__(self) -> int:
        """How many entries there are."""

    def close(self) -> None:
        """Release what this process holds open."""
