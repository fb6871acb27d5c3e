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
and in docs/reference/simulator.md). `python -m cio_logging.simulator` (or
`cio-logging simulator`) runs one until interrupted.

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
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote

from ._argparse import OneLineParser
from .stop_signal import StopRequest, stop_on_signals

__all__ = [
    "CONTROL_API",
    "AcceptedEvent",
    "RequestRecord",
    "SimulatorUnavailableError",
    "TrackAPISimulator",
    "run_from_command_line",
]

# Limits from Customer.io's documentation. Sizes are measured on the bytes received: a
# call's, a data object's or a request's text as it arrived, never a re-encoding.
MAX_NAME_BYTES = 100
MAX_DATA_BYTES = 100_000
MAX_IDENTIFIER_BYTES = 150
MAX_V2_ITEM_BYTES = 32_768
MAX_PIPELINES_CALL_BYTES = 32_768
#: A request body must be smaller than this, on either API: the Track spec's "smaller
#: than 500kb" and the Pipelines spec's "limited to 500KB", read as 500,000 bytes.
REQUEST_BYTES_LIMIT = 500_000
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
# The v2 person actions recorded with their attributes as the data.
_V2_PERSON_CALLS = frozenset({"identify", "delete", "suppress", "unsuppress"})
# Every AcceptedEvent.call: group and alias come only from Pipelines calls; merges and
# relationships only from Track v2; devices from both.
_CALLS = frozenset(
    {"event", "identify", "page", "screen", "delete", "suppress", "unsuppress", "group", "alias"}
    | {"add_device", "delete_device", "merge", "add_relationships", "delete_relationships"}
)
# The spec's batch schema lists these five: alias has a route of its own only.
_PIPELINES_BATCH_TYPES = ("identify", "track", "page", "screen", "group")
# Semantic events: a track call with one of these names acts on the person.
_SEMANTIC_CALLS = {
    "User Deleted": "delete",
    "User Suppressed": "suppress",
    "User Unsuppressed": "unsuppress",
    "Device Created or Updated": "add_device",
    "Device Deleted": "delete_device",
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

#: The unauthenticated control routes, as ``--help`` and docs/reference/simulator.md describe them.
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
                                  "retry_after": "7", "body": {...},
                                  "accept": true (handle it, then answer so)},
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


def _issue_cert_for_any_names(
    ca: Any, names: list[str], directory: Path, context: ssl.SSLContext
) -> None:
    """A server certificate signed by ``ca`` for names trustme refuses (``my_host``:
    an underscore is no IDNA, but docker-compose names services so, and TLS takes it)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    signer = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # What Python 3.13's strict verification (VERIFY_X509_STRICT) requires of a leaf.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = directory / "cio-track-simulator-server.pem"
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain.write_bytes(key_text + certificate.public_bytes(serialization.Encoding.PEM))
    chain.chmod(0o600)
    context.load_cert_chain(chain)


@dataclass(frozen=True)
class AcceptedEvent:
    """One call the simulator accepted, of either API (a duplicate id is not recorded again).

    ``call`` is ``"event"``, ``"identify"``, ``"page"``, ``"screen"``, ``"delete"``,
    ``"suppress"``, ``"unsuppress"``, ``"add_device"``, ``"delete_device"``; for Track
    only ``"merge"``, ``"add_relationships"``, ``"delete_relationships"``; for Pipelines
    only ``"group"`` and ``"alias"``. ``api`` is ``"track"`` or ``"pipelines"``. The
    other fields, for every call:

    - ``id``: the Track ``id`` or the Pipelines ``messageId`` (None when the call has none);
    - ``name``: the event name, the page or screen name (``""`` for a Pipelines page or
      screen sent without one), else the call itself (``"identify"``, ``"delete"``, ...);
    - ``customer_id``: the person (Track identifier value, Pipelines ``userId``; for a
      merge, the secondary person, merged away);
    - ``anonymous_id``: Track v1 ``anonymous_id``, Pipelines ``anonymousId``;
    - ``data``: attributes, properties or traits (``{}`` when absent); for a device the
      Track ``device`` object, or Pipelines ``{"device": context.device, "properties":
      ...}``; for a merge ``{"primary": ..., "secondary": ...}``; for relationships
      ``{"cio_relationships": [...]}``; for an alias ``{"previousId": ...}``; for a
      group its traits (its ``groupId`` is in ``raw``);
    - ``timestamp``: Unix seconds (a Pipelines ISO 8601 ``timestamp`` floored), or None;
    - ``route``: ``"v1"``, ``"v1_anonymous"``, ``"v2_batch"``, ``"v2_entity"``,
      ``"pipelines_batch"``, ``"pipelines_track"``, ``"pipelines_identify"``, ...
    - ``raw``: the call's text exactly as received (the v2 item, the Pipelines call, the
      v1 body), and ``raw_data``: the text of its data, attributes, properties or
      traits exactly as received (``""`` when it has none): what a byte-for-byte check
      compares.
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
    raw: str = ""
    raw_data: str = ""


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
    raw: str = ""
    raw_data: str = ""
    other_person: str | None = None


