"""Interpreter exit is a commit, and the last delivery, on the calling thread.

A short script (a cron job, a management command) logs and ends: normally, by an
uncaught exception or by ``sys.exit``. ``logging.shutdown()`` runs from ``atexit``,
after ``threading``'s shutdown: thread pools refuse work on every Python, and Python
3.12 refuses to start a thread. Whatever the script logged must be delivered (or, in
an outage, be on disk), nothing may be printed on stderr but the script's own
traceback, and no thread may be started once the main code has ended. The suite runs
on 3.11, 3.12 and 3.13 (CI), so each case runs on each.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, printed_ids

EXIT_APP = str(PROJECT_ROOT / "tests" / "apps" / "exit_app.py")
COUNT = 25
#: The exit status and the last line of stderr each ending gives.
ENDINGS = {
    "normal": (0, None),
    "exception": (1, "ValueError: the script failed"),
    "sys-exit": (3, None),
}


def run_exit_app(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    ending: str,
    *options: str,
    outage: bool = False,
) -> list[str]:
    """Run tests/apps/exit_app.py to its end; check its status and stderr; the ids it logged."""
    result = subprocess.run(
        [PYTHON, EXIT_APP, str(COUNT), ending, *options],
        env=child_environment(simulator, queue_dir),
        capture_output=True,
        text=True,
        timeout=90,
    )
    status, last_line = ENDINGS[ending]
    assert result.returncode == status, result.stderr
    if outage:  # the library's own warning that delivery failed, and nothing else
        assert all(
            line.startswith("Customer.io delivery failed (HTTP 503")
            for line in result.stderr.splitlines()
        ), result.stderr
    elif last_line is None:
        assert result.stderr == ""
    else:  # the script's own traceback, and nothing else
        assert result.stderr.count("Traceback") == 1, result.stderr
        assert result.stderr.rstrip().splitlines()[-1] == last_line, result.stderr
        assert "Exception ignored" not in result.stderr, result.stderr
        assert "thread" not in result.stderr, result.stderr
    return printed_ids(result.stdout)


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("kind", ["non-essential", "essential"])
def test_a_short_script_delivers_everything_at_exit(
    simulator: TrackAPISimulator, queue_dir: Path, ending: str, kind: str
) -> None:
    """Only non-essential events: none is on disk before exit, so exit commits them all."""
    options = ["--essential"] if kind == "essential" else []
    ids = run_exit_app(simulator, queue_dir, ending, *options)
    assert len(ids) == COUNT
    assert simulator.accepted_ids() == set(ids)
    assert simulator.duplicates == 0
    wal = WriteAheadLog(queue_dir / "wal")
    try:
        assert len(wal) == 0
    finally:
        wal.close()


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_events_logged_after_the_main_code_are_delivered_too(
    simulator: TrackAPISimulator, queue_dir: Path, ending: str
) -> None:
    """From a non-daemon thread once the main thread has finished, and from an atexit
    hook: both run after threading's shutdown, where no thread may start."""
    ids = run_exit_app(simulator, queue_dir, ending, "--late")
    assert len(ids) == COUNT + 3 + 3
    assert simulator.accepted_ids() == set(ids)
    assert simulator.duplicates == 0


def test_in_an_outage_every_event_is_on_disk_after_exit(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    simulator.fail(503)
    ids = run_exit_app(simulator, queue_dir, "normal", "--late", outage=True)
    assert len(ids) == COUNT + 3 + 3
    assert simulator.accepted == []
    wal = WriteAheadLog(queue_dir / "wal")
    try:
        assert len(wal) == len(ids)
        assert all(event_id in wal for event_id in ids)
    finally:
        wal.close()
