"""A local stand-in for Customer.io's Track API and Data Pipelines API, over real HTTPS on loopback.

The demo, the test suite and the benchmarks point the customerio SDK at it instead of
track.customer.io::

    with TrackAPISimulator() as sim:
        client = CustomerIO(sim.site_id, sim.api_key, host="127.0.0.1", port=sim.port, retries=0)
        client.http.trust_env = False  # REQUESTS_CA_BUNDLE would override `verify`
        client.http.verify = sim.ca_file
        client.track("42", "purchase", {"price": 9.5})
        assert sim.wait_for_events(1)

Track API: the four routes `/api/v1/customers/{identifier}/events`, `/api/v1/events`,
`/api/v2/batch` and `/api/v2/entity`, answered the way the published OpenAPI description and
the documented limits say: Basic auth `site_id:api_key`, ULID deduplication, per-item 207
errors, whole-request 400s. Events, v1 page and screen views and the v2 person actions
identify, delete, suppress, unsuppress, page and screen are recorded.

Data Pipelines API (`cdp.customer.io/v1`): `/v1/batch` and the single-call routes
`/v1/identify`, `/v1/track`, `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`. Basic auth
with the API key as the username and a blank password; 32 KB a call, 500 KB a request;
`messageId` deduplication (sharing the seen ids with Track); the semantic events `User
Deleted`, `User Suppressed` and `User Unsuppressed` recorded as delete, suppress and
unsuppress. Like the real API, an invalid or oversized call is answered 200 and silently
dropped (counted in `silently_dropped`) unless the request sends `X-Strict-Mode: 1`, which
turns it into a 400 `{"meta": {"errors": ["<field>: <message>", ...]}}` and refuses the whole
request.

Every accepted call of either API is an `AcceptedEvent` in `accepted`, in acceptance order
(`call` says which kind, `api` which API); `history(person)` gives one person's calls and
`calls(call)` one kind. Tests drive it from the same process through its methods (`fail`,
`set_latency`, `reset_connections`, `refuse_connections`, `poison`, ...), which apply to both
APIs alike, and read what it received from `requests`; another process can do the same
through the unauthenticated control routes under `/_simulator/` (listed in `CONTROL_API`,
and in the README). `python -m cio_logging.simulator` (or `cio-logging simulator`) runs one
until interrupted.

The TLS certificate comes from a throwaway CA made by trustme; its PEM is at `ca_file`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hmac
import json
import re
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote

from ._argparse import OneLineParser

__all__ = [
    "CONTROL_API",
    "AcceptedEvent",
    "RequestRecord",
    "SimulatorUnavailableError",
    "TrackAPISimulator",
    "run_from_command_line",
]

# Limits from Customer.io's documentation. Sizes are measured on compact UTF-8 JSON
# (separators without spaces, no ASCII escaping): the smallest form of the same content.
MAX_NAME_BYTES = 100
MAX_DATA_BYTES = 100_000
MAX_IDENTIFIER_BYTES = 150
MAX_V2_ITEM_BYTES = 32_768
MAX_V2_REQUEST_BYTES = 512_000
MAX_PIPELINES_CALL_BYTES = 32_768
MAX_PIPELINES_REQUEST_BYTES = 512_000
_MAX_READ_BYTES = 16 * 1024 * 1024  # beyond this the body is not even read (413)

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.IGNORECASE)
_V1_EVENT_TYPES = frozenset({"event", "page", "screen"})
_PERSON_IDENTIFIERS = frozenset({"id", "email", "phone", "cio_id"})
_ACTIONS = {
    "person": frozenset({"identify", "delete", "event", "page", "screen", "merge", "suppress"})
    | {"unsuppress", "add_relationships", "delete_relationships", "add_device", "delete_device"},
    "object": frozenset({"identify", "identify_anonymous", "delete", "add_relationships"})
    | {"delete_relationships"},
    "delivery": frozenset({"event"}),
}
# The person actions a Track v2 request records: those that the handler's person calls
# send (relationships, devices and merges are validated, not recorded).
_V2_PERSON_CALLS = frozenset({"identify", "delete", "suppress", "unsuppress"})
# Every AcceptedEvent.call: group and alias come only from Pipelines calls.
_CALLS = frozenset(
    {"event", "identify", "page", "screen", "delete", "suppress", "unsuppress", "group", "alias"}
)
# The spec's batch schema lists these five: alias has a route of its own only.
_PIPELINES_BATCH_TYPES = ("identify", "track", "page", "screen", "group")
# Semantic events: a track call with one of these names acts on the person.
_SEMANTIC_CALLS = {
    "User Deleted": "delete",
    "User Suppressed": "suppress",
    "User Unsuppressed": "unsuppress",
}
# RFC 3339, the JSON Schema meaning of the spec's `format: date-time`: a zone is required,
# since a timestamp without one names no instant.
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Route(NamedTuple):
    api: str  # "track" or "pipelines": which credentials and which validation
    name: str  # AcceptedEvent.route
    call_type: str | None = None  # the type a Pipelines single-call route implies


_ROUTES = {
    "/api/v1/events": _Route("track", "v1_anonymous"),
    "/api/v2/batch": _Route("track", "v2_batch"),
    "/api/v2/entity": _Route("track", "v2_entity"),
    "/v1/batch": _Route("pipelines", "pipelines_batch"),
    **{
        f"/v1/{kind}": _Route("pipelines", f"pipelines_{kind}", kind)
        for kind in ("identify", "track", "page", "screen", "group", "alias")
    },
}
_V1_IDENTIFIED = re.compile(r"/api/v1/customers/([^/]*)/events")
_BATCH_ROUTES = frozenset({"v2_batch", "pipelines_batch"})
_CONTROL_PREFIX = "/_simulator/"
_UNAUTHORIZED = "Unauthorized request. Make sure that you provided the right credentials."
_CHALLENGES = {
    "track": (("WWW-Authenticate", 'Basic realm="Customer.io Track API"'),),
    "pipelines": (("WWW-Authenticate", 'Basic realm="Customer.io Data Pipelines API"'),),
}
_CONTROL_METHODS = {
    "events": ("GET",),
    "requests": ("GET",),
    "history": ("GET",),
    "poison": ("GET", "POST"),
    "faults": ("POST",),
    "clear_faults": ("POST",),
    "clear_poison": ("POST",),
    "clear": ("POST",),
}

#: The unauthenticated control routes, as ``--help`` and the README describe them.
CONTROL_API = """\
control API (unauthenticated, JSON; never recorded, never faulted):
  GET  /_simulator/events        accepted calls of both APIs: {"events": [...],
                                 "duplicates": N, "silently_dropped": N}
  GET  /_simulator/history?person=ID
                                 one person's accepted calls (userId, anonymousId or
                                 Track identifier), in order: {"calls": [...]}
  GET  /_simulator/requests      every Track and Pipelines request: time, method,
                                 path, status, strict, ...
  POST /_simulator/faults        {"status": 503, "count": N | "duration": S,
                                  "retry_after": "7", "body": {...}},
                                 {"latency": S}, {"reset_connections": {"count": N}}
  POST /_simulator/clear_faults  end failures, latency, resets and a refusal
                                 (poison names stay)
  GET  /_simulator/poison        the poison names: {"names": [...]}
  POST /_simulator/poison        {"names": ["bad_event"]}: events with these names are
                                 rejected (400 on v1, a 207 item error in a v2 batch;
                                 a Pipelines track, page or screen call is dropped, or
                                 400 with X-Strict-Mode: 1)
  POST /_simulator/clear_poison  forget every poison name
  POST /_simulator/clear         forget accepted calls, requests, seen ids and the
                                 silently dropped count
