"""A function runtime, imitated: run by tests/e2e/test_serverless.py.

Like AWS Lambda's runtime, the process lives across invocations: it builds the handler
once, then reads one invocation a line on stdin (``invoke COUNT [raise]``), calls the
function with an event and a context, and answers ``returned ID ID ...`` on stdout
with the ids of the events the invocation logged (each acknowledged: its ``emit``
returned). The test freezes the process (SIGSTOP) as soon as it reads the answer, as
the platform does when the function returns, and later thaws it or kills it.

Every other event is non-essential ("page_viewed": buffered in memory until the commit
interval passes), the others essential ("purchase"). With ``raise`` the function raises
after logging (the runtime reports the error and goes on).

``wrapped``: the function is decorated with ``deliver_before_return(handler,
budget=CIO_TEST_BUDGET)``. ``flush-at-end``: it calls ``handler.flush()`` as its last
statement instead, so an invocation that raises returns without it.

``CIO_TEST_HANDLER_OPTIONS`` (JSON) adds handler options.

Usage: python tests/apps/serverless_app.py wrapped|flush-at-end
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ulid import ULID

from cio_logging import CustomerIOHandler
from cio_logging.serverless import deliver_before_return

BUDGET = float(os.environ.get("CIO_TEST_BUDGET", "5"))
#: How long each invocation may run in all, as a platform's timeout would say.
FUNCTION_TIMEOUT_MS = 30_000

options: dict[str, Any] = {"flush_interval": 0.05, "max_backoff": 0.2, "request_timeout": 2}
options.update(json.loads(os.environ.get("CIO_TEST_HANDLER_OPTIONS", "{}")))
handler = CustomerIOHandler(**options)
events = logging.getLogger("serverless.events")
events.setLevel(logging.INFO)
events.propagate = False
events.addHandler(handler)


class Context:
    """The part of AWS Lambda's context object the wrapper reads."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def get_remaining_time_in_millis(self) -> int:
        return int(FUNCTION_TIMEOUT_MS - (time.monotonic() - self._started) * 1000)


def function_body(event: dict[str, Any], logged: list[str]) -> None:
    for number in range(event["count"]):
        event_id = str(ULID())
        name = "page_viewed" if number % 2 else "purchase"
        events.info(name, extra={"cio": {"customer_id": "lambda-user", "id": event_id, "data": {}}})
        logged.append(event_id)
    if event["raise"]:
        raise RuntimeError("the function failed")


def make_function(mode: str) -> Callable[[dict[str, Any], Context], None]:
    if mode == "wrapped":

        @deliver_before_return(handler, budget=BUDGET)
        def wrapped(event: dict[str, Any], context: Context) -> None:
            function_body(event, event["logged"])

        return wrapped

    def flush_at_end(event: dict[str, Any], context: Context) -> None:
        function_body(event, event["logged"])
        handler.flush()

    return flush_at_end


def main() -> None:
    function = make_function(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        logged: list[str] = []
        event = {"count": int(words[1]), "raise": "raise" in words, "logged": logged}
        # The runtime reports a failed invocation and waits for the next.
        with contextlib.suppress(RuntimeError):
            function(event, Context())
        print("returned", *logged, flush=True)


if __name__ == "__main__":
    main()
