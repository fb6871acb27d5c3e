"""The row types of the stores and the one text format both keep an event in.

A queued event is a row ``(event id, due time, JSON text, person)`` (see :func:`encode_row`);
a dead letter is one JSON object (see :func:`dead_letter_entry`). The diskcache store
and the PostgreSQL store keep exactly these texts, so an event moves between them
(a spill moved to the database, a replay) unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string
from typing import Any, NamedTuple

from ..errors import InvalidEventError
from ..events import CALLS, EVENT, Event, event_from_dict

_ENTRY_VERSION = 1


# A NamedTuple, not a frozen dataclass: as immutable, and built about four times
# faster (a frozen dataclass pays object.__setattr__ per field); one is built for
# every event, at emit and at every read of the log.
class QueuedEvent(NamedTuple):
    """An event in the write-ahead log, with its delivery history."""

    key: str
    event: Event
    attempts: int
    first_failure_at: float | None
    last_error: str | None
    next_attempt_at: float
    replayed_at: float | None = None
    # Set for an event replayed from the dead-letter store: what it was dead-lettered
    # for first and its earlier replays, so failing again keeps them.
    dead_letter: DeadLetterHistory | None = None
    #: Where the row sits in commit order (SQLite rowid, PostgreSQL seq): the order a
    #: person's calls are sent in (see EventLog.earlier_rows). 0: not known.
    position: int = 0
    #: When the event was logged on this process's clock, where the store knows it
    #: better than the event's own stamp: fleet mode measures ages on the database's
    #: clock, so a host whose clock is off ages no event (None: use event.logged_at).
    logged_at_here: float | None = None


@dataclass(frozen=True, slots=True)
class CorruptEntry:
    """A row that could not be read as an event; it is taken out of the log."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Batch:
    """What one read of the log found: events due now, and rows taken out as corrupt.

    ``cursor`` marks where the read stopped (due time, row id): a later read from it
    continues after these rows, while they are still in the log (in flight).
    """

    events: list[QueuedEvent]
    corrupt: list[CorruptEntry]
    cursor: tuple[float, int] | None = None


#: A row ready for :meth:`WriteAheadLog.append_rows`: (event id, due time, JSON text,
#: person). The person (:attr:`Event.person`) is a column of its own, indexed: the
#: sender reads a person's calls in the order they were logged (None: a row of an
#: earlier version, in no order).
Row = tuple[str, float, str, str | None]

_ROW_VERSION = 2
# Version 3 adds the call (identify, page, ...) before the data; events keep writing
# version 2, so a queue of events stays readable by the release before this one.
_CALL_ROW_VERSION = 3
# Built once: json.dumps with options builds a new encoder on every call.
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def storable_key(key: str) -> bool:
    """Whether ``key`` can be an id in a store (an id given on the command line may hold
    anything: bytes that are not UTF-8, a NUL); no stored row has one that is not."""
    if "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_row(
    event: Event,
    *,
    replayed_at: float | None = None,
    attempts: int = 0,
    first_failure_at: float | None = None,
    last_error: str | None = None,
    dead_letter: DeadLetterHistory | None = None,
) -> Row:
    """The log row for ``event``: ``[2, name, customer_id, anonymous_id, timestamp,
    logged_at, history, data]``, where history is null for an event never tried; a
    person call is ``[3, ..., history, call, data]``.

    Positional and without the id (it is the key), so a row costs little more than
    the event's own JSON. The data is spliced in as encoded at emit. A replayed dead
    letter's history goes in ``history["dead_letter"]``; rows without it (never
    replayed, or replayed by an earlier version) read as before.
    """
    if (
        not attempts
        and first_failure_at is None
        and last_error is None
        and replayed_at is None
        and dead_letter is None
        and event.call == EVENT
    ):
        return event.id, min(event.logged_at, time.time()), _fresh_event_text(event), event.person
    history: dict[str, Any] | None = None
    if attempts or first_failure_at is not None or last_error is not None or replayed_at:
        history = {
            "attempts": attempts,
            "first_failure_at": first_failure_at,
            "last_error": last_error,
            "replayed_at": replayed_at,
        }
    if dead_letter is not None:
        history = history or {"attempts": attempts, "replayed_at": replayed_at}
        history["dead_letter"] = dead_letter.to_json()
    fields = [
        _ROW_VERSION,
        event.name,
        event.customer_id,
        event.anonymous_id,
        event.timestamp,
        event.logged_at,
        history,
    ]
    if event.call != EVENT:
        fields[0] = _CALL_ROW_VERSION
        fields.append(event.call)
    head = _ROW_ENCODER.encode(fields)
    # Due when logged, to keep the log in logging order, but never later than now: a
    # record stamped ahead of this clock (a host with a fast clock forwarding it, a
    # clock stepped back since) must not wait until the clock catches up.
    due = min(event.logged_at, time.time()) if replayed_at is None else replayed_at
    return event.id, due, f"{head[:-1]},{event.data_json}]", event.person


