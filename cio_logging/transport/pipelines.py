"""Sending calls to Customer.io's Data Pipelines API (``cdp.customer.io/v1``).

Neither the customerio SDK (it does not speak this API) nor customerio-cdp-analytics
(it queues in memory and drops, see facts.md) sends here: requests go through the
same session :mod:`.base` builds for the Track API, with the source's API key as
the Basic username and a blank password.

Every request is ``POST /v1/batch`` in Segment's shape, at most 500 KB, each call at
most 32 KB (bigger ones are refused at emit: this API has no route for them), with
``X-Strict-Mode: 1``. Without that header an invalid or oversized call is answered
200 and silently dropped, which would turn at-least-once into at-most-once; with it,
such a request is answered 400 and bisected like a Track batch, so only the bad call
is dead-lettered.

A call is built from the JSON text stored at emit: its data is spliced in, never
decoded and encoded again.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import requests

from ..events import DELETE, EVENT, IDENTIFY, PAGE, SCREEN, SUPPRESS, UNSUPPRESS, Event
from ..metadata import PACKAGE_VERSION
from ..store import QueuedEvent
from .base import HTTPDelivery, build_session
from .batching import Item

#: The semantic events (a ``track`` with a reserved name) the person actions become.
SEMANTIC_EVENTS = {
    DELETE: "User Deleted",
    SUPPRESS: "User Suppressed",
    UNSUPPRESS: "User Unsuppressed",
}
_TYPES = {EVENT: "track", IDENTIFY: "identify", PAGE: "page", SCREEN: "screen"}
# Where each call keeps its data.
_DATA_KEY = {IDENTIFY: "traits"}

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_CONTEXT = _ENCODER.encode({"library": {"name": "cio_logging", "version": PACKAGE_VERSION}})


def call_text(event: Event) -> str:
    """One call as compact JSON text, the stored data spliced in as it is."""
    head: dict[str, Any] = {"type": _TYPES.get(event.call, "track")}
    if event.customer_id is not None:
        head["userId"] = event.customer_id
    else:
        head["anonymousId"] = event.anonymous_id
    if event.call in SEMANTIC_EVENTS:
        head["event"] = SEMANTIC_EVENTS[event.call]
    elif event.call == EVENT:
        head["event"] = event.name
    elif event.call in (PAGE, SCREEN):
        head["name"] = event.name
    head["messageId"] = event.id
    head["timestamp"] = iso_timestamp(event)
    text = _ENCODER.encode(head)
    key = _DATA_KEY.get(event.call, "properties")
    return f'{text[:-1]},"context":{_CONTEXT},"{key}":{event.data_json}}}'


def iso_timestamp(event: Event) -> str:
    """The call's time in ISO 8601 (UTC, milliseconds): the record's own time when the
    event's timestamp is that second (it was not given), so calls logged in one second
    keep their order to the millisecond."""
    moment: float = event.timestamp
    if int(event.logged_at) == event.timestamp:
        moment = event.logged_at
    stamp = dt.datetime.fromtimestamp(moment, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class PipelinesClient(HTTPDelivery):
    """Delivers queued calls to the Pipelines API and classifies every answer."""

    batch_route = "pipelines_batch"

    def _open(self) -> None:
        settings = self._settings
        self._url = f"{settings.endpoint.base_url}{settings.endpoint.path}/batch"
        self._session = build_session(settings, (settings.api_key, ""), self._remember_response)
        self._session.headers["Content-Type"] = "application/json"
        self._session.headers["X-Strict-Mode"] = "1"

    def close(self) -> None:
        super().close()
        self._session.close()

    def _items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        # Every call goes in a batch: one over 32 KB was refused at emit, and this API
        # has no other route, so there is no single to send.
        items: list[Item | QueuedEvent] = []
        for queued in events:
            text = call_text(queued.event)
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
            items.append(Item(queued, text, size))
        return items

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        body = '{"batch":[' + ",".join(item.wire for item in items) + "]}"
        return self._session.post(
            self._url, data=body.encode("utf-8"), timeout=self._settings.request_timeout
        )

    def _secrets(self) -> set[str]:
        key = self._settings.api_key
        return {key, base64.b64encode(f"{key}:".encode()).decode("ascii")}
