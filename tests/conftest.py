"""Shared fixtures: a real Track API simulator over HTTPS, handlers in tmp_path, clean logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging import CustomerIOHandler
from cio_logging.simulator import TrackAPISimulator

from .spec_check import SPEC_PATH, Spec, load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]

HandlerFactory = Callable[..., CustomerIOHandler]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the logging tree as each test found it."""
    root = logging.getLogger()
    saved_handlers = list(root.handlers)
    saved_level = root.level
    saved_loggers = dict(logging.Logger.manager.loggerDict)
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name in set(logging.Logger.manager.loggerDict) - set(saved_loggers):
        logger = logging.Logger.manager.loggerDict[name]
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()


@pytest.fixture(scope="session")
def spec() -> Spec:
    """Customer.io's published Track API spec (skips when shared/ is not beside the project)."""
    loaded = load_spec()
    if loaded is None:
        pytest.skip(f"Track API spec not found at {SPEC_PATH} and CIO_TRACK_SPEC is not set")
    return loaded


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[TrackAPISimulator]:
    with TrackAPISimulator(state_dir=tmp_path / "simulator") as sim:
        yield sim


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    return tmp_path / "queue"


def handler_settings(sim: TrackAPISimulator, queue_dir: Path, **options: Any) -> dict[str, Any]:
    """Constructor arguments for a handler talking to ``sim``, fast enough for tests."""
    settings: dict[str, Any] = {
        "site_id": sim.site_id,
        "api_key": sim.api_key,
        "track_url": sim.url,
        "ca_bundle": sim.ca_file,
        "queue_dir": str(queue_dir),
        "flush_interval": 0.05,
        "max_backoff": 0.2,
        "request_timeout": 2.0,
        "flush_timeout": 10.0,
    }
    settings.update(options)
    return settings


@pytest.fixture
def make_handler(simulator: TrackAPISimulator, queue_dir: Path) -> Iterator[HandlerFactory]:
    """Build handlers against the simulator; every one is closed at teardown."""
    made: list[CustomerIOHandler] = []

    def factory(**options: Any) -> CustomerIOHandler:
        handler = CustomerIOHandler(**handler_settings(simulator, queue_dir, **options))
        made.append(handler)
        return handler

    yield factory
    for handler in made:
        handler.close()


@pytest.fixture
def event_logger(make_handler: HandlerFactory) -> tuple[logging.Logger, CustomerIOHandler]:
    """A fresh logger with one handler attached, not propagating."""
    handler = make_handler()
    logger = logging.getLogger(f"test.events.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def child_environment(sim: TrackAPISimulator, queue_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that configures its handler from variables only."""
    env = dict(os.environ)
    env.update(
        {
            "CUSTOMERIO_SITE_ID": sim.site_id,
            "CUSTOMERIO_API_KEY": sim.api_key,
            "CIO_LOGGING_TRACK_URL": sim.url,
            "CIO_LOGGING_CA_BUNDLE": sim.ca_file,
            "CIO_LOGGING_QUEUE_DIR": str(queue_dir),
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]),
        }
    )
    env.update(extra)
    return env


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


PYTHON = sys.executable
CHILD_APP = str(PROJECT_ROOT / "tests" / "child_app.py")


def printed_ids(output: str) -> list[str]:
    """The event ids a child app printed, one a line, once each emit returned."""
    return [line for line in output.splitlines() if len(line) == 26]


def run_child_app(sim: TrackAPISimulator, queue_dir: Path, *args: str) -> list[str]:
    """Run tests/child_app.py to its end on ``queue_dir``; the ids it logged."""
    result = subprocess.run(
        [PYTHON, CHILD_APP, *args],
        env=child_environment(sim, queue_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return printed_ids(result.stdout)
