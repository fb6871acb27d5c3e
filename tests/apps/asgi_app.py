"""A bare ASGI application served by ``uvicorn --workers 2`` in tests/e2e/test_servers.py.

uvicorn starts its workers with multiprocessing's spawn method: each imports this
module and so configures its own ``CustomerIOHandler`` from the environment. A worker
that uvicorn stops (SIGTERM to the supervisor) finishes its requests and exits through
the interpreter's normal shutdown, where ``logging.shutdown`` closes the handler.

Every request logs one essential event ("purchase": its emit returns once it is
committed) and answers ``<event id> <worker pid>``, as tests/apps/wsgi_app.py does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ulid import ULID

from cio_logging import CustomerIOHandler

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

options: dict[str, Any] = {
    "flush_interval": 0.05,
    "max_backoff": 0.2,
    "request_timeout": 2,
    "flush_timeout": 15,
}
options.update(json.loads(os.environ.get("CIO_TEST_HANDLER_OPTIONS", "{}")))
logger = logging.getLogger("asgi_app.events")
logger.setLevel(logging.INFO)
logger.propagate = False
handler = CustomerIOHandler(**options)
logger.addHandler(handler)
EVENT_NAME = os.environ.get("CIO_TEST_EVENT_NAME", "purchase")
SLOW_SECONDS = float(os.environ.get("CIO_TEST_SLOW_SECONDS", "1"))
FLUSH_ON_SHUTDOWN = os.environ.get("CIO_TEST_FLUSH_ON_SHUTDOWN") == "1"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if FLUSH_ON_SHUTDOWN:
                    handler.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        print("slow request started", file=sys.stderr, flush=True)
        await asyncio.sleep(SLOW_SECONDS)
    event_id = str(ULID())
    person = scope["query_string"].decode() or f"worker-{os.getpid()}"
    # An essential event is committed to disk by emit, on the event loop's thread.
    logger.info(EVENT_NAME, extra={"cio": {"customer_id": person, "id": event_id}})
    body = f"{event_id} {os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
