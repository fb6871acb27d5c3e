"""A store in memory: every role of the queue and the dead-letter archive, no disk.

For unit tests (of the sender's plan and effects, with no HTTP and no sleeping) and for
users' own tests: ``cio_logging.testing.InMemoryStore``. It passes the same contract
suite as the diskcache and PostgreSQL stores, and keeps rows in the same text
(:func:`~cio_logging.store.rows.encode_row`), so what it hands the sender is what they
hand it; only the batch items are built in Python (with the same templates).
Nothing survives the process: never use it where events must.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InvalidEventError
from ..events import Event
from ..templates import Templates, render, template_for
from .rows import (
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
    dead_letter_entry,
    dead_letter_from_json,
    decode_row,
    encode_row,
    lane_of,
    letter_json,
    matching_letters,
)


@dataclass
class _Row:
    position: int
    id: str
    due: float
    body: str
    person: str | None
    waiting: bool = False
    attempts: int | None = None
    first_failure_at: float | None = None
    last_error: str | None = None

    @property
    def other_person(self) -> str | None:
        """A merge's primary (as the databases work it out from the text)."""
        if not self.body.startswith("[3,"):
            return None
        try:
            people = decode_row(self.id, self.due, self.body, self.position).event.people
        except InvalidEventError:
            return None
        return people[1] if len(people) > 1 else None