@dataclass
class _Fault:
    """A fault that lasts `remaining` more requests and/or until a monotonic deadline."""

    remaining: int | None
    until: float | None
    status: int = 0
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    # Handle the request as usual (valid calls accepted), then answer with the fault:
    # a 207 whose errors name no item, a storm that still stores what it was sent.
    accept: bool = False

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


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")  # json.loads would accept NaN and Infinity


class _DuplicateKeyError(ValueError):
    """An object names a key twice: a receiver would keep one of the two values."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _DuplicateKeyError("an object names the same key twice")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_reject_constant)
_scan_once: Any = _DECODER.scan_once  # type: ignore[attr-defined]  # set in __init__
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Raw(NamedTuple):
    """A JSON value as received: decoded, with its exact text.

    The body, its batch and each of its calls are read member by member, so every call
    and every member of a call (its data, attributes, properties, traits) has the text
    that arrived, and sizes are counted on those bytes, never on a re-encoding.
    """

    value: Any
    text: str
    members: dict[str, _Raw] | None = None  # an object read member by member
    elements: list[_Raw] | None = None  # an array read element by element

    @property
    def size(self) -> int:
        return len(self.text) if self.text.isascii() else len(self.text.encode("utf-8"))

    def member(self, key: str) -> _Raw | None:
        return None if self.members is None else self.members.get(key)


class _NotJSON(NamedTuple):
    """A body that is not JSON, or that JSON a receiver would read two ways."""

    reason: str


def _read_json(body: bytes, depth: int) -> _Raw | _NotJSON:
    """Decode ``body``, keeping the text of values down to ``depth`` levels.

    Duplicate keys anywhere are refused (stricter than a receiver that keeps one), and
    so are NaN and Infinity, invalid UTF-8 and trailing text.
    """
    try:
        text = body.decode("utf-8")
        raw, end = _read_value(text, _WHITESPACE.match(text, 0).end(), depth)  # type: ignore[union-attr]
        if _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
            return _NotJSON("the body is not valid JSON (text after the value)")
    except _DuplicateKeyError:
        return _NotJSON("the body is not valid JSON for this API: an object names a key twice")
    except (ValueError, StopIteration, IndexError):  # UnicodeDecodeError is a ValueError
        return _NotJSON("the body is not valid JSON")
    return raw


def _read_value(text: str, index: int, depth: int) -> tuple[_Raw, int]:
    char = text[index] if index < len(text) else ""
    if depth <= 0 or char not in "{[":
        value, end = _scan_once(text, index)
        return _Raw(value, text[index:end]), end
    skip = _WHITESPACE.match
    closing = "}" if char == "{" else "]"
    members: dict[str, _Raw] = {}
    elements: list[_Raw] = []
    position = skip(text, index + 1).end()  # type: ignore[union-attr]
    if text[position] != closing:
        while True:
            if char == "{":
                if text[position] != '"':
                    raise ValueError("expected a key")
                key, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
                position = skip(text, position).end()  # type: ignore[union-attr]
                if text[position] != ":":
                    raise ValueError("expected ':'")
                position = skip(text, position + 1).end()  # type: ignore[union-attr]
                member, position = _read_value(text, position, depth - 1)
                if key in members:
                    raise _DuplicateKeyError(key)
                members[key] = member
            else:
                element, position = _read_value(text, position, depth - 1)
                elements.append(element)
            position = skip(text, position).end()  # type: ignore[union-attr]
            if text[position] == ",":
                position = skip(text, position + 1).end()  # type: ignore[union-attr]
                continue
            if text[position] != closing:
                raise ValueError(f"expected ',' or {closing!r}")
            break
    end = position + 1
    if char == "{":
        value = {key: member.value for key, member in members.items()}
        return _Raw(value, text[index:end], members=members), end
    return _Raw([element.value for element in elements], text[index:end], elements=elements), end


def _check_text(raw: _Raw, field: str) -> None:
    """Refuse a value holding a lone surrogate (a ``\\ud800`` escape): not Unicode."""
    if _SURROGATE_ESCAPE.search(raw.text):
        try:
            json.dumps(raw.value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _ValidationError(field, f"{field} is not valid UTF-8") from None


def _loads(body: bytes) -> Any:
    """A control route's body, decoded (or _NOT_JSON)."""
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
    obj: _Raw, data_key: str, poison: Collection[str]
) -> tuple[str, str | None, int | None, dict[str, Any]]:
    """Check name, id, timestamp and data/attributes, common to v1 and v2 events."""
    name = _event_name(obj.value, poison)
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


