"""What fleets meet in production: a primary that fails over to its streaming replica,
and a TLS connection that verifies the server. Both clusters are started by the test;
the applications are real processes on libpq's multi-host URL."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    APPS,
    PYTHON,
    child_environment,
    handler_settings,
    running_in_ci,
    wait_for,
)
from ..pg_cluster import APP_PASSWORD, APP_USER, Cluster, server_binaries

pytestmark = pytest.mark.postgres

FLEET_APP = str(APPS / "fleet_app.py")


def _binaries() -> Path:
    binaries = server_binaries()
    if binaries is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if running_in_ci():
            pytest.fail(f"{reason}, and CI=true: the fleet-mode tests must run in CI")
        pytest.skip(reason)
    return binaries


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary whose commits wait for its streaming replica (synchronous replication:
    a commit acknowledged is on both), and the replica (``pg_basebackup -R``)."""
    primary = Cluster(_binaries(), settings="synchronous_commit = on\n")
    replica = None
    try:
        replica = Cluster(_binaries(), replica_of=primary)
        # From now on a commit waits for the replica (not before: the primary's own
        # set-up would wait for a standby that does not exist yet). Set on the primary
        # only: once promoted, the replica is alone and must not wait for one.
        with primary.admin() as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        yield primary, replica
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


def _multi_host_url(*clusters: Cluster) -> str:
    hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in clusters)
    return f"postgresql://{APP_USER}:{APP_PASSWORD}@{hosts}/cio?target_session_attrs=read-write"


class TestFailover:
    """The primary dies (stopped at once, like a crash) while two applications log; the
    replica is promoted. Nothing acknowledged is lost and delivery resumes by itself."""

    def test_the_replica_takes_over(
        self,
        simulator: TrackAPISimulator,
        primary_and_replica: tuple[Cluster, Cluster],
        tmp_path: Path,
    ) -> None:
        primary, replica = primary_and_replica
        url = _multi_host_url(primary, replica)
        apps = [
            subprocess.Popen(
                [PYTHON, FLEET_APP, "400", "--pause", "0.01", "--lease", "2"],
                env=child_environment(simulator, tmp_path / f"app{n}", CIO_LOGGING_QUEUE_URL=url),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(2)
        ]
        try:
            assert wait_for(lambda: len(simulator.accepted) >= 100, 60)
            primary.stop("immediate")
            replica.promote()
            at_promotion = simulator.accepted_ids()
            # The running applications find the new primary through the multi-host URL
            # and send again by themselves: nothing is restarted for it.
            resumed = wait_for(lambda: len(simulator.accepted_ids() - at_promotion) >= 50, 90)
            outputs = [app.communicate(timeout=120) for app in apps]
        finally:
            for app in apps:
                if app.poll() is None:
                    app.kill()
                    app.communicate()
        for app, (_, err) in zip(apps, outputs, strict=True):
            assert app.returncode == 0, err[-3000:]
            assert "Traceback" not in err, err[-6000:]
            assert APP_PASSWORD not in err
        assert resumed, f"{len(simulator.accepted_ids() - at_promotion)} sent after the promotion"
        printed = {line for out, _ in outputs for line in out.splitlines() if len(line) == 26}
        assert len(printed) == 800
        # The apps closed; what they left in the (new) primary is sent by a process
        # that comes up later, like a deploy.
        later = subprocess.Popen(
            [PYTHON, FLEET_APP, "0", "--lease", "2"],
            env=child_environment(simulator, tmp_path / "later", CIO_LOGGING_QUEUE_URL=url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: printed <= simulator.accepted_ids(), 90), (
                f"{len(printed - simulator.accepted_ids())} of 800 acknowledged events lost"
            )
        finally:
            later.communicate(timeout=60)


class TestVerifiedTLS:
    """``sslmode=verify-full`` against a server certificate made by trustme: delivered;
    and refused (the events wait in the spill, the password in no output) when the
    certificate is not the one the URL trusts."""

    def test_verify_full(
        self, simulator: TrackAPISimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        authority = trustme.CA()
        server = authority.issue_cert("localhost", "127.0.0.1")
        cluster = Cluster(
            _binaries(),
            settings="ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            files={
                "server.crt": b"".join(blob.bytes() for blob in server.cert_chain_pems),
                "server.key": server.private_key_pem.bytes(),
            },
        )
        try:
            trusted = tmp_path / "ca.pem"
            authority.cert_pem.write_to_path(str(trusted))
            stranger = tmp_path / "other-ca.pem"
            trustme.CA().cert_pem.write_to_path(str(stranger))
            for host in ("localhost", "127.0.0.1"):
                url = (
                    f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{cluster.port}/cio"
                    f"?sslmode=verify-full&sslrootcert={trusted}"
                )
                handler = CustomerIOHandler(
                    **handler_settings(simulator, tmp_path / f"tls-{host}", queue_url=url)
                )
                try:
                    logger = _attach(handler)
                    logger.info("purchase", extra=cio_event(f"tls-{host}"))
                    handler.flush()
                    assert handler.status()["spilled"] == 0
                    with cluster.admin() as conn:
                        encrypted = conn.execute(
                            "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)"
                            " WHERE application_name LIKE 'cio_logging pid %'"
                        ).fetchall()
                    assert encrypted, "no connection of the store's open"
                    assert all(ssl for (ssl,) in encrypted)
                finally:
                    handler.close()
            assert simulator.wait_for_events(2)
            url = (
                f"postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{cluster.port}/cio"
                f"?sslmode=verify-full&sslrootcert={stranger}"
            )
            handler = CustomerIOHandler(
                **handler_settings(
                    simulator, tmp_path / "tls-refused", queue_url=url, database_timeout=0.5
                )
            )
            try:
                _attach(handler).info("purchase", extra=cio_event("refused"))
                handler.commit()
                assert handler.status()["spilled"] == 1  # safe, waiting for a database
            finally:
                handler.close()
            assert "certificate verify failed" in caplog.text
            assert APP_PASSWORD not in caplog.text
        finally:
            cluster.destroy()


def _attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"test.failover.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger
