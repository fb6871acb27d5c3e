"""uvicorn ends a SIGTERM'd worker by raising SIGTERM again with Python's default action.

uvicorn 0.5x handles SIGTERM itself: it stops accepting connections, finishes the
requests in progress, runs the lifespan's shutdown, then restores the handler it found
(Python's default) and raises the signal again. The process ends there: no ``atexit``,
no ``logging.shutdown()``. With ``commit_interval=5`` the non-essential events answered
in the last seconds were still in memory, and 4 of 5 were lost.

The handler, built where uvicorn imports the application, sees uvicorn's SIGTERM
handler and puts its own in front: on the signal it commits what is buffered, and from
then on every event (those of the requests still being served) is committed before
``emit`` returns. The FastAPI recipe also flushes at the lifespan's shutdown, so every
answered event is delivered before the worker ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, free_port, request_event, wait_for


@pytest.mark.parametrize(
    ("workers", "flush_on_shutdown"),
    [(1, False), (2, False), (2, True)],
    ids=["one-process", "two-workers", "two-workers-recipe"],
)
def test_no_answered_event_is_lost_when_uvicorn_reraises_sigterm(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    tmp_path: Path,
    workers: int,
    flush_on_shutdown: bool,
) -> None:
    """One process imports the application before uvicorn installs its handler; with
    ``--workers`` each worker imports it after: the handler commits on the signal in
    both cases (at the end, or at the signal and then at every emit)."""
    port = free_port()
    env = child_environment(
        simulator,
        queue_dir,
        CIO_TEST_EVENT_NAME="page_viewed",  # non-essential: buffered up to commit_interval
        CIO_TEST_HANDLER_OPTIONS=json.dumps({"commit_interval": 5}),
        CIO_TEST_SLOW_SECONDS="1",
        CIO_TEST_FLUSH_ON_SHUTDOWN="1" if flush_on_shutdown else "0",
    )
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as log_stream:
        uvicorn = subprocess.Popen(
            [
                PYTHON, "-m", "uvicorn", "tests.apps.asgi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "info", "--no-access-log",
                "--workers", str(workers),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert wait_for(
            lambda: (
                log.read_text().count("Application startup complete") >= workers
                or uvicorn.poll() is not None
            ),
            60,
        ), log.read_text()
        answered = [request_event(port)[0] for _ in range(5)]
        with ThreadPoolExecutor(1) as pool:
            # A request still being served when the signal comes: it logs afterwards.
            slow = pool.submit(request_event, port, "/slow")
            assert wait_for(lambda: "slow request started" in log.read_text(), 30)
            uvicorn.send_signal(signal.SIGTERM)
            answered.append(slow.result(timeout=60)[0])
        uvicorn.wait(timeout=60)
    finally:
        if uvicorn.poll() is None:
            uvicorn.kill()
            uvicorn.wait(10)
    text = log.read_text(errors="replace")
    # uvicorn's own ending: one process ends by the re-raised SIGTERM's default action
    # (its workers do the same under a supervisor, which exits 0).
    assert uvicorn.returncode == (-signal.SIGTERM if workers == 1 else 0), text
    assert "Traceback" not in text, text
    assert "Finished server process" in text, text
    delivered = simulator.accepted_ids()
    wal = WriteAheadLog(queue_dir / "wal")
    try:
        on_disk = {event_id for event_id in answered if event_id in wal}
    finally:
        wal.close()
    lost = set(answered) - delivered - on_disk
    assert not lost, f"{len(lost)} of {len(answered)} answered events lost"
    if flush_on_shutdown:
        assert set(answered) <= delivered, f"{len(on_disk)} left on disk"
    assert simulator.duplicates == 0


def test_one_persons_order_holds_across_workers_when_each_call_is_committed_at_emit(
    simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
) -> None:
    """``--workers 2`` on one queue directory: calls go out in the order they were
    committed. With ``commit_interval=0`` each call is committed before ``emit``
    returns, so calls logged one after another (each request sent once the previous
    was answered) keep their order, whichever worker served them. (With a commit
    interval, a call can wait in one worker's memory while a later one, in the other
    worker, is committed first: what the recipe warns about.)"""
    port = free_port()
    env = child_environment(
        simulator,
        queue_dir,
        CIO_TEST_EVENT_NAME="page_viewed",
        CIO_TEST_HANDLER_OPTIONS=json.dumps({"commit_interval": 0}),
    )
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as log_stream:
        uvicorn = subprocess.Popen(
            [
                PYTHON, "-m", "uvicorn", "tests.apps.asgi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "info", "--no-access-log",
                "--workers", "2",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    answers: list[tuple[str, int]] = []
    try:
        assert wait_for(
            lambda: (
                log.read_text().count("Application startup complete") >= 2
                or uvicorn.poll() is not None
            ),
            60,
        ), log.read_text()
        # On a busy machine one worker may win every accept(): go on a little.
        while len(answers) < 40 or (len({pid for _, pid in answers}) < 2 and len(answers) < 400):
            answers.append(request_event(port, "/?person-1"))
        assert wait_for(lambda: len(simulator.history("person-1")) >= len(answers), 30)
    finally:
        uvicorn.send_signal(signal.SIGTERM)
        try:
            uvicorn.wait(timeout=60)
        finally:
            if uvicorn.poll() is None:
                uvicorn.kill()
                uvicorn.wait(10)
    assert len({pid for _, pid in answers}) == 2, "one worker served every request"
    assert [event.id for event in simulator.history("person-1")] == [i for i, _ in answers]