def _track_fields(obj: _Raw, data_key: str) -> tuple[str | None, int | None, dict[str, Any]]:
    """Check id, timestamp and data/attributes, common to every Track call that records.

    The data's size is the bytes of its text as received (an SDK that escapes every
    non-ASCII character sends up to six bytes for one)."""
    fields = obj.value
    event_id = fields.get("id")
    if "id" in fields and not (isinstance(event_id, str) and _ULID.fullmatch(event_id)):
        raise _ValidationError("id", "id must be a ULID (26 Crockford base32 characters)")
    timestamp = fields.get("timestamp")
    if "timestamp" in fields and (not isinstance(timestamp, int) or isinstance(timestamp, bool)):
        raise _ValidationError("timestamp", "timestamp must be an integer (Unix seconds)")
    raw_data = obj.member(data_key)
    if raw_data is None:
        return event_id, timestamp, {}
    if not isinstance(raw_data.value, dict):
        raise _ValidationError(data_key, f"{data_key} must be an object")
    size = raw_data.size
    if size > MAX_DATA_BYTES:
        raise _ValidationError(
            data_key, f"{data_key} is {size} bytes as received, over 100000", "too_long"
        )
    return event_id, timestamp, raw_data.value


# Keys of event data, attributes, properties and traits that the published specs give a
# type (anything else under them is free).
_STRING, _BOOLEAN, _OBJECT, _STRINGS = "a string", "true or false", "an object", "strings"
_DATE_TIME_TYPE, _TOPICS = "an ISO 8601 date-time", "topics mapped to true or false"
_RESERVED = {
    ("track", "event"): {"recipient": _STRING, "from_address": _STRING, "reply_to": _STRING},
    ("track", "anonymous"): {"from_address": _STRING, "reply_to": _STRING},
    ("track", "page"): {
        **dict.fromkeys(("path", "referrer", "search", "title", "url"), _STRING),
        "keywords": _STRINGS,
    },
    ("track", "identify"): {"_update": _BOOLEAN, "cio_subscription_preferences": _TOPICS},
    ("pipelines", "identify"): {
        "email": _STRING,
        "createdAt": _DATE_TIME_TYPE,
        "unsubscribed": _BOOLEAN,
        "cio_subscription_preferences": _TOPICS,
    },
    ("pipelines", "page"): {"category": _STRING},
    ("pipelines", "group"): {"object_type_id": _STRING, "relationshipAttributes": _OBJECT},
}


def _check_reserved(data: dict[str, Any], api: str, call: str, data_key: str) -> None:
    for key, kind in _RESERVED.get((api, call), {}).items():
        if key not in data:
            continue
        value = data[key]
        if kind == _STRING:
            valid = isinstance(value, str)
        elif kind == _BOOLEAN:
            valid = isinstance(value, bool)
        elif kind == _OBJECT:
            valid = isinstance(value, dict)
        elif kind == _STRINGS:
            valid = isinstance(value, list) and all(isinstance(item, str) for item in value)
        elif kind == _DATE_TIME_TYPE:
            valid = isinstance(value, str) and _date_time(value) is not None
        else:
            valid = isinstance(value, dict) and all(
                isinstance(group, dict) and all(isinstance(flag, bool) for flag in group.values())
                for name, group in value.items()
                if name in ("topics", "channels")
            )
        if not valid:
            raise _ValidationError(f"{data_key}.{key}", f"{data_key}.{key} must be {kind}")