def _fresh_event_text(event: Event) -> str:
    """The row text of an event never tried, as ``_ROW_ENCODER`` writes it, built
    without a second JSON encoding: this runs on the caller's thread for every event,
    and the data is the one part that needs the encoder (done once, at emit)."""
    anonymous_id = event.anonymous_id
    customer_id = event.customer_id
    return (
        f"[{_ROW_VERSION},{_json_string(event.name)},"
        f"{'null' if customer_id is None else _json_string(customer_id)},"
        f"{'null' if anonymous_id is None else _json_string(anonymous_id)},"
        f"{event.timestamp:d},{event.logged_at!r},null,{event.data_json}]"
    )


def decode_row(key: str, due: float | None, value: str, position: int = 0) -> QueuedEvent:
    """A stored row's text, checked and decoded (never unpickled): the event under
    ``key`` due at ``due`` (None: a row without a due time, due at once), at
    ``position`` in commit order.

    Raises:
        InvalidEventError: the text is not an entry of ours.
    """
    try:
        split = _split_row(value)
        if split is not None:
            fields, data_json = split
        else:
            # Not in the shape encode_row writes (a version 1 entry, or text of
            # another writer): decode it whole, which checks every part of it.
            raw_entry = json.loads(value)
            if type(raw_entry) is dict:  # version 1: written before rows had a due time
                return _decode_entry(key, value)
            *fields, data = raw_entry
            if type(data) is not dict:
                raise InvalidEventError("the data of a queue entry is not an object")
            data_json = _ROW_ENCODER.encode(data)
        call = EVENT
        if fields[0] == _CALL_ROW_VERSION:
            call = fields.pop(7)
            if call not in CALLS:
                raise InvalidEventError(f"unknown call {str(call)[:20]!r} in a queue entry")
            fields[0] = _ROW_VERSION
        version, name, customer_id, anonymous_id, timestamp, logged_at, history = fields
        if version != _ROW_VERSION:
            raise InvalidEventError(f"unknown entry version {version!r}")
        # Positional arguments: a NamedTuple built from keywords costs twice as much,
        # and the sender builds two for every row it reads.
        event = Event(
            key,
            str(name),
            customer_id,
            anonymous_id,
            data_json,
            int(timestamp),
            float(logged_at),
            call,
        )
        next_attempt_at = float(due) if due is not None else 0.0
        if not history:  # never tried: most rows, and nothing more to read
            return QueuedEvent(key, event, 0, None, None, next_attempt_at, None, None, position)
        return QueuedEvent(
            key,
            event,
            int(history.get("attempts", 0)),
            history.get("first_failure_at"),
            history.get("last_error"),
            next_attempt_at,
            history.get("replayed_at"),
            DeadLetterHistory.from_json(history.get("dead_letter")),
            position,
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InvalidEventError(
            f"queue entry is not valid JSON of ours ({type(exc).__name__})"
        ) from None


# The C scanner behind json.loads, called on one value at a time: the row's head is
# read value by value and the data, the bulk of the row, is never decoded.
_scan_value: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, untyped


def _split_row(value: str) -> tuple[list[Any], str] | None:
    """The head values and the data text of a row as :func:`encode_row` writes it
    (compact: ``[2,...,history,{data}]``, a person call with its call before the
    data), or None for any other text (the caller then decodes it whole).

    The data goes out as stored, spliced into request bodies: decoding it here and
    encoding it again (as the reader did) was a fifth of the sender's CPU. It is the
    text ``encode_data`` wrote at emit, in a file only this user can write; the head
    is decoded and checked, and the data must be the one value left, an object. A
    row whose data text was damaged anyway is a poison item to Customer.io (a 400
    for its request), and bisection dead-letters it alone.
    """
    if not (value.startswith("[") and value.endswith("}]")):
        return None
    fields: list[Any] = []
    count, index = 7, 1
    try:
        while len(fields) < count:
            field, index = _scan_value(value, index)
            fields.append(field)
            if len(fields) == 1 and field == _CALL_ROW_VERSION:
                count = 8
            if value[index] != ",":
                return None
            index += 1
    except (StopIteration, IndexError):
        return None
    if value[index] != "{":
        return None
    return fields, value[index:-1]


def _decode_entry(key: str, text: str) -> QueuedEvent:
    """A version 1 entry (a JSON object with the event inside), from before rows had a
    due time; still read so a queue left by an older version is delivered."""
    raw = json.loads(text)
    if raw.get("v") != 1:
        raise InvalidEventError(f"unknown entry version {raw.get('v')!r}")
    return QueuedEvent(
        key=key,
        event=event_from_dict(raw["event"]),
        attempts=int(raw["attempts"]),
        first_failure_at=raw["first_failure_at"],
        last_error=raw["last_error"],
        next_attempt_at=float(raw["next_attempt_at"]),
        replayed_at=raw.get("replayed_at"),
    )


@dataclass(frozen=True, slots=True)
class DeadLetterReason:
    """Why an event was dead-lettered, and when."""

    error_type: str
    status: int | None
    message: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "error_type": self.error_type,
            "status": self.status,
            "message": self.message,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, raw: Any) -> DeadLetterReason:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        status = raw["status"]
        return cls(
            error_type=str(raw["error_type"]),
            status=None if status is None else int(status),
            message=str(raw["message"]),
            at=float(raw["at"]),
        )


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """One replay of a dead letter that did not deliver it: when, and what came back.

    An accepted replay leaves no record: the entry leaves the store.
    """

    at: float  # when it was replayed
    error_type: str  # the reason it came back with
    status: int | None
    message: str
    failed_at: float  # when it came back

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "error_type": self.error_type,
            "status": self.status,
            "message": self.message,
            "failed_at": self.failed_at,
        }

    @classmethod
    def came_back(cls, replayed_at: float, reason: DeadLetterReason) -> ReplayRecord:
        """The record of a replay at ``replayed_at`` that came back for ``reason``."""
        return cls(replayed_at, reason.error_type, reason.status, reason.message, reason.at)

    @classmethod
    def from_json(cls, raw: Any) -> ReplayRecord:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        status = raw["status"]
        return cls(
            at=float(raw["at"]),
            error_type=str(raw["error_type"]),
            status=None if status is None else int(status),
            message=str(raw["message"]),
            failed_at=float(raw["failed_at"]),
        )


