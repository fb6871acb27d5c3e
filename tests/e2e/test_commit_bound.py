"""During an outage, the sender's bookkeeping does not hold back the application's commits.

The sender writes to the queue's SQLite file (retry times, one statement per batch;
acknowledgements, one per batch) while the application commits to it. SQLite has one
write lock per file: every sender write holds it for one statement over one batch's
rows, never across a request. Here a separate sender (``cio-logging deliver``) works
through a backlog against a server failing every request, with the breaker kept
closed so it writes retry times as fast as it can, and is SIGKILLed again and again
(a writer killed inside its transaction: the lock goes with the process). Meanwhile
the application logs essential calls, each of which returns only once committed: the
longest such commit is the bound the README states.
"""

from __future__ import annotations

import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cio_logging import CustomerIOHandler, cio_event, cio_identify
from cio_logging.simulator import TrackAPISimulator
from tests.helpers import PROJECT_ROOT, child_environment, handler_settings, wait_for

# The breaker never opens, retries come due at once: the sender writes retry times for
# batch after batch, as fast as the failing server answers.
_BUSY_SENDER = {
    "consecutive_failures": 1_000_000,
    "volume_threshold": 1_000_000,
    "max_backoff": 0.05,
    "max_attempts": 10_000,
    "flush_interval": 0.05,
    "request_timeout": 2,
    "max_requests_per_second": 1_000,
}
#: What the README states: an application's commit waits at most this long for the
#: sender's writes, on a busy 2-core machine (measured: see the test's output).
COMMIT_BOUND_SECONDS = 1.0


def _start_sender(simulator: TrackAPISimulator, queue_dir: Path) -> subprocess.Popen[bytes]:
    env = child_environment(simulator, queue_dir, CIO_LOGGING_OPTIONS=json.dumps(_BUSY_SENDER))
    with (queue_dir.parent / "sender.err").open("ab") as errors:
        return subprocess.Popen(
            [sys.executable, "-m", "cio_logging", "deliver"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )


@pytest.mark.slow
def test_commits_are_not_held_back_by_the_senders_bookkeeping_during_an_outage(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    backlog = CustomerIOHandler(**handler_settings(simulator, queue_dir, deliver="none"))
    log = logging.getLogger("test.commit_bound")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(backlog)
    for n in range(20_000):
        log.info("queued", extra=cio_event(f"p{n % 500}", n=n))
    backlog.flush()
    log.removeHandler(backlog)
    backlog.close()

    simulator.fail(503)  # every request fails, for the whole test
    sender = _start_sender(simulator, queue_dir)
    app = CustomerIOHandler(**handler_settings(simulator, queue_dir, deliver="none"))
    log.addHandler(app)
    waits: list[float] = []
    kills = 0
    try:
        assert wait_for(lambda: len(simulator.requests) > 20, timeout=60), (
            queue_dir.parent / "sender.err"
        ).read_text()[-3000:]
        # Until the sender has been killed often and has made many failing requests (a
        # count of work, not a length of time: a busy machine only makes it longer).
        first = len(simulator.requests)
        give_up = time.monotonic() + 300
        next_kill = time.monotonic() + 1.0
        n = 0
        while kills < 10 or len(simulator.requests) - first < 100:
            assert time.monotonic() < give_up, (kills, len(simulator.requests) - first)
            started = time.perf_counter()
            log.info("essential", extra=cio_identify(f"app-{n}", n=n))  # committed on return
            waits.append(time.perf_counter() - started)
            n += 1
            if time.monotonic() >= next_kill:
                sender.send_signal(signal.SIGKILL)
                sender.wait(10)
                kills += 1
                sender = _start_sender(simulator, queue_dir)
                next_kill = time.monotonic() + 0.7
            time.sleep(0.002)
        requests = len(simulator.requests) - first
    finally:
        log.removeHandler(app)
        if sender.poll() is None:
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
        app.close()
    waits.sort()
    p99 = waits[int(len(waits) * 0.99)]
    print(
        f"{len(waits)} commits while the sender made {requests} failing requests and was "
        f"SIGKILLed {kills} times: median {statistics.median(waits) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms"
    )
    assert kills >= 10
    assert requests >= 100
    assert waits[-1] < COMMIT_BOUND_SECONDS