def _v1_draft(
    payload: _Raw, customer_id: str | None, route: str, poison: Collection[str]
) -> _Draft:
    body = payload.value
    if not isinstance(body, dict):
        raise _ValidationError("body", "the body must be a JSON object")
    _check_text(payload, "body")
    name, event_id, timestamp, data = _event_fields(payload, "data", poison)
    if "type" in body and body["type"] not in _V1_EVENT_TYPES:
        raise _ValidationError("type", "type must be one of event, page, screen")
    call = body.get("type", "event")  # a page or screen view, else an event
    anonymous_id = None
    if "anonymous_id" in body:
        anonymous_id = _check_identifier(body["anonymous_id"], "anonymous_id")
    elif call == "screen" and route == "v1":
        # The spec's eventsRequest: only its "Mobile screen view" takes type screen, and
        # it requires anonymous_id.
        raise _ValidationError(
            "anonymous_id", "a screen view on this route needs anonymous_id", "required"
        )
    if call == "event":
        _check_reserved(data, "track", "event" if route == "v1" else "anonymous", "data")
    raw_data = payload.member("data")
    return _Draft(
        event_id,
        name,
        customer_id,
        anonymous_id if route == "v1_anonymous" else None,
        data,
        timestamp,
        route,
        call,
        raw=payload.text,
        raw_data="" if raw_data is None else raw_data.text,
    )


def _one_identifier(value: Any, field: str, kinds: Collection[str]) -> tuple[str, str]:
    """One of a person's identifiers, as the spec's ``oneOf`` of one-key objects reads:
    exactly one key, a string."""
    if not isinstance(value, dict) or len(value) != 1 or not value.keys() <= set(kinds):
        raise _ValidationError(field, f"give exactly one of {', '.join(sorted(kinds))}")
    ((key, identifier),) = value.items()
    return key, _check_identifier(identifier, f"{field}.{key}")


def _check_device(device: Any, adding: bool) -> dict[str, Any]:
    if not isinstance(device, dict):
        raise _ValidationError("device", "device must be an object", "required")
    token = device.get("token")
    if not isinstance(token, str) or not token:
        raise _ValidationError("device.token", "device.token must be a non-empty string")
    if adding:
        if device.get("platform") not in ("ios", "android"):
            raise _ValidationError("device.platform", "device.platform must be ios or android")
        last_used = device.get("last_used")
        if "last_used" in device and (
            not isinstance(last_used, int) or isinstance(last_used, bool)
        ):
            raise _ValidationError("device.last_used", "device.last_used must be an integer")
        attributes = device.get("attributes", {})
        if not isinstance(attributes, dict) or not all(
            isinstance(value, str) for value in attributes.values()
        ):
            raise _ValidationError(
                "device.attributes", "device.attributes must be an object of strings"
            )
        if attributes.get("push_enabled", "true") not in ("true", "false"):
            raise _ValidationError("device.attributes.push_enabled", "must be true or false")
    return device


