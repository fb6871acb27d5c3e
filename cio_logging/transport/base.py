"""The one small interface the sender delivers through, and what both APIs share.

The sender hands a list of queued calls to a :class:`DeliveryClient` and gets a
:class:`DeliveryReport` back; it never knows which API it talks to. One module per API
implements it (:mod:`.track` for the Track API, :mod:`.pipelines` for the Data
Pipelines API) on :class:`HTTPDelivery`, which holds what they share:

* the requests session: no urllib3 retries (the sender owns the one retry policy), a
  CA bundle given in the settings wins over ``REQUESTS_CA_BUNDLE``, a response hook;
* the bisection that finds the one bad call of a refused batch (the request plan that
  keeps a person's calls in order within one delivery is :mod:`.batching`'s);
* the rate cap, the breaker and the telemetry span around every request;
* failures described in words safe to log: the status, the server's scrubbed error
  words and the exception's type, never the request data (personal data) or a key.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import pybreaker
import requests
from requests.adapters import HTTPAdapter

from .. import background
from ..config import Settings
from ..metadata import PACKAGE_VERSION
from ..resilience import DeliveryBreaker, RequestRateCap
from ..store import QueuedEvent
from ..telemetry import Telemetry
from ..window import WindowWatch
from .batching import Item, plan_requests

# Answers that mean the payload is at fault: retrying the same bytes cannot succeed.
PAYLOAD_STATUSES = frozenset({400, 413, 422})
# Answers that mean the credentials are wrong: pause, never dead-letter.
AUTH_STATUSES = frozenset({401, 403})

#: Failure kinds. ``payload``: this call is bad (dead-letter it). ``auth``: the
#: credentials are refused (pause). ``transient``: Customer.io or the network failed
#: (retry; counts against the breaker). ``not_sent``: held back before sending
#: (breaker open, shutting down): no attempt is counted.
PAYLOAD, AUTH, TRANSIENT, NOT_SENT = "payload", "auth", "transient", "not_sent"
#: ``config``: TLS verification failed: a wrong CA bundle or an intercepting proxy.
#: Like ``auth``, it is ours to fix, not the calls' fault: pause, never dead-letter.
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
    """The outcome of delivering a list of calls.

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


class DeliveryClient(Protocol):
    """What the worker, replay and drain deliver through."""

    def deliver(self, events: Sequence[QueuedEvent]) -> DeliveryReport:
        """Send ``events``, a person's calls in the order given; stop at the first
        failure that is not a call's own fault."""

    def submit(self, events: Sequence[QueuedEvent]) -> Future[DeliveryReport]:
        """:meth:`deliver` on a sender thread (at most ``max_in_flight`` at once)."""

    def close(self) -> None:
        """Stop the sender threads and close the connections."""


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


def build_session(
    settings: Settings,
    auth: tuple[str, str],
    on_response: Callable[..., Any],
    client_name: str = "",
) -> requests.Session:
    """A session for one API: pinned CA, no hidden retries, our response hook."""
    session = _PinnedCASession(str(settings.ca_bundle) if settings.ca_bundle else True)
    # The process id tells an operator (or a test) which process of several sharing a
    # queue sent a request; the session is built after a fork, so it is current.
    agent = f"cio-logging/{PACKAGE_VERSION} (pid {os.getpid()})"
    session.headers["User-Agent"] = f"{agent} {client_name}".strip()
    session.auth = auth
    session.mount(
        "https://",
        HTTPAdapter(max_retries=0, pool_connections=1, pool_maxsize=settings.max_in_flight),
    )
    session.hooks["response"].append(on_response)
    return session


