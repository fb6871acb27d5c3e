"""A child application whose wall clock the parent test steps, run by tests/e2e/test_clock_steps.py.

A real system clock step (NTP, a VM resumed, an operator's ``date -s``) moves
``time.time()`` and ``datetime.now()`` but not ``time.monotonic()``. This app patches
exactly those, in this process only, by an offset the parent sets through stdin, so a
test can step the clock both ways without root and without disturbing the machine.
The handler talks HTTPS to the parent's simulator as in production.

Commands, one a line on stdin; each is answered by one line starting with ``ok``:

* ``step SECONDS``: add SECONDS (negative: back) to the wall clock;
* ``log COUNT [AHEAD]``: log COUNT essential events, their records stamped AHEAD
  seconds after this process's wall clock (as forwarded from a host with a fast clock);
  answers ``ok`` and the ids;
* ``flush``: ``handler.flush()``; answers ``ok SECONDS QUEUED``;
* ``status``: answers ``ok`` and ``handler.status()`` as JSON;
* ``exit``: close the handler and leave.

Usage: python tests/apps/clock_app.py [OPTIONS_JSON]
       (handler options, e.g. '{"reset_timeout": 1}')
       CLOCK_APP_OFFSET=SECONDS in the environment starts the clock that far off.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from typing import Any

# CLOCK_APP_OFFSET: the clock is off by this much from the start (a restart after a step).
_offset = float(os.environ.get("CLOCK_APP_OFFSET", "0"))
_real_time = time.time
_real_time_ns = time.time_ns


def _stepped_time() -> float:
    return _real_time() + _offset


def _stepped_time_ns() -> int:
    return _real_time_ns() + int(_offset * 1e9)


class _SteppedDatetime(dt.datetime):
    """``datetime.now()`` on the stepped clock (pybreaker reads the wall clock this way)."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> _SteppedDatetime:
        return cls.fromtimestamp(_stepped_time(), tz)


# Before anything imports the library: a default argument such as ``clock=time.time``
# keeps the function it found at import.
time.time = _stepped_time
time.time_ns = _stepped_time_ns

import pybreaker  # noqa: E402  # after the patch, see above

from cio_logging import CustomerIOHandler, resilience  # noqa: E402

# pybreaker (and the library, if it does) reads the wall clock as datetime.now().
for _module in (pybreaker, resilience):
    if hasattr(_module, "datetime"):
        setattr(_module, "datetime", _SteppedDatetime)  # noqa: B010  # mypy: no such export


def _answer(*parts: object) -> None:
    sys.stdout.write(" ".join(["ok", *map(str, parts)]) + "\n")
    sys.stdout.flush()


def main() -> int:
    global _offset
    options: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    handler = CustomerIOHandler(**options)
    logger = logging.getLogger("clock.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    number = 0
    _answer("ready")
    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "step":
            _offset += float(arguments[0])
            _answer(_offset)
        elif command == "log":
            ahead = float(arguments[1]) if len(arguments) > 1 else 0.0
            ids = []
            for _ in range(int(arguments[0])):
                record = logger.makeRecord(
                    logger.name, logging.INFO, __file__, 0, "purchase", (), None
                )
                record.created += ahead
                event_id = f"01J{number:023d}"[:26]
                record.cio = {"customer_id": "clock", "id": event_id, "data": {"n": number}}
                number += 1
                logger.handle(record)
                ids.append(event_id)
            _answer(*ids)
        elif command == "flush":
            started = time.monotonic()
            handler.flush()
            _answer(round(time.monotonic() - started, 3), handler.status()["queued"])
        elif command == "status":
            _answer(json.dumps(handler.status()))
        elif command == "exit":
            break
    handler.close()
    _answer("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
