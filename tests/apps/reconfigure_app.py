"""An application that reconfigures logging with ``dictConfig`` again and again.

Frameworks and test suites do this: each call flushes and closes the old handler while
holding logging's module lock. The handler is configured from the environment (see
``child_environment``) plus the options below. Between reconfigurations it logs a
round of events and prints each event's id on stdout, then ``reconfigured SECONDS``
with how long the ``dictConfig`` call took. After the last round it prints
``waiting`` and exits once a line arrives on stdin.

Usage: python tests/apps/reconfigure_app.py ROUNDS EVENTS_PER_ROUND
"""

from __future__ import annotations

import logging
import logging.config
import sys
import time
from typing import Any

from ulid import ULID


def config() -> dict[str, Any]:
    return {
        "version": 1,
        # As Django's default does: the loggers of urllib3 and cio_logging stay enabled.
        "disable_existing_loggers": False,
        "handlers": {
            "console": {"class": "logging.StreamHandler", "level": "ERROR"},
            "cio": {
                "class": "cio_logging.CustomerIOHandler",
                "flush_interval": 0.05,
                "max_backoff": 0.2,
                "max_attempts": 1000,  # nothing may be dead-lettered by the outage
                "reset_timeout": 0.5,
                "request_timeout": 2,
                "flush_timeout": 5,
                "close_timeout": 3,
            },
        },
        "root": {"level": "INFO", "handlers": ["console", "cio"]},
    }


def main() -> int:
    rounds, per_round = int(sys.argv[1]), int(sys.argv[2])
    logging.config.dictConfig(config())
    logger = logging.getLogger("app.events")
    for _ in range(rounds):
        lines = []
        for number in range(per_round):
            event_id = str(ULID())
            logger.info(
                "purchase",
                extra={"cio": {"customer_id": "42", "id": event_id, "data": {"n": number}}},
            )
            lines.append(event_id)
        print("\n".join(lines), flush=True)
        started = time.monotonic()
        logging.config.dictConfig(config())
        print(f"reconfigured {time.monotonic() - started:.3f}", flush=True)
    print("waiting", flush=True)
    sys.stdin.readline()
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
