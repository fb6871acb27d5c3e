"""Sending events to the Track API: the only module that touches the customerio SDK.

Every request goes through the SDK (``CustomerIO.batch``, ``track``,
``track_anonymous``), with three changes to the session it builds:

* no urllib3 retries: the SDK's default retries a POST three times inside one call
  and sleeps on Retry-After for up to six hours; the worker owns the one retry policy;
* a CA bundle given in the settings wins over ``REQUESTS_CA_BUNDLE`` from the
  environment (requests would otherwise let the environment override it);
* a response hook keeps the last response, because ``CustomerIOException`` carries no
  status code and its text holds the request data (personal data). That text is never
  logged: failures are described from the status, the response body and the
  exception's type.

Routing: identified events go in v2 ``/api/v2/batch`` requests (at most 500 KB a
request, 32 KB an item, 207 answers read item by item); anonymous events, which v2
batches cannot carry, and items over 32 KB go one by one through v1.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pybreaker
import requests
from customerio import CustomerIO, CustomerIOException
from requests.adapters import HTTPAdapter

from . import background
from .config import Settings
from .metadata import PACKAGE_VERSION, SDK_VERSION
from .resilience import DeliveryBreaker, RequestRateCap
from .store import QueuedEvent
from .telemetry import Telemetry

MAX_BATCH_BYTES = 500 * 1024
MAX_ITEM_BYTES = 32 * 1024
# Headroom for the {"batch":[...]} wrapper and the SDK's own serialisation.
_BATCH_BUDGET = MAX_BATCH_BYTES - 4 * 1024
# Answers that mean the payload is at fault: retrying the same bytes cannot succeed.
PAYLOAD_STATUSES = frozenset({400, 413, 422})
# Answers that mean the credentials are wrong: pause, never dead-letter.
AUTH_STATUSES = frozenset({401, 403})

#: Failure kinds. ``payload``: this event is bad (dead-letter it). ``auth``: the
#: credentials are refused (pause). ``transient``: Customer.io or the network failed
#: (retry; counts against the breaker). ``not_sent``: held back before sending
#: (breaker open, shutting down): no attempt is counted.
PAYLOAD, AUTH, TRANSIENT, NOT_SENT = "payload", "auth", "transient", "not_sent"
#: ``config``: TLS verification failed: a wrong CA bundle or an intercepting proxy.
#: Like ``auth``, it is ours to fix, not the events' fault: pause, never dead-letter.
CONFIG = "config"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a request failed, in words that are safe to log: no request data, no keys."""

    status: int | None
    error_type: str
    message: str
    retry_after: float | None = None

    @property
    def kind(self) -> str:
        if self.status in PAYLOAD_STATUSES or self.error_type == "item_rejected":
            return PAYLOAD
        if self.status in AUTH_STATUSES:
            return AUTH
        if self.error_type == "SSLError":
            return CONFIG
        if self.error_type in ("circuit_open", "stopped"):
            return NOT_SENT
        return TRANSIENT

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True)
class DeliveryReport:
    """The outcome of delivering a list of events.

    ``accepted`` were taken by Customer.io; ``rejected`` never will be (dead-letter
    them); ``failed`` were sent and failed for the reason in ``failure`` (count an
    attempt); ``deferred`` were not sent at all, because an earlier request failed.
    """

    accepted: list[QueuedEvent] = field(default_factory=list)
    rejected: list[tuple[QueuedEvent, Failure]] = field(default_factory=list)
    failed: list[QueuedEvent] = field(default_factory=list)
    deferred: list[QueuedEvent] = field(default_factory=list)
    failure: Failure | None = None
    requests: int = 0


class _PinnedCASession(requests.Session):
    """A Session whose ``verify`` the environment cannot override."""

    def __init__(self, verify: str | bool) -> None:
        super().__init__()
        self.verify = verify
        self._pinned = verify

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self._pinned is not True:
            settings["verify"] = self._pinned
        return settings


