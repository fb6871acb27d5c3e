"""Every call as it goes on the wire, and the one size rule both APIs share.

Pure functions, no I/O. For each call and API this module decides the route
(:func:`route_of`), builds the exact text that goes out (a Track v2 batch item, a Track
v1 body, a Pipelines call) and measures it in UTF-8 bytes. The emit check
(:func:`check_for_api`) and the clients use the same functions, so what is counted at
emit is byte for byte what is sent.

The limits, as the published specs state them and as a server that counts the bytes it
receives would apply them:

- a call (a v2 batch item, a Pipelines call, the body of a Pipelines single-call
  route) is at most 32,768 bytes ("32 KB");
- a request body is smaller than 500,000 bytes (Track: "smaller than 500kb";
  Pipelines: "limited to 500KB"): the strictest reading of both;
- v1 event data is at most 100,000 bytes, a name 100 bytes, an identifier 150 bytes
  (checked by :mod:`.events`; a v1 body is sent compact and UTF-8, so its data goes
  out as the bytes counted).

Text is JSON as ``json`` writes it with ``ensure_ascii=False`` and no spaces: non-ASCII
characters go as their UTF-8 bytes (1 to 4), control characters as six-byte ``\\u00XX``
escapes, ``"`` and ``\\`` as two bytes. Sizes are measured on that text, never estimated.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterable
from json.encoder import encode_basestring
from typing import Any

from .errors import InvalidEventError
from .events import (
    ADD_DEVICE,
    ADD_RELATIONSHIPS,
    ALIAS,
    DELETE,
    DELETE_DEVICE,
    DELETE_RELATIONSHIPS,
    EVENT,
    GROUP,
    IDENTIFY,
    MERGE,
    PAGE,
    PIPELINES_API,
    SCREEN,
    SUPPRESS,
    TRACK_API,
    UNSUPPRESS,
    Event,
    event_from_record,
)
from .metadata import PACKAGE_VERSION

#: The most bytes one call takes as sent: a Track v2 batch item, a Pipelines call.
MAX_CALL_BYTES = 32_768
#: A request body must be smaller than this many bytes, on either API.
REQUEST_BYTES_LIMIT = 500_000
#: What a batch body adds around its items: ``{"batch":[`` and ``]}`` (plus one comma
#: between two items).
BATCH_OPEN, BATCH_CLOSE = '{"batch":[', "]}"
BATCH_FRAME_BYTES = len(BATCH_OPEN) + len(BATCH_CLOSE)

#: The routes a call can take (the names the telemetry and the simulator use).
V2_BATCH, V1, V1_ANONYMOUS = "v2_batch", "v1", "v1_anonymous"
PIPELINES_BATCH, PIPELINES_ALIAS = "pipelines_batch", "pipelines_alias"

#: The semantic events (a Pipelines ``track`` with a reserved name) calls become.
SEMANTIC_EVENTS = {
    DELETE: "User Deleted",
    SUPPRESS: "User Suppressed",
    UNSUPPRESS: "User Unsuppressed",
    ADD_DEVICE: "Device Created or Updated",
    DELETE_DEVICE: "Device Deleted",
}

# -- the size rule ----------------------------------------------------------------------


def utf8_size(text: str) -> int:
    """The bytes ``text`` takes as sent (lone surrogates never get here: refused at emit)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def batch_body_size(item_sizes: Iterable[int]) -> int:
    """The bytes of ``{"batch":[item,item,...]}`` for items of these sizes."""
    sizes = list(item_sizes)
    return BATCH_FRAME_BYTES + sum(sizes) + max(0, len(sizes) - 1)


# -- routes -------------------------------------------------------------------------------

# The v1 type of the calls v1 carries (an event has none).
_V1_TYPES = {EVENT: None, PAGE: "page", SCREEN: "screen"}
# What each API cannot carry, with the call to use instead.
_NOT_ON = {
    TRACK_API: {
        GROUP: "the Track API has no group call: relate a person to objects with "
        "cio_add_relationships",
        ALIAS: "the Track API has no alias call: cio_merge merges two people",
    },
    PIPELINES_API: {
        MERGE: "the Pipelines API has no merge call (its alias only reconciles ids for "
        "destinations such as Mixpanel): send merges through the Track API",
        ADD_RELATIONSHIPS: "the Pipelines API relates a person to an object with a group "
        "call: use cio_group",
        DELETE_RELATIONSHIPS: "on the Pipelines API a relationship is removed by a "
        "'Relationship Deleted' event for one object at a time, which this library does not "
        "send: send it through the Track API",
    },
}
# Calls that name a known person on each API (the rest also take an anonymous one).
_KNOWN_ONLY = {
    TRACK_API: frozenset(
        {IDENTIFY, DELETE, SUPPRESS, UNSUPPRESS, ADD_DEVICE, DELETE_DEVICE, MERGE}
        | {ADD_RELATIONSHIPS, DELETE_RELATIONSHIPS}
    ),
    PIPELINES_API: frozenset({DELETE, SUPPRESS, UNSUPPRESS, ADD_DEVICE, DELETE_DEVICE, ALIAS}),
}
# More than any call adds around its data: the fixed keys, the ISO timestamp, the
# context, a name of 100 bytes and an identifier of 150 with every byte escaped as
# six. A call whose data is shorter than the limit by this much (counting four bytes
# a character) fits without being built and measured.
_HEAD_BOUND = 2_048


