"""The cio-logging command: the demo (the main job) and the simulator."""

from __future__ import annotations

import io
import re
import signal
import subprocess

import pytest

from cio_logging.cli import main
from cio_logging.demo import run_demo

from .conftest import PYTHON


def test_demo_accounts_for_every_event() -> None:
    out = io.StringIO()
    assert run_demo(out=out, outage_seconds=1.0) == 0
    text = out.getvalue()
    assert "every event accounted for" in text
    assert "closed->open" in text  # the outage opened the breaker ...
    assert "half-open->closed" in text  # ... and a probe closed it
    assert "waiting on disk 30" in text
    assert "degradation_essential_only" in text
    assert re.search(r"dead-lettered +1\n", text)


def test_demo_command_exits_zero() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "cio_logging.cli", "demo", "--outage-seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "every event accounted for" in result.stdout
    assert "Traceback" not in result.stderr


def test_simulator_command_prints_url_and_ca() -> None:
    with subprocess.Popen(
        [PYTHON, "-m", "cio_logging.cli", "simulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    text = "".join(lines)
    assert "https://127.0.0.1:" in text
    assert ".pem" in text
    assert "CIO_LOGGING_TRACK_URL=" in text


def test_unknown_arguments_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--nope"])
    assert exit_.value.code == 2