class _SDKClient(CustomerIO):  # type: ignore[misc]  # the SDK is untyped
    """The SDK client with our session: no hidden retries, pinned CA, response capture."""

    def __init__(self, settings: Settings, on_response: Any) -> None:
        super().__init__(
            settings.site_id,
            settings.api_key,
            host=settings.endpoint.host,
            port=settings.endpoint.port,
            retries=0,
            timeout=settings.request_timeout,
        )
        self._verify: str | bool = str(settings.ca_bundle) if settings.ca_bundle else True
        self._on_response = on_response
        self._pool_size = settings.max_in_flight

    def _build_session(self) -> requests.Session:
        session = _PinnedCASession(self._verify)
        # The process id tells an operator (or a test) which process of several
        # sharing a queue sent a request; it is built after a fork, so it is current.
        session.headers["User-Agent"] = (
            f"cio-logging/{PACKAGE_VERSION} (pid {os.getpid()}) "
            f"Customer.io Python Client/{SDK_VERSION}"
        )
        session.auth = (self.site_id, self.api_key)
        session.mount(
            "https://",
            HTTPAdapter(max_retries=0, pool_connections=1, pool_maxsize=self._pool_size),
        )
        session.hooks["response"].append(self._on_response)
        return session

    def _sanitize(self, data: Any) -> Any:
        """Send the data as it is: the SDK would walk every value of every event (in
        Python, a tenth of the delivery cost) to turn datetimes into numbers and NaN
        into null; ``encode_data`` did both, or refused the event, at emit."""
        return data

    def __repr__(self) -> str:  # the SDK's default repr is harmless, but be explicit
        return f"<cio_logging SDK client for {self.host}:{self.port}>"