class InMemoryStore:
    """The queue and the dead letters of one workspace, in memory; thread-safe."""

    def __init__(self, directory: Path | None = None) -> None:
        #: Named in messages; nothing is written there.
        self.directory = directory or Path("<memory>")
        self._guard = threading.RLock()
        self._rows: dict[int, _Row] = {}  # by position, inserted in position order
        self._ids: dict[str, int] = {}
        self._delivered = 0
        self._positions = itertools.count(1)
        self._letters: dict[str, str] = {}  # id -> the entry's JSON text

    # -- EventSink ---------------------------------------------------------------------

    def append_rows(self, rows: Sequence[Row]) -> int:
        last = 0
        with self._guard:
            for key, due, body, person in rows:
                if key in self._ids:
                    continue
                last = next(self._positions)
                self._rows[last] = _Row(last, key, due, body, person)
                self._ids[key] = last
        return last

    def append(
        self,
        event: Event,
        *,
        replayed_at: float | None = None,
        dead_letter: DeadLetterHistory | None = None,
    ) -> None:
        self.append_rows([encode_row(event, replayed_at=replayed_at, dead_letter=dead_letter)])

    def volume(self) -> int:
        with self._guard:
            return sum(len(row.body.encode()) for row in self._rows.values())

    def replaced_on_disk(self, *, at_most_every: float = 0.0) -> bool:
        return False

    def recover(self, error: BaseException | None) -> str | None:
        return None

    # -- QueueView ---------------------------------------------------------------------

    def __len__(self) -> int:
        with self._guard:
            return len(self._rows)

    def __contains__(self, key: object) -> bool:
        with self._guard:
            return key in self._ids

    def get(self, key: str) -> QueuedEvent | None:
        with self._guard:
            position = self._ids.get(key)
            row = None if position is None else self._rows[position]
        if row is None:
            return None
        try:
            return _decoded(row)
        except InvalidEventError:
            return None

    def oldest_logged_at(self) -> float | None:
        with self._guard:
            rows = sorted(self._rows.values(), key=lambda row: row.id)
        for row in rows[:1]:
            try:
                return _decoded(row).event.logged_at
            except InvalidEventError:
                return None
        return None

    def sendable_through(self, rowid: int, now: float, horizon: float) -> bool:
        with self._guard:
            return any(
                row.position <= rowid
                and (not row.waiting or row.due <= now or row.due > now + horizon)
                for row in self._rows.values()
            )

    def close(self) -> None:
        """Nothing to release."""

    # -- SenderQueue -------------------------------------------------------------------

    def next_batch(self, query: BatchQuery, templates: Templates) -> SendBatch:
        """As the databases do it: the calls (of the lane) that may go (due, no person
        busy or behind a retry), in commit order, up to ``limit``."""
        batch = SendBatch([], [], [], [], [], [], [], [])
        with self._guard:
            rows = sorted(self._rows.values(), key=lambda row: row.position)
        waiting = [row for row in rows if row.waiting and row.due > query.now]
        merges = [row for row in rows if row.other_person is not None]
        used = 0
        # As the databases read: a window of ``scan`` rows at a time; a batch comes from
        # one window; a window of busy people's calls only ends the read.
        scan = query.scan or 4 * query.limit
        examined = busy_seen = 0
        for row in rows:
            if len(batch) >= query.limit:
                break
            if query.lane is not None and lane_of(row.person) != query.lane:
                continue
            if examined == scan:
                if batch or busy_seen == scan:
                    break
                examined = busy_seen = 0
            examined += 1
            if row.person in query.busy or row.other_person in query.busy:
                busy_seen += 1
            if row.waiting and row.due > query.now:
                continue
            if row.person is not None and (
                row.person in query.busy
                or any(w.person == row.person and w.position < row.position for w in waiting)
                or any(
                    m.position < row.position and row.person in (m.person, m.other_person)
                    for m in merges
                )
            ):
                continue
            other = row.other_person
            if other is not None and (
                other in query.busy
                or any(e.person == other and e.position < row.position for e in rows)
            ):
                continue
            item, logged, essential = self._item(row, query, templates)
            size = len((item or row.body).encode("utf-8")) + 1
            if batch.positions and used + size > query.budget:
                break
            used += size
            if not item:
                batch.slow.append(len(batch))
            batch.positions.append(str(row.position))
            batch.ids.append(row.id)
            batch.people.append(row.person or "")
            if other is not None:
                batch.others.append(other)
            batch.items.append(item)
            batch.logged_at.append(logged)
            batch.essential.append(essential)
            if item:
                stamp = decode_row(row.id, row.due, row.body, row.position).event.timestamp
                if stamp < query.late_before:
                    batch.late += 1
                batch.oldest = stamp if batch.oldest is None else min(batch.oldest, stamp)
        return batch

    @staticmethod
    def _item(row: _Row, query: BatchQuery, templates: Templates) -> tuple[str, float, bool]:
        """The row's item ("" where the sender must look at it), logged_at, essential."""
        try:
            event = decode_row(row.id, row.due, row.body, row.position).event
        except InvalidEventError:
            return "", 0.0, False
        if not row.body.startswith("[") or '"v":' in row.body[:6]:
            return "", event.logged_at, False  # only the compact rows, as the databases
        template = template_for(templates, event)
        if template is None:
            return "", event.logged_at, False
        item = render(template, event)
        if len(item.encode("utf-8")) > query.item_limit or event.logged_at < query.expire_before:
            return "", event.logged_at, False
        return item, event.logged_at, event.name in query.essential

    def rows(self, positions: Sequence[str | int]) -> tuple[list[QueuedEvent], list[CorruptEntry]]:
        wanted = sorted({int(position) for position in positions})
        events: list[QueuedEvent] = []
        corrupt: list[CorruptEntry] = []
        with self._guard:
            found = [self._rows[p] for p in wanted if p in self._rows]
        for row in found:
            try:
                events.append(_decoded(row))
            except InvalidEventError as exc:
                corrupt.append(CorruptEntry(row.id, str(exc), row.position))
        return events, corrupt

    def delivered_total(self) -> int | None:
        return self._delivered

    def acknowledge(self, positions: Sequence[str | int], *, delivered: int = 0) -> None:
        with self._guard:
            self._delivered += delivered
            for position in positions:
                row = self._rows.pop(int(position), None)
                if row is not None:
                    del self._ids[row.id]

    def remove(self, keys: Iterable[str]) -> None:
        with self._guard:
            self.acknowledge([self._ids[key] for key in keys if key in self._ids])

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
        exhausted: list[QueuedEvent] = []
        counted = 1 if count_attempt else 0
        with self._guard:
            for position in sorted({int(p) for p in positions}):
                row = self._rows.get(position)
                if row is None:
                    continue
                try:
                    history = _decoded(row)
                except InvalidEventError:
                    continue
                attempts = history.attempts
                if count_attempt and attempts + 1 >= max_attempts:
                    exhausted.append(history)
                    continue
                attempts += counted
                row.attempts = attempts
                row.first_failure_at = history.first_failure_at or now
                row.last_error = error
                row.waiting = True
                row.due = now + delays[min(attempts, len(delays) - 1)]
        return exhausted

    def next_due(self, after: float) -> float | None:
        with self._guard:
            return min(
                (row.due for row in self._rows.values() if row.waiting and row.due > after),
                default=None,
            )

    def adjust_due_times(self, step: float, now: float, horizon: float) -> int:
        moved = 0
        with self._guard:
            for row in self._rows.values():
                if not row.waiting:
                    continue
                if (step < 0 and row.due > now) or (
                    step > 0 and now - step < row.due <= now - step + horizon
                ):
                    row.due += step
                    moved += 1
                if row.due > now + horizon:
                    row.due = now
                    moved += 1
        return moved

    def requeue(self, rows: Sequence[Row]) -> list[int]:
        with self._guard:
            lowest = min(self._rows, default=1)
            start = min(lowest, 1) - len(rows)
            positions = list(range(start, start + len(rows)))
            for position, (key, due, body, person) in zip(positions, rows, strict=True):
                if key not in self._ids:
                    self._rows[position] = _Row(position, key, due, body, person)
                    self._ids[key] = position
        return positions

    def queued_calls_of(self, person: str) -> int:
        with self._guard:
            return sum(1 for row in self._rows.values() if row.person == person)

    # -- the dead letters ----------------------------------------------------------------

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
        entry = dead_letter_entry(
            key,
            event,
            status=status,
            error_type=error_type,
            message=message,
            attempts=attempts,
            first_failure_at=first_failure_at,
            now=time.time() if now is None else now,
            original=original,
            replays=replays,
            replay_count=replay_count,
            existing=lambda: self.letter(key),
        )
        with self._guard:
            self._letters[key] = json.dumps(entry, ensure_ascii=False)

    def letter(self, key: str) -> DeadLetter | None:
        """One dead letter by id (:meth:`get` is the queue's)."""
        with self._guard:
            text = self._letters.get(key)
        return None if text is None else dead_letter_from_json(key, json.loads(text))

    def letters(self) -> Iterator[DeadLetter]:
        """Every dead letter, oldest id first."""
        with self._guard:
            keys = sorted(self._letters)
        for key in keys:
            letter = self.letter(key)
            if letter is not None:
                yield letter

    def people(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for letter in self.letters():
            if letter.person is not None:
                found.setdefault(letter.person, []).append(letter.key)
        return found

    def note_later_calls(self, key: str, calls: Sequence[LaterCall]) -> int:
        letter = self.letter(key)
        if letter is None:
            return 0
        if not calls:
            return letter.later_count
        kept, count = letter.with_later(calls)
        entry = letter_json(letter)
        entry["later"] = [call.to_json() for call in kept]
        entry["later_count"] = count
        with self._guard:
            self._letters[key] = json.dumps(entry, ensure_ascii=False)
        return count

    @property
    def dead_letters(self) -> InMemoryDeadLetters:
        """The dead letters as a :class:`~cio_logging.store.DeadLetterArchive`."""
        return InMemoryDeadLetters(self)


class InMemoryDeadLetters:
    """The dead-letter archive face of an :class:`InMemoryStore`."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store
        self.directory = store.directory

    def add(self, key: str, event: Event | None, **reason: object) -> None:
        self._store.add(key, event, **reason)  # type: ignore[arg-type]

    def people(self) -> dict[str, list[str]]:
        return self._store.people()

    def note_later_calls(self, key: str, calls: Sequence[LaterCall]) -> int:
        return self._store.note_later_calls(key, calls)

    def __iter__(self) -> Iterator[DeadLetter]:
        return self._store.letters()

    def get(self, key: str) -> DeadLetter | None:
        return self._store.letter(key) or self._store.letter(key.upper())

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
        letters: Iterable[DeadLetter] = (
            self if keys is None else filter(None, map(self.get, sorted(set(keys))))
        )
        return matching_letters(
            letters, event=event, reason=reason, since=since, before=before, limit=limit
        )

    def purge(self, letters: Iterable[DeadLetter]) -> int:
        removed = 0
        with self._store._guard:
            for letter in letters:
                removed += self._store._letters.pop(letter.key, None) is not None
        return removed

    def count(self, by: Literal["event", "reason"] | None = None) -> Counter[str]:
        counts: Counter[str] = Counter()
        for letter in self:
            if by == "event":
                counts[letter.event_name or "<unreadable>"] += 1
            elif by == "reason":
                counts[letter.error_type] += 1
            else:
                counts["total"] += 1
        return counts

    def __len__(self) -> int:
        with self._store._guard:
            return len(self._store._letters)

    def close(self) -> None:
        """Nothing to release."""


def _decoded(row: _Row) -> QueuedEvent:
    queued = decode_row(row.id, row.due, row.body, row.position)
    if row.attempts is None:
        return queued
    return queued._replace(
        attempts=row.attempts,
        first_failure_at=row.first_failure_at,
        last_error=row.last_error,
        next_attempt_at=row.due,
    )