def _surely_fits(event: Event) -> bool:
    return 4 * len(event.data_json) + _HEAD_BOUND <= MAX_CALL_BYTES


def call_from_record(record: logging.LogRecord, api: str) -> Event | None:
    """The call a tagged record becomes on ``api``, checked; None for an untagged one.

    What the handler queues, and what ``testing.capture_cio_events`` shows.

    Raises:
        UnreadableTagError: the tag is where it cannot be read.
        InvalidEventError: the call breaks a rule or the API cannot carry it; an
            exception the application's objects raised while the tag was read (a
            mapping whose methods raise) is one, rule ``unreadable_record``, named by its
            type only, since its text may quote the value.
    """
    try:
        event = event_from_record(record)
        if event is not None:
            check_for_api(event, api)
    except InvalidEventError:
        raise
    except Exception as exc:
        raise InvalidEventError(
            f"the record could not be read as a call ({type(exc).__name__} while reading its tag)",
            "unreadable_record",
        ) from None
    return event


def route_of(event: Event, api: str) -> str:
    """The route ``event`` takes on ``api``, assuming it passed :func:`check_for_api`.

    Track: an anonymous event, page or screen view goes through v1 ``/api/v1/events``;
    an identified event or page view whose v2 item is over 32,768 bytes through v1
    ``/api/v1/customers/{id}/events``; everything else in v2 batches. Pipelines: an
    alias goes to ``/v1/alias`` (the batch schema has no alias), the rest in batches.
    """
    if api == PIPELINES_API:
        return PIPELINES_ALIAS if event.call == ALIAS else PIPELINES_BATCH
    if event.call in _V1_TYPES:
        if event.customer_id is None:
            return V1_ANONYMOUS
        if (
            event.call != SCREEN
            and not _surely_fits(event)
            and utf8_size(track_item(event)) > MAX_CALL_BYTES
        ):
            return V1
    return V2_BATCH


def check_for_api(event: Event, api: str) -> str:
    """Refuse at emit a call the configured API would refuse or cannot carry; return
    its route.

    Raises:
        InvalidEventError: with ``rule`` naming what the call breaks:
            ``unsupported_call``, ``anonymous_person_call``, ``call_too_large``,
            ``reserved_attribute``.
    """
    call, data = event.call, event.data_json
    if call == EVENT and 4 * len(data) + _HEAD_BOUND <= MAX_CALL_BYTES:
        # Most calls: an event too small to outgrow any route, with no typed key. This
        # runs on the caller's thread for every event: the general path below costs
        # four times as much.
        search = _EVENT_SEARCH[api]
        if search is None or search.search(data) is None:
            if api == PIPELINES_API:
                return PIPELINES_BATCH
            return V2_BATCH if event.customer_id is not None else V1_ANONYMOUS
    refusal = _NOT_ON[api].get(call)
    if refusal is not None:
        raise InvalidEventError(refusal, "unsupported_call")
    if event.anonymous_id is not None and call in _KNOWN_ONLY[api]:
        where = "Track" if api == TRACK_API else "Pipelines"
        raise InvalidEventError(
            f"the {where} API cannot {call.replace('_', ' ')} for an anonymous person: give "
            "customer_id"
            + (", or use the Pipelines API for an anonymous identify" if call == IDENTIFY else ""),
            "anonymous_person_call",
        )
    _check_reserved(event, api)
    route = route_of(event, api)
    if route in (V1, V1_ANONYMOUS) or _surely_fits(event):
        return route  # v1 takes up to 100 KB of data, checked at emit already
    text = pipelines_call(event) if api == PIPELINES_API else track_item(event)
    size = utf8_size(text)
    if size > MAX_CALL_BYTES:
        if api == PIPELINES_API:
            where = "a Pipelines call"
        elif call == SCREEN:
            where = "a Track v2 batch item (v1 takes a screen view only for an anonymous person)"
        else:
            where = "a Track v2 batch item"
        raise InvalidEventError(
            f"the {call} call is {size:,} bytes as sent; {where} takes at most {MAX_CALL_BYTES:,}",
            "call_too_large",
        )
    return route


