"""A short-lived script on the fleet store (a cron job, a management command), run as a
subprocess by the fleet exit tests.

It configures a handler from the environment (CIO_LOGGING_QUEUE_URL, CIO_LOGGING_DELIVER),
logs one essential event and COUNT others (committed within commit_interval, so at exit
they are still in memory), prints each id once ``emit`` returned, and ends the way
ENDING says, without calling flush() or close(): ``logging.shutdown()`` at interpreter
exit must commit them.

Usage: python tests/apps/short_script.py COUNT normal|exception|exit
"""

from __future__ import annotations

import logging
import sys

from ulid import ULID

from cio_logging import CustomerIOHandler, cio_event


def main() -> None:
    count, ending = int(sys.argv[1]), sys.argv[2]
    handler = CustomerIOHandler(commit_interval=5.0, database_timeout=2.0)
    logger = logging.getLogger("script.events")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    for number in range(count + 1):
        event_id = str(ULID())
        name = "purchase" if number == 0 else "page_viewed"
        logger.info(name, extra=cio_event("script-user", id=event_id, n=number))
        print(event_id, flush=True)
    if ending == "exception":
        raise RuntimeError("the script failed")
    if ending == "exit":
        sys.exit(3)


if __name__ == "__main__":
    main()