def _check_relationships(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _ValidationError(
            "cio_relationships", "cio_relationships must be an array", "required"
        )
    for index, relationship in enumerate(value):
        where = f"cio_relationships[{index}]"
        if not isinstance(relationship, dict):
            raise _ValidationError(where, f"{where} must be an object")
        identifiers = relationship.get("identifiers")
        # The spec's oneOf: object_type_id and object_id, or cio_object_id (not both).
        names = set(identifiers) if isinstance(identifiers, dict) else set()
        by_type = {"object_type_id", "object_id"} <= names and "cio_object_id" not in names
        by_cio_id = "cio_object_id" in names and not names & {"object_type_id", "object_id"}
        if not (by_type or by_cio_id):
            raise _ValidationError(
                f"{where}.identifiers",
                "name the object by object_type_id and object_id, or by cio_object_id",
            )
        assert isinstance(identifiers, dict)
        for name in names & {"object_type_id", "object_id", "cio_object_id"}:
            if not isinstance(identifiers[name], str):
                raise _ValidationError(f"{where}.identifiers.{name}", f"{name} must be a string")
        attributes = relationship.get("relationship_attributes", {})
        if not isinstance(attributes, dict):
            raise _ValidationError(
                f"{where}.relationship_attributes", "relationship_attributes must be an object"
            )
    return value


def _v2_draft(raw_item: _Raw, route: str, poison: Collection[str]) -> _Draft | None:
    """Validate one v2 operation; return the person call it records (None for others)."""
    item = raw_item.value
    if not isinstance(item, dict):
        raise _ValidationError("item", "each operation must be a JSON object")
    size = raw_item.size
    if size > MAX_V2_ITEM_BYTES:
        raise _ValidationError(
            "item", f"the operation is {size} bytes as received, over 32768", "too_long"
        )
    _check_text(raw_item, "item")
    kind, action = item.get("type"), item.get("action")
    if kind not in _ACTIONS:
        raise _ValidationError("type", "type must be one of person, object, delivery")
    if action not in _ACTIONS[kind]:
        raise _ValidationError("action", f"action {action!r} is not valid for type {kind}")
    raw = {"raw": raw_item.text}
    if action == "merge":  # the one operation that names two people instead of identifiers
        if "primary" not in item or "secondary" not in item:
            raise _ValidationError("primary", "merge needs primary and secondary", "required")
        kinds = ("id", "email", "cio_id")
        _, primary = _one_identifier(item["primary"], "primary", kinds)
        _, secondary = _one_identifier(item["secondary"], "secondary", kinds)
        merged = {"primary": item["primary"], "secondary": item["secondary"]}
        return _Draft(
            None,
            "merge",
            secondary,
            None,
            merged,
            None,
            route,
            "merge",
            **raw,
            other_person=primary,
        )
    identifiers = item.get("identifiers")
    if not isinstance(identifiers, dict) or not identifiers:
        raise _ValidationError("identifiers", "identifiers must be a non-empty object", "required")
    if kind != "person":
        return None  # objects and deliveries are accepted but are not person events
    _, person = _one_identifier(identifiers, "identifiers", _PERSON_IDENTIFIERS)
    attributes = raw_item.member("attributes")
    raw["raw_data"] = "" if attributes is None else attributes.text
    if action in ("event", "page", "screen"):
        name, event_id, timestamp, data = _event_fields(raw_item, "attributes", poison)
        _check_reserved(data, "track", action, "attributes")
        return _Draft(event_id, name, person, None, data, timestamp, route, action, **raw)
    if action in _V2_PERSON_CALLS:
        event_id, timestamp, data = _track_fields(raw_item, "attributes")
        _check_reserved(data, "track", action, "attributes")
        return _Draft(event_id, action, person, None, data, timestamp, route, action, **raw)
    if action in ("add_device", "delete_device"):
        device = _check_device(item.get("device"), action == "add_device")
        return _Draft(None, action, person, None, device, None, route, action, **raw)
    if action in ("add_relationships", "delete_relationships"):
        relationships = _check_relationships(item.get("cio_relationships"))
        data = {"cio_relationships": relationships}
        return _Draft(None, action, person, None, data, None, route, action, **raw)
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


def _date_time(value: str) -> datetime | None:
    """An RFC 3339 date-time (the JSON Schema meaning of ``format: date-time``), or None."""
    if not _DATE_TIME.fullmatch(value.upper()):
        return None
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:  # the shape is right, the date is not: 02-30
        return None


def _pipelines_timestamp(call: dict[str, Any]) -> int | None:
    """The ISO 8601 ``timestamp`` in whole Unix seconds (floored); None when absent."""
    if "timestamp" not in call:
        return None
    value = call["timestamp"]
    instant = _date_time(value) if isinstance(value, str) else None
    if instant is None:
        raise _ValidationError(
            "timestamp", "timestamp must be an ISO 8601 date-time with a zone offset or Z"
        )
    return (instant - _EPOCH) // timedelta(seconds=1)


def _pipelines_draft(
    raw_call: _Raw, implied: str | None, route: str, poison: Collection[str]
) -> _Draft:
    """Validate one Pipelines call; ``implied``: the type its single-call route sets.

    Errors name a field of the call, or "" for the call as a whole.
    """
    call = raw_call.value
    if not isinstance(call, dict):
        raise _ValidationError("", "each call must be a JSON object")
    size = raw_call.size
    if size > MAX_PIPELINES_CALL_BYTES:
        raise _ValidationError("", f"the call is {size} bytes as received, over 32768", "too_long")
    try:
        _check_text(raw_call, "call")
    except _ValidationError:
        raise _ValidationError("", "the call is not valid UTF-8") from None
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
    if "context" in call and (kind == "identify" or (implied is not None and kind != "alias")):
        # Where the spec reads a call's context through all_common_fields, a oneOf of
        # "Non-mobile" and "Mobile" that every context matches both of: read as
        # published, no such call with a context is valid, and the context can be left
        # out (a batched track, page, screen or group, and an alias, take any context).
        raise _ValidationError(
            "context",
            f"a context on this {kind} call matches both the mobile and the non-mobile "
            "context of the spec's oneOf: leave it out",
        )
    if kind == "alias":
        previous_id = _pipelines_string(call, "previousId")
        for key, value in (("previousId", previous_id), ("userId", user_id)):
            if not value:
                raise _ValidationError(key, f"alias needs {key}", "required")
        return _Draft(
            message_id,
            kind,
            user_id,
            anonymous_id,
            {"previousId": previous_id},
            timestamp,
            route,
            kind,
            "pipelines",
            raw=raw_call.text,
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
    data_key = "traits" if kind in ("identify", "group") else "properties"
    data: dict[str, Any] = call.get(data_key, {})
    if kind == "track":
        name = _pipelines_name(call, "event", poison)
        recorded = _SEMANTIC_CALLS.get(name, "event")
        if recorded != "event":
            if not user_id:
                raise _ValidationError("userId", f"{name!r} needs a userId", "required")
            name = recorded
        if recorded in ("add_device", "delete_device"):
            data = {"device": _pipelines_device(call.get("context")), "properties": data}
    elif kind in ("page", "screen"):
        name = _pipelines_name(call, "name", poison)
    _check_reserved(data, "pipelines", kind, data_key)
    raw_data = raw_call.member(data_key)
    return _Draft(
        message_id,
        name,
        user_id,
        anonymous_id,
        data,
        timestamp,
        route,
        recorded,
        "pipelines",
        raw=raw_call.text,
        raw_data="" if raw_data is None else raw_data.text,
    )


def _pipelines_device(context: Any) -> dict[str, Any]:
    """A device event's ``context.device``, as the spec's device events require it."""
    device = context.get("device") if isinstance(context, dict) else None
    if not isinstance(device, dict):
        raise _ValidationError("context.device", "a device event needs context.device", "required")
    if not isinstance(device.get("token"), str) or not device["token"]:
        raise _ValidationError(
            "context.device.token", "context.device.token must be a non-empty string", "required"
        )
    if "type" in device and device["type"] not in ("ios", "android"):
        raise _ValidationError("context.device.type", "context.device.type must be ios or android")
    return device


def _pipelines_calls(
    route: _Route, payload: _Raw | _NotJSON, size: int, poison: Collection[str]
) -> tuple[list[_Draft], list[str], int]:
    """Validate one Pipelines request.

    Returns the calls it records, its errors as "<field>: <message>", and how many calls
    those errors drop (a body that holds no calls at all counts as one).
    """
    if isinstance(payload, _NotJSON):
        return [], [f"body: {payload.reason}"], 1
    calls: list[tuple[str, _Raw]] = [("", payload)]
    if route.call_type is None:
        body = payload.value
        raw_batch = payload.member("batch")
        batch = None if raw_batch is None else raw_batch.elements
        dropped = len(batch) if batch is not None else 1
        if size >= REQUEST_BYTES_LIMIT:
            return [], [f"body: the request is {size:,} bytes, not under 500,000"], dropped
        if not isinstance(body, dict) or batch is None:
            return [], ['batch: the body must be {"batch": [call, ...]}'], dropped
        if "context" in body:
            return (
                [],
                [
                    "context: a batch's context matches both the mobile and the non-mobile "
                    "context of the spec's oneOf: leave it out"
                ],
                dropped,
            )
        calls = [(f"batch[{index}]", call) for index, call in enumerate(batch)]
    elif size > MAX_PIPELINES_CALL_BYTES:
        return [], [f"body: the request is {size:,} bytes, over 32,768"], 1
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
        server_names: Collection[str] = (),
    ) -> None:
        """``server_names``: more host names its certificate is valid for, beside
        ``127.0.0.1``, ``localhost`` and ``host`` (a name such as ``my_host``, resolved
        to the address it listens on by whoever connects)."""
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
        # Ordered, without repeats.
        names = dict.fromkeys(["127.0.0.1", "localhost", host, *server_names])
        if any("_" in name for name in names):
            _issue_cert_for_any_names(ca, list(names), directory, self._context)
        else:
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
        accept: bool = False,
    ) -> None:
        """Answer the next `count` requests, or all for `duration` s, or all until cleared.

        ``accept``: handle each request as usual first (its valid calls are accepted and
        recorded), then answer with this fault instead of the real answer: a 207 whose
        errors cannot be matched to items, for instance.
        """
        if not 200 <= status <= 599:
            raise ValueError(f"status must be 200-599, not {status}")
        fault = _new_fault(count, duration, status)
        fault.retry_after, fault.body, fault.accept = retry_after, body, accept
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
        # Batches are read down to each call's members, other bodies to their members.
        parsed = (
            None if route is None else _read_json(body, 3 if route.name in _BATCH_ROUTES else 1)
        )
        payload = None if parsed is None or isinstance(parsed, _NotJSON) else parsed.value
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
        elif failure is not None and not failure.accept:
            answer = _fault_answer(failure)
        elif route is None:
            answer = _Answer(404, {"meta": {"error": "Not Found"}})
        elif method != "POST":
            answer = _Answer(405, {"meta": {"error": "Method Not Allowed"}}, (("Allow", "POST"),))
        elif not self._authorized(authorization, route.api):
            answer = _Answer(401, {"meta": {"error": _UNAUTHORIZED}}, _CHALLENGES[route.api])
        elif route.api == "pipelines":
            answer = self._pipelines(route, parsed, len(body), strict)
        else:
            raw_identifier = match.group(1) if match else None
            answer = self._route(route.name, raw_identifier, parsed, len(body))
        if failure is not None and failure.accept and answer is not None:
            answer = _fault_answer(failure)  # handled as usual, answered with the fault
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

    def _pipelines(
        self, route: _Route, payload: _Raw | _NotJSON | None, size: int, strict: bool
    ) -> _Answer:
        assert payload is not None  # a known route's body is always read
        drafts, errors, dropped = _pipelines_calls(route, payload, size, self.poison_names)
        if errors and strict:
            return _Answer(400, {"meta": {"errors": errors}})
        # Without strict mode the real API answers 200 and drops what it cannot take.
        self._accept(drafts, dropped)
        return _Answer(200, {})

    def _route(
        self, route: str, raw_identifier: str | None, payload: _Raw | _NotJSON | None, size: int
    ) -> _Answer:
        assert payload is not None  # a known route's body is always read
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
                if isinstance(payload, _NotJSON):
                    raise _ValidationError("body", payload.reason)
                draft = _v1_draft(payload, customer_id, route, poison)
            except _ValidationError as exc:
                return _Answer(400, {"meta": {"error": exc.message}})
            self._accept([draft])
            return _Answer(200, {})
        if size >= REQUEST_BYTES_LIMIT:
            return _whole_request_error(f"the request is {size:,} bytes, not under 500,000")
        if isinstance(payload, _NotJSON):
            return _whole_request_error(payload.reason)
        if not isinstance(payload.value, dict):
            return _whole_request_error("the body must be a JSON object")
        if route == "v2_entity":
            if size > MAX_V2_ITEM_BYTES:  # "/entity is limited to requests 32kb or smaller"
                return _whole_request_error(f"the request is {size:,} bytes, over 32,768")
            try:
                entity = _v2_draft(payload, route, poison)
            except _ValidationError as exc:
                return _whole_request_error(exc.message, exc.field, exc.reason)
            self._accept([] if entity is None else [entity])
            return _Answer(200, {})
        raw_batch = payload.member("batch")
        batch = None if raw_batch is None else raw_batch.elements
        if not batch:
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
                fields = draft._asdict()
                other = fields.pop("other_person")
                accepted = AcceptedEvent(received_at=now, **fields)
                self._accepted.append(accepted)
                people = (accepted.customer_id, accepted.anonymous_id, other)
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
                accept=bool(spec.get("accept", False)),
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
    with stop_on_signals() as stop:
        return _serve_until_stopped(args, stop)


def _serve_until_stopped(args: argparse.Namespace, stop: StopRequest) -> int:
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
    return 0


if __name__ == "__main__":
    raise SystemExit(run_from_command_line())
