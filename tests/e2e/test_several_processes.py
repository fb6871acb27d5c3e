"""Several processes on one queue directory: four applications and a CLI drain at once.

Every process appends; only the holder of ``delivery.lock`` sends. One application is
killed with SIGKILL mid-run: the delivering one (while it sends, or through an
outage, with a backlog it was responsible for) or a bystander. The others and the
drain take its work over. Nothing whose emit returned is lost, no event goes out under
another id, and a resend is only ever the batch in flight when the holder died.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging.simulator import RequestRecord, TrackAPISimulator
from cio_logging.state_record import read_state
from cio_logging.store import DeadLetterStore, WriteAheadLog

from ..helpers import (
    CHILD_APP,
    PYTHON,
    HandlerFactory,
    child_environment,
    printed_ids,
    run_child_app,
    wait_for,
)

APPS = 4
EVENTS = 250
KILL_AFTER = 80  # ids printed by the victim before it is killed
LATENCY = 0.1  # every Track request takes at least this long: one sender is visible


class App:
    """A running tests/apps/child_app.py whose stdout is read on a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    @property
    def ids(self) -> list[str]:
        return printed_ids("\n".join(self.lines))


def lock_holder(queue_dir: Path) -> int | None:
    """The pid written in delivery.lock by the process that took it last."""
    try:
        return int((queue_dir / "delivery.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def in_flight_at_the_kill(record: RequestRecord, victim_pid: int, killed_at: float) -> bool:
    """Whether the killed process may have had ``record`` out when it died.

    Its own requests stamped up to two latencies before the kill, or after it: the
    simulator stamps a request once it has read it, on a thread of this busy process,
    so one sent just before the kill may be stamped a moment after.
    """
    return f"(pid {victim_pid})" in record.user_agent and record.time >= killed_at - 2 * LATENCY


def overlapping(
    requests: list[RequestRecord], victim_pid: int, killed_at: float
) -> list[tuple[float, float]]:
    """Requests of two different processes answered at the same time, other than one
    the killed process had in flight.

    A process may have several requests in flight (``max_in_flight``); each request's
    User-Agent names its process. The simulator waits ``LATENCY`` before it answers,
    so requests of two processes that took turns are at least ``LATENCY`` apart. Only
    a request the killed holder had in flight may overlap its successor's.
    """
    timed = sorted(
        (record.time, record.user_agent)
        for record in requests
        if not in_flight_at_the_kill(record, victim_pid, killed_at)
    )
    return [
        (earlier, later)
        for (earlier, first), (later, second) in itertools.combinations(timed, 2)
        if first != second and abs(later - earlier) < LATENCY - 0.01
    ]


@pytest.fixture
def apps() -> Iterator[list[App]]:
    """Applications a test starts; any still running at teardown are killed."""
    started: list[App] = []
    yield started
    for app in started:
        if app.process.poll() is None:
            app.process.kill()
        app.finish(10)
        if app.process.stdout is not None:
            app.process.stdout.close()


@pytest.mark.parametrize("victim", ["holder-sending", "holder-in-outage", "bystander"])
def test_four_apps_and_a_drain_share_a_queue_and_survive_a_kill(
    simulator: TrackAPISimulator, queue_dir: Path, apps: list[App], victim: str
) -> None:
    simulator.set_latency(LATENCY)
    if victim == "holder-in-outage":
        simulator.fail(503)  # the holder's breaker opens; a backlog builds that it owns
    env = child_environment(simulator, queue_dir)
    for _ in range(APPS):
        process = subprocess.Popen(
            # "purchase" is essential: its emit returns only once it is committed.
            [PYTHON, CHILD_APP, str(EVENTS), "--pause", "0.01", "--name", "purchase"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        apps.append(App(process))
        # One after the other: opening the queue at the very same moment is its own test.
        assert wait_for(lambda: bool(apps[-1].lines), 20), "an application did not start"
        assert apps[-1].lines[0] == "ready"
    pids = {app.process.pid: app for app in apps}
    assert wait_for(lambda: lock_holder(queue_dir) in pids, 20), "no application took the lock"
    holder = lock_holder(queue_dir)
    drain = subprocess.Popen(
        [PYTHON, "-m", "cio_logging.cli", "drain", "--timeout", "90", "--json"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if victim == "bystander":
            target = next(app for pid, app in pids.items() if pid != holder)
        else:
            assert holder is not None
            target = pids[holder]
        assert wait_for(lambda: len(target.ids) >= KILL_AFTER, 30), target.lines[-5:]
        assert lock_holder(queue_dir) == holder  # nobody took the lock from a live holder
        killed_at = time.time()
        target.process.send_signal(signal.SIGKILL)
        if victim == "holder-in-outage":
            assert simulator.accepted == []
            simulator.clear_faults()
            simulator.set_latency(LATENCY)
        assert target.finish(10) == -signal.SIGKILL
        if victim != "bystander":
            # The kernel released the lock; a survivor or the drain takes over.
            assert wait_for(lambda: lock_holder(queue_dir) not in (None, holder), 10)
        survivors = [app for app in apps if app is not target]
        for app in survivors:
            assert app.finish(60) == 0, app.lines[-5:]
            assert app.lines[-1] == "done"
            assert len(app.ids) == EVENTS
        stdout, stderr = drain.communicate(timeout=120)
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.communicate(timeout=10)
    assert drain.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    report = json.loads(stdout)
    assert report["queued"] == 0

    ids = {event_id for app in apps for event_id in app.ids}
    assert len(ids) == sum(len(app.ids) for app in apps)
    assert KILL_AFTER <= len(target.ids) < EVENTS
    missing = ids - simulator.accepted_ids()
    assert not missing, f"lost {len(missing)} of {len(ids)}"
    # No event went out under another id: the simulator saw these ids, plus at most the
    # one the victim had committed but not yet printed when it was killed.
    accepted = simulator.accepted
    unprinted = [event for event in accepted if event.id not in ids]
    assert len(unprinted) <= 1, unprinted
    assert {event.customer_id for event in unprinted} <= {f"child-{target.process.pid}"}
    assert len(accepted) == len({event.id for event in accepted}) == len(ids) + len(unprinted)
    assert len(WriteAheadLog(queue_dir / "wal")) == 0
    assert len(DeadLetterStore(queue_dir / "dead")) == 0

    requests = simulator.requests
    # Only one process sent at a time (an flock on delivery.lock).
    assert overlapping(requests, target.process.pid, killed_at) == []
    # A resend (same id) is at most the batches the killed holder had in flight.
    in_flight = [
        r.item_count for r in requests if in_flight_at_the_kill(r, target.process.pid, killed_at)
    ]
    if victim == "bystander":
        assert simulator.duplicates == 0
    else:
        # Up to max_in_flight requests may have been out at the kill.
        assert simulator.duplicates <= sum(in_flight)


START_TOGETHER = """
import os, sys, time
from pathlib import Path
from cio_logging import CustomerIOHandler

root, rounds, processes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
failures = 0
for number in range(2 * rounds):
    queue = root / f"queue-{number // 2}"  # each directory twice: new, then existing
    start = time.monotonic() + 0.3
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            time.sleep(max(0.0, start - time.monotonic()))
            try:
                CustomerIOHandler(queue_dir=queue).close()
            except Exception as exc:
                print(f"{type(exc).__name__}: {exc}", flush=True)
                os._exit(1)
            os._exit(0)
        children.append(pid)
    failures += sum(os.waitpid(pid, 0)[1] != 0 for pid in children)
print(f"failures: {failures}", flush=True)
"""


def test_processes_starting_together_on_one_queue_directory_all_start(
    simulator: TrackAPISimulator, tmp_path: Path
) -> None:
    """gunicorn without --preload: every worker builds its handler at the same moment."""
    result = subprocess.run(
        [PYTHON, "-c", START_TOGETHER, str(tmp_path / "queues"), "4", "6"],
        env=child_environment(simulator, tmp_path / "unused"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "failures: 0", result.stdout


def test_a_handler_that_failed_to_start_leaves_a_clean_exit(
    simulator: TrackAPISimulator, tmp_path: Path
) -> None:
    """A constructor that raised must not leave a half-built handler to logging.shutdown.

    The error reaches the top (as when dictConfig fails at start-up), so its traceback
    keeps the half-built handler alive until the interpreter's exit.
    """
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    script = (
        "from cio_logging import CustomerIOHandler\n"
        f"CustomerIOHandler(queue_dir={str(not_a_directory / 'queue')!r})\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", script],
        env=child_environment(simulator, tmp_path / "unused"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "ConfigurationError: queue_dir" in result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
    assert "AttributeError" not in result.stderr, result.stderr


def test_a_process_that_delivered_nothing_keeps_the_record_of_one_that_did(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    """state.json stays the last deliverer's when an idle process takes the lock after it."""
    ids = run_child_app(simulator, queue_dir, "5")
    assert simulator.wait_for_events(len(ids))
    recorded = read_state(queue_dir)
    assert recorded is not None
    assert recorded["delivered"] == 5
    idle = make_handler()
    idle.flush()  # starts its worker, which takes the free lock and finds nothing to send
    assert wait_for(lambda: idle.status()["delivering_process"])
    idle.close()
    assert read_state(queue_dir) == recorded
    status = queue_status_json(simulator, queue_dir)
    assert (status["counters"]["delivered"], status["recorded_by_pid"]) == (5, recorded["pid"])
    assert status["recorder_is_delivering"] is False


def queue_status_json(simulator: TrackAPISimulator, queue_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [PYTHON, "-m", "cio_logging.cli", "status", "--json"],
        env=child_environment(simulator, queue_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status
