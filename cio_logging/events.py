"""The call model: tagging a log record, mapping it to a Customer.io call, validating it.

Pure functions, no I/O. A call leaves here as one compact JSON text, which is what
the write-ahead log stores and what the sender reads back.

A call is an event (``cio_event``) or a person call (``cio_identify``, ``cio_page``,
``cio_screen``, ``cio_delete``, ``cio_suppress``, ``cio_unsuppress``), carried by the
same :class:`Event` tuple; ``call`` says which. Limits are Customer.io's published
ones (``../shared/docs/facts.md``): a call that breaks one, or that the configured API
cannot carry (:func:`check_for_api`), is refused at emit, where the application's
developer can see why, rather than rejected by the API hours later.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Mapping
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, NamedTuple, TypeGuard

from ulid import ULID

from .errors import InvalidEventError, UnreadableTagError

#: The ``extra`` key that marks a log record as a Customer.io event.
EXTRA_KEY = "cio"

MAX_NAME_BYTES = 100
MAX_IDENTIFIER_BYTES = 150
MAX_DATA_BYTES = 100_000

_ALLOWED_KEYS = frozenset(
    {"customer_id", "anonymous_id", "name", "data", "timestamp", "id", "call"}
)

#: The calls a record can carry. ``event`` is a Track event / a Pipelines ``track``.
EVENT = "event"
IDENTIFY, PAGE, SCREEN = "identify", "page", "screen"
DELETE, SUPPRESS, UNSUPPRESS = "delete", "suppress", "unsuppress"
CALLS = frozenset({EVENT, IDENTIFY, PAGE, SCREEN, DELETE, SUPPRESS, UNSUPPRESS})
#: Calls about the person itself: named after the call, always essential (a lost
#: identify means a campaign never reaches that person; a lost delete is a promise
#: broken), and never anonymous where the API cannot take it (see check_for_api).
PERSON_CALLS = frozenset({IDENTIFY, DELETE, SUPPRESS, UNSUPPRESS})
#: The two APIs (``api=`` of the handler).
TRACK_API, PIPELINES_API = "track", "pipelines"
#: One call as sent, at most (both APIs: a v2 batch item, a Pipelines call).
MAX_CALL_BYTES = 32 * 1024
# What a call adds around its data on the wire, generously: keys, ids, the ISO
# timestamp, the context naming the library.
_CALL_FRAME_BYTES = 512
# Set by cio_event on a mistake it must not raise for; the record is refused at emit.
_TAG_ERROR_KEY = "cio_event_error"

# A tag a structlog renderer (JSON, console, key-value, logfmt) wrote into the message
# text: ``"cio": {``, ``cio={``, ``'cio': {``, ``cio="{``, with colour codes between.
_COLOUR = r"(?:\x1b\[[0-9;]*m)*"
_RENDERED_TAG = re.compile(
    rf"""(?:^|[^\w]|\x1b\[[0-9;]*m)cio['"]?{_COLOUR}\s*[:=]\s*{_COLOUR}['"]?\{{"""
)

# Crockford's base32 (the ULID alphabet), two characters (10 bits) at a time.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(_CROCKFORD[index >> 5] + _CROCKFORD[index & 31] for index in range(1024))


# A NamedTuple, not a frozen dataclass: as immutable, and built about four times
# faster (a frozen dataclass pays object.__setattr__ per field); one is built for
# every event, at emit and at every read of the log.
class Event(NamedTuple):
    """One Track API event, as stored in the write-ahead log.

    Exactly one of ``customer_id`` and ``anonymous_id`` is set. ``data_json`` is the
    event data already encoded, so the data is encoded once, at emit.
    """

    id: str
    name: str
    customer_id: str | None
    anonymous_id: str | None
    data_json: str
    timestamp: int
    logged_at: float
    #: Which call (see CALLS): a Track event unless a person-call helper tagged it.
    call: str = EVENT

    @property
    def person(self) -> str:
        """The key a person's calls are ordered by: their id, or their anonymous id."""
        if self.customer_id is not None:
            return "c:" + self.customer_id
        return "a:" + (self.anonymous_id or "")

    def is_essential(self, essential_events: frozenset[str]) -> bool:
        """Essential: committed before emit returns, kept at the essential-only level."""
        return self.call in PERSON_CALLS or self.name in essential_events

    def to_json(self) -> str:
        """The call as the compact JSON object the write-ahead log stores."""
        fields: dict[str, object] = {
            "id": self.id,
            "name": self.name,
            "customer_id": self.customer_id,
            "anonymous_id": self.anonymous_id,
            "timestamp": self.timestamp,
            "logged_at": self.logged_at,
        }
        if self.call != EVENT:
            fields["call"] = self.call
        head = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        # Splice the data in rather than decode and re-encode it.
        return f'{head[:-1]},"data":{self.data_json}}}'

    @property
    def data(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.data_json)
        return decoded


def cio_event(
    customer_id: str | int | None = None,
    *,
    anonymous_id: str | None = None,
    name: str | None = None,
    id: str | ULID | None = None,  # the Track API's own field name
    timestamp: float | dt.datetime | None = None,
    data: Mapping[str, Any] | None = None,
    **data_keywords: Any,
) -> dict[str, dict[str, Any]]:
    """Build the ``extra`` dict that tags a log record as a Customer.io event.

    ``name``, ``id``, ``timestamp``, ``anonymous_id`` and ``data`` are the event's own
    fields, never data. Data keys with those names go in the ``data`` mapping, which is
    merged with the other keywords.

    Args:
        customer_id: the person's identifier (``identifiers.id`` in Customer.io).
        anonymous_id: for an event from someone not yet identified, instead of
            ``customer_id``.
        name: the event name; by default the record's formatted message.
        id: the event's ULID; by default a new one made at emit. Reuse an id to make
            Customer.io ignore the event as one it already received.
        timestamp: when the event happened, Unix seconds or a datetime; by default the
            record's creation time.
        data: event data as a mapping, for keys that cannot be keywords (``name``,
            ``id``, ``timestamp``, ``data``, ``customer_id``, ``anonymous_id``, or not
            identifiers at all).
        **data_keywords: more event data. A key given here and in ``data`` too is
            not resolved either way: the record is refused at emit, with a warning
            that names the key (this function itself never raises).

    Examples:
        ```python
        log.info("purchase", extra=cio_event("user-42", amount=9.99, sku="A-1"))
        log.info("profile_updated", extra=cio_event("user-1", data={"name": "Alice"}))
        ```
    """
    return _tag(EVENT, customer_id, anonymous_id, name, id, timestamp, data, data_keywords)


def _tag(
    call: str,
    customer_id: str | int | None,
    anonymous_id: str | None,
    name: str | None,
    id: str | ULID | None,
    timestamp: float | dt.datetime | None,
    data: Mapping[str, Any] | None,
    data_keywords: dict[str, Any],
    data_argument: str = "data",
) -> dict[str, dict[str, Any]]:
    """The tag every helper builds: never raises (a mistake is refused at emit)."""
    tag: dict[str, Any] = {}
    if data is None:
        tag["data"] = data_keywords
    elif not isinstance(data, Mapping):
        tag[_TAG_ERROR_KEY] = f"{data_argument}= must be a mapping, not {type(data).__name__}"
    else:
        clashes = data_keywords.keys() & data.keys()
        if clashes:
            keys = ", ".join(repr(key) for key in sorted(clashes))
            tag[_TAG_ERROR_KEY] = (
                f"got key(s) {keys} both in {data_argument}= and as keywords; give each key once"
            )
        tag["data"] = {**data, **data_keywords}
    if call != EVENT:
        tag["call"] = call
    if customer_id is not None:
        tag["customer_id"] = customer_id
    if anonymous_id is not None:
        tag["anonymous_id"] = anonymous_id
    if name is not None:
        tag["name"] = name
    if id is not None:
        tag["id"] = id
    if timestamp is not None:
        tag["timestamp"] = timestamp
    return {EXTRA_KEY: tag}


def cio_identify(
    customer_id: str | int | None = None,
    *,
    anonymous_id: str | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
    attributes: Mapping[str, Any] | None = None,
    **attribute_keywords: Any,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as an identify: create or update a person and their attributes.

    Track API: a v2 batch ``identify`` (it needs ``customer_id``: an anonymous
    identify is refused at emit). Pipelines API: ``identify`` with ``traits``, for a
    known or an anonymous person. ``attributes`` is for keys that cannot be keywords.

    Examples:
        ```python
        log.info("identify", extra=cio_identify("user-42", email="a@example.com"))
        ```
    """
    return _tag(
        IDENTIFY,
        customer_id,
        anonymous_id,
        None,
        id,
        timestamp,
        attributes,
        attribute_keywords,
        "attributes",
    )


def cio_page(
    customer_id: str | int | None = None,
    name: str | None = None,
    *,
    anonymous_id: str | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
    properties: Mapping[str, Any] | None = None,
    **property_keywords: Any,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as a page view (``name``: the page; by default the message).

    Track API: a v2 ``page`` action, or v1 with ``type: page`` for an anonymous person.
    Pipelines API: ``page``.
    """
    return _tag(
        PAGE,
        customer_id,
        anonymous_id,
        name,
        id,
        timestamp,
        properties,
        property_keywords,
        "properties",
    )


def cio_screen(
    customer_id: str | int | None = None,
    name: str | None = None,
    *,
    anonymous_id: str | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
    properties: Mapping[str, Any] | None = None,
    **property_keywords: Any,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as a mobile screen view; like `cio_page`."""
    return _tag(
        SCREEN,
        customer_id,
        anonymous_id,
        name,
        id,
        timestamp,
        properties,
        property_keywords,
        "properties",
    )


def cio_delete(
    customer_id: str | int, *, id: str | ULID | None = None, timestamp: float | None = None
) -> dict[str, dict[str, Any]]:
    """Tag a log record as deleting a person: Track v2 ``delete``, Pipelines ``User Deleted``.

    Sent after every call for the same person logged before it in this process.
    """
    return _tag(DELETE, customer_id, None, None, id, timestamp, None, {})


def cio_suppress(
    customer_id: str | int, *, id: str | ULID | None = None, timestamp: float | None = None
) -> dict[str, dict[str, Any]]:
    """Tag a log record as suppressing a person (delete, and ignore their future
    calls): Track v2 ``suppress``, Pipelines ``User Suppressed``."""
    return _tag(SUPPRESS, customer_id, None, None, id, timestamp, None, {})


def cio_unsuppress(
    customer_id: str | int, *, id: str | ULID | None = None, timestamp: float | None = None
) -> dict[str, dict[str, Any]]:
    """Tag a log record as lifting a suppression: Track v2 ``unsuppress``,
    Pipelines ``User Unsuppressed``."""
    return _tag(UNSUPPRESS, customer_id, None, None, id, timestamp, None, {})


def carries_tag(record: logging.LogRecord) -> bool:
    """Whether ``record`` carries a Customer.io tag, in any shape :func:`event_from_record`
    reads or reports.

    Besides ``record.cio`` (``extra=cio_event(...)``), the shapes structlog leaves:
    ``record.extra["cio"]`` (``render_to_log_kwargs`` given ``extra=cio_event(...)``),
    an event dict as the message (``ProcessorFormatter.wrap_for_formatter``), a tag
    rendered into the message text; and a tag passed as the message's argument. A few
    lookups and type checks for an untagged record.
    """
    fields = record.__dict__
    if EXTRA_KEY in fields or ("extra" in fields and _holds_tag(fields["extra"])):
        return True
    message = fields.get("msg")  # .get: handle() must never raise into the caller
    if type(message) is str:
        if "cio" in message and _rendered_tag(message):
            return True
    elif type(message) is dict:
        return EXTRA_KEY in message or _holds_tag(message.get("extra"))
    return _tag_as_argument(fields.get("args"))


def _holds_tag(value: object) -> TypeGuard[Mapping[str, Any]]:
    return value is not None and isinstance(value, Mapping) and EXTRA_KEY in value


def _rendered_tag(text: str) -> bool:
    """Whether ``text`` holds a rendered tag: ``cio`` then a dict naming a person."""
    found = _RENDERED_TAG.search(text)
    return found is not None and (
        "customer_id" in text[found.end() :] or "anonymous_id" in text[found.end() :]
    )


def _tag_as_argument(args: object) -> bool:
    """``log.info("purchase", cio_event(...))``: logging takes a lone dict as the arguments."""
    return type(args) is dict and isinstance(args.get(EXTRA_KEY), Mapping)


def event_from_record(record: logging.LogRecord) -> Event | None:
    """Map a log record to an :class:`Event`, or ``None`` if it is not tagged.

    The tag is read from ``record.cio``, from ``record.extra["cio"]``, or from the
    message when it is a structlog event dict (``msg["cio"]`` or
    ``msg["extra"]["cio"]``; the default name is then ``msg["event"]``).

    Raises:
        UnreadableTagError: the record carries a tag where it cannot be read (rendered
            into the message text, or passed as the message's argument).
        InvalidEventError: the record is tagged but the tag breaks a rule; the
            message names the field and the rule, never the value.
    """
    fields = record.__dict__
    default_name: object = None  # None: the record's formatted message
    if EXTRA_KEY in fields:
        tag = fields[EXTRA_KEY]
    else:
        located = _tag_elsewhere(record)
        if located is None:
            return None
        tag, default_name = located
    if tag is None:
        return None
    if type(tag) is not dict and not isinstance(tag, Mapping):  # the ABC check is slow
        raise InvalidEventError(f"extra[{EXTRA_KEY!r}] must be a dict, not {type(tag).__name__}")
    if not _ALLOWED_KEYS.issuperset(tag):
        if _TAG_ERROR_KEY in tag:
            raise InvalidEventError(str(tag[_TAG_ERROR_KEY]))
        unknown = set(tag) - _ALLOWED_KEYS
        if unknown == {EXTRA_KEY}:
            raise InvalidEventError(
                f"extra[{EXTRA_KEY!r}] holds another {EXTRA_KEY!r} key: cio_event(...) returns "
                f"the whole extra dict, so pass extra=cio_event(...), not "
                f"extra={{{EXTRA_KEY!r}: cio_event(...)}}"
            )
        names = ", ".join(sorted(map(str, unknown)))
        raise InvalidEventError(
            f"unknown key(s) {names} in extra[{EXTRA_KEY!r}]; event data goes under 'data' "
            f"(allowed: {', '.join(sorted(_ALLOWED_KEYS))})"
        )
    customer_id = tag.get("customer_id")
    if customer_id is not None:
        customer_id = _identifier("customer_id", customer_id)
    anonymous_id = tag.get("anonymous_id")
    if anonymous_id is not None:
        anonymous_id = _identifier("anonymous_id", anonymous_id)
    call = tag.get("call", EVENT)
    if call not in CALLS:
        raise InvalidEventError(
            f"unknown call in extra[{EXTRA_KEY!r}]['call'] (known: {', '.join(sorted(CALLS))})"
        )
    if (customer_id is None) == (anonymous_id is None):
        what = "an event" if call == EVENT else f"a {call} call"
        raise InvalidEventError(f"{what} needs exactly one of customer_id and anonymous_id")
    if call in PERSON_CALLS:
        name = call  # a person call has no name of its own
    else:
        name = tag.get("name")
        if name is None:
            name = record.getMessage() if default_name is None else default_name
    # Positional: a NamedTuple built from keywords costs a third more, at every emit.
    return Event(
        _event_id(tag.get("id")),
        _name(name),
        customer_id,
        anonymous_id,
        encode_data(tag.get("data")),
        _timestamp(tag.get("timestamp"), record.created),
        record.created,
        call,
    )


def check_for_api(event: Event, api: str) -> None:
    """Refuse at emit a call the configured API would refuse or cannot carry.

    Raises:
        InvalidEventError: with ``rule`` naming what the call breaks.
    """
    if event.call == EVENT and api == TRACK_API:
        return  # the Track API's own limits were checked already; v1 takes 100 KB of data
    if event.anonymous_id is not None:
        if api == TRACK_API and event.call in PERSON_CALLS:
            raise InvalidEventError(
                f"the Track API cannot {event.call} an anonymous person (its person actions "
                "need an identifier): give customer_id, or use the Pipelines API for an "
                "anonymous identify",
                "anonymous_person_call",
            )
        if api == PIPELINES_API and event.call in (DELETE, SUPPRESS, UNSUPPRESS):
            raise InvalidEventError(
                f"the Pipelines API cannot {event.call} an anonymous person: give customer_id",
                "anonymous_person_call",
            )
    # Track events over 32 KB go one by one through v1; nothing else has such a route.
    if event.call in (PAGE, SCREEN) and api == TRACK_API:
        return
    person = event.customer_id or event.anonymous_id or ""
    data = event.data_json
    size = _CALL_FRAME_BYTES + len(event.name) + len(person)
    size += len(data) if data.isascii() else _utf8_size("data", data)
    if size > MAX_CALL_BYTES:
        where = "a Pipelines call" if api == PIPELINES_API else "a Track v2 batch item"
        raise InvalidEventError(
            f"the {event.call} call is about {size:,} bytes as sent; {where} takes at most "
            f"{MAX_CALL_BYTES:,}",
            "call_too_large",
        )


def _tag_elsewhere(record: logging.LogRecord) -> tuple[object, object] | None:
    """The tag and the default name from a shape other than ``record.cio``, or None.

    Raises:
        UnreadableTagError: the tag is there but cannot be read.
    """
    extra = record.__dict__.get("extra")
    if _holds_tag(extra):
        return extra[EXTRA_KEY], None
    message = record.msg
    if type(message) is dict:  # a structlog event dict (ProcessorFormatter.wrap_for_formatter)
        event = message.get("event")
        default_name = None if event is None else str(event)
        if EXTRA_KEY in message:
            return message[EXTRA_KEY], default_name
        nested = message.get("extra")
        if _holds_tag(nested):
            return nested[EXTRA_KEY], default_name
        return None
    if type(message) is str and "cio" in message and _rendered_tag(message):
        raise UnreadableTagError(
            "rendered",
            "the record's message is text holding a rendered Customer.io tag: a structlog "
            "renderer (or a QueueHandler, formatting the record) turned the tag into text "
            "before it reached this handler, and text is not read as an event. Wrap the last "
            "processor of structlog's chain, as in "
            "cio_logging.structlog.CioEventRenderer(structlog.processors.JSONRenderer()): it "
            "passes the tag beside the text",
        )
    if _tag_as_argument(record.args):
        raise UnreadableTagError(
            "args",
            "the Customer.io tag was passed as the message's argument, as in "
            "log.info('purchase', cio_event(...)); pass it as a keyword: "
            "log.info('purchase', extra=cio_event(...))",
        )
    return None


def event_from_dict(raw: Mapping[str, Any]) -> Event:
    """Rebuild an event from the decoded object :meth:`Event.to_json` wrote.

    Raises:
        InvalidEventError: the object is not such an event.
    """
    try:
        return Event(
            id=str(raw["id"]),
            name=str(raw["name"]),
            customer_id=raw["customer_id"],
            anonymous_id=raw["anonymous_id"],
            data_json=json.dumps(raw["data"], ensure_ascii=False, separators=(",", ":")),
            timestamp=int(raw["timestamp"]),
            logged_at=float(raw["logged_at"]),
            call=_stored_call(raw.get("call", EVENT)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidEventError(f"stored event is malformed ({type(exc).__name__})") from None


def _stored_call(value: object) -> str:
    if value not in CALLS:
        raise ValueError("unknown call")
    return str(value)


def encode_data(data: object) -> str:
    """Encode event data as compact JSON, refusing what the Track API cannot take.

    Datetimes become Unix seconds (as the Customer.io SDK does), dates ISO strings,
    Decimals numbers, UUIDs and sets strings and lists. NaN and infinity, cycles,
    non-JSON objects, lone surrogates and data over 100,000 bytes are refused.
    """
    if data is None:
        return "{}"
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidEventError(f"data must be a dict, not {type(data).__name__}")
    try:
        if _encode_unchecked is None:
            text = _DATA_ENCODER.encode(data)
        else:
            try:
                text = "".join(_encode_unchecked(data, 0))
            except RecursionError:
                text = _DATA_ENCODER.encode(data)  # which names a cycle as one
        # ASCII text has no lone surrogate and one byte a character: skip the encoding.
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEventError(
            "data contains text that is not valid Unicode (a lone surrogate)"
        ) from None
    except RecursionError:
        raise InvalidEventError("data is nested too deeply to encode") from None
    except (TypeError, ValueError) as exc:
        # json's messages name the type or the rule ("Circular reference detected",
        # "Out of range float values"), not the data itself.
        raise InvalidEventError(f"data cannot be encoded as JSON: {exc}") from None
    if size > MAX_DATA_BYTES:
        raise InvalidEventError(
            f"data is {size:,} bytes as JSON; Customer.io accepts at most {MAX_DATA_BYTES:,}"
        )
    return text


def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return int(aware.timestamp())
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("Decimal NaN or infinity is not JSON compliant")
        return number
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Built once: json.dumps with options builds a new encoder on every call.
_DATA_ENCODER = json.JSONEncoder(
    default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
)
# The same encoder's C core, called directly: JSONEncoder.encode builds it anew for
# every call, a third of an event's encoding. Without the cycle check (its marker
# table would be shared between threads): a cycle ends in RecursionError, and
# _DATA_ENCODER then encodes again to say it is one.
_encode_unchecked = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _json_default, encode_basestring, None, ":", ",", False, False, False)
)


def _identifier(field_name: str, value: object) -> str | None:
    if value is None:
        return None
    if type(value) is str and value.isascii():  # the common case, cheaply
        if not value.strip():
            raise InvalidEventError(f"{field_name} must not be empty")
        if len(value) > MAX_IDENTIFIER_BYTES:
            raise InvalidEventError(
                f"{field_name} is {len(value)} bytes; Customer.io accepts at most "
                f"{MAX_IDENTIFIER_BYTES}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidEventError(
            f"{field_name} must be a string or an integer, not {type(value).__name__}"
        )
    text = str(value)
    if not text.strip():
        raise InvalidEventError(f"{field_name} must not be empty")
    size = _utf8_size(field_name, text)
    if size > MAX_IDENTIFIER_BYTES:
        raise InvalidEventError(
            f"{field_name} is {size} bytes; Customer.io accepts at most {MAX_IDENTIFIER_BYTES}"
        )
    return text


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidEventError(f"name must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidEventError("name must not be empty")
    size = _utf8_size("name", value)
    if size > MAX_NAME_BYTES:
        raise InvalidEventError(
            f"name is {size} bytes; Customer.io accepts at most {MAX_NAME_BYTES}"
        )
    return value


# Not os.urandom: a system call releases the GIL, and with the flush thread busy the
# caller then waits up to a switch interval (5 ms) to get it back; that was half the
# cost of an emit under load. A Mersenne Twister seeded from os.urandom, reseeded in
# every forked child, gives ids that do not collide (80 bits per millisecond); they
# only need to be unique, not unpredictable.
_RANDOM = random.Random()  # noqa: S311 - unique, not secret (see above)
_random_bits = _RANDOM.getrandbits
os.register_at_fork(after_in_child=_RANDOM.seed)


# (millisecond, its 10 characters) of the last id made.
_time_part: tuple[int, str] = (-1, "")


def new_event_id() -> str:
    """A fresh ULID: the current millisecond and 80 random bits.

    Not python-ulid's ``ULID()``: its module-wide generator takes a lock, and a child
    forked while another thread held it hangs in its first emit (seen here).
    """
    global _time_part
    millisecond = time.time_ns() // 1_000_000
    pairs = _PAIRS
    part = _time_part  # one read: another thread may replace it meanwhile
    if part[0] != millisecond:
        # The first 10 characters are the 48-bit millisecond (the first pair holds 8
        # bits): the same for every id of that millisecond, so built once for them.
        part = (
            millisecond,
            pairs[millisecond >> 40]
            + pairs[(millisecond >> 30) & 1023]
            + pairs[(millisecond >> 20) & 1023]
            + pairs[(millisecond >> 10) & 1023]
            + pairs[millisecond & 1023],
        )
        _time_part = part
    # The 80 random bits as 16 characters: 8 table lookups of 10 bits, unrolled
    # because this runs on the caller's thread for every event.
    value = _random_bits(80)
    return (
        part[1]
        + pairs[value >> 70]
        + pairs[(value >> 60) & 1023]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


def _event_id(value: object) -> str:
    if value is None:
        return new_event_id()
    if isinstance(value, ULID):
        return str(value)
    if not isinstance(value, str):
        raise InvalidEventError(f"id must be a ULID string, not {type(value).__name__}")
    try:
        return str(ULID.from_str(value.upper()))
    except ValueError:
        raise InvalidEventError("id is not a valid ULID (26 Crockford base32 characters)") from None


def _timestamp(value: object, created: float) -> int:
    if value is None:
        return int(created)
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        value = aware.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEventError(
            f"timestamp must be Unix seconds or a datetime, not {type(value).__name__}"
        )
    if not math.isfinite(value) or not 0 <= value < 2**32:
        raise InvalidEventError("timestamp is outside the range of Unix seconds")
    return int(value)


def _utf8_size(field_name: str, text: str) -> int:
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEventError(f"{field_name} is not valid Unicode (a lone surrogate)") from None
