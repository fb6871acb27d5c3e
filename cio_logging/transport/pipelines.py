"""Sending calls to Customer.io's Data Pipelines API (``cdp.customer.io/v1``).

Neither the customerio SDK (it does not speak this API) nor customerio-cdp-analytics
(it queues in memory and drops, see facts.md) sends here: requests go through the
same session :mod:`.base` builds for the Track API, with the source's API key as
the Basic username and a blank password.

Every call but an alias goes in ``POST /v1/batch`` requests in Segment's shape, each
body under 500,000 bytes, each call at most 32,768 bytes (bigger ones are refused at
emit: this API has no route for them); an alias, which the published batch schema
does not list, goes alone to ``POST /v1/alias``. Every request sends
``X-Strict-Mode: 1``. Without that header an invalid or oversized call is answered 200
and silently dropped, which would turn at-least-once into at-most-once; with it, such
a request is answered 400 and bisected like a Track batch, so only the bad call is
dead-lettered.

A call is built by :mod:`..wire` from the JSON text stored at emit: its data is spliced
in, never decoded and encoded again.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import requests

from .. import wire
from ..events import PIPELINES_API
from ..store import QueuedEvent
from .base import HTTPDelivery, build_session
from .batching import Item

__all__ = ["SEMANTIC_EVENTS", "PipelinesClient", "call_text", "iso_timestamp"]

#: The semantic events (a ``track`` with a reserved name) calls become.
SEMANTIC_EVENTS = wire.SEMANTIC_EVENTS
#: One call's text (see ``wire.pipelines_call``).
call_text = wire.pipelines_call
iso_timestamp = wire.iso_timestamp


class PipelinesClient(HTTPDelivery):
    """Delivers queued calls to the Pipelines API and classifies every answer."""

    batch_route = wire.PIPELINES_BATCH

    def _open(self) -> None:
        settings = self._settings
        base = f"{settings.endpoint.base_url}{settings.endpoint.path}"
        self._url, self._alias_url = f"{base}/batch", f"{base}/alias"
        self._session = build_session(settings, (settings.api_key, ""), self._remember_response)
        self._session.headers["Content-Type"] = "application/json"
        self._session.headers["X-Strict-Mode"] = "1"

    def close(self) -> None:
        super().close()
        self._session.close()

    def _items(self, events: Sequence[QueuedEvent]) -> list[Item | QueuedEvent]:
        items: list[Item | QueuedEvent] = []
        for queued in events:
            if wire.route_of(queued.event, PIPELINES_API) != wire.PIPELINES_BATCH:
                items.append(queued)  # an alias, alone on its route
                continue
            text = wire.pipelines_call(queued.event)
            items.append(Item(queued, text, wire.utf8_size(text)))
        return items

    def _post_batch(self, items: Sequence[Item]) -> requests.Response:
        body = wire.BATCH_OPEN + ",".join(item.wire for item in items) + wire.BATCH_CLOSE
        return self._post(self._url, body)

    def _single_route(self, queued: QueuedEvent) -> str:
        return wire.route_of(queued.event, PIPELINES_API)

    def _post_single(self, queued: QueuedEvent) -> requests.Response:
        return self._post(self._alias_url, wire.pipelines_call(queued.event))

    def _post(self, url: str, body: str) -> requests.Response:
        return self._session.post(
            url, data=body.encode("utf-8"), timeout=self._settings.request_timeout
        )

    def _secrets(self) -> set[str]:
        key = self._settings.api_key
        return {key, base64.b64encode(f"{key}:".encode()).decode("ascii")}
