"""An application that logs each person's calls in a known order, for the order test.

Person ``p-N`` gets an identify, three events and (every tenth person) a delete, the
people interleaved at random (seeded), so requests carry many people at once. Each
call carries its own id in its data as ``ref`` (a Track API identify or delete has no
id field on the wire; the data says which call arrived). A call's line
``<person> <call> <ref>`` is printed once its emit returned: every call here is essential
(person calls always are; the events are named in ``essential_events``), so it is on
disk by then.

Usage: python tests/apps/order_app.py PEOPLE SEED [PAUSE]  (seconds between calls)
"""

from __future__ import annotations

import logging
import random
import sys
import time

from cio_logging import CustomerIOHandler, cio_delete, cio_event, cio_identify
from cio_logging.events import new_event_id


def main() -> int:
    people, seed = int(sys.argv[1]), int(sys.argv[2])
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    handler = CustomerIOHandler(
        essential_events=["step"],
        max_in_flight=4,
        batch_size=50,
        flush_interval=0.05,
        max_backoff=0.2,
        reset_timeout=0.5,
        max_attempts=1000,
        request_timeout=5,
    )
    logger = logging.getLogger("order.app")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    plans = {
        f"p-{number}": ["identify", "step", "step", "step"]
        + (["delete"] if number % 10 == 0 else [])
        for number in range(people)
    }
    rng = random.Random(seed)
    order = [person for person, calls in plans.items() for _ in calls]
    rng.shuffle(order)  # each person's calls keep their order; people interleave
    position = dict.fromkeys(plans, 0)
    print("ready", flush=True)
    for person in order:
        call = plans[person][position[person]]
        position[person] += 1
        ref = new_event_id()
        if call == "identify":
            extra = cio_identify(person, id=ref, ref=ref, plan="trial")
        elif call == "delete":
            extra = cio_delete(person, id=ref)
        else:
            extra = cio_event(person, id=ref, ref=ref)
        logger.info(call, extra=extra)
        sys.stdout.write(f"{person} {call} {ref}\n")
        sys.stdout.flush()
        if pause:
            time.sleep(pause)
    print("done", flush=True)
    handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
