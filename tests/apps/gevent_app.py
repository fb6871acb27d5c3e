"""A WSGI application served by ``gunicorn -k gevent`` in tests/e2e/test_gevent.py.

gunicorn's gevent worker monkey-patches the process (``gevent.monkey.patch_all()``)
before it imports this module, so the handler's commit and flush threads are greenlets
on the worker's hub, and its locks and sleeps are gevent's.

Every request logs one non-essential event ("page_viewed": buffered, committed by the
commit greenlet) and answers ``<event id> <worker pid>``. A ticker greenlet sleeps 1 ms
at a time and records the gaps between its wake-ups: any stretch in which something
kept the hub (a commit, a read of the queue, a request) shows as a long gap. At exit
(``atexit``, before ``logging.shutdown()``) each worker writes the gaps it saw, as JSON,
to ``CIO_TEST_TICKS_DIR/<pid>.json``. With ``CIO_TEST_LOG_EVENTS=0`` requests log
nothing: the same server's gaps without the handler at work, to compare with.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ulid import ULID

from cio_logging import CustomerIOHandler

handler = CustomerIOHandler(flush_interval=0.05, max_backoff=0.2, request_timeout=2)
logger = logging.getLogger("gevent_app.events")
logger.setLevel(logging.INFO)
logger.propagate = False
logger.addHandler(handler)

_gaps: list[float] = []
_ticking = True


def _tick() -> None:
    last = time.perf_counter()
    while _ticking:
        time.sleep(0.001)  # gevent's sleep: yields to the hub
        now = time.perf_counter()
        _gaps.append(now - last)
        last = now


def _report_gaps() -> None:
    global _ticking
    _ticking = False
    gaps = sorted(_gaps)
    report = {
        "pid": os.getpid(),
        "ticks": len(gaps),
        "max_ms": 1000 * gaps[-1] if gaps else None,
        "p99_ms": 1000 * gaps[int(len(gaps) * 0.99)] if gaps else None,
        "over_20ms": sum(1 for gap in gaps if gap > 0.020),
        "patched": type(threading.Lock()).__module__,
    }
    Path(os.environ["CIO_TEST_TICKS_DIR"], f"{os.getpid()}.json").write_text(json.dumps(report))


threading.Thread(target=_tick, name="ticker", daemon=True).start()
atexit.register(_report_gaps)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
LOG_EVENTS = os.environ.get("CIO_TEST_LOG_EVENTS", "1") == "1"


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    event_id = str(ULID())
    if LOG_EVENTS:
        logger.info(
            "page_viewed", extra={"cio": {"customer_id": f"worker-{os.getpid()}", "id": event_id}}
        )
    body = f"{event_id} {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
