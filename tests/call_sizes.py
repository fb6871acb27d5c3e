"""Calls of an exact size on the wire, for the tests at the size limits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cio_logging.events import Event, event_from_record
from cio_logging.wire import pipelines_call, track_item, utf8_size

#: Padding of each kind: (character, bytes it takes on the wire).
PADDING = {
    "ascii": ("x", 1),
    "two-byte": ("é", 2),
    "four-byte": ("🎉", 4),
    "escaped": ("\x01", 6),  # json writes \u0001
}


def event_of(extra: dict[str, Any], message: str = "msg") -> Event:
    """The event the handler makes of a record tagged with ``extra``."""
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, message, (), None, extra=extra
    )
    event = event_from_record(record)
    assert event is not None
    return event


def wire_size(event: Event, api: str) -> int:
    """The bytes ``event`` takes as one call of a batch on ``api``."""
    return utf8_size(pipelines_call(event) if api == "pipelines" else track_item(event))


def padding_for(
    make: Callable[[str], dict[str, Any]], api: str, target: int, kind: str = "ascii"
) -> str:
    """The padding (of ``kind``, topped up with ASCII) that makes the call ``make(padding)``
    tags exactly ``target`` bytes as sent on ``api``."""
    char, width = PADDING[kind]
    units, rest = divmod(target - wire_size(event_of(make("")), api), width)
    padding = char * units + "x" * rest
    assert wire_size(event_of(make(padding)), api) == target
    return padding


def sized(
    make: Callable[[str], dict[str, Any]], api: str, target: int, kind: str = "ascii"
) -> Event:
    """The call ``make(padding)`` tags, exactly ``target`` bytes as sent on ``api``."""
    return event_of(make(padding_for(make, api, target, kind)))
