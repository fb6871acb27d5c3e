"""Pre-fork servers: gunicorn ``--preload`` with 4 sync workers, and multiprocessing pools.

The handler is configured in the parent (the gunicorn master, the pool's parent) before
it forks, so the children inherit the handler, its open write-ahead log, its delivery
lock and maybe the parent's backlog on disk. The promise (README, "Fork"): every
process delivers its events, and a child never sends its parent's backlog again.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.wal import DeadLetterStore, WriteAheadLog

from .conftest import (
    PROJECT_ROOT,
    PYTHON,
    HandlerFactory,
    child_environment,
    printed_ids,
    wait_for,
)

WORKERS = 4
REQUESTS = 200
MASTER_EVENTS = 5
POOL_APP = str(PROJECT_ROOT / "tests" / "pool_app.py")


def listening_port(log: Path, gunicorn: subprocess.Popen[bytes]) -> int:
    """The port gunicorn bound (it was given port 0), once its workers booted."""
    found: list[int] = []

    def ready() -> bool:
        text = log.read_text(errors="replace")
        match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
        if match and text.count("Booting worker with pid") >= WORKERS:
            found.append(int(match.group(1)))
            return True
        return gunicorn.poll() is not None

    assert wait_for(ready, 60), log.read_text(errors="replace")
    assert gunicorn.poll() is None, log.read_text(errors="replace")
    assert found
    return found[0]


def get(port: int) -> tuple[str, int]:
    """One request; the event id the worker logged and the worker's pid."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
    finally:
        connection.close()
    event_id, pid = body.split()
    return event_id, int(pid)


def carrying(simulator: TrackAPISimulator, event_id: str) -> Counter[int]:
    """How many Track requests carried this event id, by the status they were answered."""
    return Counter(
        record.status for record in simulator.requests if event_id in json.dumps(record.payload)
    )


