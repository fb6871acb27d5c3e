"""The local spill of fleet mode is always moved into PostgreSQL: by any process that
can reach the database, whatever its ``deliver`` (here applications with
``deliver="none"`` and a separate ``cio-logging deliver``), at start, after the
database recovers and at exit; ``flush()`` waits for it; ``status`` shows each host's
spilled rows."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import APPS, CLI, PYTHON, child_environment, handler_settings, wait_for
from ..pg_cluster import APP_USER, Cluster, server_binaries

pytestmark = pytest.mark.postgres

FLEET_APP = str(APPS / "fleet_app.py")


def _attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"test.spill.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def _spilled(queue_dir: Path) -> int:
    spill = WriteAheadLog(queue_dir / "spill")
    try:
        return len(spill)
    finally:
        spill.close()


class TestAppendOnlyProcesses:
    """Applications that only append (``deliver="none"``) and one ``cio-logging
    deliver``: the database restarted, then killed, while they log."""

    def test_nothing_stranded_in_their_spills(
        self, simulator: TrackAPISimulator, pg_cluster: Cluster, tmp_path: Path
    ) -> None:
        binaries = server_binaries()
        assert binaries is not None  # pg_cluster skipped (or failed, in CI) without them
        # A commit acknowledged survives the server's crash (the suite's clusters skip
        # that wait: synchronous_commit = off), as in production.
        own_cluster = Cluster(binaries, settings="synchronous_commit = on\n")
        try:
            self._run(simulator, own_cluster, tmp_path)
        finally:
            own_cluster.destroy()

    def _run(self, simulator: TrackAPISimulator, own_cluster: Cluster, tmp_path: Path) -> None:
        url = own_cluster.url()
        sender = subprocess.Popen(
            [*CLI, "deliver", "--queue-url", url, "--queue-dir", str(tmp_path / "sender")],
            env=child_environment(simulator, tmp_path / "sender"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        apps = [
            subprocess.Popen(
                [PYTHON, FLEET_APP, "300", "--pause", "0.01"],
                env=child_environment(
                    simulator,
                    tmp_path / f"app{number}",
                    CIO_LOGGING_QUEUE_URL=url,
                    CIO_LOGGING_DELIVER="none",
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for number in range(2)
        ]
        try:
            assert wait_for(lambda: len(simulator.accepted) >= 50, 60)
            own_cluster.stop()  # a restart
            time.sleep(1.0)
            own_cluster.start()
            assert wait_for(lambda: len(simulator.accepted) >= 250, 60)
            own_cluster.stop("immediate")  # killed
            time.sleep(1.0)
            own_cluster.start()
            outputs = [app.communicate(timeout=120) for app in apps]  # stdin closed: exit
        finally:
            for app in apps:
                if app.poll() is None:
                    app.kill()
                    app.communicate()
        printed = {line for out, _ in outputs for line in out.splitlines() if len(line) == 26}
        assert len(printed) == 600
        try:
            assert wait_for(lambda: printed <= simulator.accepted_ids(), 90), (
                f"{len(printed - simulator.accepted_ids())} of 600 missing; spilled: "
                f"{[_spilled(tmp_path / f'app{n}') for n in range(2)]}"
            )
        finally:
            sender.terminate()
            sender.communicate(timeout=60)
        assert [_spilled(tmp_path / f"app{number}") for number in range(2)] == [0, 0]


class TestFlushWaits:
    """``flush()`` counts rows in the spill as not yet committed: with
    ``deliver="process"`` it returned at once while they waited there."""

    def test_flush_moves_the_spill_then_waits_for_the_sender(
        self, simulator: TrackAPISimulator, own_cluster: Cluster, tmp_path: Path
    ) -> None:
        handler = CustomerIOHandler(
            **handler_settings(
                simulator,
                tmp_path / "app",
                queue_url=own_cluster.url(),
                deliver="process",
                database_timeout=0.3,
                flush_timeout=60,
            )
        )
        try:
            logger = _attach(handler)
            own_cluster.stop()
            for number in range(20):
                logger.info("purchase", extra=cio_event("flushed", n=number))
            assert handler.status()["spilled"] == 20
            own_cluster.start()
            handler.flush()
            assert handler.status()["spilled"] == 0
            assert len(simulator.accepted) == 20
        finally:
            handler.close()


class TestStatusPerHost:
    """``cio-logging status --queue-url`` shows the rows waiting in each host's spill:
    here the role lost its INSERT grant on ``cio_queue`` (a commit refused for every
    row), so they wait until it is given back."""

    def test_spilled_rows_are_shown_until_moved(
        self, simulator: TrackAPISimulator, pg_url: str, pg_cluster: Cluster, tmp_path: Path
    ) -> None:
        handler = CustomerIOHandler(
            **handler_settings(simulator, tmp_path / "app", queue_url=pg_url, deliver="none")
        )
        dbname = pg_url.rsplit("/", 1)[1]
        owner = f"owner_{uuid.uuid4().hex[:6]}"
        try:
            logger = _attach(handler)
            logger.info("purchase", extra=cio_event("before"))  # the schema exists
            with pg_cluster.admin(dbname) as conn:
                # The tables' owner is the application role: hand them to another one
                # so that the application role can lose a grant.
                conn.execute(f"CREATE ROLE {owner}")
                conn.execute(f"ALTER TABLE cio_queue OWNER TO {owner}")
                conn.execute(f"GRANT SELECT, UPDATE, DELETE ON cio_queue TO {APP_USER}")
            for number in range(7):
                logger.info("purchase", extra=cio_event("spilled", n=number))
            assert handler.status()["spilled"] == 7

            def shown() -> list[dict[str, object]]:
                result = subprocess.run(
                    [*CLI, "status", "--queue-url", pg_url, "--json"],
                    env=child_environment(simulator, tmp_path / "operator"),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 0, result.stderr
                spilled: list[dict[str, object]] = json.loads(result.stdout)["spilled"]
                return spilled

            assert wait_for(lambda: [s["rows"] for s in shown()] == [7], 30)
            (spill,) = shown()
            assert spill["directory"] == str(tmp_path / "app" / "spill")
            with pg_cluster.admin(dbname) as conn:
                conn.execute(f"GRANT INSERT ON cio_queue TO {APP_USER}")
                conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_USER}")
            assert wait_for(lambda: shown() == [], 30)
            assert wait_for(lambda: handler.status()["spilled"] == 0)
            with psycopg.connect(pg_url) as conn:
                (queued,) = conn.execute("SELECT count(*) FROM cio_queue").fetchall()[0]
            assert queued == 8
        finally:
            handler.close()