"""
_FAULT_KEYS = frozenset({"status", "latency", "reset_connections"})
_NOT_JSON = object()  # stands for a body that did not parse


class SimulatorUnavailableError(RuntimeError):
    """The simulator cannot run here: trustme is missing, or it cannot listen."""


def _trustme() -> Any:
    try:
        import trustme
    except ImportError:
        raise SimulatorUnavailableError(
            "the Track API simulator needs trustme, which is not installed: "
            "pip install 'cio-logging[simulator]'"
        ) from None
    return trustme


@dataclass(frozen=True)
class AcceptedEvent:
    """One call the simulator accepted, of either API (a duplicate id is not recorded again).

    ``call`` is ``"event"``, ``"identify"``, ``"page"``, ``"screen"``, ``"delete"``,
    ``"suppress"``, ``"unsuppress"``, or for Pipelines only ``"group"`` and ``"alias"``;
    ``api`` is ``"track"`` or ``"pipelines"``. The other fields, for every call:

    - ``id``: the Track ``id`` or the Pipelines ``messageId`` (None when the call has none);
    - ``name``: the event name, the page or screen name (``""`` for a Pipelines page or
      screen sent without one), else the call itself (``"identify"``, ``"delete"``, ...);
    - ``customer_id``: the person (Track identifier value, Pipelines ``userId``);
    - ``anonymous_id``: Track v1 ``anonymous_id``, Pipelines ``anonymousId``;
    - ``data``: attributes, properties or traits (``{}`` when absent; for an alias,
      ``{"previousId": ...}``);
    - ``timestamp``: Unix seconds (a Pipelines ISO 8601 ``timestamp`` floored), or None;
    - ``route``: ``"v1"``, ``"v1_anonymous"``, ``"v2_batch"``, ``"v2_entity"``,
      ``"pipelines_batch"``, ``"pipelines_track"``, ``"pipelines_identify"``, ...
    """

    id: str | None
    name: str
    customer_id: str | None
    anonymous_id: str | None
    data: dict[str, Any]
    timestamp: int | None
    route: str
    received_at: float
    call: str = "event"
    api: str = "track"


@dataclass(frozen=True)
class RequestRecord:
    """One Track or Pipelines request as the simulator answered it (status 0: dropped)."""

    time: float
    method: str
    path: str
    status: int
    body_bytes: int
    item_count: int
    payload: Any = None  # the decoded JSON body, kept only while ``record_bodies`` is set
    user_agent: str = ""
    #: ``time.monotonic()`` when the request line and headers had arrived, before the
    #: body was read: where a server's rate limiter counts a request.
    arrived_at: float = 0.0
    #: Seconds from the request's headers read to its answer ready (latency included).
    duration: float = 0.0
    #: Whether the request sent ``X-Strict-Mode: 1``.
    strict: bool = False


class _Answer(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class _Draft(NamedTuple):
    """A call that passed validation, before deduplication stamps it as accepted."""

    id: str | None
    name: str
    customer_id: str | None
    anonymous_id: str | None
    data: dict[str, Any]
    timestamp: int | None
    route: str
    call: str = "event"
    api: str = "track"


@dataclass
class _Fault:
    """A fault that lasts `remaining` more requests and/or until a monotonic deadline."""

    remaining: int | None
    until: float | None
    status: int = 0
    retry_after: str | None = None
    body: dict[str, Any] | None = None

    def take(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


class _ValidationError(Exception):
    def __init__(self, field: str, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message

    def detail(self) -> dict[str, str]:
        return {"reason": self.reason, "field": self.field, "message": self.message}


def _utf8_size(text: str, field: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate sent as a JSON \ud800 escape
        raise _ValidationError(field, f"{field} is not valid UTF-8") from None


def _json_size(value: Any, field: str) -> int:
    return _utf8_size(json.dumps(value, separators=(",", ":"), ensure_ascii=False), field)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")  # json.loads would accept NaN and Infinity


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except ValueError:  # also UnicodeDecodeError
        return _NOT_JSON


def _check_identifier(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _ValidationError(field, f"{field} must be a string")
    if not value:
        raise _ValidationError(field, f"{field} must not be empty", "required")
    size = _utf8_size(value, field)
    if size > MAX_IDENTIFIER_BYTES:
        raise _ValidationError(field, f"{field} is {size} bytes, over 150", "too_long")
    return value


def _event_fields(
    obj: dict[str, Any], data_key: str, poison: Collection[str]
) -> tuple[str, str | None, int | None, dict[str, Any]]:
    """Check name, id, timestamp and data/attributes, common to v1 and v2 events."""
    name = _event_name(obj, poison)
    return (name, *_track_fields(obj, data_key))


def _event_name(obj: dict[str, Any], poison: Collection[str]) -> str:
    if "name" not in obj:
        raise _ValidationError("name", "name is required", "required")
    name = obj["name"]
    if not isinstance(name, str):
        raise _ValidationError("name", "name must be a string")
    if not name.strip():  # Customer.io trims names, so blank is empty
        raise _ValidationError("name", "name must not be empty", "required")
    size = _utf8_size(name, "name")
    if size > MAX_NAME_BYTES:
        raise _ValidationError("name", f"name is {size} bytes, over 100", "too_long")
    if name in poison:
        raise _ValidationError("name", f"event name {name!r} is rejected (poison name)")
    return name


def _track_fields(
    obj: dict[str, Any], data_key: str
) -> tuple[str | None, int | None, dict[str, Any]]:
    """Check id, timestamp and data/attributes, common to every Track call that records."""
    event_id = obj.get("id")
    if "id" in obj and not (isinstance(event_id, str) and _ULID.fullmatch(event_id)):
        raise _ValidationError("id", "id must be a ULID (26 Crockford base32 characters)")
    timestamp = obj.get("timestamp")
    if "timestamp" in obj and (not isinstance(timestamp, int) or isinstance(timestamp, bool)):
        raise _ValidationError("timestamp", "timestamp must be an integer (Unix seconds)")
    data = obj.get(data_key, {})
    if not isinstance(data, dict):
        raise _ValidationError(data_key, f"{data_key} must be an object")
    size = _json_size(data, data_key)
    if size > MAX_DATA_BYTES:
        raise _ValidationError(data_key, f"{data_key} is {size} bytes, over 100000", "too_long")
    return event_id, timestamp, data


def _v1_draft(payload: Any, customer_id: str | None, route: str, poison: Collection[str]) -> _Draft:
    if not isinstance(payload, dict):
        raise _ValidationError("body", "the body must be a JSON object")
    name, event_id, timestamp, data = _event_fields(payload, "data", poison)
    if "type" in payload and payload["type"] not in _V1_EVENT_TYPES:
        raise _ValidationError("type", "type must be one of event, page, screen")
    anonymous_id = None
    if route == "v1_anonymous" and "anonymous_id" in payload:
        anonymous_id = _check_identifier(payload["anonymous_id"], "anonymous_id")
    call = payload.get("type", "event")  # a page or screen view, else an event
    return _Draft(event_id, name, customer_id, anonymous_id, data, timestamp, route, call)


def _v2_draft(item: Any, route: str, poison: Collection[str]) -> _Draft | None:
    """Validate one v2 operation; return the person call it records (None for others)."""
    if not isinstance(item, dict):
        raise _ValidationError("item", "each operation must be a JSON object")
    size = _json_size(item, "item")
    if size > MAX_V2_ITEM_BYTES:
        raise _ValidationError("item", f"the operation is {size} bytes, over 32768", "too_long")
    kind, action = item.get("type"), item.get("action")
    if kind not in _ACTIONS:
        raise _ValidationError("type", "type must be one of person, object, delivery")
    if action not in _ACTIONS[kind]:
        raise _ValidationError("action", f"action {action!r} is not valid for type {kind}")
    if action == "merge":  # the one operation that names two people instead of identifiers
        if not (isinstance(item.get("primary"), dict) and isinstance(item.get("secondary"), dict)):
            raise _ValidationError("primary", "merge needs primary and secondary", "required")
        return None
    identifiers = item.get("identifiers")
    if not isinstance(identifiers, dict) or not identifiers:
        raise _ValidationError("identifiers", "identifiers must be a non-empty object", "required")
    if kind != "person":
        return None  # objects and deliveries are accepted but are not person events
    if len(identifiers) != 1 or not identifiers.keys() <= _PERSON_IDENTIFIERS:
        raise _ValidationError("identifiers", "give exactly one of id, email, phone, cio_id")
    ((key, value),) = identifiers.items()
    person = _check_identifier(value, f"identifiers.{key}")
    if action in ("event", "page", "screen"):
        name, event_id, timestamp, data = _event_fields(item, "attributes", poison)
        return _Draft(event_id, name, person, None, data, timestamp, route, action)
    if action in _V2_PERSON_CALLS:
        event_id, timestamp, data = _track_fields(item, "attributes")
        return _Draft(event_id, action, person, None, data, timestamp, route, action)
    if "attributes" in item and not isinstance(item["attributes"], dict):
        raise _ValidationError("attributes", "attributes must be an object")
    return None


def _pipelines_string(call: dict[str, Any], key: str) -> str | None:
    value = call.get(key)
    if key in call and not isinstance(value, str):
        raise _ValidationError(key, f"{key} must be a string")
    return value


def _pipelines_name(call: dict[str, Any], key: str, poison: Collection[str]) -> str:
    """A track call's ``event`` (required, not blank) or a page or screen ``name``."""
    required = key == "event"
    if key not in call:
        if required:
            raise _ValidationError(key, f"{key} is required", "required")
        return ""
    name = call[key]
    if not isinstance(name, str):
        raise _ValidationError(key, f"{key} must be a string")
    if required and not name.strip():
        raise _ValidationError(key, f"{key} must not be empty", "required")
    if name in poison:
        raise _ValidationError(key, f"{key} {name!r} is rejected (poison name)", "poison")
    return name


def _pipelines_timestamp(call: dict[str, Any]) -> int | None:
    """The ISO 8601 ``timestamp`` in whole Unix seconds (floored); None when absent."""
    if "timestamp" not in call:
        return None
    value = call["timestamp"]
    instant = None
    if isinstance(value, str) and _DATE_TIME.fullmatch(value.upper()):
        with contextlib.suppress(ValueError):  # the shape is right, the date is not: 02-30
            instant = datetime.fromisoformat(value.upper())
    if instant is None:
        raise _ValidationError(
            "timestamp", "timestamp must be an ISO 8601 date-time with a zone offset or Z"
        )
    return (instant - _EPOCH) // timedelta(seconds=1)


def _pipelines_draft(call: Any, implied: str | None, route: str, poison: Collection[str]) -> _Draft:
    """Validate one Pipelines call; ``implied``: the type its single-call route sets.

    Errors name a field of the call, or "" for the call as a whole.
    """
    if not isinstance(call, dict):
        raise _ValidationError("", "each call must be a JSON object")
    try:
        size = _json_size(call, "call")
    except _ValidationError:
        raise _ValidationError("", "the call is not valid UTF-8") from None
    if size > MAX_PIPELINES_CALL_BYTES:
        raise _ValidationError("", f"the call is {size} bytes, over 32768", "too_long")
    kind = call.get("type", implied)
    allowed = _PIPELINES_BATCH_TYPES if implied is None else (implied,)
    if not isinstance(kind, str) or kind not in allowed:
        if implied is not None:
            message = f"type must be {implied!r} on this route, or left out"
        else:
            hint = " (alias has a route of its own, /v1/alias)" if kind == "alias" else ""
            message = f"type must be one of {', '.join(allowed)}{hint}"
        raise _ValidationError("type", message)
    # An empty id names nobody (the spec allows one on an identify that names an email).
    user_id = _pipelines_string(call, "userId") or None
    anonymous_id = _pipelines_string(call, "anonymousId") or None
    message_id = _pipelines_string(call, "messageId")
    if message_id == "":
        raise _ValidationError("messageId", "messageId must not be empty", "required")
    timestamp = _pipelines_timestamp(call)
    for key in ("properties", "traits", "context"):
        if key in call and not isinstance(call[key], dict):
            raise _ValidationError(key, f"{key} must be an object")
    if kind == "alias":
        previous_id = _pipelines_string(call, "previousId")
        for key, value in (("previousId", previous_id), ("userId", user_id)):
            if not value:
                raise _ValidationError(key, f"alias needs {key}", "required")
        data = {"previousId": previous_id}
        return _Draft(
            message_id, kind, user_id, anonymous_id, data, timestamp, route, kind, "pipelines"
        )
    group_id = _pipelines_string(call, "groupId")
    if kind == "group" and not group_id:
        raise _ValidationError("groupId", "groupId is required", "required")
    traits = call.get("traits", {})
    email = traits.get("email")
    # The spec's two other ways to say whom a call is about: a track call may name a
    # group instead, and an identify may send an empty userId and name the person by
    # the email trait.
    named_otherwise = (kind == "track" and bool(group_id)) or (
        kind == "identify" and "userId" in call and isinstance(email, str) and email != ""
    )
    if not (user_id or anonymous_id or named_otherwise):
        raise _ValidationError("userId", "userId or anonymousId is required", "required")
    name, recorded = kind, kind
    if kind == "track":
        name = _pipelines_name(call, "event", poison)
        recorded = _SEMANTIC_CALLS.get(name, "event")
        if recorded != "event":
            if not user_id:
                raise _ValidationError("userId", f"{name!r} needs a userId", "required")
            name = recorded
    elif kind in ("page", "screen"):
        name = _pipelines_name(call, "name", poison)
    data = traits if kind in ("identify", "group") else call.get("properties", {})
    return _Draft(
        message_id, name, user_id, anonymous_id, data, timestamp, route, recorded, "pipelines"
    )


