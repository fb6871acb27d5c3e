"""A short-lived script on the fleet store: whatever ends it (the end of the script, an
exception, sys.exit), ``logging.shutdown()`` commits every event it logged into
PostgreSQL, on the calling thread (the interpreter refuses thread pools and new threads
by then), with ``deliver="none"`` and ``"thread"``, straight to PostgreSQL and through
PgBouncer. Real processes, a real database."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest

from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import APPS, PYTHON, child_environment, printed_ids

pytestmark = pytest.mark.postgres

SCRIPT = str(APPS / "short_script.py")
EXIT_CODES = {"normal": 0, "exception": 1, "exit": 3}


def _queued(url: str) -> set[str]:
    with psycopg.connect(url, prepare_threshold=None) as conn:
        return {key for (key,) in conn.execute("SELECT id FROM cio_queue").fetchall()}


class TestShortScript:
    """One essential event and 200 others, still in memory when the script ends."""

    @pytest.mark.parametrize("deliver", ["none", "thread"])
    @pytest.mark.parametrize("ending", ["normal", "exception", "exit"])
    def test_every_event_is_committed_at_exit(
        self,
        simulator: TrackAPISimulator,
        fleet_url: str,
        tmp_path: Path,
        deliver: str,
        ending: str,
    ) -> None:
        queue_dir = tmp_path / "script"
        result = subprocess.run(
            [PYTHON, SCRIPT, "200", ending],
            env=child_environment(
                simulator, queue_dir, CIO_LOGGING_QUEUE_URL=fleet_url, CIO_LOGGING_DELIVER=deliver
            ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == EXIT_CODES[ending], result.stderr[-3000:]
        ids = printed_ids(result.stdout)
        assert len(ids) == 201
        # In the database (or already sent): none lost, none left in the local spill.
        missing = set(ids) - simulator.accepted_ids() - _queued(fleet_url)
        assert not missing, f"{len(missing)} of 201 lost:\n{result.stderr[-3000:]}"
        spill = WriteAheadLog(queue_dir / "spill")
        assert len(spill) == 0
        spill.close()
        assert "cannot" not in result.stderr, result.stderr[-3000:]
        if ending != "exception":
            assert "Traceback" not in result.stderr, result.stderr[-3000:]