@pytest.mark.parametrize(
    "scenario",
    [
        # The master's flush thread delivered its backlog before the fork.
        "backlog-delivered",
        # An outage at boot: the master's backlog is still on disk when it forks the
        # workers, which then serve requests while Customer.io recovers.
        "backlog-on-disk-at-fork",
        # Workers recycled every ~25 requests: the master forks again and again while
        # its flush thread is delivering.
        "workers-recycled",
    ],
)
def test_gunicorn_preload_workers_deliver_and_never_resend_the_masters_backlog(
    simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path, scenario: str
) -> None:
    simulator.record_bodies = True
    master_ids_file = tmp_path / "master_ids.txt"
    handler_options = {"reset_timeout": 0.5, "max_attempts": 1000}
    env = child_environment(
        simulator,
        queue_dir,
        CIO_TEST_MASTER_EVENTS=str(MASTER_EVENTS),
        CIO_TEST_MASTER_IDS=str(master_ids_file),
        CIO_TEST_REQUEST_PAUSE="0.005",
        CIO_TEST_HANDLER_OPTIONS=json.dumps(handler_options),
    )
    arguments = [
        PYTHON, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
        "--worker-class", "sync", "--bind", "127.0.0.1:0", "--chdir", str(PROJECT_ROOT),
        "--graceful-timeout", "30", "--timeout", "60", "--log-level", "info",
        "--no-control-socket",
    ]  # fmt: skip
    if scenario == "workers-recycled":
        arguments += ["--max-requests", "25", "--max-requests-jitter", "10"]
    if scenario == "backlog-on-disk-at-fork":
        simulator.fail(503)
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as log_stream:
        gunicorn = subprocess.Popen(
            [*arguments, "tests.wsgi_app:application"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )
    try:
        port = listening_port(log, gunicorn)
        master_ids = printed_ids(master_ids_file.read_text())
        assert len(master_ids) == MASTER_EVENTS
        if scenario == "backlog-on-disk-at-fork":
            assert simulator.accepted == []  # the backlog was on disk when the master forked
            simulator.clear_faults()
        answers: list[tuple[str, int]] = []
        with ThreadPoolExecutor(8) as pool:
            answers += pool.map(lambda _: get(port), range(REQUESTS))
            # On a noisy machine one worker may win every accept(): go on a little.
            extra = 0
            while len({pid for _, pid in answers}) < WORKERS and extra < 4 * REQUESTS:
                answers += pool.map(lambda _: get(port), range(50))
                extra += 50
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(timeout=60)
        finally:
            if gunicorn.poll() is None:
                gunicorn.kill()
                gunicorn.wait(10)
    text = log.read_text(errors="replace")
    assert gunicorn.returncode == 0, text
    assert "Traceback" not in text, text
    assert "flush timed out" not in text, text

    worker_pids = {pid for _, pid in answers}
    assert gunicorn.pid not in worker_pids  # requests are served by the workers
    if scenario == "workers-recycled":
        assert len(worker_pids) > WORKERS  # workers were really replaced
    else:
        assert len(worker_pids) == WORKERS, Counter(pid for _, pid in answers)
    served_ids = [event_id for event_id, _ in answers]
    assert len(set(served_ids)) == len(served_ids)

    # Every process delivered before gunicorn's exit: nothing waits on disk.
    missing = set(served_ids) - simulator.accepted_ids()
    assert not missing, f"{len(missing)} of {len(served_ids)} workers' events not delivered"
    assert not set(master_ids) - simulator.accepted_ids(), "the master's backlog was lost"
    assert len(WriteAheadLog(queue_dir / "wal")) == 0
    assert len(DeadLetterStore(queue_dir / "dead")) == 0
    # Nothing sent twice: each accepted once, by one successful request, under its own id.
    assert simulator.duplicates == 0
    assert {event.id for event in simulator.accepted} == set(served_ids) | set(master_ids)
    for event_id in master_ids:
        answered = carrying(simulator, event_id)
        assert answered[200] + answered[207] == 1, (event_id, answered)
    master_customers = {e.customer_id for e in simulator.accepted if e.id in set(master_ids)}
    assert master_customers == {f"master-{gunicorn.pid}"}


@pytest.mark.parametrize("outage", [False, True], ids=["up", "outage"])
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_pool_children_exiting_without_logging_shutdown_lose_nothing(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    make_handler: HandlerFactory,
    start_method: str,
    outage: bool,
) -> None:
    """multiprocessing.Pool workers end with os._exit or SIGTERM: no logging.shutdown.

    The parent logged a backlog before the pool started (with fork the children inherit
    it on disk); each child logs and goes without a flush. With Customer.io up, the
    parent delivers everything before it exits. Through an outage, everything is on
    disk when it exits, and a restarted process delivers it, each event once.
    """
    simulator.record_bodies = True
    if outage:
        simulator.fail(503)
    result = subprocess.run(
        [PYTHON, POOL_APP, start_method, "3", "12", "15"],
        env=child_environment(simulator, queue_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    parent_ids = [row[1] for row in rows if row[0] == "parent"]
    child_ids = [row[1] for row in rows if row[0] == "child"]
    assert len(parent_ids) == 3 + 1  # the backlog, and one after the pool
    assert len(child_ids) == 12 * 15
    parent_pids = {row[2] for row in rows if row[0] == "parent"}
    assert len(parent_pids) == 1
    assert parent_pids.isdisjoint(row[2] for row in rows if row[0] == "child")
    ids = set(parent_ids) | set(child_ids)
    if outage:
        assert simulator.accepted == []
        wal = WriteAheadLog(queue_dir / "wal")
        assert len(wal) == len(ids)  # the children's events outlived them, on disk
        assert all(event_id in wal for event_id in ids)
        wal.close()
        simulator.clear_faults()
        make_handler()  # the application restarts
        assert wait_for(lambda: simulator.accepted_ids() >= ids, 15), (
            f"missing {len(ids - simulator.accepted_ids())} of {len(ids)}"
        )
    else:
        # The parent held the delivery lock and flushed the whole directory at exit.
        assert simulator.accepted_ids() >= ids, f"missing {len(ids - simulator.accepted_ids())}"
    assert simulator.duplicates == 0
    assert {event.id for event in simulator.accepted} == ids

    def sent_once() -> bool:  # the simulator records a request just after it accepts it
        return all(
            carrying(simulator, event_id)[200] + carrying(simulator, event_id)[207] == 1
            for event_id in parent_ids
        )

    assert wait_for(sent_once, 5), {
        event_id: carrying(simulator, event_id) for event_id in parent_ids
    }


def test_after_a_preload_shutdown_status_shows_the_workers_deliveries(
    simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
) -> None:
    """The master logged nothing; taking the lock at shutdown, it must not record zeros."""
    env = child_environment(simulator, queue_dir, CIO_TEST_REQUEST_PAUSE="0.005")
    arguments = [
        PYTHON, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
        "--worker-class", "sync", "--bind", "127.0.0.1:0", "--chdir", str(PROJECT_ROOT),
        "--graceful-timeout", "30", "--no-control-socket", "tests.wsgi_app:application",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as log_stream:
        gunicorn = subprocess.Popen(
            arguments,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )
    try:
        port = listening_port(log, gunicorn)
        answers = [get(port) for _ in range(40)]
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            gunicorn.wait(timeout=60)
        finally:
            if gunicorn.poll() is None:
                gunicorn.kill()
                gunicorn.wait(10)
    assert gunicorn.returncode == 0, log.read_text(errors="replace")
    assert {event_id for event_id, _ in answers} <= simulator.accepted_ids()
    status = subprocess.run(
        [PYTHON, "-m", "cio_logging.cli", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(status.stdout)
    assert report["recorded_by_pid"] != gunicorn.pid
    assert report["recorded_by_pid"] in {pid for _, pid in answers}
    assert report["counters"]["delivered"] > 0
