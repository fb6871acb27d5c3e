"""A bare ASGI application served by ``uvicorn --workers 2`` in tests/e2e/test_servers.py.

uvicorn starts its workers with multiprocessing's spawn method: each imports this
module and so configures its own ``CustomerIOHandler`` from the environment. A worker
that uvicorn stops (SIGTERM to the supervisor) finishes its requests and exits through
the interpreter's normal shutdown, where ``logging.shutdown`` closes the handler.

Every request logs one essential event ("purchase": its emit returns once it is
committed) and answers ``<event id> <worker pid>``, as tests/apps/wsgi_app.py does.
"""

from __future__ import annotations

import json
import logging
import os
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
logger.addHandler(CustomerIOHandler(**options))


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    event_id = str(ULID())
    # An essential event: emit commits it to disk on this (the event loop's) thread.
    logger.info("purchase", extra={"cio": {"customer_id": f"worker-{os.getpid()}", "id": event_id}})
    body = f"{event_id} {os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