# The replays an entry keeps (the latest); replay_count counts them all. A cron job
# replaying through a long outage must not grow an entry without bound.
_REPLAY_HISTORY = 20


@dataclass(frozen=True, slots=True)
class DeadLetterHistory:
    """What a dead letter carries back into the write-ahead log when it is replayed
    there, so that failing again writes it back with its first reason and attempts."""

    original: DeadLetterReason
    replays: tuple[ReplayRecord, ...]
    replay_count: int
    first_failure_at: float
    attempts: int

    def to_json(self) -> dict[str, Any]:
        return {
            "original": self.original.to_json(),
            "replays": [record.to_json() for record in self.replays],
            "replay_count": self.replay_count,
            "first_failure_at": self.first_failure_at,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, raw: Any) -> DeadLetterHistory | None:
        """None when absent or not ours: the event is delivered all the same."""
        if raw is None:
            return None
        try:
            return cls(
                original=DeadLetterReason.from_json(raw["original"]),
                replays=tuple(ReplayRecord.from_json(item) for item in raw["replays"]),
                replay_count=int(raw["replay_count"]),
                first_failure_at=float(raw["first_failure_at"]),
                attempts=int(raw["attempts"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event Customer.io will never accept, kept with why.

    ``error_type``, ``status``, ``message`` and ``last_failure_at`` are the latest
    reason; ``original`` is the reason it was first dead-lettered for (the same, for
    an entry never replayed), and ``replays`` the replays that did not deliver it.
    """

    key: str
    event: dict[str, Any] | None  # None when the stored row could not even be read
    status: int | None
    error_type: str
    message: str
    attempts: int
    first_failure_at: float
    last_failure_at: float
    original: DeadLetterReason | None = None  # None only for an unreadable entry
    replays: tuple[ReplayRecord, ...] = ()
    replay_count: int = 0  # every replay that failed, also those dropped from replays

    @property
    def event_name(self) -> str | None:
        return None if self.event is None else str(self.event.get("name"))

    @property
    def latest(self) -> DeadLetterReason:
        return DeadLetterReason(self.error_type, self.status, self.message, self.last_failure_at)

    def matches_reason(self, reason: str) -> bool:
        """Whether ``reason`` is the latest or the original error type, or text in
        either message."""
        reasons = [self.latest] if self.original is None else [self.latest, self.original]
        return any(reason == r.error_type or reason in r.message for r in reasons)

    def history(self) -> DeadLetterHistory:
        """What a replay into the write-ahead log carries with the event."""
        return DeadLetterHistory(
            original=self.original or self.latest,
            replays=self.replays,
            replay_count=self.replay_count,
            first_failure_at=self.first_failure_at,
            attempts=self.attempts,
        )


def dead_letter_entry(
    key: str,
    event: Event | None,
    *,
    status: int | None,
    error_type: str,
    message: str,
    attempts: int,
    first_failure_at: float | None,
    now: float,
    original: DeadLetterReason | None,
    replays: Sequence[ReplayRecord],
    replay_count: int | None,
    existing: Callable[[], DeadLetter | None],
) -> dict[str, Any]:
    """The stored form of a dead letter whose latest reason is this one.

    ``original``: the reason it was first dead-lettered for. When not given, the
    entry already stored under ``key`` (read through ``existing``) keeps its own,
    with its replay history: an event in both the log and the store after a crash,
    failing again. A new entry's original reason is this one.
    ``replays``: the replays that failed, oldest first; the latest ``_REPLAY_HISTORY``
    are kept, ``replay_count`` (default: how many are given) counts them all.
    """
    if original is None:
        stored = existing()
        if stored is not None and stored.original is not None:
            original = stored.original
            replays, replay_count = stored.replays, stored.replay_count
    if original is None:
        original = DeadLetterReason(error_type, status, message, now)
    return {
        "v": _ENTRY_VERSION,
        "key": key,
        "event": None if event is None else json.loads(event.to_json()),
        "status": status,
        "error_type": error_type,
        "message": message,
        "attempts": attempts,
        "first_failure_at": first_failure_at or now,
        "last_failure_at": now,
        # Added in place, still version 1: an entry without them reads as one
        # never replayed, and an earlier version reading these ignores them.
        "original": original.to_json(),
        "replays": [record.to_json() for record in replays[-_REPLAY_HISTORY:]],
        "replay_count": len(replays) if replay_count is None else replay_count,
    }


def dead_letter_from_json(key: str, raw: Any) -> DeadLetter:
    """A stored dead letter (see :func:`dead_letter_entry`), or a ``corrupt_entry``
    placeholder under ``key`` when it is not one of ours."""
    try:
        latest = DeadLetterReason(
            raw["error_type"], raw["status"], raw["message"], raw["last_failure_at"]
        )
        # An entry from before replays kept history: its reason is the original.
        original = raw.get("original")
        return DeadLetter(
            key=raw["key"],
            event=raw["event"],
            status=raw["status"],
            error_type=raw["error_type"],
            message=raw["message"],
            attempts=raw["attempts"],
            first_failure_at=raw["first_failure_at"],
            last_failure_at=raw["last_failure_at"],
            original=latest if original is None else DeadLetterReason.from_json(original),
            replays=tuple(ReplayRecord.from_json(item) for item in raw.get("replays", ())),
            replay_count=int(raw.get("replay_count", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return DeadLetter(
            key,
            None,
            None,
            "corrupt_entry",
            "not a dead letter written by cio_logging",
            0,
            0.0,
            0.0,
        )


def dead_letter_from_text(key: str, text: str) -> DeadLetter:
    """:func:`dead_letter_from_json` of a JSON text."""
    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    return dead_letter_from_json(key, raw)


def matching_letters(
    letters: Iterable[DeadLetter],
    *,
    event: str | None = None,
    reason: str | None = None,
    since: float | None = None,
    before: float | None = None,
    limit: int | None = None,
) -> list[DeadLetter]:
    """The letters matching every filter given, in the order given.

    ``reason`` matches the latest or the original error type exactly, or appears in
    either message. ``since`` and ``before`` compare with the last failure time.
    """
    chosen: list[DeadLetter] = []
    for letter in letters:
        if event is not None and letter.event_name != event:
            continue
        if reason is not None and not letter.matches_reason(reason):
            continue
        if since is not None and letter.last_failure_at < since:
            continue
        if before is not None and letter.last_failure_at >= before:
            continue
        chosen.append(letter)
        if limit is not None and len(chosen) >= limit:
            break
    return chosen
