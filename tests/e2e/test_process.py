"""Real processes: restart, SIGKILL, fork. Nothing whose emit returned is ever lost."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.state_record import read_state
from cio_logging.store import WriteAheadLog

from ..helpers import (
    APIS,
    CHILD_APP,
    PROJECT_ROOT,
    PYTHON,
    HandlerFactory,
    child_environment,
    printed_ids,
    run_child_app,
    wait_for,
)

FORK_APP = str(PROJECT_ROOT / "tests" / "apps" / "fork_app.py")


def test_restart_delivers_what_an_earlier_process_left(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    simulator.fail(503)  # the first process cannot deliver anything
    ids = run_child_app(simulator, queue_dir, "25")
    assert len(ids) == 25
    assert simulator.accepted == []
    simulator.clear_faults()
    make_handler()  # a new process (here, the test) on the same queue directory
    assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 15)
    assert simulator.duplicates == 0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("trial", range(12))
def test_sigkill_loses_no_event_whose_emit_returned(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    make_handler: HandlerFactory,
    trial: int,
    api: str,
) -> None:
    """Kill -9 at a random moment: while logging, committing, sending or acknowledging.

    Half the events are essential (durable when emit returns), half not (durable once
    the app's ``handler.commit()`` returned, or the commit interval passed).
    """
    rng = random.Random(trial)
    simulator.set_latency(rng.choice([0.0, 0.02, 0.1]))
    if trial % 2:
        simulator.fail(503, duration=rng.uniform(0.05, 0.5))
    child = subprocess.Popen(
        [PYTHON, CHILD_APP, "400", "--pause", "0.002", "--mixed"],
        env=child_environment(simulator, queue_dir, api),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    kill_after = rng.randint(5, 300)
    ids: list[str] = []
    lines = 0
    while lines < kill_after:
        line = child.stdout.readline().strip()
        if not line or line == "done":
            break
        lines += 1
        ids.extend(printed_ids(line))
    child.send_signal(signal.SIGKILL)
    # The same text stream (communicate() with a timeout would skip what readline()
    # already buffered): every line printed before the kill.
    rest = child.stdout.read()
    child.stdout.close()
    child.wait(timeout=30)
    ids.extend(printed_ids(rest))
    assert child.returncode == -signal.SIGKILL
    simulator.clear_faults()
    simulator.set_latency(0)
    make_handler()
    assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 20), (
        f"lost {len(set(ids) - simulator.accepted_ids())} of {len(ids)}"
    )
    accepted = simulator.accepted
    assert len({e.id for e in accepted}) == len(accepted)  # duplicates only as the same id


def test_sigkill_after_the_commit_interval_loses_no_non_essential_event(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    """Nobody calls commit(): the writer commits within commit_interval (0.05 s)."""
    simulator.fail(503)  # nothing is delivered (and deleted) before the kill
    child = subprocess.Popen(
        [PYTHON, CHILD_APP, "60", "--non-essential", "--linger", "30"],
        env=child_environment(simulator, queue_dir),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ids = []
    for line in child.stdout:
        if line.strip() == "done":
            break
        if line.startswith("pending "):
            ids.append(line.split()[1])
    time.sleep(0.5)  # ten commit intervals
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert len(ids) == 60
    simulator.clear_faults()
    make_handler()
    assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 20), (
        f"lost {len(set(ids) - simulator.accepted_ids())} of {len(ids)}"
    )


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["parent-logs-first", "parent-silent", "mp-fork", "mp-spawn"])
def test_forked_children_deliver_their_events(
    simulator: TrackAPISimulator, queue_dir: Path, mode: str, api: str
) -> None:
    result = subprocess.run(
        [PYTHON, FORK_APP, mode, "3", "20"],
        env=child_environment(simulator, queue_dir, api),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ids = printed_ids(result.stdout)
    expected = 3 * 20 + (2 if mode == "parent-logs-first" else 1)
    assert len(ids) == expected
    assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 15), (
        f"missing {len(set(ids) - simulator.accepted_ids())}"
    )
    # The parent's backlog was not sent again by each child: no duplicate ids arrived.
    assert simulator.duplicates == 0
    assert "Traceback" not in result.stderr


def test_interpreter_exit_flushes(simulator: TrackAPISimulator, queue_dir: Path) -> None:
    """No explicit flush: logging.shutdown at exit reaches the handler."""
    script = (
        "import logging\nfrom cio_logging import CustomerIOHandler, cio_event\n"
        "log = logging.getLogger('exit'); log.setLevel(logging.INFO)\n"
        "log.addHandler(CustomerIOHandler(flush_interval=5))\n"
        "for n in range(30): log.info('at_exit', extra=cio_event('u', n=n))\n"
    )
    started = time.monotonic()
    subprocess.run(
        [PYTHON, "-c", script], env=child_environment(simulator, queue_dir), check=True, timeout=60
    )
    assert time.monotonic() - started < 20
    assert len(simulator.accepted) == 30
    logging.getLogger(__name__).debug("exit delivered all 30")


def test_exit_beside_a_delivering_process_in_an_outage_is_quick(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    """A process that does not deliver used to wait its whole flush_timeout at exit."""
    simulator.fail(503)
    env = child_environment(simulator, queue_dir)
    live_app = str(PROJECT_ROOT / "tests" / "apps" / "live_app.py")
    with subprocess.Popen(
        [PYTHON, live_app, "1", "-o", "consecutive_failures=1"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as live:
        try:
            assert wait_for(lambda: (read_state(queue_dir) or {}).get("breaker") == "open", 15)
            started = time.monotonic()
            ids = run_child_app(simulator, queue_dir, "3")
            took = time.monotonic() - started
        finally:
            assert live.stdin is not None
            live.stdin.close()
            live.wait(30)
    assert len(ids) == 3
    assert took < 5  # child_app's flush_timeout is 10 s
    assert WriteAheadLog(queue_dir / "wal").read_due(10, now=float("inf")).events
