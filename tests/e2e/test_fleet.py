"""Fleet mode end to end in one process: a handler on PostgreSQL delivering to the
simulator over HTTPS, its status, two workspaces on one database, the database away."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psycopg
import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import HandlerFactory, handler_settings, wait_for
from ..pg_cluster import APP_PASSWORD, Cluster

pytestmark = pytest.mark.postgres


def attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"test.fleet.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


class TestFleetHandler:
    """The handler with queue_url: same API, the queue in the database."""

    def test_delivers_and_leaves_nothing_queued(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, fleet_url: str
    ) -> None:
        pg_url = fleet_url  # straight to PostgreSQL, then through PgBouncer
        handler = make_handler(queue_url=pg_url, lease_seconds=3)
        logger = attach(handler)
        for number in range(30):
            name = "purchase" if number % 2 else "page_viewed"
            logger.info(name, extra=cio_event(f"user-{number}", n=number))
        handler.flush()
        assert simulator.wait_for_events(30)
        assert len(simulator.accepted_ids()) == 30
        with psycopg.connect(pg_url) as conn:
            (left,) = conn.execute("SELECT count(*) FROM cio_queue").fetchall()[0]
        assert left == 0
        status = handler.status()
        assert status["store"] == "postgresql"
        assert status["queued"] == 0
        assert status["lease"]["pid"] == os.getpid()
        assert status["fleet"]["breaker"] == "closed"
        assert status["delivering_process"] is True
        assert APP_PASSWORD not in repr(status)
        assert APP_PASSWORD not in repr(handler.settings)

    def test_the_environment_variable_selects_it(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        pg_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("CIO_LOGGING_QUEUE_URL", pg_url)
        handler = CustomerIOHandler(**handler_settings(simulator, queue_dir))
        try:
            attach(handler).info("purchase", extra=cio_event("u1"))
            handler.flush()
            assert handler.status()["store"] == "postgresql"
            assert simulator.wait_for_events(1)
        finally:
            handler.close()

    def test_dead_letters_land_in_the_table(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, fleet_url: str
    ) -> None:
        pg_url = fleet_url  # straight to PostgreSQL, then through PgBouncer
        simulator.poison_names.add("broken")
        handler = make_handler(queue_url=pg_url)
        logger = attach(handler)
        logger.info("broken", extra=cio_event("u1", plan="pro"))
        logger.info("purchase", extra=cio_event("u2"))
        handler.flush()
        assert wait_for(lambda: handler.status()["dead_letters"] == 1)
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT count(*), event FROM cio_dead_letter GROUP BY event ORDER BY count DESC"
            ).fetchall()
            (customer, plan) = conn.execute(
                "SELECT customer_id, data->>'plan' FROM cio_dead_letter"
            ).fetchall()[0]
        assert rows == [(1, "broken")]
        assert (customer, plan) == ("u1", "pro")


class TestTakeover:
    """A process taking the lease keeps the fleet's open breaker and pauses."""

    def test_an_open_breaker_is_adopted(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, pg_url: str
    ) -> None:
        handler = make_handler(queue_url=pg_url, reset_timeout=30)
        workspace = handler.settings.workspace
        handler.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO cio_sender_state (workspace, term, state) VALUES (%s, 0, %s)"
                " ON CONFLICT (workspace) DO UPDATE SET state = excluded.state",
                (workspace, json.dumps({"breaker": "open", "probe_at": time.time() + 20})),
            )
        successor = make_handler(queue_url=pg_url, reset_timeout=30)
        attach(successor).info("purchase", extra=cio_event("u1"))
        assert wait_for(lambda: successor.status()["delivering_process"])
        assert wait_for(lambda: successor.status()["breaker"] == "open")
        time.sleep(1.0)
        assert simulator.requests == []  # no batch, no early probe
        assert 15 < successor._worker.breaker.seconds_until_probe() <= 20


class TestWorkspaces:
    """Two workspaces on one database never see each other's events."""

    def test_each_simulator_gets_only_its_own(
        self, pg_url: str, tmp_path: Path, simulator: TrackAPISimulator
    ) -> None:
        with TrackAPISimulator(
            state_dir=tmp_path / "other-sim", site_id="other-site", api_key="other-key"
        ) as other:
            first = CustomerIOHandler(
                **handler_settings(simulator, tmp_path / "q1", queue_url=pg_url)
            )
            second = CustomerIOHandler(**handler_settings(other, tmp_path / "q2", queue_url=pg_url))
            try:
                for number in range(10):
                    attach(first).info("purchase", extra=cio_event("a", n=number))
                    attach(second).info("signup", extra=cio_event("b", n=number))
                first.flush()
                second.flush()
                assert simulator.wait_for_events(10)
                assert other.wait_for_events(10)
                assert {e.name for e in simulator.accepted} == {"purchase"}
                assert {e.name for e in other.accepted} == {"signup"}
                assert first.status()["lease"]["pid"] == os.getpid()
                assert second.status()["lease"]["pid"] == os.getpid()
            finally:
                first.close()
                second.close()


class TestDatabaseAway:
    """PostgreSQL stopped: emit stays fast and safe, rows spill and move back."""

    def test_gauges_skip_a_reading_rather_than_fail(
        self,
        own_cluster: Cluster,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        settings = handler_settings(
            simulator, queue_dir, queue_url=own_cluster.url(), database_timeout=0.3
        )
        handler = CustomerIOHandler(meter_provider=provider, **settings)
        try:
            logger = attach(handler)
            own_cluster.stop()
            logger.info("purchase", extra=cio_event("during"))  # spills: database away
            data = reader.get_metrics_data()
            names = {
                metric.name
                for resource in (data.resource_metrics if data else [])
                for scope in resource.scope_metrics
                for metric in scope.metrics
            }
            assert "cio.queue.depth" not in names  # skipped, not failed
            assert "cio.circuit.state" in names
            assert "Callback failed" not in caplog.text
        finally:
            handler.close()
            provider.shutdown()

    def test_spill_then_delivery(
        self, own_cluster: Cluster, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        url = own_cluster.url()
        settings = handler_settings(
            simulator, queue_dir, queue_url=url, database_timeout=0.3, lease_seconds=2
        )
        handler = CustomerIOHandler(**settings)
        logger = attach(handler)
        try:
            logger.info("purchase", extra=cio_event("before"))
            handler.flush()
            own_cluster.stop()
            slowest = 0.0
            for number in range(50):
                started = time.monotonic()
                logger.info("purchase", extra=cio_event("during", n=number))
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 0.3 + 0.3
            assert handler.status()["spilled"] == 50
            own_cluster.start()
            assert simulator.wait_for_events(51, timeout=30)
            assert wait_for(lambda: handler.status()["spilled"] == 0)
        finally:
            handler.close()
