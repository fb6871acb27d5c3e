"""Finishing what must not be left half done when an interrupt arrives.

Python runs a signal handler on the main thread between two bytecodes, and whatever it
raises (KeyboardInterrupt for SIGINT, SystemExit from a handler calling ``sys.exit``)
surfaces there, even while a lock is being acquired. Code that resets a flag or rolls
back a transaction in a ``finally`` can itself be interrupted halfway; this runs such
an action to its end and only then lets the interrupt go on.
"""

from __future__ import annotations

from collections.abc import Callable

# How often an action is tried through a storm of interrupts. A real exception from
# the action (not an interrupt) would repeat on every try: the bound keeps it finite.
_TRIES = 100


def run_through_interrupts(action: Callable[[], None]) -> None:
    """Run ``action`` until it completes once, then raise the first interrupt met.

    ``action`` must be safe to run again after being cut short (idempotent), as
    resetting a flag or rolling back an open transaction is.
    """
    interrupt: BaseException | None = None
    for _ in range(_TRIES):
        try:
            action()
            break
        except BaseException as exc:  # KeyboardInterrupt, SystemExit from a signal handler
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt
