"""A tiny WSGI application served by gunicorn in tests/e2e/test_servers.py.

Its module level configures a ``CustomerIOHandler`` from the environment, so with
``gunicorn --preload`` the handler, its write-ahead log and maybe its flush thread
exist in the master before it forks the workers. When ``CIO_TEST_MASTER_EVENTS`` is
set, the master also logs that many events at import (the parent's backlog) and
writes their ids, one a line, to ``CIO_TEST_MASTER_IDS``.

Every request logs one essential event ("purchase": its emit returns once it is
committed) and answers ``<event id> <worker pid>``.

``CIO_TEST_HANDLER_OPTIONS`` (JSON) adds constructor options.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ulid import ULID

from cio_logging import CustomerIOHandler

options: dict[str, Any] = {
    "flush_interval": 0.05,
    "max_backoff": 0.2,
    "request_timeout": 2,
    "flush_timeout": 15,
}
options.update(json.loads(os.environ.get("CIO_TEST_HANDLER_OPTIONS", "{}")))
handler = CustomerIOHandler(**options)
logger = logging.getLogger("wsgi_app.events")
logger.setLevel(logging.INFO)
logger.propagate = False
logger.addHandler(handler)

PAUSE = float(os.environ.get("CIO_TEST_REQUEST_PAUSE", "0"))


def log_purchase(who: str, number: int) -> str:
    event_id = str(ULID())
    logger.info(
        "purchase",
        extra={
            "cio": {"customer_id": f"{who}-{os.getpid()}", "id": event_id, "data": {"n": number}}
        },
    )
    return event_id


_master_ids = [
    log_purchase("master", n) for n in range(int(os.environ.get("CIO_TEST_MASTER_EVENTS", "0")))
]
if "CIO_TEST_MASTER_IDS" in os.environ:
    Path(os.environ["CIO_TEST_MASTER_IDS"]).write_text("".join(f"{i}\n" for i in _master_ids))

_served = 0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    global _served
    _served += 1
    event_id = log_purchase("worker", _served)
    if PAUSE:
        time.sleep(PAUSE)  # spread concurrent requests over every worker
    body = f"{event_id} {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