class TrackClient:
    """Delivers queued events to the Track API and classifies every answer."""

    def __init__(
        self,
        settings: Settings,
        *,
        breaker: DeliveryBreaker | None = None,
        rate_cap: RequestRateCap | None = None,
        telemetry: Telemetry | None = None,
        thread_initializer: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._breaker = breaker
        self._rate_cap = rate_cap
        self._telemetry = telemetry
        self._local = threading.local()
        self._sdk = _SDKClient(settings, self._remember_response)
        self._sdk.http  # build the session now: the SDK builds it lazily, unlocked  # noqa: B018
        self._thread_initializer = thread_initializer
        self._senders: ThreadPoolExecutor | None = None
        background.guard_loggers()  # the SDK's, requests' and urllib3's loggers exist now

    def close(self) -> None:
        if self._senders is not None:
            self._senders.shutdown(wait=True)
        self._sdk.close()

    def deliver(self, events: Sequence[QueuedEvent]) -> DeliveryReport:
        """Send ``events``; stop at the first failure that is not the payload's fault.

        Each request waits for the rate cap and goes through the breaker. Concurrency
        is the caller's: the worker keeps several ``deliver`` calls in flight through
        :meth:`submit`.
        """
        report = DeliveryReport()
        batchable: list[tuple[QueuedEvent, dict[str, Any], int]] = []
        singles: list[QueuedEvent] = []
        for queued in events:
            if queued.event.customer_id is None:
                singles.append(queued)
                continue
            item = _batch_item(queued)
            size = _wire_size(item, queued.event.data_json)
            if size > MAX_ITEM_BYTES:
                singles.append(queued)  # v1 takes up to 100 KB of data
            else:
                batchable.append((queued, item, size))
        for chunk in _chunks_by_size(batchable, self._settings.batch_size):
            if report.failure is not None:
                report.deferred.extend(queued for queued, _, _ in chunk)
            else:
                self._send_batch(chunk, report)
        for queued in singles:
            if report.failure is not None:
                report.deferred.append(queued)
            else:
                self._send_single(queued, report)
        return report

    def submit(self, events: Sequence[QueuedEvent]) -> Future[DeliveryReport]:
        """Deliver ``events`` on a sender thread (at most ``max_in_flight`` at once)."""
        try:
            return self._sender_pool().submit(self.deliver, events)
        except RuntimeError:
            # The interpreter is exiting (logging.shutdown() flushes from an atexit
            # hook, after concurrent.futures stopped taking work): send right here.
            done: Future[DeliveryReport] = Future()
            done.set_result(self.deliver(events))
            return done

    def _sender_pool(self) -> ThreadPoolExecutor:
        if self._senders is None:
            self._senders = ThreadPoolExecutor(
                max_workers=self._settings.max_in_flight,
                thread_name_prefix="cio_logging-send",
                initializer=self._thread_initializer,
            )
        return self._senders

    def _send_batch(
        self, chunk: list[tuple[QueuedEvent, dict[str, Any], int]], report: DeliveryReport
    ) -> None:
        failure, response = self._call(
            lambda: self._sdk.batch([item for _, item, _ in chunk]), chunk, "v2_batch"
        )
        report.requests += 1
        if failure is None and response is not None:
            rejected = _rejected_items(response, len(chunk)) or {}
            for index, (queued, _, _) in enumerate(chunk):
                if index in rejected:
                    report.rejected.append((queued, rejected[index]))
                else:
                    report.accepted.append(queued)
        elif failure is not None and failure.kind == PAYLOAD and len(chunk) > 1:
            # One poison item condemns the whole request: bisect to find it, so its
            # neighbours are delivered and only it is dead-lettered.
            middle = len(chunk) // 2
            self._send_batch(chunk[:middle], report)
            if report.failure is None:
                self._send_batch(chunk[middle:], report)
            else:
                report.deferred.extend(queued for queued, _, _ in chunk[middle:])
        elif failure is not None and failure.kind == PAYLOAD:
            report.rejected.append((chunk[0][0], failure))
        elif failure is not None:
            report.failure = failure
            unsent = report.deferred if failure.kind == NOT_SENT else report.failed
            unsent.extend(queued for queued, _, _ in chunk)

    def _send_single(self, queued: QueuedEvent, report: DeliveryReport) -> None:
        event = queued.event
        if event.customer_id is not None:

            def send() -> Any:
                return self._sdk.track(
                    event.customer_id,
                    event.name,
                    event.data,
                    id=event.id,
                    timestamp=event.timestamp,
                )
        else:

            def send() -> Any:
                return self._sdk.track_anonymous(
                    event.anonymous_id,
                    event.name,
                    event.data,
                    id=event.id,
                    timestamp=event.timestamp,
                )

        route = "v1" if event.customer_id is not None else "v1_anonymous"
        failure, _ = self._call(send, [(queued, {}, 0)], route)
        report.requests += 1
        if failure is None:
            report.accepted.append(queued)
        elif failure.kind == PAYLOAD:
            report.rejected.append((queued, failure))
        else:
            report.failure = failure
            (report.deferred if failure.kind == NOT_SENT else report.failed).append(queued)

    def _call(
        self,
        send: Callable[[], Any],
        chunk: Sequence[tuple[QueuedEvent, Any, int]],
        route: str,
    ) -> tuple[Failure | None, requests.Response | None]:
        slot = None
        if self._rate_cap is not None:
            slot = self._rate_cap.acquire()
            if slot is None:
                return Failure(None, "stopped", "shutting down: not sent"), None
        sent = False

        def attempt() -> tuple[Failure | None, requests.Response | None]:
            nonlocal sent
            sent = True
            if self._telemetry is None:
                return self._attempt(send, chunk)
            with self._telemetry.request(route, len(chunk)) as span:
                outcome = self._attempt(send, chunk)
                failure, response = outcome
                if response is not None:
                    span.answered(response.status_code)
                elif failure is not None:
                    if failure.status is not None:
                        span.answered(failure.status)
                    span.failed(failure.error_type, failure.message)
                return outcome

        try:
            if self._breaker is None:
                return attempt()
            return self._breaker.call(
                attempt,
                failed=lambda outcome: outcome[0] is not None and outcome[0].kind == TRANSIENT,
            )
        except pybreaker.CircuitBreakerError:
            return Failure(None, "circuit_open", "circuit breaker open: not sent"), None
        finally:
            # The slot counts until the answer is in (a second more, see RequestRateCap).
            if slot is not None:
                (slot.release if sent else slot.cancel)()

    def _attempt(
        self, send: Callable[[], Any], chunk: Sequence[tuple[QueuedEvent, Any, int]]
    ) -> tuple[Failure | None, requests.Response | None]:
        self._local.response = None
        try:
            response = send()
            if _rejected_items(response, len(chunk)) is None:
                return Failure(
                    207, "unreadable_207", "HTTP 207 naming no item of the request: resent"
                ), None
            return None, response
        except CustomerIOException as exc:
            answer: requests.Response | None = self._local.response
            if answer is not None:
                return self._http_failure(answer, chunk), None
            return _transport_failure(exc.__cause__, self._settings.request_timeout), None
        except requests.RequestException as exc:  # raised outside the SDK's wrapper
            return _transport_failure(exc, self._settings.request_timeout), None

    def _remember_response(
        self, response: requests.Response, *args: Any, **kwargs: Any
    ) -> requests.Response:
        self._local.response = response
        return response

    def _http_failure(
        self, response: requests.Response, chunk: Sequence[tuple[QueuedEvent, Any, int]]
    ) -> Failure:
        # The server may quote what we sent: identifiers and every string in the data.
        secrets = {self._settings.api_key, self._settings.site_id}
        for queued, _, _ in chunk:
            event = queued.event
            secrets.add(event.customer_id or event.anonymous_id or "")
            secrets.update(_strings_in(event.data))
        credentials = f"{self._settings.site_id}:{self._settings.api_key}".encode()
        secrets.add(base64.b64encode(credentials).decode("ascii"))  # a quoted Authorization
        # Scrubbed whole, then cut: a cut first could leave part of a secret behind.
        detail = _scrub(_error_text(response), secrets)[:200]
        status = response.status_code
        message = f"HTTP {status}" + (f": {detail}" if detail else "")
        return Failure(status, f"http_{status}", message, _retry_after(response))


def _batch_item(queued: QueuedEvent) -> dict[str, Any]:
    event = queued.event
    return {
        "type": "person",
        "identifiers": {"id": event.customer_id},
        "action": "event",
        "name": event.name,
        "id": event.id,
        "timestamp": event.timestamp,
        "attributes": event.data,
    }


# The item's JSON without its attributes, beyond the names and ids: keys, quotes,
# separators and the timestamp, generously.
_ITEM_FRAME_BYTES = 160


def _wire_size(item: dict[str, Any], data_json: str) -> int:
    """The bytes ``item`` takes as requests encodes it (ASCII escapes, ", " separators),
    which is what Customer.io's limits count, or an upper bound of it.

    Compact ASCII data at most doubles on the wire (a space after each separator), so a
    bound that is well under the limit spares the encoding; otherwise encode it.
    """
    event_bytes = len(item["name"]) + len(item["identifiers"]["id"]) + len(item["id"])
    if data_json.isascii() and item["name"].isascii() and item["identifiers"]["id"].isascii():
        bound = _ITEM_FRAME_BYTES + 2 * event_bytes + 2 * len(data_json)
        if bound <= MAX_ITEM_BYTES // 2:
            return bound
    return len(json.dumps(item))


def _chunks_by_size(
    items: list[tuple[QueuedEvent, dict[str, Any], int]], max_items: int
) -> list[list[tuple[QueuedEvent, dict[str, Any], int]]]:
    chunks: list[list[tuple[QueuedEvent, dict[str, Any], int]]] = []
    current: list[tuple[QueuedEvent, dict[str, Any], int]] = []
    used = 0
    for entry in items:
        if current and (used + entry[2] + 1 > _BATCH_BUDGET or len(current) >= max_items):
            chunks.append(current)
            current, used = [], 0
        current.append(entry)
        used += entry[2] + 1
    if current:
        chunks.append(current)
    return chunks


def _rejected_items(response: requests.Response, count: int) -> dict[int, Failure] | None:
    """Per-item errors of a 207 answer (the SDK treats 207 as plain success).

    None when the answer is a 207 whose errors cannot all be matched to items of the
    request: the caller then resends the whole chunk (ids deduplicate) rather than
    guess which items were refused.
    """
    if response.status_code != 207:
        return {}
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        return None
    if not isinstance(errors, list) or not errors:
        return None
    rejected: dict[int, Failure] = {}
    for error in errors:
        index = error.get("batch_index") if isinstance(error, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            return None
        # reason and field only: the message may quote the offending value.
        words = " ".join(str(error.get(k)) for k in ("reason", "field") if error.get(k))
        rejected[index] = Failure(
            207, "item_rejected", f"rejected in a 207 batch answer: {words or 'no reason'}"
        )
    return rejected


def _error_text(response: requests.Response) -> str:
    """The server's own error words, from either 400 body shape found in the wild."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    meta = body.get("meta")
    parts: list[str] = []
    if isinstance(meta, dict):
        if isinstance(meta.get("error"), str):
            parts.append(meta["error"])
        if isinstance(meta.get("errors"), list):
            parts.extend(str(e) for e in meta["errors"])
    if isinstance(body.get("errors"), list):
        parts.extend(
            str(e.get("reason", e)) if isinstance(e, dict) else str(e) for e in body["errors"]
        )
    return "; ".join(parts)[:10_000]


def _strings_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def _scrub(text: str, secrets: set[str]) -> str:
    # Longest first, so a secret inside another is not left half-redacted.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "[redacted]")
    return text


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        moment = _http_date(value)
        if moment is None:
            return None  # neither seconds nor an HTTP date: ignore it
        # Measured against the server's own Date header when it sent one: both stamps
        # come from its clock, while ours may be off by any amount (or have stepped),
        # and an hour behind would turn "in 30 s" into the max_retry_after cap.
        served = _http_date(response.headers.get("Date"))
        seconds = moment - (time.time() if served is None else served)
    return max(0.0, seconds)  # the retry policy caps it


def _http_date(value: str | None) -> float | None:
    """An HTTP date as Unix seconds, or None."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _transport_failure(cause: BaseException | None, timeout: float) -> Failure:
    """Describe a failure without a response by its type: its text holds the URL."""
    if isinstance(cause, requests.Timeout):
        return Failure(None, type(cause).__name__, f"no answer within {timeout:g} s")
    if isinstance(cause, requests.exceptions.SSLError):
        return Failure(None, "SSLError", "TLS handshake or certificate verification failed")
    if isinstance(cause, requests.ConnectionError):
        return Failure(None, type(cause).__name__, "connection refused, reset or unreachable")
    name = type(cause).__name__ if cause is not None else "CustomerIOException"
    return Failure(None, name, f"request failed ({name})")
