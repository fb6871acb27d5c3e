"""The call model: tagging a log record, mapping it to a Customer.io call, validating it.

Pure functions, no I/O. A call leaves here as one compact JSON text, which is what
the write-ahead log stores and what the sender reads back.

A call is an event (``cio_event``) or a person call (``cio_identify``, ``cio_page``,
``cio_screen``, ``cio_delete``, ``cio_suppress``, ``cio_unsuppress``, the devices,
``cio_merge``, the relationships, ``cio_group``, ``cio_alias``), carried by the same
:class:`Event` tuple; ``call`` says which. Limits are Customer.io's published ones
(``../shared/docs/facts.md``): a call that breaks one, or that the configured API
cannot carry (``wire.check_for_api``), is refused at emit, where the application's
developer can see why, rather than rejected by the API hours later.

Nothing changes silently: every value is either encoded as the conversion table of
:func:`encode_data` says, or the record is refused with a warning naming the rule.
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
ADD_DEVICE, DELETE_DEVICE, MERGE = "add_device", "delete_device", "merge"
ADD_RELATIONSHIPS, DELETE_RELATIONSHIPS = "add_relationships", "delete_relationships"
GROUP, ALIAS = "group", "alias"
CALLS = frozenset(
    {EVENT, IDENTIFY, PAGE, SCREEN, DELETE, SUPPRESS, UNSUPPRESS, ADD_DEVICE, DELETE_DEVICE}
    | {MERGE, ADD_RELATIONSHIPS, DELETE_RELATIONSHIPS, GROUP, ALIAS}
)
#: Calls about the person itself: named after the call, and always essential (a lost
#: identify means a campaign never reaches that person; a lost delete is a promise
#: broken; a lost device, merge or relationship is a profile left wrong).
PERSON_CALLS = CALLS - {EVENT, PAGE, SCREEN}
#: The two APIs (``api=`` of the handler).
TRACK_API, PIPELINES_API = "track", "pipelines"
#: Device platforms both APIs accept.
PLATFORMS = ("ios", "android")
# Set by cio_event on a mistake it must not raise for; the record is refused at emit,
# under the rule in _RULE_KEY ("invalid" when absent).
_TAG_ERROR_KEY = "cio_event_error"
_RULE_KEY = "cio_event_rule"

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

    @property
    def people(self) -> tuple[str, ...]:
        """Every person whose order this call takes part in, its own first.

        A merge is stored under the person merged away (``customer_id`` is the
        secondary: it goes after that person's earlier calls and before their later
        ones) and also waits for every earlier call of the person it is merged into.
        """
        if self.call != MERGE:
            return (self.person,)
        primary = self.data.get("primary")
        return (self.person, "c:" + str(primary))

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
    data: Mapping[Any, Any] | None = None,
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
    data: Mapping[Any, Any] | None,
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
        try:
            merged = {**data, **data_keywords}
            clashes = len(merged) != len(data) + len(data_keywords)
        except Exception as exc:  # a Mapping whose keys, length or items raise
            tag[_TAG_ERROR_KEY] = f"{data_argument}= could not be read ({type(exc).__name__})"
            tag[_RULE_KEY] = "data_unreadable"
        else:
            if clashes:
                keys = ", ".join(sorted(repr(key) for key in data_keywords if _given_in(data, key)))
                tag[_TAG_ERROR_KEY] = (
                    f"got key(s) {keys} both in {data_argument}= and as keywords; "
                    "give each key once"
                )
            tag["data"] = merged
    return _finish_tag(tag, call, customer_id, anonymous_id, name, id, timestamp)


def _given_in(data: Mapping[str, Any], key: str) -> bool:
    try:
        return key in data
    except Exception:
        return False


def _finish_tag(
    tag: dict[str, Any],
    call: str,
    customer_id: object,
    anonymous_id: object,
    name: object,
    id: object,
    timestamp: object,
) -> dict[str, dict[str, Any]]:
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
    attributes: Mapping[Any, Any] | None = None,
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
    properties: Mapping[Any, Any] | None = None,
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
    properties: Mapping[Any, Any] | None = None,
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


def cio_add_device(
    customer_id: str | int,
    token: str,
    platform: str,
    *,
    last_used: float | dt.datetime | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
    attributes: Mapping[str, str] | None = None,
    **attribute_keywords: str,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as adding (or updating) a person's mobile device.

    Track API: a v2 batch ``add_device``. Pipelines API: the semantic event ``Device
    Created or Updated``, the token and platform in ``context.device``, the
    attributes (and ``last_used``) in ``properties``. ``platform`` is ``"ios"`` or
    ``"android"``; device attributes are text (``push_enabled``: ``"true"`` or
    ``"false"``).

    Example::

        log.info("device", extra=cio_add_device("user-42", "apns-token", "ios", app_version="2.1"))
    """
    tag = _tag(
        ADD_DEVICE,
        customer_id,
        None,
        None,
        id,
        timestamp,
        attributes,
        attribute_keywords,
        "attributes",
    )
    fields = tag[EXTRA_KEY]
    device: dict[str, Any] = {"token": token, "platform": platform}
    if last_used is not None:
        device["last_used"] = last_used
    if fields.get("data"):
        device["attributes"] = fields["data"]
    fields["data"] = device
    return tag


