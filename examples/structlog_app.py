"""Customer.io events from structlog, in each set-up of structlog's standard-library docs.

    export CUSTOMERIO_SITE_ID=... CUSTOMERIO_API_KEY=...
    python examples/structlog_app.py render_to_log_kwargs   # or processor_formatter, renderer

Needs ``pip install 'cio-logging[structlog]'``.
"""

from __future__ import annotations

import logging
import sys

import structlog

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.structlog import CioEventRenderer

SHARED: list[structlog.typing.Processor] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
]


def configure(setup: str) -> None:
    console = logging.StreamHandler()
    if setup == "render_to_log_kwargs":  # logging formats: structlog hands over msg and extra
        last: structlog.typing.Processor = structlog.stdlib.render_to_log_kwargs
    elif setup == "processor_formatter":  # structlog formats, inside logging's handlers
        last = structlog.stdlib.ProcessorFormatter.wrap_for_formatter
        console.setFormatter(
            structlog.stdlib.ProcessorFormatter(processor=structlog.dev.ConsoleRenderer())
        )
    elif setup == "renderer":  # structlog renders; wrap the renderer so the tag gets through
        last = CioEventRenderer(structlog.processors.JSONRenderer())
    else:
        raise SystemExit(f"unknown set-up {setup!r}")
    logging.basicConfig(level=logging.INFO, handlers=[console])
    logging.getLogger("app.events").addHandler(CustomerIOHandler())  # from the environment
    structlog.configure(
        processors=[*SHARED, last],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def main() -> None:
    configure(sys.argv[1] if len(sys.argv) > 1 else "renderer")
    log = structlog.get_logger("app.events")
    log.info("signup", extra=cio_event("user-42", plan="pro"))  # the README's style
    log.info("purchase", **cio_event("user-42", amount=9.99))  # or the tag as a key
    log.info("an ordinary structlog line: not an event", user="user-42")


if __name__ == "__main__":
    main()
