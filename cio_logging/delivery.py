"""Sending calls to the Track API: the only module that touches the customerio SDK.

Every request goes through the SDK (``CustomerIO.batch``, and its ``send_request``
for v1 events), on the session :mod:`.client` builds: no urllib3 retries, a pinned
CA bundle, a response hook that keeps the last response, because
``CustomerIOException`` carries no status code and its text holds the request data
(personal data). That text is never logged: failures are described from the status,
the response body and the exception's type.

Routing: events, identifies, page and screen views and the person actions (delete,
suppress, unsuppress) of identified people go in v2 ``/api/v2/batch`` requests (at
most 500 KB a request, 32 KB an item, 207 answers read item by item); anonymous
events, page and screen views, which v2 batches cannot carry, and events, pages and
screens over 32 KB go one by one through v1 (the others are refused at emit: see
``events.check_for_api``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

import requests
from customerio import CustomerIO, CustomerIOException

from .client import (
    AUTH,
    CONFIG,
    MAX_ITEM_BYTES,
    NOT_SENT,
    PAYLOAD,
    TRANSIENT,
    DeliveryReport,
    Failure,
    HTTPDelivery,
    Item,
    TransportError,
    build_session,
)
from .config import Settings
from .events import DELETE, EVENT, IDENTIFY, PAGE, SCREEN, SUPPRESS, UNSUPPRESS
from .metadata import SDK_VERSION
from .store import QueuedEvent

__all__ = [
    "AUTH",
    "CONFIG",
    "NOT_SENT",
    "PAYLOAD",
    "TRANSIENT",
    "DeliveryReport",
    "Failure",
    "TrackClient",
]

# v1 events carry a type; v2 actions name the call.
_V1_TYPES = {EVENT: None, PAGE: "page", SCREEN: "screen"}
_ACTIONS = {
    EVENT: "event",
    IDENTIFY: "identify",
    PAGE: "page",
    SCREEN: "screen",
    DELETE: "delete",
    SUPPRESS: "suppress",
    UNSUPPRESS: "unsuppress",
}


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

    def close(self) -> None:
        super().close()
        self._sdk.close()

    def _items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        entries: list[Item | QueuedEvent] = []
        for queued in events:
            if queued.event.customer_id is None:
                entries.append(queued)  # v2 batches carry no anonymous person
                continue
            item = _batch_item(queued)
            size = _wire_size(item, queued.event.data_json)
            if size > MAX_ITEM_BYTES and queued.event.call in _V1_TYPES:
                entries.append(queued)  # v1 takes up to 100 KB of data
            else:
                entries.append(Item(queued, item, size))
        return entries

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        return self._through_sdk(lambda: self._sdk.batch([item.wire for item in items]))

    def _single_route(self, queued: QueuedEvent) -> str:
        return "v1" if queued.event.customer_id is not None else "v1_anonymous"

    def _post_single(self, queued: QueuedEvent) -> tuple[str, requests.Response]:
        event = queued.event
        body: dict[str, Any] = {"name": event.name, "data": event.data, "id": event.id}
        body["timestamp"] = event.timestamp
        kind = _V1_TYPES.get(event.call)
        if kind is not None:
            body["type"] = kind
        if event.customer_id is not None:
            url = self._sdk.get_event_query_string(event.customer_id)
        else:
            url = self._sdk.get_events_query_string()
            body["anonymous_id"] = event.anonymous_id
        route = self._single_route(queued)
        return route, self._through_sdk(lambda: self._sdk.send_request("POST", url, body))

    def _through_sdk(self, send: Callable[[], Any]) -> requests.Response:
        """Run an SDK call; the answer its response hook saw, whatever it raised."""
        self._local.response = None
        try:
            send()
        except CustomerIOException as exc:
            answer: requests.Response | None = self._local.response
            if answer is None:
                raise TransportError(exc.__cause__) from None
            return answer
        answer = self._local.response
        if answer is None:  # cannot happen: a return means an answer came
            raise TransportError(None)
        return answer

    def _secrets(self) -> set[str]:
        settings = self._settings
        credentials = f"{settings.site_id}:{settings.api_key}".encode()
        # A quoted Authorization header, too.
        return {settings.api_key, settings.site_id, base64.b64encode(credentials).decode("ascii")}

    def _rejected_items(self, response: requests.Response, count: int) -> dict[int, Failure] | None:
        return _rejected_items(response, count)


def _batch_item(queued: QueuedEvent) -> dict[str, Any]:
    event = queued.event
    item: dict[str, Any] = {
        "type": "person",
        "identifiers": {"id": event.customer_id},
        "action": _ACTIONS[event.call],
    }
    if event.call in (EVENT, PAGE, SCREEN):
        item["name"] = event.name
        item["id"] = event.id
    if event.call in (EVENT, PAGE, SCREEN, IDENTIFY):
        item["timestamp"] = event.timestamp
        item["attributes"] = event.data
    return item


# The item's JSON without its attributes, beyond the names and ids: keys, quotes,
# separators and the timestamp, generously.
_ITEM_FRAME_BYTES = 160


def _wire_size(item: dict[str, Any], data_json: str) -> int:
    """The bytes ``item`` takes as requests encodes it (ASCII escapes, ", " separators),
    which is what Customer.io's limits count, or an upper bound of it.

    Compact ASCII data at most doubles on the wire (a space after each separator), so a
    bound that is well under the limit spares the encoding; otherwise encode it.
    """
    name = item.get("name", "")
    event_bytes = len(name) + len(item["identifiers"]["id"]) + len(item.get("id", ""))
    if data_json.isascii() and name.isascii() and item["identifiers"]["id"].isascii():
        bound = _ITEM_FRAME_BYTES + 2 * event_bytes + 2 * len(data_json)
        if bound <= MAX_ITEM_BYTES // 2:
            return bound
    return len(json.dumps(item))


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
