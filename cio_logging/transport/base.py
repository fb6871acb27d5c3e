"""The one small interface the sender delivers through, and what both APIs share.

The sender hands a client one request at a time, a batch of item texts or a single call,
and gets an :class:`~cio_logging.sender.outcome.Answer` back; it never knows which API
it talks to. One module per API implements it (:mod:`.track` for the Track API,
:mod:`.pipelines` for the Data Pipelines API) on :class:`HTTPDelivery`, which holds what
they share:

* the requests session: no urllib3 retries (the sender owns the one retry policy), a
  CA bundle given in the settings wins over ``REQUESTS_CA_BUNDLE``, a response hook;
* the rate cap and the telemetry span around every request;
* answers read into words safe to log: the status, the server's scrubbed error words,
  the exception's type (and the proxy, when one is in use), never the request data
  (personal data) or a key.

What an answer means (retry, dead-letter, split, pause) is decided elsewhere, once:
:mod:`cio_logging.sender.outcome`.
"""

from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from .. import background, cooperative, wire
from ..config import Settings
from ..metadata import PACKAGE_VERSION
from ..resilience import RequestRateCap
from ..store import QueuedEvent
from ..telemetry import Telemetry
from ..templates import Templates
from ..window import WindowWatch
from .answer import Answer
from .batching import Item

#: Answers to requests that never left.
STOPPED = Answer(None, "stopped", "shutting down: not sent")


