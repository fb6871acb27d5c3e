"""gunicorn's gevent worker: a monkey-patched process, where threads are greenlets.

Two ``gunicorn -k gevent`` workers serve requests that log non-essential events; then
gunicorn is stopped (SIGTERM: each worker finishes and exits through
``logging.shutdown()``). Every event a request answered with arrives once, by id, and
nothing is left on disk: the commit and flush greenlets did their work, and ``close()``
finished. Each worker's ticker greenlet measures how long the hub was kept at a stretch;
the figures are printed (``-s``), not asserted: on a busy machine the operating system
alone can stop a process for longer than any bound a test could hold.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import (
    PROJECT_ROOT,
    PYTHON,
    child_environment,
    printed_ids,
    request_event,
    wait_for,
)

WORKERS = 2


def require(library: str) -> None:
    """Skip unless ``library`` is installed, without importing it here: importing
    eventlet into the test process makes every later fork warn (and fail the tests
    that fork, under ``filterwarnings = error``), and gevent is for its own processes.
    """
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (the test extra installs it)")


REQUESTS = 300


def test_gunicorn_gevent_workers_deliver_every_answered_event_once(
    simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
) -> None:
    require("gevent")
    simulator.record_bodies = True
    ticks = tmp_path / "ticks"
    ticks.mkdir()
    env = child_environment(simulator, queue_dir, CIO_TEST_TICKS_DIR=str(ticks))
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as log_stream:
        gunicorn = subprocess.Popen(
            [
                PYTHON, "-m", "gunicorn", "--worker-class", "gevent", "--workers", str(WORKERS),
                "--bind", "127.0.0.1:0", "--chdir", str(PROJECT_ROOT), "--graceful-timeout",
                "30", "--log-level", "info", "--no-control-socket",
                "tests.apps.gevent_app:application",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    answers: list[tuple[str, int]] = []
    try:
        port: list[int] = []

        def listening() -> bool:
            text = log.read_text(errors="replace")
            if (
                "Listening at: http://127.0.0.1:" in text
                and text.count("Booting worker") >= WORKERS
            ):
                port.append(int(text.split("Listening at: http://127.0.0.1:")[1].split()[0]))
                return True
            return gunicorn.poll() is not None

        assert wait_for(listening, 60), log.read_text(errors="replace")
        assert gunicorn.poll() is None, log.read_text(errors="replace")
        with ThreadPoolExecutor(8) as pool:
            answers += pool.map(lambda _: request_event(port[0]), range(REQUESTS))
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
    served = [event_id for event_id, _ in answers]
    assert len(set(served)) == REQUESTS
    missing = set(served) - simulator.accepted_ids()
    assert not missing, f"{len(missing)} of {len(served)} answered events not delivered"
    assert all(count == 1 for count in Counter(e.id for e in simulator.accepted).values())
    assert simulator.duplicates == 0
    wal = WriteAheadLog(queue_dir / "wal")
    try:
        assert len(wal) == 0
    finally:
        wal.close()
    reports = [json.loads(path.read_text()) for path in ticks.glob("*.json")]
    assert reports, "no worker reported its ticks"
    serving = {pid for _, pid in answers}
    for report in reports:
        assert report["patched"].startswith("gevent"), report  # the worker was patched
        # A worker that answered requests gave its hub to the ticker too. One that
        # gunicorn started late (it replaces a worker it found slow on a busy
        # machine) may be stopped before its ticker ever ran: nothing to measure.
        if report["pid"] in serving:
            assert report["ticks"] > 0, report
        print(f"gevent worker hub gaps: {report}")


#: How each library patches a process, first thing in the script.
PATCHES = {
    "gevent": "from gevent import monkey\n\nmonkey.patch_all()\n",
    "eventlet": "import eventlet\n\neventlet.monkey_patch()\n",
}

SHORT_SCRIPT = """
import logging
import threading

from ulid import ULID

from cio_logging import CustomerIOHandler

log = logging.getLogger("patched_script.events")
log.setLevel(logging.INFO)
log.propagate = False
log.addHandler(CustomerIOHandler())


def log_some(where):
    for number in range(10):
        event_id = str(ULID())
        log.info("page_viewed", extra={"cio": {"customer_id": where, "id": event_id}})
        print(event_id)


# Two green threads and the main one, then the end of the script.
threads = [threading.Thread(target=log_some, args=(f"green-{n}",)) for n in range(2)]
for thread in threads:
    thread.start()
log_some("main")
for thread in threads:
    thread.join()
"""


@pytest.mark.parametrize("library", list(PATCHES))
def test_a_short_patched_script_delivers_at_exit(
    simulator: TrackAPISimulator, queue_dir: Path, library: str
) -> None:
    """A monkey-patched script that logs only non-essential events from green threads
    and ends: every event is delivered at exit. On Python 3.12 gevent resolves host
    names in its thread pool, which cannot start a thread at exit: the handler resolves
    them on the hub instead then (nothing else runs on it any more). eventlet, whose
    gunicorn worker gunicorn 27 no longer ships, is tested this way only."""
    require(library)
    # eventlet and its DNS library warn, on stderr, that they are deprecated.
    quiet = ["-W", "ignore"] if library == "eventlet" else []
    result = subprocess.run(
        [PYTHON, *quiet, "-c", PATCHES[library] + SHORT_SCRIPT],
        env=child_environment(simulator, queue_dir),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    ids = printed_ids(result.stdout)
    assert len(ids) == 30
    assert simulator.accepted_ids() == set(ids)
    assert simulator.duplicates == 0
