"""structlog's standard-library set-ups deliver tagged events, with the real structlog."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import queue
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator
from cio_logging.structlog import CioEventRenderer

from ..helpers import PROJECT_ROOT, PYTHON, HandlerFactory, child_environment

#: The processors structlog's documentation puts before the last one.
USUAL_CHAIN: list[structlog.typing.Processor] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
    structlog.processors.UnicodeDecoder(),
]


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def stdlib_logger(handler: logging.Handler, *others: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.structlog.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for other in others:
        logger.addHandler(other)
    logger.addHandler(handler)
    return logger


def configure(last: structlog.typing.Processor) -> None:
    structlog.configure(
        processors=[*USUAL_CHAIN, last],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def delivered(handler: CustomerIOHandler, simulator: TrackAPISimulator) -> list[tuple[str, str]]:
    handler.flush()
    return sorted((e.name, str(e.customer_id)) for e in simulator.accepted)


def log_both_styles(name: str) -> None:
    log = structlog.get_logger(name)
    log.info("purchase", extra=cio_event("user-1", amount=5))  # the README's style
    log.info("signup", **cio_event("user-2", plan="pro"))  # the tag as a key of its own
    log.info("just a log line", user="user-3")  # untagged: not an event


class TestRenderToLogKwargs:
    """A chain ending in render_to_log_kwargs (or render_to_log_args_and_kwargs)."""

    @pytest.mark.parametrize(
        "last",
        [structlog.stdlib.render_to_log_kwargs, structlog.stdlib.render_to_log_args_and_kwargs],
        ids=["kwargs", "args-and-kwargs"],
    )
    def test_both_styles_deliver(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        last: structlog.typing.Processor,
    ) -> None:
        handler = make_handler()
        logger = stdlib_logger(handler)
        configure(last)
        log_both_styles(logger.name)
        assert delivered(handler, simulator) == [("purchase", "user-1"), ("signup", "user-2")]
        by_name = {e.name: e.data for e in simulator.accepted}
        assert by_name == {"purchase": {"amount": 5}, "signup": {"plan": "pro"}}
        assert handler.status()["dropped"] == {}


class TestProcessorFormatter:
    """A chain ending in ProcessorFormatter.wrap_for_formatter, rendered by stdlib handlers."""

    def test_both_styles_deliver_and_the_console_still_renders(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        console = io.StringIO()
        stream = logging.StreamHandler(console)
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                ]
            )
        )
        logger = stdlib_logger(handler, stream)
        configure(structlog.stdlib.ProcessorFormatter.wrap_for_formatter)
        log_both_styles(logger.name)
        assert delivered(handler, simulator) == [("purchase", "user-1"), ("signup", "user-2")]
        lines = [json.loads(line) for line in console.getvalue().splitlines()]
        assert [line["event"] for line in lines] == ["purchase", "signup", "just a log line"]

    def test_a_foreign_stdlib_record_still_delivers(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        stream = logging.StreamHandler(io.StringIO())
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(processor=structlog.dev.ConsoleRenderer())
        )
        logger = stdlib_logger(handler, stream)
        configure(structlog.stdlib.ProcessorFormatter.wrap_for_formatter)
        logger.info("purchase", extra=cio_event("user-1"))
        assert delivered(handler, simulator) == [("purchase", "user-1")]


class TestBehindAQueueHandler:
    """A QueueHandler formats the event dict into text before the listener's handlers see it."""

    def run_through_a_queue(
        self, handler: CustomerIOHandler, last: structlog.typing.Processor
    ) -> None:
        records: queue.Queue[logging.LogRecord] = queue.Queue()
        logger = stdlib_logger(logging.handlers.QueueHandler(records))
        listener = logging.handlers.QueueListener(records, handler)
        configure(last)
        listener.start()
        try:
            log_both_styles(logger.name)
        finally:
            listener.stop()

    def test_the_wrapped_last_processor_delivers(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        self.run_through_a_queue(
            handler, CioEventRenderer(structlog.stdlib.ProcessorFormatter.wrap_for_formatter)
        )
        assert delivered(handler, simulator) == [("purchase", "user-1"), ("signup", "user-2")]

    def test_unwrapped_it_is_reported_not_silently_dropped(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        handler = make_handler()
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            self.run_through_a_queue(
                handler, structlog.stdlib.ProcessorFormatter.wrap_for_formatter
            )
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert "QueueHandler" in warning
        assert handler.status()["dropped"] == {"unreadable_tag": 2}
        assert delivered(handler, simulator) == []


class TestRenderingWithinStructlog:
    """structlog.stdlib.LoggerFactory and BoundLogger, a renderer last."""

    @pytest.mark.parametrize(
        "renderer",
        [
            structlog.processors.JSONRenderer(),
            structlog.dev.ConsoleRenderer(colors=True),
            structlog.processors.KeyValueRenderer(),
            structlog.processors.LogfmtRenderer(),
            structlog.stdlib.render_to_log_kwargs,  # wrapping what needs no wrapping is fine
        ],
        ids=["json", "console", "key-value", "logfmt", "kwargs"],
    )
    def test_the_wrapped_renderer_delivers(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        renderer: structlog.typing.Processor,
    ) -> None:
        handler = make_handler()
        logger = stdlib_logger(handler)
        configure(CioEventRenderer(renderer))
        log_both_styles(logger.name)
        assert delivered(handler, simulator) == [("purchase", "user-1"), ("signup", "user-2")]

    def test_the_rendered_text_is_unchanged(self) -> None:
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
        event = {"event": "purchase", "cio": {"customer_id": "u", "data": {}}}
        result = CioEventRenderer(renderer)(None, "info", dict(event))
        assert isinstance(result, tuple)
        args, kwargs = result
        assert args == (renderer(None, "info", dict(event)),)
        assert kwargs == {"extra": {"cio": {"customer_id": "u", "data": {}, "name": "purchase"}}}

    def test_an_explicit_name_wins_over_the_event(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        logger = stdlib_logger(handler)
        configure(CioEventRenderer(structlog.processors.JSONRenderer()))
        structlog.get_logger(logger.name).info("ignored", **cio_event("u", name="renamed"))
        assert delivered(handler, simulator) == [("renamed", "u")]

    @pytest.mark.parametrize(
        "renderer",
        [structlog.processors.JSONRenderer(), structlog.dev.ConsoleRenderer(colors=True)],
        ids=["json", "console"],
    )
    def test_an_unwrapped_renderer_is_reported_once_per_logger(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        renderer: structlog.typing.Processor,
    ) -> None:
        handler = make_handler()
        logger = stdlib_logger(handler)
        configure(renderer)
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            log_both_styles(logger.name)
            log_both_styles(logger.name)
        warnings = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert len(warnings) == 1, warnings
        assert logger.name in warnings[0]
        assert "CioEventRenderer" in warnings[0]
        assert handler.status()["dropped"] == {"unreadable_tag": 4}
        assert delivered(handler, simulator) == []


@pytest.mark.parametrize("setup", ["render_to_log_kwargs", "processor_formatter", "renderer"])
def test_the_example_app_delivers_in_each_set_up(
    simulator: TrackAPISimulator, queue_dir: Path, setup: str
) -> None:
    """examples/structlog_app.py, the recipe's three set-ups, run as a user would run them
    (docs/how-to/structlog.md shows the third, run by tests/test_docs.py)."""
    result = subprocess.run(
        [PYTHON, str(PROJECT_ROOT / "examples" / "structlog_app.py"), setup],
        env=child_environment(simulator, queue_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sorted((e.name, e.customer_id, e.data) for e in simulator.accepted) == [
        ("purchase", "user-42", {"amount": 9.99}),
        ("signup", "user-42", {"plan": "pro"}),
    ]
    assert "an ordinary structlog line" in result.stderr  # the console still logs
    assert "cio_logging" not in result.stderr  # no warning