class TransportError(Exception):
    """No answer: raised by a client's send function with the cause (never its text)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(type(cause).__name__ if cause is not None else "no answer")
        self.cause = cause


class HTTPDelivery:
    """The machinery both API clients share; each adds its wire format and routes.

    A subclass sets ``batch_route`` (the telemetry route of its batch requests) and
    implements :meth:`_open` (its session), :meth:`_items` (which calls can go in a
    batch, in what form),
    :meth:`_post_batch`, :meth:`_post_single`, :meth:`_secrets` and, where its API
    answers item by item, :meth:`_rejected_items`.
    """

    batch_route = "batch"

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
        self._thread_initializer = thread_initializer
        self._senders: ThreadPoolExecutor | None = None
        #: Events sent past Customer.io's 72-hour window: counted, and warned about.
        self.window = WindowWatch(None if telemetry is None else telemetry.events_past_window)
        self._open()
        background.guard_loggers()  # requests', urllib3's (and the SDK's) loggers exist now

    # -- what a subclass provides --------------------------------------------------------

    def _open(self) -> None:
        """Build the session (and whatever else the API's client needs)."""
        raise NotImplementedError

    def _items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        raise NotImplementedError

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        raise NotImplementedError

    def _post_single(self, queued: QueuedEvent) -> requests.Response:
        """Send one call a batch cannot carry, on its own route (see :meth:`_single_route`).
        Only called for what :meth:`_items` returned bare."""
        raise NotImplementedError

    def _single_route(self, queued: QueuedEvent) -> str:
        """The telemetry route of :meth:`_post_single` for ``queued``."""
        raise NotImplementedError

    def _secrets(self) -> set[str]:
        """What the server may quote that must never be logged: keys, encoded auth."""
        raise NotImplementedError

    def _rejected_items(self, response: requests.Response, count: int) -> dict[int, Failure] | None:
        """Per-item refusals of an accepted request ({} for none; None: unreadable)."""
        return {}

    # -- delivering ----------------------------------------------------------------------

    def close(self) -> None:
        if self._senders is not None:
            self._senders.shutdown(wait=True)

    def deliver(self, events: Sequence[QueuedEvent]) -> DeliveryReport:
        """Send ``events``; stop at the first failure that is not the payload's fault.

        Each request waits for the rate cap and goes through the breaker. Concurrency
        is the caller's: the worker keeps several ``deliver`` calls in flight through
        :meth:`submit`, never two with calls of the same person.
        """
        report = DeliveryReport()
        self.window.check(queued.event for queued in events)
        for request in plan_requests(self._items(events), self._settings.batch_size):
            if report.failure is not None:
                report.deferred.extend(item.queued for item in request.items)
            elif request.single:
                self._send_single(request.items[0].queued, report)
            else:
                self._send_batch(request.items, report)
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

    def _send_batch(self, chunk: list[Item], report: DeliveryReport) -> None:
        failure, response = self._call(lambda: self._post_batch(chunk), chunk, self.batch_route)
        report.requests += 1
        if failure is None and response is not None:
            rejected = self._rejected_items(response, len(chunk)) or {}
            for index, item in enumerate(chunk):
                if index in rejected:
                    report.rejected.append((item.queued, rejected[index]))
                else:
                    report.accepted.append(item.queued)
        elif failure is not None and failure.kind == PAYLOAD and len(chunk) > 1:
            # One poison item condemns the whole request: bisect to find it, so its
            # neighbours are delivered and only it is dead-lettered. The halves go in
            # order, so a person's calls keep theirs.
            middle = len(chunk) // 2
            self._send_batch(chunk[:middle], report)
            if report.failure is None:
                self._send_batch(chunk[middle:], report)
            else:
                report.deferred.extend(item.queued for item in chunk[middle:])
        elif failure is not None and failure.kind == PAYLOAD:
            report.rejected.append((chunk[0].queued, failure))
        elif failure is not None:
            report.failure = failure
            unsent = report.deferred if failure.kind == NOT_SENT else report.failed
            unsent.extend(item.queued for item in chunk)

    def _send_single(self, queued: QueuedEvent, report: DeliveryReport) -> None:
        chunk = [Item(queued, None, 0)]
        failure, _ = self._call(
            lambda: self._post_single(queued), chunk, self._single_route(queued)
        )
        report.requests += 1
        if failure is None:
            report.accepted.append(queued)
        elif failure.kind == PAYLOAD:
            report.rejected.append((queued, failure))
        else:
            report.failure = failure
            (report.deferred if failure.kind == NOT_SENT else report.failed).append(queued)

    def _call(
        self, send: Callable[[], requests.Response], chunk: Sequence[Item], route: str
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
        self, send: Callable[[], requests.Response], chunk: Sequence[Item]
    ) -> tuple[Failure | None, requests.Response | None]:
        try:
            response = send()
        except TransportError as exc:
            return transport_failure(exc.cause, self._settings.request_timeout), None
        except requests.RequestException as exc:
            return transport_failure(exc, self._settings.request_timeout), None
        if not 200 <= response.status_code < 300:
            return self._http_failure(response, chunk), None
        if self._rejected_items(response, len(chunk)) is None:
            return Failure(
                response.status_code,
                f"unreadable_{response.status_code}",
                f"HTTP {response.status_code} naming no item of the request: resent",
            ), None
        return None, response

    def _remember_response(
        self, response: requests.Response, *args: Any, **kwargs: Any
    ) -> requests.Response:
        self._local.response = response
        return response

    def _http_failure(self, response: requests.Response, chunk: Sequence[Item]) -> Failure:
        # The server may quote what we sent: identifiers and every string in the data.
        secrets = self._secrets()
        for item in chunk:
            event = item.queued.event
            secrets.add(event.customer_id or event.anonymous_id or "")
            secrets.update(strings_in(event.data))
        # Scrubbed whole, then cut: a cut first could leave part of a secret behind.
        detail = scrub(error_text(response), secrets)[:200]
        status = response.status_code
        message = f"HTTP {status}" + (f": {detail}" if detail else "")
        return Failure(status, f"http_{status}", message, retry_after(response))


def error_text(response: requests.Response) -> str:
    """The server's own error words, from the error body shapes found in the wild."""
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


def strings_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def scrub(text: str, secrets: set[str]) -> str:
    # Longest first, so a secret inside another is not left half-redacted.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "[redacted]")
    return text


def retry_after(response: requests.Response) -> float | None:
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


def transport_failure(cause: BaseException | None, timeout: float) -> Failure:
    """Describe a failure without a response by its type: its text holds the URL."""
    if isinstance(cause, requests.Timeout):
        return Failure(None, type(cause).__name__, f"no answer within {timeout:g} s")
    if isinstance(cause, requests.exceptions.SSLError):
        return Failure(None, "SSLError", "TLS handshake or certificate verification failed")
    if isinstance(cause, requests.ConnectionError):
        return Failure(None, type(cause).__name__, "connection refused, reset or unreachable")
    name = type(cause).__name__ if cause is not None else "CustomerIOException"
    return Failure(None, name, f"request failed ({name})")
