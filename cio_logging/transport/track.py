"""Sending calls to the Track API: the only module that touches the customerio SDK.

Every request goes out on the SDK's session, which :mod:`.base` builds: no urllib3
retries, a pinned CA bundle, a response hook that keeps the last response, because
``CustomerIOException`` carries no status code and its text holds the request data
(personal data). That text is never logged: failures are described from the status,
the response body and the exception's type. v1 events go through the SDK's
``send_request``; a v2 batch body is built here from the JSON text stored at emit (the
data spliced in, never decoded and encoded again) and posted as bytes on the same
session, to the URL ``CustomerIO.batch`` would use, with the same auth and timeout.

Routing: events, identifies, page and screen views and the person actions (delete,
suppress, unsuppress) of identified people go in v2 ``/api/v2/batch`` requests (at
most 500 KB a request, 32 KB an item, 207 answers read item by item); anonymous
events, page and screen views, which v2 batches cannot carry, and events, pages and
screens over 32 KB go one by one through v1 (the others are refused at emit: see
``events.check_for_api``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring
from typing import Any

import requests
from customerio import CustomerIO, CustomerIOException

from ..config import Settings
from ..events import DELETE, EVENT, IDENTIFY, PAGE, SCREEN, SUPPRESS, UNSUPPRESS, Event
from ..metadata import SDK_VERSION
from ..store import QueuedEvent
from .base import Failure, HTTPDelivery, TransportError, build_session
from .batching import MAX_ITEM_BYTES, Item

__all__ = ["TrackClient", "item_text"]

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
            if queued.event.customer_id is None:
                entries.append(queued)  # v2 batches carry no anonymous person
                continue
            text = item_text(queued.event)
            # What Customer.io's 32 KB counts: the item's bytes as sent.
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
            if size > MAX_ITEM_BYTES and queued.event.call in _V1_TYPES:
                entries.append(queued)  # v1 takes up to 100 KB of data
            else:
                entries.append(Item(queued, text, size))
        return entries

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        # Joined from each item's text, not CustomerIO.batch: that encodes every
        # item's data again, in one json.dumps that holds the GIL for milliseconds
        # while the application's threads wait. A requests exception is mapped by
        # the caller (HTTPDelivery._attempt), as the SDK's cause was.
        body = '{"batch":[' + ",".join([item.wire for item in items]) + "]}"
        session: requests.Session = self._sdk.http
        return session.post(
            self._batch_url,
            data=body.encode("utf-8"),
            headers=_JSON_HEADERS,
            timeout=self._sdk.timeout,
        )

    def _single_route(self, queued: QueuedEvent) -> str:
        return "v1" if queued.event.customer_id is not None else "v1_anonymous"

    def _post_single(self, queued: QueuedEvent) -> requests.Response:
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
        return self._through_sdk(lambda: self._sdk.send_request("POST", url, body))

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


_JSON_HEADERS = {"Content-Type": "application/json"}
# The item kinds that name the call and carry its id; those that carry data.
_NAMED = frozenset({EVENT, PAGE, SCREEN})
_WITH_DATA = frozenset({EVENT, PAGE, SCREEN, IDENTIFY})


def item_text(event: Event) -> str:
    """One v2 batch item as compact JSON text, the stored data spliced in as it is.

    ``{"type": "person", "identifiers": {"id": ...}, "action": ..., "name": ...,
    "id": ..., "timestamp": ..., "attributes": {data}}``; person actions without data
    (delete, suppress, unsuppress) stop after the action. Strings are encoded by
    json's own encoder (UTF-8, not ASCII escapes: lone surrogates were refused at
    emit), so the text is what ``json.dumps`` would give, only without decoding
    the data.
    """
    person, action = encode_basestring(event.customer_id or ""), _ACTIONS[event.call]
    head = f'{{"type":"person","identifiers":{{"id":{person}}},"action":"{action}"'
    if event.call in _NAMED:
        head += f',"name":{encode_basestring(event.name)},"id":{encode_basestring(event.id)}'
    if event.call in _WITH_DATA:
        return f'{head},"timestamp":{int(event.timestamp)},"attributes":{event.data_json}}}'
    return head + "}"


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
