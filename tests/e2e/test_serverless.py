"""Serverless functions: the platform freezes the process when an invocation returns.

tests/apps/serverless_app.py imitates a function runtime: one process, several
invocations. The test freezes it (SIGSTOP) as soon as an invocation has returned, as the
platform does, looks at what Customer.io received while nothing in the process can run,
thaws it for the next invocation (SIGCONT), and at the end kills it (SIGKILL), as the
platform recycles an instance without a signal. Nothing acknowledged may be lost:
what an invocation logged is delivered before it returns, or, when the budget could
not send it, on disk for a later process, which sends it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import PROJECT_ROOT, PYTHON, HandlerFactory, child_environment, wait_for

SERVERLESS_APP = str(PROJECT_ROOT / "tests" / "apps" / "serverless_app.py")


class Runtime:
    """One instance of the function: a process that serves invocations until killed."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.acknowledged: list[str] = []

    def invoke(self, count: int, *, fail: bool = False) -> list[str]:
        """One invocation; returns its events' ids once it returned, and freezes the
        process at once."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.stdin.write(f"invoke {count}{' raise' if fail else ''}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().split()
        os.kill(self.process.pid, signal.SIGSTOP)  # the invocation returned: frozen
        assert answer[:1] == ["returned"], answer
        self.acknowledged += answer[1:]
        return answer[1:]


@contextmanager
def runtime(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    mode: str,
    budget: float = 5.0,
    commit_interval: float = 0.05,
    queue_url: str | None = None,
) -> Iterator[Runtime]:
    env = child_environment(
        simulator,
        queue_dir,
        CIO_TEST_BUDGET=str(budget),
        CIO_TEST_HANDLER_OPTIONS=json.dumps({"commit_interval": commit_interval}),
    )
    if queue_url is not None:
        env["CIO_LOGGING_QUEUE_URL"] = queue_url
    with subprocess.Popen(
        [PYTHON, SERVERLESS_APP, mode],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
            yield Runtime(process)
        finally:
            process.kill()  # the platform recycles the instance: SIGKILL, even when frozen
            process.wait(30)


def on_disk(queue_dir: Path, ids: list[str]) -> set[str]:
    wal = WriteAheadLog(queue_dir / "wal")
    try:
        return {event_id for event_id in ids if event_id in wal}
    finally:
        wal.close()


def test_every_acknowledged_event_is_delivered_before_the_invocation_returns(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    """Three invocations, the last of which raises, then the instance is recycled.
    ``deliver_before_return`` delivers after a failed invocation too. (A ``flush()`` as
    the function's last statement, the recipe before it, does not: run that way, the
    failed invocation's 10 events were not delivered at its return, and its last
    non-essential one, still in memory, died with the instance: 1 of 30 lost; the
    others had been committed by the essential events logged after them.) The commit
    interval is 5 s, so that nothing but the wrapper commits them."""
    with runtime(simulator, queue_dir, "wrapped", commit_interval=5) as instance:
        for fail in (False, False, True):
            logged = instance.invoke(10, fail=fail)
            assert len(logged) == 10
            # Frozen: nothing in the process runs now. Each was sent before the return.
            missing = set(logged) - simulator.accepted_ids()
            assert not missing, f"{len(missing)} of {len(logged)} not delivered at return"
        acknowledged = instance.acknowledged
    lost = set(acknowledged) - simulator.accepted_ids() - on_disk(queue_dir, acknowledged)
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged events lost"
    assert simulator.duplicates == 0


def test_what_the_budget_could_not_send_is_on_disk_and_sent_later(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> None:
    """Customer.io fails for the whole invocation: it returns within its budget with its
    events on disk; the instance is killed while frozen; a later process on the same
    queue (the next instance, or the fleet's sender on the fleet store) sends them."""
    simulator.fail(503)
    with runtime(simulator, queue_dir, "wrapped", budget=0.5) as instance:
        acknowledged = instance.invoke(10) + instance.invoke(10, fail=True)
    assert simulator.accepted == []
    assert on_disk(queue_dir, acknowledged) == set(acknowledged)
    simulator.clear_faults()
    make_handler()  # a later process on the same queue
    assert wait_for(lambda: simulator.accepted_ids() >= set(acknowledged), 30)
    assert simulator.duplicates == 0


@pytest.mark.postgres
def test_in_the_fleet_store_what_is_left_outlives_the_instance(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    tmp_path: Path,
    pg_url: str,
    make_handler: HandlerFactory,
) -> None:
    """The same outage on the fleet store: the instance's disk goes with it when it is
    recycled, and its events wait in PostgreSQL; another instance, on a disk of its
    own, sends them."""
    simulator.fail(503)
    first_disk = tmp_path / "instance-1"  # make_handler's queue_dir is another disk
    with runtime(simulator, first_disk, "wrapped", budget=0.5, queue_url=pg_url) as instance:
        acknowledged = instance.invoke(10) + instance.invoke(10, fail=True)
    assert simulator.accepted == []
    shutil.rmtree(first_disk)  # recycled: its local disk is gone
    simulator.clear_faults()
    make_handler(queue_url=pg_url)  # another instance, on its own disk (queue_dir)
    assert wait_for(lambda: simulator.accepted_ids() >= set(acknowledged), 30)
    assert simulator.duplicates == 0