# Keys of the data that the specs give a type: a call with one of them of another type
# would fail the published schema. Checked only when the key's text is in the data.
_STRING = "a string"
_BOOLEAN = "true or false"
_STRINGS = "a list of strings"
_OBJECT = "an object"
_DATE_TIME = "an ISO 8601 date-time string with a zone (2026-01-02T03:04:05Z)"
_TOPICS = "an object with 'topics' (and on Pipelines 'channels') mapping names to true/false"
_RESERVED: dict[tuple[str, str], dict[str, str]] = {
    (TRACK_API, EVENT): {"recipient": _STRING, "from_address": _STRING, "reply_to": _STRING},
    (TRACK_API, PAGE): {
        **dict.fromkeys(("path", "referrer", "search", "title", "url"), _STRING),
        "keywords": _STRINGS,
    },
    (TRACK_API, IDENTIFY): {"cio_subscription_preferences": _TOPICS, "_update": _BOOLEAN},
    (PIPELINES_API, IDENTIFY): {
        "email": _STRING,
        "createdAt": _DATE_TIME,
        "unsubscribed": _BOOLEAN,
        "cio_subscription_preferences": _TOPICS,
    },
    (PIPELINES_API, PAGE): {"category": _STRING},
    (PIPELINES_API, GROUP): {"object_type_id": _STRING, "relationshipAttributes": _OBJECT},
}
# One search a call for any of its reserved keys (with their quotes and colon).
_RESERVED_SEARCH = {
    kind: re.compile('"(?:' + "|".join(map(re.escape, keys)) + ')":')
    for kind, keys in _RESERVED.items()
}
_EVENT_SEARCH = {api: _RESERVED_SEARCH.get((api, EVENT)) for api in (TRACK_API, PIPELINES_API)}
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)")


def _check_reserved(event: Event, api: str) -> None:
    search = _RESERVED_SEARCH.get((api, event.call))
    # The keys' text (with quotes and colon) is absent from almost every call: then
    # the data is never decoded here.
    if search is None or search.search(event.data_json) is None:
        return
    rules = _RESERVED[(api, event.call)]
    present = [key for key in rules if f'"{key}":' in event.data_json]
    data = event.data
    if event.call == GROUP:
        data = data.get("traits", {})
    for key in present:
        if key in data and not _has_type(data[key], rules[key]):
            raise InvalidEventError(
                f"the {event.call} call's {key!r} must be {rules[key]}: the published "
                f"{'Track' if api == TRACK_API else 'Pipelines'} API schema reserves it",
                "reserved_attribute",
            )


def _has_type(value: Any, kind: str) -> bool:
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _BOOLEAN:
        return isinstance(value, bool)
    if kind == _STRINGS:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind == _OBJECT:
        return isinstance(value, dict)
    if kind == _DATE_TIME:
        if not (isinstance(value, str) and _RFC3339.fullmatch(value)):
            return False
        try:
            dt.datetime.fromisoformat(value.upper())
        except ValueError:
            return False
        return True
    # _TOPICS
    if not isinstance(value, dict):
        return False
    return all(
        isinstance(group, dict) and all(isinstance(flag, bool) for flag in group.values())
        for name, group in value.items()
        if name in ("topics", "channels")
    )


# -- Track API ----------------------------------------------------------------------------

_ACTIONS = {
    EVENT: "event",
    IDENTIFY: "identify",
    PAGE: "page",
    SCREEN: "screen",
    DELETE: "delete",
    SUPPRESS: "suppress",
    UNSUPPRESS: "unsuppress",
    ADD_DEVICE: "add_device",
    DELETE_DEVICE: "delete_device",
    ADD_RELATIONSHIPS: "add_relationships",
    DELETE_RELATIONSHIPS: "delete_relationships",
}
# The item kinds that name the call and carry its id; those that carry attributes.
_NAMED = frozenset({EVENT, PAGE, SCREEN})
_WITH_ATTRIBUTES = frozenset({EVENT, PAGE, SCREEN, IDENTIFY})


def track_item(event: Event) -> str:
    """One v2 batch item as compact JSON text, the stored data spliced in as it is.

    ``{"type":"person","identifiers":{"id":...},"action":...,"name":...,"id":...,
    "timestamp":...,"attributes":{data}}`` for events, page and screen views (an
    identify has no name or id); ``"device":{...}`` for the devices;
    ``"cio_relationships":[...]`` for relationships; nothing more for delete,
    suppress and unsuppress; and a merge names no identifiers but
    ``"primary":{"id":...},"secondary":{"id":...}``.
    """
    call = event.call
    if call == MERGE:
        primary = encode_basestring(str(event.data["primary"]))
        secondary = encode_basestring(event.customer_id or "")
        return (
            f'{{"type":"person","action":"merge","primary":{{"id":{primary}}},'
            f'"secondary":{{"id":{secondary}}}}}'
        )
    person, action = encode_basestring(event.customer_id or ""), _ACTIONS[call]
    head = f'{{"type":"person","identifiers":{{"id":{person}}},"action":"{action}"'
    if call in _NAMED:
        head += f',"name":{encode_basestring(event.name)},"id":{encode_basestring(event.id)}'
    if call in _WITH_ATTRIBUTES:
        return f'{head},"timestamp":{int(event.timestamp)},"attributes":{event.data_json}}}'
    if call in (ADD_DEVICE, DELETE_DEVICE):
        return f'{head},"device":{event.data_json}}}'
    if call in (ADD_RELATIONSHIPS, DELETE_RELATIONSHIPS):
        return f"{head},{event.data_json[1:]}"  # {"cio_relationships":[...]} opened up
    return head + "}"


