"""The sender: reads the queue, delivers, and writes down what each answer meant.

::

    loop.py      Sender: the thread (or the calling thread at exit), waking, the right
                 to send, the in-flight window; decides nothing
    plan.py      which calls may go now: the store's batch query, the few calls Python
                 must look at, the requests a batch is cut into (a person's order kept)
    exchange.py  one batch's requests and answers: sends, asks the outcome policy,
                 splits as told
    outcome.py   decide(answer) -> Decision: deliver, split, reject, retry, pause,
                 not sent; pure
    effects.py   the one place that writes decisions into the stores, the holds and
                 the counters
    state.py     holds and counters, and the state record (state.json or the fleet's row)
    upkeep.py    clock steps, the fleet's spill, recovery of a damaged file, old rows

``dlq replay`` puts dead letters back in the queue and ``drain`` runs a sender, so both
go through these same stages and rules. See ``docs/explanation/architecture.md``.
"""

from __future__ import annotations

from .loop import Sender, SenderLock, flush_thread_marker
from .state import DeliveryStats, Hold, StateFile, StateRecord

__all__ = [
    "DeliveryStats",
    "Hold",
    "Sender",
    "SenderLock",
    "StateFile",
    "StateRecord",
    "flush_thread_marker",
]