def cio_delete_device(
    customer_id: str | int,
    token: str,
    *,
    platform: str | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as removing a device from a person.

    Track API: a v2 batch ``delete_device``. Pipelines API: the semantic event
    ``Device Deleted`` (``platform``, when given, goes in ``context.device.type``).
    """
    device: dict[str, Any] = {"token": token}
    if platform is not None:
        device["platform"] = platform
    return _tag(DELETE_DEVICE, customer_id, None, None, id, timestamp, None, device)


def cio_merge(
    primary: str | int,
    secondary: str | int,
    *,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as merging the person ``secondary`` into ``primary``.

    Track API only: a v2 batch ``merge`` (Customer.io then deletes ``secondary``; the
    primary must exist). The Pipelines API has no merge: refused at emit there.

    Order: the merge is sent after every call logged before it for either person, and
    before every call logged after it for ``secondary`` (which Customer.io would create
    anew). Calls for ``primary`` logged after it may go before it: they land on the
    primary either way.
    """
    return _tag(MERGE, secondary, None, None, id, timestamp, None, {"primary": primary})


def cio_add_relationships(
    customer_id: str | int,
    relationships: Any,
    *,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as relating a person to objects (companies, accounts, ...).

    Track API only: a v2 batch ``add_relationships``. On the Pipelines API relate a
    person to an object with :func:`cio_group`; this call is refused at emit there.

    Args:
        relationships: the objects, each ``(object_type_id, object_id)``, or a dict
            with ``object_type_id`` and ``object_id`` (or ``cio_object_id``) and
            optionally ``relationship_attributes``.

    Example::

        log.info("joined", extra=cio_add_relationships("user-42", [("1", "acme")]))
    """
    return _relationship_tag(ADD_RELATIONSHIPS, customer_id, relationships, id, timestamp)


def cio_delete_relationships(
    customer_id: str | int,
    relationships: Any,
    *,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as removing a person's relationships to objects; like
    :func:`cio_add_relationships` (Track API only: a v2 batch ``delete_relationships``)."""
    return _relationship_tag(DELETE_RELATIONSHIPS, customer_id, relationships, id, timestamp)


def _relationship_tag(
    call: str, customer_id: object, relationships: object, id: object, timestamp: object
) -> dict[str, dict[str, Any]]:
    tag: dict[str, Any] = {}
    try:
        if isinstance(relationships, str | bytes | Mapping):
            raise TypeError("a list of relationships")
        given = [_relationship_spec(item) for item in relationships]  # type: ignore[attr-defined]
    except Exception as exc:
        tag[_TAG_ERROR_KEY] = (
            f"the relationships of a {call} call must be a list of (object_type_id, "
            f"object_id) pairs or dicts ({type(exc).__name__})"
        )
        tag[_RULE_KEY] = "call_shape"
    else:
        tag["data"] = {"cio_relationships": given}
    return _finish_tag(tag, call, customer_id, None, None, id, timestamp)


def _relationship_spec(item: object) -> object:
    """A relationship as the Track API writes it, from a pair or a flat dict."""
    if isinstance(item, tuple) and len(item) == 2:
        return {"identifiers": {"object_type_id": item[0], "object_id": item[1]}}
    if isinstance(item, Mapping):
        fields = dict(item)
        attributes = fields.pop("relationship_attributes", None)
        spec: dict[str, Any] = {"identifiers": fields}
        if attributes is not None:
            spec["relationship_attributes"] = attributes
        return spec
    return item  # refused at emit, with its type


def cio_group(
    customer_id: str | int | None = None,
    group_id: str | int | None = None,
    *,
    anonymous_id: str | None = None,
    object_type_id: str | int | None = None,
    relationship_attributes: Mapping[str, Any] | None = None,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
    traits: Mapping[Any, Any] | None = None,
    **trait_keywords: Any,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as a Pipelines ``group`` call: relate a person (known or
    anonymous) to the object ``group_id``, with the object's traits.

    Pipelines API only (on the Track API use :func:`cio_add_relationships`; refused
    at emit there). ``object_type_id`` and ``relationship_attributes`` go in the
    traits as ``object_type_id`` and ``relationshipAttributes``.

    Example::

        log.info("joined", extra=cio_group("user-42", "acme", object_type_id="1", name="Acme"))
    """
    tag = _tag(
        GROUP, customer_id, anonymous_id, None, id, timestamp, traits, trait_keywords, "traits"
    )
    fields = tag[EXTRA_KEY]
    if "data" in fields:
        group_traits = fields["data"]
        if object_type_id is not None:
            group_traits["object_type_id"] = (
                str(object_type_id) if type(object_type_id) is int else object_type_id
            )
        if relationship_attributes is not None:
            group_traits["relationshipAttributes"] = relationship_attributes
        fields["data"] = {"groupId": group_id, "traits": group_traits}
    return tag


def cio_alias(
    customer_id: str | int,
    previous_id: str | int,
    *,
    id: str | ULID | None = None,
    timestamp: float | dt.datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """Tag a log record as a Pipelines ``alias`` call: ``previous_id`` (an anonymous id
    or an earlier user id) is the person ``customer_id`` from now on.

    Pipelines API only (``POST /v1/alias``: batches cannot carry it); refused at emit
    on the Track API, whose nearest call is :func:`cio_merge`. Sent in
    ``customer_id``'s order.
    """
    return _tag(ALIAS, customer_id, None, None, id, timestamp, None, {"previousId": previous_id})


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
            raise InvalidEventError(str(tag[_TAG_ERROR_KEY]), str(tag.get(_RULE_KEY, "invalid")))
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
    if type(call) is not str or call not in CALLS:
        raise InvalidEventError(
            f"unknown call in extra[{EXTRA_KEY!r}]['call'] (known: {', '.join(sorted(CALLS))})"
        )
    if (customer_id is None) == (anonymous_id is None):
        what = "an event" if call == EVENT else f"a {call} call"
        raise InvalidEventError(f"{what} needs exactly one of customer_id and anonymous_id")
    data = tag.get("data")
    name: object
    if call in PERSON_CALLS:
        name = call  # a person call has no name of its own
        if call in _CALL_SHAPES:
            try:
                data = _CALL_SHAPES[call](data, customer_id)
            except InvalidEventError:
                raise
            except Exception as exc:  # the application's objects raised while read
                raise InvalidEventError(
                    f"the data of a {call} call could not be read ({type(exc).__name__})",
                    "data_unreadable",
                ) from None
    else:
        name = tag.get("name")
        if name is None:
            name = _formatted_message(record) if default_name is None else default_name
    # Positional: a NamedTuple built from keywords costs a third more, at every emit.
    return Event(
        _event_id(tag.get("id")),
        _name(name),
        customer_id,
        anonymous_id,
        encode_data(data),
        _timestamp(tag.get("timestamp"), record.created),
        record.created,
        call,
    )


def _formatted_message(record: logging.LogRecord) -> str:
    """The record's message, the event's default name.

    Raises:
        InvalidEventError: formatting raised (arguments that do not match the format,
            an argument whose ``__str__`` raises); named by the exception's type only.
    """
    try:
        return record.getMessage()
    except Exception as exc:
        raise InvalidEventError(
            f"the record's message cannot be formatted with its arguments "
            f"({type(exc).__name__}), so it cannot name the event: give name=, or fix the "
            "format string or the argument",
            "message_unformattable",
        ) from None


# -- the shapes of the calls that carry fields of their own ----------------------------
#
# Their data is the call's own fields, checked here and normalised into the object the
# wire module splices into a request (keys in a fixed order, nothing else): a device, a
# merge's primary, relationships, a group, an alias's previous id. Each function takes
# the tag's data and the call's customer_id and returns the data to store.


def _fields(call: str, data: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if data is None:
        data = {}
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidEventError(
            f"the data of a {call} call must be a dict, not {type(data).__name__}"
        )
    try:
        fields = dict(data)
    except Exception as exc:
        raise InvalidEventError(
            f"the data of a {call} call could not be read ({type(exc).__name__})",
            "data_unreadable",
        ) from None
    unknown = [key for key in fields if key not in allowed]
    if unknown:
        raise InvalidEventError(
            f"a {call} call takes only {', '.join(allowed) or 'no data'} "
            f"({len(unknown)} other key(s) given)",
            "call_shape",
        )
    return fields


def _text(call: str, field: str, value: object, *, limit: int | None = None) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidEventError(
            f"{field} of a {call} call must be a string, not {type(value).__name__}", "call_shape"
        )
    text = str(value)
    if not text.strip():
        raise InvalidEventError(f"{field} of a {call} call must not be empty", "call_shape")
    if limit is not None and _utf8_size(field, text) > limit:
        raise InvalidEventError(
            f"{field} of a {call} call is over {limit} bytes; Customer.io accepts at most {limit}",
            "call_shape",
        )
    return text


def _no_data(call: str) -> Any:
    def shape(data: object, customer_id: str | None) -> dict[str, Any]:
        _fields(call, data, ())
        return {}

    return shape


def _device(call: str) -> Any:
    adding = call == ADD_DEVICE

    def shape(data: object, customer_id: str | None) -> dict[str, Any]:
        allowed = ("token", "platform") + (("last_used", "attributes") if adding else ())
        fields = _fields(call, data, allowed)
        device: dict[str, Any] = {"token": _text(call, "token", fields.get("token"))}
        platform = fields.get("platform")
        if platform is not None or adding:
            if platform not in PLATFORMS:
                raise InvalidEventError(
                    f"platform of a {call} call must be one of {', '.join(PLATFORMS)}",
                    "call_shape",
                )
            device["platform"] = platform
        last_used = fields.get("last_used")
        if last_used is not None:
            device["last_used"] = _timestamp(last_used, 0.0)
        attributes = fields.get("attributes")
        if attributes:
            if not isinstance(attributes, Mapping) or not all(
                type(key) is str and type(value) is str for key, value in attributes.items()
            ):
                raise InvalidEventError(
                    "device attributes must map text to text (the Track API takes string "
                    "values only)",
                    "call_shape",
                )
            if attributes.get("push_enabled", "true") not in ("true", "false"):
                raise InvalidEventError(
                    "the device attribute push_enabled must be 'true' or 'false'", "call_shape"
                )
            device["attributes"] = dict(attributes)
        return device

    return shape


def _merge(data: object, customer_id: str | None) -> dict[str, Any]:
    fields = _fields(MERGE, data, ("primary",))
    primary = _identifier("primary", fields.get("primary"))
    if primary is None:
        raise InvalidEventError("a merge call needs the primary person", "call_shape")
    if primary == customer_id:
        raise InvalidEventError(
            "a merge call merges a person into another, not into itself", "call_shape"
        )
    return {"primary": primary}


def _relationships(call: str) -> Any:
    def shape(data: object, customer_id: str | None) -> dict[str, Any]:
        fields = _fields(call, data, ("cio_relationships",))
        given = fields.get("cio_relationships")
        if not isinstance(given, list | tuple) or not given:
            raise InvalidEventError(f"a {call} call needs at least one relationship", "call_shape")
        return {"cio_relationships": [_relationship(call, item) for item in given]}

    return shape


def _relationship(call: str, item: object) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidEventError(
            f"each relationship of a {call} call must be a dict, not {type(item).__name__}",
            "call_shape",
        )
    extra = set(item) - {"identifiers", "relationship_attributes"}
    identifiers = item.get("identifiers")
    if extra or not isinstance(identifiers, Mapping):
        raise InvalidEventError(
            f"each relationship of a {call} call is {{'identifiers': {{...}}, "
            "'relationship_attributes': {...}}",
            "call_shape",
        )
    if set(identifiers) == {"cio_object_id"}:
        names: tuple[str, ...] = ("cio_object_id",)
    elif set(identifiers) == {"object_type_id", "object_id"}:
        names = ("object_type_id", "object_id")
    else:
        raise InvalidEventError(
            "an object is named by object_type_id and object_id, or by cio_object_id alone",
            "call_shape",
        )
    relationship: dict[str, Any] = {
        "identifiers": {
            name: _text(call, name, identifiers[name], limit=MAX_IDENTIFIER_BYTES) for name in names
        }
    }
    attributes = item.get("relationship_attributes")
    if attributes is not None:
        if not isinstance(attributes, Mapping):
            raise InvalidEventError("relationship_attributes must be a dict", "call_shape")
        relationship["relationship_attributes"] = attributes
    return relationship


def _group(data: object, customer_id: str | None) -> dict[str, Any]:
    fields = _fields(GROUP, data, ("groupId", "traits"))
    group_id = _text(GROUP, "groupId", fields.get("groupId"), limit=MAX_IDENTIFIER_BYTES)
    traits = fields.get("traits") or {}
    if not isinstance(traits, Mapping):
        raise InvalidEventError("the traits of a group call must be a dict", "call_shape")
    return {"groupId": group_id, "traits": traits}


def _alias(data: object, customer_id: str | None) -> dict[str, Any]:
    fields = _fields(ALIAS, data, ("previousId",))
    previous = _text(ALIAS, "previousId", fields.get("previousId"), limit=MAX_IDENTIFIER_BYTES)
    if previous == customer_id:
        raise InvalidEventError(
            "an alias links two different ids, not an id to itself", "call_shape"
        )
    return {"previousId": previous}


_CALL_SHAPES: dict[str, Any] = {
    DELETE: _no_data(DELETE),
    SUPPRESS: _no_data(SUPPRESS),
    UNSUPPRESS: _no_data(UNSUPPRESS),
    ADD_DEVICE: _device(ADD_DEVICE),
    DELETE_DEVICE: _device(DELETE_DEVICE),
    MERGE: _merge,
    ADD_RELATIONSHIPS: _relationships(ADD_RELATIONSHIPS),
    DELETE_RELATIONSHIPS: _relationships(DELETE_RELATIONSHIPS),
    GROUP: _group,
    ALIAS: _alias,
}


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
        try:
            default_name = None if event is None else str(event)
        except Exception as exc:
            raise InvalidEventError(
                f"the structlog event cannot be turned into text ({type(exc).__name__}), so "
                "it cannot name the event: give name=",
                "message_unformattable",
            ) from None
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
    """Encode event data as compact JSON (UTF-8 text, no ASCII escapes), refusing what
    would not arrive exactly as logged.

    What each value becomes (the README's table of conversions):

    - ``str``: a JSON string (control characters escaped, ``\\u0000`` style); a
      lone surrogate is refused.
    - ``int`` (and ``IntEnum``): the integer's exact digits, whatever its size (past
      4,300 digits Python refuses to print it: refused).
    - ``float``: the shortest text that reads back as the same double; NaN and
      infinity are refused.
    - ``decimal.Decimal``: an integral value as its exact integer digits; any other as
      the shortest float text, when that float is exactly the Decimal's value (``9.99``,
      ``0.1``); refused when no double holds it (``1e-400``, 20 significant digits),
      and for NaN and infinity.
    - ``bool``, ``None``: ``true``, ``false``, ``null``.
    - ``dict`` and any other ``Mapping``: an object. Keys that are ``str`` stay as they
      are; ``int``, ``float``, ``bool`` and ``None`` keys become their JSON text
      (``1`` -> ``"1"``, ``None`` -> ``"null"``); two keys of one object that become the
      same text (``{1: ..., "1": ...}``) are refused; any other key type is refused.
    - ``list``, ``tuple``: an array; ``set``, ``frozenset``: an array in iteration order.
    - ``datetime``: whole Unix seconds (naive ones read as UTC, the fraction dropped);
      ``date``: ``"YYYY-MM-DD"``; ``uuid.UUID``: its canonical string.
    - Anything else (bytes, objects, a value whose conversion raises), cycles, nesting
      past Python's recursion limit and data over 100,000 bytes: refused.
    """
    if data is None:
        return "{}"
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidEventError(f"data must be a dict, not {type(data).__name__}")
    try:
        if type(data) is not dict:
            data = _json_default(data)
        # A cycle or deep nesting ends the check in RecursionError: the encoder below
        # says which it is. (Not contextlib.suppress: a context manager per event costs
        # a quarter of a microsecond on the caller's thread.)
        try:  # noqa: SIM105
            _check_keys(data)  # type: ignore[arg-type]  # a dict, converted above
        except RecursionError:
            pass
        if _encode_unchecked is None:
            text = _DATA_ENCODER.encode(data)
        else:
            try:
                text = "".join(_encode_unchecked(data, 0))
            except RecursionError:
                text = _DATA_ENCODER.encode(data)  # which names a cycle as one
        # ASCII text has no lone surrogate and one byte a character: skip the encoding.
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except InvalidEventError:
        raise
    except UnicodeEncodeError:
        raise InvalidEventError(
            "data contains text that is not valid Unicode (a lone surrogate)"
        ) from None
    except RecursionError:
        raise InvalidEventError("data is nested too deeply to encode") from None
    except _RefusedValueError as exc:
        raise InvalidEventError(str(exc), exc.rule) from None
    except (TypeError, ValueError) as exc:
        # json's messages name the type or the rule ("Circular reference detected",
        # "Out of range float values"), not the data itself.
        raise InvalidEventError(f"data cannot be encoded as JSON: {exc}") from None
    except Exception as exc:  # a value's own method raised: its text may hold the value
        raise InvalidEventError(
            f"data could not be read: a value raised {type(exc).__name__} while being encoded",
            "data_unreadable",
        ) from None
    if size > MAX_DATA_BYTES:
        raise InvalidEventError(
            f"data is {size:,} bytes as JSON; Customer.io accepts at most {MAX_DATA_BYTES:,}"
        )
    return text


class _RefusedValueError(ValueError):
    """A value the conversion table refuses, under a rule of its own."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


# Values the key check never looks into (a set cannot hold a dict; a Mapping that is
# not a dict is checked when it is converted).
_SCALARS = frozenset({str, int, float, bool, type(None)})
_TEXT = frozenset({str})


def _check_keys(data: dict[Any, Any]) -> None:
    """Refuse an object whose keys collide once turned into JSON text.

    json turns ``1``, ``1.0``, ``True`` and ``None`` keys into ``"1"``, ``"1.0"``,
    ``"true"`` and ``"null"``, so ``{1: "a", "1": "b"}`` would go out with the key
    ``"1"`` twice, and the receiver would keep one of them. Only objects with a key
    that is not a ``str`` need the comparison. This runs on the caller's thread for
    every event: an object of text keys and plain values is checked by two passes in
    C (``issuperset`` over the types), and only containers are looked into.

    Raises:
        _RefusedValueError: two keys of one object collide.
        RecursionError: a cycle, or nesting past the recursion limit (the encoder then
            says which).
    """
    if not _SCALARS.issuperset(map(type, data.values())):
        for child in data.values():
            if type(child) not in _SCALARS:
                _check_nested(child)
    if not _TEXT.issuperset(map(type, data)) and len({_key_text(key) for key in data}) != len(data):
        raise _RefusedValueError(
            "data holds an object whose keys collide once turned into JSON text "
            "(such as 1 and '1'); the receiver would keep only one of them",
            "key_collision",
        )


def _check_nested(value: object) -> None:
    if isinstance(value, dict):
        _check_keys(value)
    elif isinstance(value, list | tuple) and not _SCALARS.issuperset(map(type, value)):
        for child in value:
            if type(child) not in _SCALARS:
                _check_nested(child)


def _key_text(key: object) -> object:
    """A key as json writes it (other types are left for the encoder to refuse)."""
    if isinstance(key, str):
        return str.__str__(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return float.__repr__(key)
    return key


def _unix_seconds(value: dt.datetime, what: str, rule: str) -> float:
    """A datetime as Unix seconds (naive: UTC).

    Raises:
        _RefusedValueError: its time zone raised, or it is out of range (named by the
            exception's type only: a tzinfo's message may quote anything).
    """
    try:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return aware.timestamp()
    except Exception as exc:
        raise _RefusedValueError(
            f"{what} that cannot be turned into Unix seconds ({type(exc).__name__}: its "
            "tzinfo raised, or it is out of range)",
            rule,
        ) from None


def _decimal_number(value: decimal.Decimal) -> int | float:
    """A Decimal as the JSON number that is exactly its value (see :func:`encode_data`).

    Raises:
        _RefusedValueError: no JSON number a double can hold is exactly this value.
    """
    if not value.is_finite():
        raise _RefusedValueError("Decimal NaN or infinity is not JSON compliant", "invalid")
    if value == value.to_integral_value():
        if value.adjusted() >= 4300:  # int() would build it only for json to refuse it
            raise _RefusedValueError(
                "data holds an integral Decimal with more digits than JSON text allows",
                "decimal_not_exact",
            )
        return int(value)
    number = float(value)
    if math.isfinite(number) and decimal.Decimal(repr(number)) == value:
        return number
    raise _RefusedValueError(
        "data holds a Decimal that no JSON number a double can hold is exactly equal to "
        "(too many significant digits, or out of a double's range); send it as a string, "
        "or round it",
        "decimal_not_exact",
    )


def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return int(_unix_seconds(value, "data holds a datetime", "data_unreadable"))
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return _decimal_number(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, Mapping):
        try:
            converted = dict(value)
        except Exception as exc:
            raise _RefusedValueError(
                f"data holds a mapping that could not be read ({type(exc).__name__})",
                "data_unreadable",
            ) from None
        _check_keys(converted)
        return converted
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
        try:
            value = _unix_seconds(value, "timestamp is a datetime", "timestamp_unreadable")
        except _RefusedValueError as exc:
            raise InvalidEventError(str(exc), exc.rule) from None
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
