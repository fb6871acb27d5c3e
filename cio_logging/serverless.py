"""Serverless functions: every event on disk, and delivered within a budget, before the
invocation returns.

A function platform (AWS Lambda and the like) freezes the process as soon as an
invocation returns, and later thaws it for the next one or recycles it without a
signal. Nothing runs while it is frozen, the commit and flush threads included, and
``atexit`` never runs. So the handler's background work must be done before the
invocation returns, on the invocation's own time::

    handler = CustomerIOHandler()
    logging.getLogger("shop.events").addHandler(handler)

    @deliver_before_return(handler, budget=2.0)
    def lambda_handler(event, context):
        ...

or, around any block, ``with deliver_before_return(handler): ...``. When the function
returns or raises, every event it logged is committed, then delivered for at most
``budget`` seconds (less if the platform's ``context`` says the invocation has less
time left). What the budget could not send stays queued: in ``queue_dir`` a later
invocation of the same instance sends it; in the fleet store (``queue_url``) any
process of the fleet does, after the instance is gone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .handler import CustomerIOHandler

__all__ = ["deliver_before_return"]

P = ParamSpec("P")
R = TypeVar("R")

#: The platform's own timeout must not be reached by our delivery: leave this much.
SAFETY_MARGIN_SECONDS = 0.5

internal_log = logging.getLogger("cio_logging")


class deliver_before_return:  # noqa: N801 (used as a decorator and a context manager)
    """Commit and deliver before an invocation returns (a decorator or a context manager).

    Args:
        handlers: the handler, or handlers, to flush.
        budget: the longest the delivery may take, in seconds, after the function
            returned or raised. When a positional argument of the decorated function has
            ``get_remaining_time_in_millis()`` (AWS Lambda's context), the budget is cut
            to what the invocation has left, less a safety margin.

    After each invocation :attr:`delivered` says whether everything the process logged
    was delivered (or cannot go now: a retry due later, the breaker open) within the
    budget; what was not waits on disk or in the fleet store. Nothing here ever raises
    into the function's caller, and an exception the function raised goes on as it was.
    """

    def __init__(
        self,
        handlers: CustomerIOHandler | Iterable[CustomerIOHandler],
        *,
        budget: float = 2.0,
    ) -> None:
        if isinstance(handlers, CustomerIOHandler):
            handlers = [handlers]
        self._handlers = list(handlers)
        if budget < 0:
            raise ValueError(f"budget must be at least 0, not {budget!r}")
        self._budget = budget
        self._remaining: Callable[[], float] | None = None
        #: Whether the last invocation delivered everything within its budget.
        self.delivered: bool | None = None

    def __enter__(self) -> deliver_before_return:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.delivered = self._deliver()

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def invocation(*args: P.args, **kwargs: P.kwargs) -> R:
            context = next((a for a in args if hasattr(a, "get_remaining_time_in_millis")), None)
            try:
                return function(*args, **kwargs)
            finally:
                self.delivered = self._deliver(context)

        return invocation

    def _deliver(self, context: Any = None) -> bool:
        budget = self._budget
        if context is not None:
            try:
                left = float(context.get_remaining_time_in_millis()) / 1000.0
            except Exception:  # a context of another shape: keep the budget given
                left = budget + SAFETY_MARGIN_SECONDS
            budget = max(0.0, min(budget, left - SAFETY_MARGIN_SECONDS))
        deadline = time.monotonic() + budget
        delivered = True
        for handler in self._handlers:
            try:
                remaining = max(0.0, deadline - time.monotonic())
                delivered = handler.deliver_within(remaining) and delivered
            except Exception:  # never into the function's caller
                internal_log.exception("delivering before the invocation returned failed")
                delivered = False
        return delivered