def _pipelines_calls(
    route: _Route, payload: Any, size: int, poison: Collection[str]
) -> tuple[list[_Draft], list[str], int]:
    """Validate one Pipelines request.

    Returns the calls it records, its errors as "<field>: <message>", and how many calls
    those errors drop (a body that holds no calls at all counts as one).
    """
    if payload is _NOT_JSON:
        return [], ["body: the body is not valid JSON"], 1
    calls: list[tuple[str, Any]] = [("", payload)]
    if route.call_type is None:
        batch = payload.get("batch") if isinstance(payload, dict) else None
        dropped = len(batch) if isinstance(batch, list) else 1
        if size > MAX_PIPELINES_REQUEST_BYTES:
            return [], [f"body: the request is {size} bytes, over 512000"], dropped
        if not isinstance(payload, dict) or not isinstance(batch, list):
            return [], ['batch: the body must be {"batch": [call, ...]}'], dropped
        if "context" in payload and not isinstance(payload["context"], dict):
            return [], ["context: context must be an object"], dropped
        calls = [(f"batch[{index}]", call) for index, call in enumerate(batch)]
    drafts: list[_Draft] = []
    errors: list[str] = []
    for where, call in calls:
        try:
            drafts.append(_pipelines_draft(call, route.call_type, route.name, poison))
        except _ValidationError as exc:
            field = ".".join(part for part in (where, exc.field) if part) or "body"
            errors.append(f"{field}: {exc.message}")
    return drafts, errors, len(errors)


