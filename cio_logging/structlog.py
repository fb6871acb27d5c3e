"""structlog integration: Customer.io events from structlog loggers.

Tag an event as with the standard library, ``log.info("purchase",
extra=cio_event("user-42", amount=9.99))``, or with the tag as a key of its own,
``log.info("purchase", **cio_event("user-42", amount=9.99))``. Each set-up of
structlog's standard-library documentation then delivers it:

- a chain ending in ``structlog.stdlib.render_to_log_kwargs``: as it is; the handler
  reads ``record.cio``, or ``record.extra["cio"]`` for the ``extra=`` style;
- a chain ending in ``structlog.stdlib.ProcessorFormatter.wrap_for_formatter``, with
  ``ProcessorFormatter`` on the standard handlers: as it is; the handler reads the tag
  from the event dict the record carries as its message;
- a chain that renders inside structlog (``structlog.stdlib.LoggerFactory`` with
  ``JSONRenderer``, ``ConsoleRenderer``, ... last): wrap the renderer in
  :class:`CioEventRenderer`, which passes the tag to logging beside the rendered text.
  Without it the tag reaches the handler only as text; the handler cannot read it and
  says so, once per logger.

Needs structlog (``pip install 'cio-logging[structlog]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from structlog.typing import EventDict, Processor, ProcessorReturnValue, WrappedLogger

from .events import EXTRA_KEY

__all__ = ["CioEventRenderer"]


class CioEventRenderer:
    """Render with ``renderer``, and hand the Customer.io tag to logging beside the text.

    The last processor of a chain that renders inside structlog. The tag, from a
    ``cio`` key or from ``extra["cio"]``, is rendered like any other key and also
    passed to the logging call as ``extra={"cio": tag}``, where ``CustomerIOHandler``
    reads it. Its name defaults to the structlog event (``"purchase"``), not to the
    rendered text. An event dict without a tag renders as ``renderer`` alone would.

    Args:
        renderer: the processor that would otherwise end the chain, such as
            ``structlog.processors.JSONRenderer()``. It may return text, a dict of
            keyword arguments or an ``(args, kwargs)`` pair.

    Example::

        structlog.configure(
            processors=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
                CioEventRenderer(structlog.processors.JSONRenderer()),
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
        )
    """

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.renderer!r})"

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> ProcessorReturnValue:
        tag = _find_tag(event_dict)
        event = event_dict.get("event")  # read before the renderer, which may pop it
        rendered = self.renderer(logger, method_name, event_dict)
        if tag is None:
            return rendered
        if isinstance(tag, Mapping) and tag.get("name") is None and event is not None:
            tag = {**tag, "name": str(event)}
        if isinstance(rendered, Mapping):  # keyword arguments for the logging call
            return {**rendered, "extra": {**rendered.get("extra", {}), EXTRA_KEY: tag}}
        if isinstance(rendered, tuple):  # (args, kwargs)
            args, kwargs = rendered
            return args, {**kwargs, "extra": {**kwargs.get("extra", {}), EXTRA_KEY: tag}}
        return (rendered,), {"extra": {EXTRA_KEY: tag}}


def _find_tag(event_dict: EventDict) -> Any:
    tag = event_dict.get(EXTRA_KEY)
    if tag is not None:
        return tag
    extra = event_dict.get("extra")
    if isinstance(extra, Mapping):
        return extra.get(EXTRA_KEY)
    return None