def track_v1_body(event: Event) -> str:
    """The body of a v1 event (``/api/v1/customers/{id}/events`` or ``/api/v1/events``),
    compact and UTF-8 like every other request, so its data goes out as the bytes
    counted at emit: ``{"name":...,"data":{...},"id":...,"timestamp":...}`` plus
    ``"type"`` for a page or screen view and ``"anonymous_id"`` for an anonymous one."""
    body = (
        f'{{"name":{encode_basestring(event.name)},"data":{event.data_json},'
        f'"id":{encode_basestring(event.id)},"timestamp":{int(event.timestamp)}'
    )
    kind = _V1_TYPES.get(event.call)
    if kind is not None:
        body += f',"type":"{kind}"'
    if event.customer_id is None and event.anonymous_id is not None:
        body += f',"anonymous_id":{encode_basestring(event.anonymous_id)}'
    return body + "}"


# -- Pipelines API -------------------------------------------------------------------------

_TYPES = {EVENT: "track", IDENTIFY: "identify", PAGE: "page", SCREEN: "screen", GROUP: "group"}
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_LIBRARY = {"name": "cio_logging", "version": PACKAGE_VERSION}
_CONTEXT = _ENCODER.encode({"library": _LIBRARY})


def pipelines_call(event: Event) -> str:
    """One Pipelines call as compact JSON text, the stored data spliced in as it is.

    Segment's shape: ``type``, ``userId`` or ``anonymousId``, the call's own fields,
    ``messageId`` (the ULID), ``timestamp`` (ISO 8601), ``context`` naming this library,
    and ``properties`` or ``traits``. An identify carries no ``context``: the spec's
    identify reads it through a ``oneOf`` whose two alternatives (mobile, non-mobile)
    both match any context, so with one no identify would pass the published schema.
    The person calls are semantic ``track`` events (``User Deleted``, ``Device
    Created or Updated``, ...); devices put the token and platform in
    ``context.device``. An alias (sent on its own route, which implies its type)
    carries ``previousId`` and no ``type``.
    """
    call = event.call
    head: dict[str, Any] = {}
    if call != ALIAS:
        head["type"] = _TYPES.get(call, "track")
    if event.customer_id is not None:
        head["userId"] = event.customer_id
    else:
        head["anonymousId"] = event.anonymous_id
    if call in SEMANTIC_EVENTS:
        head["event"] = SEMANTIC_EVENTS[call]
    elif call == EVENT:
        head["event"] = event.name
    elif call in (PAGE, SCREEN):
        head["name"] = event.name
    head["messageId"] = event.id
    head["timestamp"] = iso_timestamp(event)
    text = _ENCODER.encode(head)[:-1]
    if call == IDENTIFY:
        return f'{text},"traits":{event.data_json}}}'
    if call in (EVENT, PAGE, SCREEN):
        return f'{text},"context":{_CONTEXT},"properties":{event.data_json}}}'
    if call in (DELETE, SUPPRESS, UNSUPPRESS):
        return f'{text},"context":{_CONTEXT},"properties":{{}}}}'
    if call in (GROUP, ALIAS):  # {"groupId":...,"traits":{...}}, {"previousId":...}
        return f'{text},"context":{_CONTEXT},{event.data_json[1:]}'
    # ADD_DEVICE, DELETE_DEVICE
    data = event.data
    device = {"token": data["token"]}
    if "platform" in data:
        device["type"] = data["platform"]
    properties = dict(data.get("attributes", {}))
    if "last_used" in data:
        properties["last_used"] = data["last_used"]
    context = _ENCODER.encode({"library": _LIBRARY, "device": device})
    return f'{text},"context":{context},"properties":{_ENCODER.encode(properties)}}}'


def iso_timestamp(event: Event) -> str:
    """The call's time in ISO 8601 (UTC, milliseconds): the record's own time when the
    event's timestamp is that second (it was not given), so calls logged in one second
    keep their order to the millisecond."""
    moment: float = event.timestamp
    if int(event.logged_at) == event.timestamp:
        moment = event.logged_at
    stamp = dt.datetime.fromtimestamp(moment, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