def _whole_request_error(message: str, field: str = "body", reason: str = "invalid") -> _Answer:
    # facts.md's {"meta": {"errors": [...]}} plus the spec's v2 400 shape {"errors": [{...}]}
    detail = {"reason": reason, "field": field, "message": message}
    return _Answer(400, {"meta": {"errors": [f"{field}: {message}"]}, "errors": [detail]})


def _fault_answer(fault: _Fault) -> _Answer:
    status = fault.status
    if fault.body is not None:
        body = fault.body
    elif status < 300:
        body = {}
    elif status == 400:
        body = {"meta": {"errors": ["simulated bad request"]}}
    elif status == 401:
        body = {"meta": {"error": _UNAUTHORIZED}}
    else:
        body = {"meta": {"error": f"{_phrase(status)} (simulated)"}}
    headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
    return _Answer(status, body, headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _item_count(route: str | None, payload: Any) -> int:
    if route in _BATCH_ROUTES:
        batch = payload.get("batch") if isinstance(payload, dict) else None
        return len(batch) if isinstance(batch, list) else 0
    return 1 if isinstance(payload, dict) else 0


def _new_fault(count: int | None, duration: float | None, status: int = 0) -> _Fault:
    if count is not None and count < 1:
        raise ValueError("count must be at least 1")
    if duration is not None and duration <= 0:
        raise ValueError("duration must be positive")
    return _Fault(count, None if duration is None else time.monotonic() + duration, status)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the SDK's connection pool is exercised
    server_version = "cio-track-simulator/1"
    disable_nagle_algorithm = True
    wbufsize = -1  # buffer each answer so it leaves in one TLS write (handle_one_request flushes)
    reset_requested = False

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the stdlib writes every request to stderr."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer protocol errors (bad request line, 501, ...) in JSON too, then hang up."""
        self.close_connection = True
        self._send(_Answer(code, {"meta": {"error": message or _phrase(code)}}))

    def _send(self, answer: _Answer) -> None:
        payload = json.dumps(answer.body, separators=(",", ":")).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in answer.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_error(HTTPStatus.LENGTH_REQUIRED)
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return None
        if length > _MAX_READ_BYTES:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return None
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-body
            self.close_connection = True
            return None
        return body

    def _dispatch(self) -> None:
        arrived_at = time.monotonic()
        started = time.perf_counter()
        simulator = cast(_Server, self.server).simulator
        path, _, query = self.path.partition("?")
        body = self._read_body()
        if body is None:
            return
        try:
            if path.startswith(_CONTROL_PREFIX):
                answer: _Answer | None = simulator._control(self.command, path, body, query)
            else:
                authorization = self.headers.get("Authorization")
                answer = simulator._track(
                    self.command,
                    path,
                    authorization,
                    body,
                    self.headers.get("User-Agent", ""),
                    arrived_at,
                    started,
                    self.headers.get("X-Strict-Mode", "").strip() == "1",
                )
        except Exception as exc:  # a simulator bug: say so to the client rather than hang up
            answer = _Answer(500, {"meta": {"error": f"simulator error: {exc!r}"}})
        if answer is None:
            self.reset_requested = self.close_connection = True
            return
        self._send(answer)

    # http.server dispatches on these names; HEAD falls through to its 501.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch  # noqa: N815


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], simulator: TrackAPISimulator, context: ssl.SSLContext
    ) -> None:
        self.simulator, self.ssl_context = simulator, context
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the connection's own thread, so a slow or broken
        # client cannot hold up the accept loop.
        request.settimeout(10)
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:
            return
        conn.settimeout(None)
        reset = False
        try:
            if self.simulator._track_connection(conn, True):
                reset = _Handler(conn, client_address, self).reset_requested
        finally:
            self.simulator._track_connection(conn, False)
            if reset:  # linger 0: close() sends RST, as a crashing proxy would
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients hanging up mid-request are routine in fault tests."""


class TrackAPISimulator:
    """A local HTTPS Track API and Data Pipelines API, with inspectable records and
    injectable faults (the name is older than the Pipelines routes)."""

    def __init__(
        self,
        site_id: str = "sim-site",
        api_key: str = "sim-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: str | Path | None = None,
    ) -> None:
        trustme = _trustme()  # first: nothing to clean up when it is missing
        self.site_id, self.api_key = site_id, api_key
        self.poison_names: set[str] = set()
        #: Keep each request's decoded body in ``requests`` (off: benchmarks send millions).
        self.record_bodies = False
        self._host, self._port = host, port
        self._owned_dir = state_dir is None  # a directory we made is ours to remove on close
        directory = Path(tempfile.mkdtemp(prefix="cio-sim-") if state_dir is None else state_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        ca = trustme.CA()
        # Absolute: the CA path is printed in an export line, pasted into other shells.
        self._ca_file = directory.resolve() / "cio-track-simulator-ca.pem"
        ca.cert_pem.write_to_path(self._ca_file)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        names = dict.fromkeys(["127.0.0.1", "localhost", host])  # ordered, without repeats
        ca.issue_cert(*names).configure_cert(self._context)
        # One lock guards records, faults and credentials; the condition wakes wait_for_events.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._accepted: list[AcceptedEvent] = []
        # Each person's calls as they are accepted, so history() need not scan them all.
        self._history: dict[str, list[AcceptedEvent]] = {}
        self._requests: list[RequestRecord] = []
        self._seen_ids: set[str] = set()
        self._duplicates = 0
        self._silently_dropped = 0
        self._failure: _Fault | None = None
        self._reset: _Fault | None = None
        self._latency = 0.0
        self._connections: set[ssl.SSLSocket] = set()
        # Start, stop and the refusal timer serialise on their own lock, never held by requests.
        self._lifecycle = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._refusal_timer: threading.Timer | None = None
        self._refusing = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self._host}:{self._port}"

    @property
    def ca_file(self) -> str:
        return str(self._ca_file)

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> TrackAPISimulator:
        """Listen (on the same port as before, after a stop); idempotent."""
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("the simulator is closed")
            if self._server is None:
                try:
                    server = _Server((self._host, self._port), self, self._context)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    advice = "; --port 0 picks a free one" if exc.errno == errno.EADDRINUSE else ""
                    raise SimulatorUnavailableError(
                        f"cannot listen on {self._host}:{self._port}: {reason}{advice}"
                    ) from exc
                self._server = server
                self._port = server.server_address[1]
                self._thread = threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
                    name=f"cio-track-simulator:{self._port}",
                    daemon=True,
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections; start() listens again on the same port."""
        with self._lifecycle:
            self._cancel_refusal()
            self._stop_listening()

    def close(self) -> None:
        """Stop and remove the temporary directory (when the simulator made it); idempotent."""
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            self.stop()
            if self._owned_dir:
                shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TrackAPISimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stop_listening(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()
        with self._lock:
            connections = list(self._connections)
        # Kept-alive connections would otherwise go on being served by a "stopped" server.
        for conn in connections:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)

    def _track_connection(self, conn: ssl.SSLSocket, is_open: bool) -> bool:
        """Register or forget a connection; refuse one that raced with stop()."""
        with self._lock:
            if not is_open:
                self._connections.discard(conn)
            elif self._server is None:
                return False
            else:
                self._connections.add(conn)
        return True

    def _cancel_refusal(self) -> None:
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        self._refusing = False

    def _end_refusal(self) -> None:
        with self._lifecycle:
            if self._refusing and not self._closed:
                self._refusing, self._refusal_timer = False, None
                self.start()

    # -- records -------------------------------------------------------------------------

    @property
    def accepted(self) -> list[AcceptedEvent]:
        with self._lock:
            return list(self._accepted)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    @property
    def duplicates(self) -> int:
        with self._lock:
            return self._duplicates

    @property
    def silently_dropped(self) -> int:
        """Pipelines calls answered 200 but not accepted: invalid or oversized, without
        ``X-Strict-Mode: 1`` (a request whose body holds no calls at all counts one)."""
        with self._lock:
            return self._silently_dropped

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return {event.id for event in self._accepted if event.id is not None}

    def history(self, person: str) -> list[AcceptedEvent]:
        """Every accepted call whose ``customer_id`` or ``anonymous_id`` is ``person``,
        of either API, in the order they were accepted."""
        with self._lock:
            return list(self._history.get(person, ()))

    def calls(self, call: str) -> list[AcceptedEvent]:
        """The accepted calls of one kind (``"identify"``, ``"event"``, ...), in order.

        Raises:
            ValueError: ``call`` is not one of the kinds ``AcceptedEvent.call`` takes.
        """
        if call not in _CALLS:
            raise ValueError(f"call must be one of {', '.join(sorted(_CALLS))}, not {call!r}")
        with self._lock:
            return [accepted for accepted in self._accepted if accepted.call == call]

    def wait_for_events(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least `count` calls (events or person calls) were accepted;
        False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._accepted) >= count, timeout)

    def clear(self) -> None:
        """Forget accepted calls, requests, seen ids and counts (faults stay)."""
        with self._lock:
            self._accepted.clear()
            self._history.clear()
            self._requests.clear()
            self._seen_ids.clear()
            self._duplicates = 0
            self._silently_dropped = 0

    # -- faults --------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        count: int | None = None,
        duration: float | None = None,
        retry_after: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Answer the next `count` requests, or all for `duration` s, or all until cleared."""
        if not 200 <= status <= 599:
            raise ValueError(f"status must be 200-599, not {status}")
        fault = _new_fault(count, duration, status)
        fault.retry_after, fault.body = retry_after, body
        with self._lock:
            self._failure = fault

    def set_latency(self, seconds: float) -> None:
        """Sleep this long before answering every Track request (0 turns it off)."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._latency = seconds

    def reset_connections(self, *, count: int | None = None, duration: float | None = None) -> None:
        """Read requests, then close the connection without answering."""
        fault = _new_fault(count, duration)
        with self._lock:
            self._reset = fault

    def refuse_connections(self, duration: float | None = None) -> None:
        """Stop listening (ECONNREFUSED); listen again after `duration` s if given."""
        if duration is not None and duration <= 0:
            raise ValueError("duration must be positive")
        with self._lifecycle:
            self.stop()
            self._refusing = True
            if duration is not None:
                self._refusal_timer = threading.Timer(duration, self._end_refusal)
                self._refusal_timer.daemon = True
                self._refusal_timer.start()

    def set_credentials(self, site_id: str, api_key: str) -> None:
        """Accept only these Basic-auth credentials from now on."""
        with self._lock:
            self.site_id, self.api_key = site_id, api_key

    def poison(self, *names: str) -> None:
        """Reject events with these names from now on (added to ``poison_names``)."""
        with self._lock:
            self.poison_names = self.poison_names | set(names)

    def clear_poison(self) -> None:
        """Accept every event name again."""
        with self._lock:
            self.poison_names = set()

    def clear_faults(self) -> None:
        """End failures, latency, resets and a refusal. Poison names stay: clear_poison()."""
        with self._lock:
            self._failure = self._reset = None
            self._latency = 0.0
        with self._lifecycle:
            if self._refusing and not self._closed:
                self._cancel_refusal()
                self.start()

    # -- request handling (called from connection threads) -------------------------------

    def _track(
        self,
        method: str,
        path: str,
        authorization: str | None,
        body: bytes,
        user_agent: str = "",
        arrived_at: float | None = None,
        started: float | None = None,
        strict: bool = False,
    ) -> _Answer | None:
        """Answer one Track or Pipelines request; None means drop the connection unanswered.

        ``arrived_at``: ``time.monotonic()`` and ``started``: ``time.perf_counter()``
        when its headers were read; ``strict``: it sent ``X-Strict-Mode: 1``.
        """
        received = time.time()
        if arrived_at is None:
            arrived_at = time.monotonic()
        if started is None:
            started = time.perf_counter()
        match = _V1_IDENTIFIED.fullmatch(path)
        route = _Route("track", "v1") if match else _ROUTES.get(path)
        payload = _loads(body) if route else None
        with self._lock:
            latency = self._latency
        if latency:
            time.sleep(latency)
        failure = None
        with self._lock:  # faults come first: an outage answers whatever the credentials
            now = time.monotonic()
            if self._reset is not None and not self._reset.take(now):
                self._reset = None
            if self._reset is None and self._failure is not None:
                if self._failure.take(now):
                    failure = self._failure
                else:
                    self._failure = None
            reset = self._reset is not None
        if reset:
            answer = None
        elif failure is not None:
            answer = _fault_answer(failure)
        elif route is None:
            answer = _Answer(404, {"meta": {"error": "Not Found"}})
        elif method != "POST":
            answer = _Answer(405, {"meta": {"error": "Method Not Allowed"}}, (("Allow", "POST"),))
        elif not self._authorized(authorization, route.api):
            answer = _Answer(401, {"meta": {"error": _UNAUTHORIZED}}, _CHALLENGES[route.api])
        elif route.api == "pipelines":
            answer = self._pipelines(route, payload, len(body), strict)
        else:
            raw_identifier = match.group(1) if match else None
            answer = self._route(route.name, raw_identifier, payload, len(body))
        status = 0 if answer is None else answer.status
        record = RequestRecord(
            received,
            method,
            path,
            status,
            len(body),
            _item_count(None if route is None else route.name, payload),
            payload if self.record_bodies else None,
            user_agent,
            arrived_at,
            time.perf_counter() - started,
            strict,
        )
        with self._lock:  # recorded before the answer leaves, so a client never outruns it
            self._requests.append(record)
        return answer

    def _authorized(self, authorization: str | None, api: str) -> bool:
        """Track wants ``site_id:api_key``; Pipelines the key as username, a blank password."""
        scheme, _, credentials = (authorization or "").partition(" ")
        try:
            given = base64.b64decode(credentials.strip(), validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            return False
        with self._lock:
            user = self.site_id if api == "track" else self.api_key
            password = self.api_key if api == "track" else ""
        expected = f"{user}:{password}".encode()
        return scheme.lower() == "basic" and hmac.compare_digest(given, expected)

    def _pipelines(self, route: _Route, payload: Any, size: int, strict: bool) -> _Answer:
        drafts, errors, dropped = _pipelines_calls(route, payload, size, self.poison_names)
        if errors and strict:
            return _Answer(400, {"meta": {"errors": errors}})
        # Without strict mode the real API answers 200 and drops what it cannot take.
        self._accept(drafts, dropped)
        return _Answer(200, {})

    def _route(self, route: str, raw_identifier: str | None, payload: Any, size: int) -> _Answer:
        poison = self.poison_names
        if route.startswith("v1"):
            try:
                customer_id = None
                if raw_identifier is not None:
                    try:
                        decoded = unquote(raw_identifier, errors="strict")
                    except UnicodeDecodeError:
                        raise _ValidationError("identifier", "identifier is not UTF-8") from None
                    customer_id = _check_identifier(decoded, "identifier")
                if payload is _NOT_JSON:
                    raise _ValidationError("body", "the body is not valid JSON")
                draft = _v1_draft(payload, customer_id, route, poison)
            except _ValidationError as exc:
                return _Answer(400, {"meta": {"error": exc.message}})
            self._accept([draft])
            return _Answer(200, {})
        if size > MAX_V2_REQUEST_BYTES:
            return _whole_request_error(f"the request is {size} bytes, over 512000")
        if payload is _NOT_JSON or not isinstance(payload, dict):
            return _whole_request_error("the body must be a JSON object")
        if route == "v2_entity":
            try:
                entity = _v2_draft(payload, route, poison)
            except _ValidationError as exc:
                return _whole_request_error(exc.message, exc.field, exc.reason)
            self._accept([] if entity is None else [entity])
            return _Answer(200, {})
        batch = payload.get("batch")
        if not isinstance(batch, list) or not batch:
            return _whole_request_error("batch must be a non-empty array")
        drafts: list[_Draft] = []
        errors: list[dict[str, Any]] = []
        for index, item in enumerate(batch):
            try:
                item_draft = _v2_draft(item, route, poison)
            except _ValidationError as exc:
                errors.append({"batch_index": index, **exc.detail()})
                continue
            if item_draft is not None:
                drafts.append(item_draft)
        self._accept(drafts)
        return _Answer(207, {"errors": errors}) if errors else _Answer(200, {})

    def _accept(self, drafts: list[_Draft], dropped: int = 0) -> None:
        with self._changed:
            now = time.time()
            self._silently_dropped += dropped
            for draft in drafts:
                if draft.id is not None:
                    # ULIDs are case-insensitive; messageIds are compared the same way
                    # and share the set, so an id is one call whichever API carried it.
                    key = draft.id.upper()
                    if key in self._seen_ids:
                        self._duplicates += 1
                        continue
                    self._seen_ids.add(key)
                accepted = AcceptedEvent(received_at=now, **draft._asdict())
                self._accepted.append(accepted)
                people = (accepted.customer_id, accepted.anonymous_id)
                for person in {person for person in people if person is not None}:
                    self._history.setdefault(person, []).append(accepted)
            self._changed.notify_all()

    def _control(self, method: str, path: str, body: bytes, query: str = "") -> _Answer:
        """The unauthenticated /_simulator/ routes: never recorded, never faulted."""
        action = path[len(_CONTROL_PREFIX) :]
        expected = _CONTROL_METHODS.get(action)
        if expected is None:
            return _Answer(404, {"meta": {"error": "Not Found"}})
        if method not in expected:
            allow = (("Allow", ", ".join(expected)),)
            return _Answer(405, {"meta": {"error": "Method Not Allowed"}}, allow)
        if action == "events":
            with self._lock:
                events, duplicates = list(self._accepted), self._duplicates
                dropped = self._silently_dropped
            listed = [asdict(event) for event in events]
            counts = {"duplicates": duplicates, "silently_dropped": dropped}
            return _Answer(200, {"events": listed, **counts})
        if action == "history":
            people = parse_qs(query, keep_blank_values=True).get("person", [])
            if len(people) != 1:
                return _Answer(400, {"meta": {"error": "expected ?person=ID, once"}})
            return _Answer(200, {"calls": [asdict(call) for call in self.history(people[0])]})
        if action == "requests":
            return _Answer(200, {"requests": [asdict(r) for r in self.requests]})
        if action == "poison" and method == "GET":
            return _Answer(200, {"names": sorted(self.poison_names)})
        if action == "clear":
            self.clear()
        elif action == "clear_faults":
            self.clear_faults()
        elif action == "clear_poison":
            self.clear_poison()
        elif action == "poison":
            names = _loads(body)
            names = names.get("names") if isinstance(names, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                return _Answer(400, {"meta": {"error": 'expected {"names": ["event name", ...]}'}})
            self.poison(*names)
            return _Answer(200, {"names": sorted(self.poison_names)})
        else:
            spec = _loads(body)
            try:
                self._apply_faults(spec)
            except (TypeError, ValueError, AttributeError) as exc:
                return _Answer(400, {"meta": {"error": f"bad fault request: {exc}"}})
        return _Answer(200, {})

    def _apply_faults(self, spec: Any) -> None:
        if not isinstance(spec, dict) or not spec.keys() & _FAULT_KEYS:
            raise ValueError("expected status, latency or reset_connections")
        if "status" in spec:
            retry_after = spec.get("retry_after")
            self.fail(
                int(spec["status"]),
                count=spec.get("count"),
                duration=spec.get("duration"),
                retry_after=None if retry_after is None else str(retry_after),
                body=spec.get("body"),
            )
        if "latency" in spec:
            self.set_latency(float(spec["latency"]))
        if "reset_connections" in spec:
            reset = spec["reset_connections"] or {}
            self.reset_connections(count=reset.get("count"), duration=reset.get("duration"))


def run_from_command_line(argv: list[str] | None = None) -> int:
    """Serve a simulator until SIGINT or SIGTERM; print what a client needs to reach it.

    Returns 0 after an interrupt, 1 when it cannot start (one line on stderr says why).
    """
    parser = OneLineParser(
        prog="cio-logging simulator",
        description="A local Customer.io Track API and Data Pipelines API over HTTPS, for "
        "trying the handler and the CLI without a workspace. Track routes take Basic auth "
        "site-id:api-key; the Pipelines routes under /v1/ (batch, identify, track, page, "
        "screen, group, alias) take the API key as the username with a blank password, and "
        "answer an invalid call 200 and drop it unless the request sends X-Strict-Mode: 1 "
        "(then 400). It prints the environment variables that point a handler (or "
        "cio-logging) at it, then serves until interrupted.",
        epilog=f"{CONTROL_API}\nexit codes: 0 after SIGINT or SIGTERM; 1 when it cannot "
        "start (port in use, trustme missing).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8443,
        help="port to listen on (default %(default)s; 0 picks a free one)",
    )
    parser.add_argument(
        "--site-id", default="sim-site", help="the site id it accepts (default %(default)s)"
    )
    parser.add_argument(
        "--api-key", default="sim-key", help="the API key it accepts (default %(default)s)"
    )
    parser.add_argument(
        "--state-dir",
        help="where to write the CA file (default: a temporary directory, removed at exit)",
    )
    parser.add_argument(
        "--poison",
        action="append",
        default=[],
        metavar="NAME",
        help="reject events with this name (400 on v1, a 207 item error in a batch), and "
        "Pipelines track, page and screen calls with it (dropped, or 400 in strict mode); "
        "repeat for more; also POST /_simulator/poison",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    simulator: TrackAPISimulator | None = None
    try:
        simulator = TrackAPISimulator(
            args.site_id, args.api_key, host=args.host, port=args.port, state_dir=args.state_dir
        )
        simulator.poison(*args.poison)
        simulator.start()
        exports = {
            "CUSTOMERIO_SITE_ID": simulator.site_id,
            "CUSTOMERIO_API_KEY": simulator.api_key,  # printed on purpose: a local test key
            "CIO_LOGGING_TRACK_URL": simulator.url,
            "CIO_LOGGING_CA_BUNDLE": simulator.ca_file,
        }
        print(f"Customer.io Track API simulator listening on {simulator.url}", flush=True)
        print(f"CA file: {simulator.ca_file}", flush=True)
        print(f"site id: {simulator.site_id}  api key: {simulator.api_key}", flush=True)
        line = " ".join(f"{name}={shlex.quote(value)}" for name, value in exports.items())
        print(f"export {line}", flush=True)
        if args.poison:
            print(f"poison names (rejected): {', '.join(sorted(args.poison))}", flush=True)
        print(f"control API: {simulator.url}/_simulator/ (see --help)", flush=True)
        print(
            f"Pipelines API: {simulator.url}/v1 (the api key as the username, blank password)",
            flush=True,
        )
        while not stop.wait(0.5):  # wake now and then so a signal is handled promptly
            pass
    except SimulatorUnavailableError as exc:
        print(f"cio-logging simulator: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # the state directory cannot be made or written
        print(f"cio-logging simulator: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if simulator is not None:
            simulator.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_from_command_line())
