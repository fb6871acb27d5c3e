"""Grouping calls into requests: sizes, batch length, and each person's order.

What both APIs share about batching: the byte limits of a batch request and of one
call in it, and the plan that fills requests in order so a person's calls keep the
order they were read in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .. import wire
from ..store import QueuedEvent

#: A request body must be smaller than this (see ``wire``: the one rule both APIs share).
MAX_BATCH_BYTES = wire.REQUEST_BYTES_LIMIT
MAX_ITEM_BYTES = wire.MAX_CALL_BYTES
# What the items of a batch may take, each counted with the comma before it: the body
# is {"batch":[ + items + ]}, so with `used` bytes of items and commas it is
# used - 1 + 12 bytes, under MAX_BATCH_BYTES exactly while used <= this budget.
BATCH_BUDGET = MAX_BATCH_BYTES - wire.BATCH_FRAME_BYTES


class Item(NamedTuple):
    """One call of a batch request: the queued call, its wire form, its size in bytes."""

    queued: QueuedEvent
    wire: Any
    size: int


class PlannedRequest(NamedTuple):
    """A batch of items, or (``single``) one call sent on its own route."""

    single: bool
    items: list[Item]


def plan_requests(
    batchable: Sequence[Item | QueuedEvent], max_items: int, budget: int = BATCH_BUDGET
) -> list[PlannedRequest]:
    """Group calls into requests sent one after another, keeping each person's order.

    ``batchable`` is in the order the calls were read; an :class:`Item` can go in a
    batch, a bare :class:`QueuedEvent` goes alone (a route batches cannot carry).
    Batches fill in order; a single for a person who has a call in the batch being
    filled closes that batch first, so it goes after the person's earlier calls and
    before their later ones. Other people's calls are not held up by it.
    """
    planned: list[PlannedRequest] = []
    current: list[Item] = []
    people: set[str] = set()
    used = 0
    for entry in batchable:
        if isinstance(entry, Item):
            if current and (used + entry.size + 1 > budget or len(current) >= max_items):
                planned.append(PlannedRequest(False, current))
                current, people, used = [], set(), 0
            current.append(entry)
            people.add(entry.queued.event.person)
            used += entry.size + 1
            continue
        if entry.event.person in people:
            planned.append(PlannedRequest(False, current))
            current, people, used = [], set(), 0
        planned.append(PlannedRequest(True, [Item(entry, None, 0)]))
    if current:
        planned.append(PlannedRequest(False, current))
    return planned
