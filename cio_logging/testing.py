"""Helpers for an application's own tests: the events a block of code logged, and a
Track API simulator to deliver them to.

::

    from cio_logging.testing import capture_cio_events

    def test_checkout_logs_a_purchase() -> None:
        with capture_cio_events() as captured:
            checkout("user-42", amount=9.99)
        assert [(e.name, e.customer_id, e.data) for e in captured.events] == [
            ("purchase", "user-42", {"amount": 9.99})
        ]
        assert captured.refusals == []

:func:`capture_cio_events` runs the handler's own mapping and validation on every
record, so an event it accepts is one ``CustomerIOHandler`` would queue, and a record
it refuses is one the handler would refuse (with the same message). With pytest, the
plugin installed by the ``testing`` extra adds the ``cio_simulator`` fixture, a
:class:`CioSimulator`: the real HTTPS simulator, for tests that deliver end to end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import ENV_API_KEY, ENV_CA_BUNDLE, ENV_QUEUE_DIR, ENV_SITE_ID, ENV_TRACK_URL
from .errors import InvalidEventError, UnreadableTagError
from .events import EXTRA_KEY, TRACK_API, Event, carries_tag
from .handler import CustomerIOHandler
from .wire import call_from_record

if TYPE_CHECKING:
    from .simulator import AcceptedEvent, TrackAPISimulator

__all__ = ["CapturedEvents", "CioSimulator", "Event", "Refusal", "capture_cio_events"]


class Refusal(NamedTuple):
    """A tagged record the handler would refuse, and why (its warning's reason)."""

    record: logging.LogRecord
    reason: str
    #: For a tag the handler cannot read at all: its shape (``"rendered"``, ``"args"``).
    shape: str | None = None


class CapturedEvents:
    """What the records logged inside `capture_cio_events` would have become."""

    def __init__(self) -> None:
        #: The events the handler would queue, in the order they were logged.
        self.events: list[Event] = []
        #: The tagged records it would refuse, with the reason.
        self.refusals: list[Refusal] = []

    @property
    def names(self) -> list[str]:
        """The names of :attr:`events`, in order."""
        return [event.name for event in self.events]

    def __repr__(self) -> str:
        return f"<CapturedEvents events={self.names!r} refusals={len(self.refusals)}>"


class _CapturingHandler(logging.Handler):
    """Maps and validates records as ``CustomerIOHandler`` does, and keeps the outcome."""

    def __init__(self, captured: CapturedEvents, api: str) -> None:
        super().__init__(logging.NOTSET)
        self.captured, self.api = captured, api

    def handle(self, record: logging.LogRecord) -> Any:
        # CustomerIOHandler.handle's own test: the same records reach emit.
        if EXTRA_KEY not in record.__dict__ and not carries_tag(record):
            return False
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = call_from_record(record, self.api)
        except UnreadableTagError as exc:
            self.captured.refusals.append(Refusal(record, str(exc), exc.shape))
        except InvalidEventError as exc:
            self.captured.refusals.append(Refusal(record, str(exc)))
        else:
            if event is not None:
                self.captured.events.append(event)


@contextmanager
def capture_cio_events(
    logger: str | logging.Logger | None = None,
    *,
    level: int | str | None = None,
    api: str = TRACK_API,
) -> Iterator[CapturedEvents]:
    """Capture the Customer.io events logged inside the ``with`` block.

    A handler is attached to ``logger`` for the block and removed after it. Nothing is
    sent anywhere, and the application's own handlers still run.

    Args:
        logger: the logger (or its name) to capture at; default the root logger. A
            record reaches it as it would reach a handler attached there: records of a
            logger with ``propagate = False`` are captured only at that logger or below.
        level: if given, the logger's level for the block (restored after). By
            default levels are left alone, so a record the application's logging
            configuration would drop (``log.info`` under a WARNING root) is not
            captured, just as it would not be sent.
        api: the API the application's handler speaks (``"track"`` or
            ``"pipelines"``): what one carries the other may refuse (a merge, a
            group), and their limits are counted on their own bytes.

    Yields:
        A `CapturedEvents`, filled as records are logged.
    """
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
    captured = CapturedEvents()
    handler = _CapturingHandler(captured, api)
    saved_level = target.level
    if level is not None:
        target.setLevel(level)
    target.addHandler(handler)
    try:
        yield captured
    finally:
        target.removeHandler(handler)
        if level is not None:
            target.setLevel(saved_level)


def simulator_handler_settings(
    simulator: TrackAPISimulator, queue_dir: str | os.PathLike[str], **options: Any
) -> dict[str, Any]:
    """``CustomerIOHandler`` keyword arguments that deliver to ``simulator``, quickly
    (short intervals and timeouts), with the queue in ``queue_dir``; ``options`` are
    added to (or replace) them."""
    settings: dict[str, Any] = {
        "site_id": simulator.site_id,
        "api_key": simulator.api_key,
        "track_url": simulator.url,
        "ca_bundle": simulator.ca_file,
        "queue_dir": str(queue_dir),
        "flush_interval": 0.05,
        "max_backoff": 0.2,
        "request_timeout": 2.0,
        "flush_timeout": 10.0,
    }
    settings.update(options)
    return settings


class CioSimulator:
    """A running Track API simulator (real HTTPS on loopback) and how to point a handler at it.

    The ``cio_simulator`` fixture yields one; outside pytest, use it as a context
    manager: ``with CioSimulator(tmp_dir) as sim: ...``. Needs trustme (the
    ``testing`` or ``simulator`` extra).

    Args:
        directory: where the simulator keeps its CA and the handlers their queue.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from .simulator import TrackAPISimulator  # needs trustme, which only this needs

        directory = Path(directory)
        #: The queue directory handlers built by `handler()` share.
        self.queue_dir = directory / "queue"
        #: The simulator itself: faults (``fail``, ``set_latency``, ...) and its records.
        self.simulator: TrackAPISimulator = TrackAPISimulator(state_dir=directory / "simulator")
        self._handlers: list[CustomerIOHandler] = []
        self.simulator.start()

    def __enter__(self) -> CioSimulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The Track API base URL (``track_url``)."""
        return self.simulator.url

    @property
    def ca_file(self) -> str:
        """The PEM file of the CA that signed its certificate (``ca_bundle``)."""
        return self.simulator.ca_file

    @property
    def site_id(self) -> str:
        return self.simulator.site_id

    @property
    def api_key(self) -> str:
        return self.simulator.api_key

    @property
    def events(self) -> list[AcceptedEvent]:
        """The calls it accepted so far, events and person calls alike (each with its
        ``call`` and ``api``; a duplicate id is recorded once)."""
        return self.simulator.accepted

    def history(self, person: str) -> list[AcceptedEvent]:
        """One person's accepted calls (by customer id or anonymous id), in order."""
        return self.simulator.history(person)

    def wait_for_events(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` events were accepted; False on timeout."""
        return self.simulator.wait_for_events(count, timeout)

    def handler_settings(self, **options: Any) -> dict[str, Any]:
        """``CustomerIOHandler`` keyword arguments that deliver here, quickly.

        ``options`` are added to (or replace) them, as in ``handler_settings(batch_size=10)``.
        """
        return simulator_handler_settings(self.simulator, self.queue_dir, **options)

    def environ(self) -> dict[str, str]:
        """The environment variables that point a handler configured from them here.

        For an application that builds its handler through ``dictConfig`` or a
        framework's settings: set them (``monkeypatch.setenv``) before it configures
        logging, or pass them to a subprocess.
        """
        return {
            ENV_SITE_ID: self.site_id,
            ENV_API_KEY: self.api_key,
            ENV_TRACK_URL: self.url,
            ENV_CA_BUNDLE: self.ca_file,
            ENV_QUEUE_DIR: str(self.queue_dir),
        }

    def handler(self, **options: Any) -> CustomerIOHandler:
        """A ``CustomerIOHandler`` that delivers here; closed by `close()`."""
        handler = CustomerIOHandler(**self.handler_settings(**options))
        self._handlers.append(handler)
        return handler

    def close(self) -> None:
        """Close the handlers built here, then stop the simulator."""
        handlers, self._handlers = self._handlers, []
        for handler in handlers:
            for logger in [logging.getLogger(), *_loggers()]:
                if handler in logger.handlers:
                    logger.removeHandler(handler)
            handler.close()
        self.simulator.close()


def _loggers() -> list[logging.Logger]:
    return [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
