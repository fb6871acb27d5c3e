"""The fixtures :mod:`cio_logging.pytest_plugin` registers when the ``testing`` extra is there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .testing import CioSimulator


@pytest.fixture
def cio_simulator(tmp_path: Path) -> Iterator[CioSimulator]:
    """A running Track API simulator over HTTPS, and how to point a handler at it.

    Its CA, and the queue of the handlers ``cio_simulator.handler()`` builds, are in
    this test's ``tmp_path`` (under ``cio-simulator/``). Those handlers are closed, and
    the simulator stopped, when the test ends.
    """
    with CioSimulator(tmp_path / "cio-simulator") as simulator:
        yield simulator
