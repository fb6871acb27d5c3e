"""Sending calls to the Track API: the only module that touches the customerio SDK.

Every request goes out on the SDK's session, which :mod:`.base` builds: no urllib3
retries, a pinned CA bundle, a response hook that keeps the last response, because
``CustomerIOException`` carries no status code and its text holds the request data
(personal data). That text is never logged: failures are described from the status,
the response body and the exception's type. Every body is built by :mod:`..wire` from
the JSON text stored at emit (the data spliced in, never decoded and encoded again),
compact and UTF-8, and posted as bytes on the SDK's session, to the URLs the SDK would
use, with the same auth and timeout. Not the SDK's ``send_request`` for v1: it encodes
with ``ensure_ascii`` and ``", "`` separators, so 100,000 bytes of data counted at emit
could go out as 300,000.

Routing (``wire.route_of``): identified events, identifies, page and screen views,
the person actions, devices, merges and relationships go in v2 ``/api/v2/batch``
requests (each body under 500,000 bytes, each item at most 32,768 bytes, 207 answers
read item by item); anonymous events, page and screen views, which v2 batches cannot
carry, and identified events and page views over 32 KB go one by one through v1
(what no route carries is refused at emit: see ``wire.check_for_api``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import requests
from customerio import CustomerIO

from .. import wire
from ..config import Settings
from ..events import TRACK_API
from ..metadata import SDK_VERSION
from ..store import QueuedEvent
from .base import Failure, HTTPDelivery, build_session
from .batching import Item

__all__ = ["TrackClient", "item_text"]

#: One v2 batch item's text (see ``wire.track_item``).
item_text = wire.track_item


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
        self._settings = settings
        self._on_response = on_response

    def _build_session(self) -> requests.Session:
        return build_session(
            self._settings,
            (self.site_id, self.api_key),
            self._on_response,
            f"Customer.io Python Client/{SDK_VERSION}",
        )

    def _sanitize(self, data: Any) -> Any:
        """Send the data as it is: the SDK would walk every value of every event (in
        Python, a tenth of the delivery cost) to turn datetimes into numbers and NaN
        into null; ``encode_data`` did both, or refused the event, at emit."""
        return data

    def __repr__(self) -> str:  # the SDK's default repr is harmless, but be explicit
        return f"<cio_logging SDK client for {self.host}:{self.port}>"


class TrackClient(HTTPDelivery):
    """Delivers queued calls to the Track API and classifies every answer."""

    batch_route = "v2_batch"

    def _open(self) -> None:
        self._sdk = _SDKClient(self._settings, self._remember_response)
        self._sdk.http  # build the session now: the SDK builds it lazily, unlocked  # noqa: B018
        # Where CustomerIO.batch posts: from host and port, never base_url (facts.md).
        sdk = self._sdk
        address = sdk.host if sdk.port == 443 else f"{sdk.host}:{sdk.port}"
        self._batch_url = f"https://{address}/api/v2/batch"

    def close(self) -> None:
        super().close()
        self._sdk.close()

    def _items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        entries: list[Item | QueuedEvent] = []
        for queued in events:
            event = queued.event
            if wire.route_of(event, TRACK_API) != wire.V2_BATCH:
                entries.append(queued)  # v1, one by one
                continue
            text = wire.track_item(event)
            entries.append(Item(queued, text, wire.utf8_size(text)))
        return entries

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        # Joined from each item's text, not CustomerIO.batch: that encodes every
        # item's data again, in one json.dumps that holds the GIL for milliseconds
        # while the application's threads wait. A requests exception is mapped by
        # the caller (HTTPDelivery._attempt), as the SDK's cause was.
        body = wire.BATCH_OPEN + ",".join([item.wire for item in items]) + wire.BATCH_CLOSE
        return self._post(self._batch_url, body)

    def _single_route(self, queued: QueuedEvent) -> str:
        return wire.route_of(queued.event, TRACK_API)

    def _post_single(self, queued: QueuedEvent) -> requests.Response:
        event = queued.event
        if event.customer_id is not None:
            url = self._sdk.get_event_query_string(event.customer_id)
        else:
            url = self._sdk.get_events_query_string()
        return self._post(url, wire.track_v1_body(event))

    def _post(self, url: str, body: str) -> requests.Response:
        session: requests.Session = self._sdk.http
        return session.post(
            url, data=body.encode("utf-8"), headers=_JSON_HEADERS, timeout=self._sdk.timeout
        )

    def _secrets(self) -> set[str]:
        settings = self._settings
        credentials = f"{settings.site_id}:{settings.api_key}".encode()
        # A quoted Authorization header, too.
        return {settings.api_key, settings.site_id, base64.b64encode(credentials).decode("ascii")}

    def _rejected_items(self, response: requests.Response, count: int) -> dict[int, Failure] | None:
        return _rejected_items(response, count)


_JSON_HEADERS = {"Content-Type": "application/json"}


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
