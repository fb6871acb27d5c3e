"""The clients: what turns queued calls into HTTP requests and answers into reports.

::

    transport/__init__.py   make_client: the client of the API the settings name
    transport/answer.py     Answer: what one request came back with
    transport/base.py       HTTPDelivery: session, rate cap, span, answers read into
                            words safe to log (the proxy named when one is in use)
    transport/batching.py   byte limits and the request plan (a person's order kept)
    transport/track.py      the Track API (v2 batches, v1 singles) through the SDK
    transport/pipelines.py  the Data Pipelines API (/v1/batch, strict mode)

The API modules import the base; the base imports neither of them; this module imports
all three. Nothing here imports the sender.
"""

from __future__ import annotations

from ..config import PIPELINES, Settings
from ..resilience import RequestRateCap
from ..telemetry import Telemetry
from .answer import Answer
from .base import DeliveryClient, HTTPDelivery
from .pipelines import PipelinesClient
from .track import TrackClient

__all__ = [
    "Answer",
    "DeliveryClient",
    "HTTPDelivery",
    "PipelinesClient",
    "TrackClient",
    "make_client",
]


def make_client(
    settings: Settings,
    *,
    rate_cap: RequestRateCap | None = None,
    telemetry: Telemetry | None = None,
) -> HTTPDelivery:
    """The client of the API the settings name."""
    client = PipelinesClient if settings.api == PIPELINES else TrackClient
    return client(settings, rate_cap=rate_cap, telemetry=telemetry)