class DeliveryClient(Protocol):
    """What the sender delivers through: one request at a time, one answer back."""

    #: The telemetry route of batch requests.
    batch_route: str
    #: The batch items the database may build (see cio_logging/templates.py).
    templates: Templates

    #: Events about to be sent past Customer.io's 72-hour window: counted, warned about.
    window: WindowWatch

    def items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        """Each call as a batch item (its text and size), or bare when it must go alone."""

    def post_batch(self, items: Sequence[str]) -> Answer:
        """Send one batch request of these item texts (in this order)."""

    def post_single(self, queued: QueuedEvent) -> Answer:
        """Send one call a batch cannot carry, on its own route."""

    def close(self) -> None:
        """Close the connections."""


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
    implements :meth:`_open` (its session), :meth:`items` (which calls can go in a
    batch, in what form), :meth:`_send_batch`, :meth:`_send_single`,
    :meth:`_single_route`, :meth:`_secrets` and, where its API answers item by item,
    :meth:`_item_errors`.
    """

    batch_route = "batch"
    templates: Templates = MappingProxyType({})

    def __init__(
        self,
        settings: Settings,
        *,
        rate_cap: RequestRateCap | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._rate_cap = rate_cap
        self._telemetry = telemetry
        self._local = threading.local()
        #: Events sent past Customer.io's 72-hour window: counted, and warned about.
        self.window = WindowWatch(None if telemetry is None else telemetry.events_past_window)
        self._open()
        background.guard_loggers()  # requests', urllib3's (and the SDK's) loggers exist now

    # -- what a subclass provides --------------------------------------------------------

    def _open(self) -> None:
        """Build the session (and whatever else the API's client needs)."""
        raise NotImplementedError

    def items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        raise NotImplementedError

    def _send_batch(self, body: bytes) -> requests.Response:
        """POST one batch body (``{"batch":[...]}``, UTF-8) on the API's batch route."""
        raise NotImplementedError

    def _send_single(self, queued: QueuedEvent) -> requests.Response:
        """Send one call a batch cannot carry, on its own route (see :meth:`_single_route`).
        Only called for what :meth:`items` returned bare."""
        raise NotImplementedError

    def _single_route(self, queued: QueuedEvent) -> str:
        """The telemetry route of :meth:`_send_single` for ``queued``."""
        raise NotImplementedError

    def _secrets(self) -> set[str]:
        """What the server may quote that must never be logged: keys, encoded auth."""
        raise NotImplementedError

    def _item_errors(self, response: requests.Response, count: int) -> tuple[dict[int, str], int]:
        """Per-item refusals of an accepted request: {index: reason} and how many
        errors named no item of the request. ({}, 0) for an API without them."""
        return {}, 0

    # -- sending -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (a subclass closes its session)."""

    def post_batch(self, items: Sequence[str]) -> Answer:
        """Send one batch request of these item texts; its answer, read."""
        body = (wire.BATCH_OPEN + ",".join(items) + wire.BATCH_CLOSE).encode("utf-8")
        return self._exchange(
            self.batch_route, len(items), lambda: self._send_batch(body), lambda: items
        )

    def post_single(self, queued: QueuedEvent) -> Answer:
        """Send one call on its own route; its answer, read."""
        return self._exchange(
            self._single_route(queued),
            1,
            lambda: self._send_single(queued),
            lambda: [
                queued.event.data_json,
                queued.event.customer_id or "",
                queued.event.anonymous_id or "",
            ],
        )

    def _exchange(
        self,
        route: str,
        count: int,
        send: Callable[[], requests.Response],
        sent: Callable[[], Iterable[str]],
    ) -> Answer:
        """Take a slot under the rate cap, send, read the answer (inside a span)."""
        slot = None
        if self._rate_cap is not None:
            slot = self._rate_cap.acquire()
            if slot is None:
                return STOPPED
        try:
            if self._telemetry is None:
                return self._answer(send, count, sent)
            with self._telemetry.request(route, count) as span:
                answer = self._answer(send, count, sent)
                if answer.status is not None:
                    span.answered(answer.status)
                if not answer.accepted:
                    span.failed(answer.error_type, answer.message)
                return answer
        finally:
            # The slot counts until the answer is in (a second more, see RequestRateCap).
            if slot is not None:
                slot.release()

    def _answer(
        self, send: Callable[[], requests.Response], count: int, sent: Callable[[], Iterable[str]]
    ) -> Answer:
        if background.interpreter_exiting():
            # Under gevent each OS thread has its own hub, whose resolver runs in a
            # thread it can no longer start: resolve on this thread's hub instead.
            cooperative.resolve_names_on_the_hub()
        try:
            response = send()
        except TransportError as exc:
            return transport_answer(exc.cause, self._settings.request_timeout, self._proxy())
        except requests.RequestException as exc:
            return transport_answer(exc, self._settings.request_timeout, self._proxy())
        status = response.status_code
        if 200 <= status < 300:
            errors, unmatched = self._item_errors(response, count)
            return Answer(status, item_errors=errors, unmatched_errors=unmatched)
        # The server may quote what we sent: identifiers and every string in the data.
        secrets = self._secrets()
        secrets.update(_strings_sent(sent()))
        words, names_a_call = error_text(response)
        # Scrubbed whole, then cut: a cut first could leave part of a secret behind.
        detail = scrub(words, secrets)[:200]
        return Answer(
            status,
            f"http_{status}",
            f"HTTP {status}" + (f": {detail}" if detail else ""),
            retry_after(response),
            names_a_call=names_a_call,
        )

    def _proxy(self) -> str | None:
        """The proxy requests would use for this API (from the environment), if any."""
        return environment_proxy(self._settings.endpoint.base_url)

    def _remember_response(
        self, response: requests.Response, *args: Any, **kwargs: Any
    ) -> requests.Response:
        self._local.response = response
        return response


def _strings_sent(sent: Iterable[str]) -> Iterator[str]:
    """Every string value in the JSON texts sent (items, data), and plain strings."""
    for text in sent:
        if text.startswith(("{", "[")):
            try:
                yield from strings_in(json.loads(text))
            except ValueError:
                yield text
        else:
            yield text


def error_text(response: requests.Response) -> tuple[str, bool]:
    """The server's own error words, from the error body shapes found in the wild, and
    whether they point at a field or an item (a list of errors, not a bare
    ``{"meta": {"error": "Bad Request"}}``)."""
    try:
        body = response.json()
    except ValueError:
        return "", False
    if not isinstance(body, dict):
        return "", False
    meta = body.get("meta")
    parts: list[str] = []
    names_a_call = False
    if isinstance(meta, dict):
        if isinstance(meta.get("error"), str):
            parts.append(meta["error"])
        if isinstance(meta.get("errors"), list) and meta["errors"]:
            parts.extend(str(e) for e in meta["errors"])
            names_a_call = True
    if isinstance(body.get("errors"), list) and body["errors"]:
        parts.extend(
            str(e.get("reason", e)) if isinstance(e, dict) else str(e) for e in body["errors"]
        )
        names_a_call = True
    return "; ".join(parts)[:10_000], names_a_call


def strings_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
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


def environment_proxy(url: str) -> str | None:
    """``"<proxy> (from VAR)"`` when requests would send ``url`` through a proxy taken
    from the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, honouring
    ``NO_PROXY``), with any credentials in it removed; else None."""
    proxies = requests.utils.get_environ_proxies(url)
    scheme = urlsplit(url).scheme
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return None
    wanted = {f"{scheme}_proxy", "all_proxy"}
    variable = next(
        (name for name, value in os.environ.items() if name.lower() in wanted and value == proxy),
        f"{scheme.upper()}_PROXY",
    )
    return f"{_without_credentials(proxy)} (from {variable})"


def _without_credentials(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "a proxy"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def transport_answer(cause: BaseException | None, timeout: float, proxy: str | None) -> Answer:
    """Describe a failure without a response by its type: its text holds the URL. When
    a proxy is in use, say so: a connection error may be the proxy's."""
    through = "" if proxy is None else f" through the proxy {proxy}"
    if isinstance(cause, requests.Timeout):
        return Answer(None, type(cause).__name__, f"no answer within {timeout:g} s{through}")
    if isinstance(cause, requests.exceptions.SSLError):
        return Answer(
            None, "SSLError", f"TLS handshake or certificate verification failed{through}"
        )
    if isinstance(cause, requests.exceptions.ProxyError):
        return Answer(None, "ProxyError", f"the proxy failed or refused{through}")
    if isinstance(cause, requests.ConnectionError):
        return Answer(
            None, type(cause).__name__, f"connection refused, reset or unreachable{through}"
        )
    name = type(cause).__name__ if cause is not None else "CustomerIOException"
    return Answer(None, name, f"request failed ({name}){through}")
