"""The clients: what turns queued calls into HTTP requests and answers into reports.

::

    transport/__init__.py   make_client: the client of the API the settings name
    transport/base.py       HTTPDelivery: session, rate cap, breaker, span, bisection,
                            failures in words safe to log
    transport/batching.py   byte limits and the request plan (a person's order kept)
    transport/track.py      the Track API (v2 batches, v1 singles) through the SDK
    transport/pipelines.py  the Data Pipelines API (/v1/batch, strict mode)

The API modules import the base; the base imports neither of them; this module imports
all three. Nothing here imports the sender.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import PIPELINES, Settings
from ..resilience import DeliveryBreaker, RequestRateCap
from ..telemetry import Telemetry
from .base import (
    AUTH,
    CONFIG,
    NOT_SENT,
    PAYLOAD,
    TRANSIENT,
    DeliveryClient,
    DeliveryReport,
    Failure,
    HTTPDelivery,
)
from .pipelines import PipelinesClient
from .track import TrackClient

__all__ = [
    "AUTH",
    "CONFIG",
    "NOT_SENT",
    "PAYLOAD",
    "TRANSIENT",
    "DeliveryClient",
    "DeliveryReport",
    "Failure",
    "HTTPDelivery",
    "PipelinesClient",
    "TrackClient",
    "make_client",
]


def make_client(
    settings: Settings,
    *,
    breaker: DeliveryBreaker | None = None,
    rate_cap: RequestRateCap | None = None,
    telemetry: Telemetry | None = None,
    thread_initializer: Callable[[], None] | None = None,
) -> HTTPDelivery:
    """The client of the API the settings name."""
    client = PipelinesClient if settings.api == PIPELINES else TrackClient
    return client(
        settings,
        breaker=breaker,
        rate_cap=rate_cap,
        telemetry=telemetry,
        thread_initializer=thread_initializer,
    )
