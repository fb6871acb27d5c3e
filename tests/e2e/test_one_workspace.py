"""One workspace per queue: a queue directory (its log, its dead letters, fleet mode's
spill) is only ever sent with the credentials it was written for. Two applications of
two workspaces given one queue_dir (one variable in a shared base image) must not send
each other's events, personal data, into the wrong workspace: the second is refused,
with a clear error, whatever the store and the sender (a thread, a process, `cio-logging
deliver`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_logging import CustomerIOHandler
from cio_logging.errors import ConfigurationError
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    CHILD_APP,
    CLI,
    PYTHON,
    child_environment,
    free_port,
    handler_settings,
    printed_ids,
    wait_for,
)
from ..pg_cluster import Cluster

REFUSED = "holds the queue of workspace"


@pytest.fixture
def other(tmp_path: Path) -> Iterator[TrackAPISimulator]:
    """Workspace B: another site, other credentials."""
    with TrackAPISimulator(
        state_dir=tmp_path / "sim-b", site_id="site-b", api_key="key-b-0123456789"
    ) as simulator:
        yield simulator


def _sender(simulator: TrackAPISimulator, queue_dir: Path, **env: str) -> subprocess.Popen[str]:
    """Workspace A's application: logs 3 events, then stays up delivering for a while."""
    return subprocess.Popen(
        [PYTHON, CHILD_APP, "3", "--linger", "6"],
        env=child_environment(simulator, queue_dir, **env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _intruder(
    simulator: TrackAPISimulator, queue_dir: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """Workspace B's application on the same queue_dir: logs 5 events and leaves."""
    return subprocess.run(
        [PYTHON, CHILD_APP, "5"],
        env=child_environment(simulator, queue_dir, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_apart(
    mine: TrackAPISimulator,
    theirs: TrackAPISimulator,
    sender: subprocess.Popen[str],
    intruder: subprocess.CompletedProcess[str],
) -> None:
    out, err = sender.communicate(timeout=120)
    assert sender.returncode == 0, err[-2000:]
    b_ids = set(printed_ids(intruder.stdout))
    # Workspace A received nothing of B's; B was refused, before logging anything.
    assert not (b_ids & mine.accepted_ids()), "B's events went to workspace A"
    assert intruder.returncode != 0
    assert REFUSED in intruder.stderr, intruder.stderr[-2000:]
    assert not b_ids
    assert set(printed_ids(out)) <= mine.accepted_ids()
    assert not (set(printed_ids(out)) & theirs.accepted_ids())


class TestLocalStore:
    """The diskcache queue directory."""

    @pytest.mark.parametrize("deliver", ["thread", "process"])
    def test_another_workspace_is_refused(
        self,
        simulator: TrackAPISimulator,
        other: TrackAPISimulator,
        tmp_path: Path,
        deliver: str,
    ) -> None:
        shared = tmp_path / "shared"
        sender = _sender(simulator, shared, CIO_LOGGING_DELIVER=deliver)
        try:
            assert wait_for(lambda: len(simulator.accepted) >= 3, 60)
            intruder = _intruder(other, shared, CIO_LOGGING_DELIVER="none")
        except BaseException:
            sender.kill()
            sender.communicate()
            raise
        _check_apart(simulator, other, sender, intruder)

    def test_deliver_with_other_credentials_is_refused(
        self, simulator: TrackAPISimulator, other: TrackAPISimulator, tmp_path: Path
    ) -> None:
        shared = tmp_path / "shared"
        written = subprocess.run(
            [PYTHON, CHILD_APP, "4", "--no-close"],
            env=child_environment(simulator, shared, CIO_LOGGING_DELIVER="none"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        mine = set(printed_ids(written.stdout))
        assert len(mine) == 4
        result = subprocess.run(
            [*CLI, "deliver", "--queue-dir", str(shared)],
            env=child_environment(other, shared),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert REFUSED in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert not (mine & other.accepted_ids())

    def test_the_constructor_says_why(
        self, simulator: TrackAPISimulator, other: TrackAPISimulator, tmp_path: Path
    ) -> None:
        shared = tmp_path / "shared"
        CustomerIOHandler(**handler_settings(simulator, shared)).close()
        with pytest.raises(ConfigurationError) as caught:
            CustomerIOHandler(**handler_settings(other, shared))
        assert REFUSED in str(caught.value)
        assert "site-b" in str(caught.value)
        assert other.api_key not in str(caught.value)
        # The same workspace opens it as before.
        CustomerIOHandler(**handler_settings(simulator, shared)).close()


@pytest.mark.postgres
class TestFleetSpill:
    """Fleet mode: the spill in queue_dir is moved into the database as the workspace of
    whoever moves it, so another workspace's spill must never be there."""

    def test_another_workspace_is_refused(
        self,
        simulator: TrackAPISimulator,
        other: TrackAPISimulator,
        pg_url: str,
        pg_cluster: Cluster,
        tmp_path: Path,
    ) -> None:
        shared = tmp_path / "shared"
        sender = _sender(simulator, shared, CIO_LOGGING_QUEUE_URL=pg_url)
        try:
            assert wait_for(lambda: len(simulator.accepted) >= 3, 60)
            # B's database does not answer: its events would go to the spill in shared/.
            unreachable = pg_cluster.url().replace(f":{pg_cluster.port}/", f":{free_port()}/")
            intruder = _intruder(other, shared, CIO_LOGGING_QUEUE_URL=unreachable)
        except BaseException:
            sender.kill()
            sender.communicate()
            raise
        _check_apart(simulator, other, sender, intruder)
