"""Fleet mode with real processes on one real database: a sender SIGKILLed with its
disk, a sender paused past its lease (SIGSTOP/SIGCONT), an outage seen by the whole
fleet, the database stopped with an application restart in the gap, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, handler_settings, wait_for
from ..pg_cluster import APP_PASSWORD, Cluster

pytestmark = pytest.mark.postgres

FLEET_APP = str(PROJECT_ROOT / "tests" / "apps" / "fleet_app.py")
SKEWED_CLOCK = str(PROJECT_ROOT / "tests" / "apps" / "skewed_clock")
CLI = [PYTHON, "-m", "cio_logging.cli"]


class Host:
    """One fleet_app.py process and what it printed so far."""

    def __init__(
        self,
        sim: TrackAPISimulator,
        url: str,
        queue_dir: Path,
        count: int,
        *args: str,
        clock_skew: float = 0.0,
    ) -> None:
        self.queue_dir = queue_dir
        env = child_environment(sim, queue_dir, CIO_LOGGING_QUEUE_URL=url)
        if clock_skew:
            # This host's wall clock is off (see tests/apps/skewed_clock).
            env["PYTHONPATH"] = os.pathsep.join([SKEWED_CLOCK, env["PYTHONPATH"]])
            env["CIO_TEST_CLOCK_SKEW"] = str(clock_skew)
        self.process = subprocess.Popen(
            [PYTHON, FLEET_APP, str(count), *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.errors)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ids(self) -> list[str]:
        return [line for line in list(self.lines) if len(line) == 26]

    @property
    def done(self) -> bool:
        return "done" in self.lines

    def emit_max(self) -> float:
        return self._figure("emit-max")

    def emit_p99(self) -> float:
        return self._figure("emit-p99")

    def _figure(self, name: str) -> float:
        for line in self.lines:
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} line")

    def finish(self, timeout: float = 30.0) -> int:
        """Let it close (stdin closed) and wait; its exit code."""
        if self.process.poll() is None and self.process.stdin is not None:
            with _suppress_pipe():
                self.process.stdin.close()
        code = self.process.wait(timeout)
        self._close_pipes()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with _suppress_pipe():
                    stream.close()


class _suppress_pipe:  # noqa: N801 - a tiny context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is BrokenPipeError


def lease(url: str) -> tuple[int, int, bool] | None:
    """(term, pid, still valid) of the only workspace's lease, or None."""
    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute("SELECT term, pid, expires_at > now() FROM cio_lease").fetchall()
        except psycopg.errors.UndefinedTable:
            return None  # no process has opened the store yet
    return None if not rows else (int(rows[0][0]), int(rows[0][1]), bool(rows[0][2]))


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for host in made:
        host.kill()
        assert APP_PASSWORD not in "\n".join(host.lines + host.errors)


def _sender(url: str, fleet: list[Host], timeout: float = 20.0) -> Host:
    pids = {host.pid: host for host in fleet}
    found: list[Host] = []

    def holder() -> bool:
        current = lease(url)
        if current is not None and current[2] and current[1] in pids:
            found.append(pids[current[1]])
            return True
        return False

    assert wait_for(holder, timeout)
    return found[-1]


class TestFourHosts:
    """Four processes, own spill directories, one database; the sender dies with its disk."""

    @pytest.mark.slow
    def test_sigkill_of_the_sender_loses_nothing(
        self,
        simulator: TrackAPISimulator,
        pg_url: str,
        tmp_path: Path,
        hosts: list[Host],
    ) -> None:
        simulator.set_latency(0.02)
        lease_seconds = 3.0
        for number in range(4):
            hosts.append(
                Host(
                    simulator,
                    pg_url,
                    tmp_path / f"host{number}",
                    500,
                    "--pause",
                    "0.004",
                    "--lease",
                    str(lease_seconds),
                )
            )
        sender = _sender(pg_url, hosts)
        assert wait_for(lambda: len(simulator.accepted) >= 300, 30)
        term_before = lease(pg_url)
        assert term_before is not None
        killed_ids = set(sender.ids)
        killed_at = time.monotonic()
        sender.kill()
        shutil.rmtree(sender.queue_dir)  # the host is gone with its disk
        survivors = [host for host in hosts if host is not sender]

        def taken_over() -> bool:
            current = lease(pg_url)
            return current is not None and current[0] > term_before[0] and current[2]

        assert wait_for(taken_over, lease_seconds + 10)
        takeover = time.monotonic() - killed_at
        assert wait_for(lambda: all(host.done for host in survivors), 60)
        expected = killed_ids | {i for host in survivors for i in host.ids}
        assert wait_for(lambda: expected <= simulator.accepted_ids(), 60), len(
            expected - simulator.accepted_ids()
        )
        # Nothing under a new id: an id no host printed can only be the killed host's
        # last event, committed (emit returned) just before the SIGKILL hit its print.
        unprinted = [e for e in simulator.accepted if e.id not in expected]
        assert all(e.customer_id == f"host-{sender.pid}" for e in unprinted), unprinted
        assert len(unprinted) <= 1
        # Resends: at most the batches in flight at the kill, under their own ids.
        assert simulator.duplicates <= 4 * 50
        # Takeover within the lease (plus one poll and the time to notice).
        assert takeover <= lease_seconds + 2.5, takeover
        for host in survivors:
            assert host.finish() == 0
        print(
            f"takeover {takeover:.2f} s, duplicates {simulator.duplicates}, "
            f"delivered {len(simulator.accepted_ids())}"
        )


class TestFencing:
    """A sender paused past its lease neither deletes the new sender's rows nor sends
    anything under a second id."""

    def test_sigstop_past_the_lease_then_sigcont(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path, hosts: list[Host]
    ) -> None:
        simulator.set_latency(0.05)
        lease_seconds = 2.0
        for number in range(2):
            hosts.append(
                Host(
                    simulator,
                    pg_url,
                    tmp_path / f"host{number}",
                    300,
                    "--pause",
                    "0.01",
                    "--lease",
                    str(lease_seconds),
                )
            )
        sender = _sender(pg_url, hosts)
        other = next(host for host in hosts if host is not sender)
        assert wait_for(lambda: len(simulator.accepted) >= 50, 30)
        first = lease(pg_url)
        assert first is not None
        os.kill(sender.pid, signal.SIGSTOP)
        try:

            def moved() -> bool:
                current = lease(pg_url)
                return current is not None and current[1] == other.pid and current[2]

            assert wait_for(moved, lease_seconds + 10)
            time.sleep(1.0)  # the new sender works while the old one sleeps
        finally:
            os.kill(sender.pid, signal.SIGCONT)
        assert wait_for(lambda: sender.done and other.done, 60)
        printed = set(sender.ids) | set(other.ids)
        assert len(printed) == 600
        assert wait_for(lambda: printed <= simulator.accepted_ids(), 60)
        assert simulator.accepted_ids() == printed  # no event under a second id
        current = lease(pg_url)
        assert current is not None
        assert current[1] == other.pid  # the stale one did not take it back
        with psycopg.connect(pg_url) as conn:
            (left,) = conn.execute("SELECT count(*) FROM cio_queue").fetchall()[0]
        assert wait_for(lambda: _queue_rows(pg_url) == 0, 20), left
        assert sender.finish() == 0
        assert other.finish() == 0


def _queue_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM cio_queue").fetchall()[0]
    return int(rows)


class TestOutage:
    """Customer.io answers 503 for 20 s while four processes log."""

    @pytest.mark.slow
    def test_one_sender_probes_for_the_fleet(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path, hosts: list[Host]
    ) -> None:
        for number in range(4):
            hosts.append(
                Host(
                    simulator,
                    pg_url,
                    tmp_path / f"host{number}",
                    400,
                    "--pause",
                    "0.06",
                    "--reset-timeout",
                    "2",
                )
            )
        sender = _sender(pg_url, hosts)
        assert wait_for(lambda: len(simulator.accepted) >= 20, 30)
        outage_start = time.time()
        simulator.fail(503, duration=20)
        time.sleep(8)
        status = subprocess.run(
            [*CLI, "status", "--queue-url", pg_url, "--json"],
            env=child_environment(simulator, tmp_path / "operator"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert APP_PASSWORD not in status.stdout + status.stderr
        shown = json.loads(status.stdout)
        assert shown["breaker"] == "open"
        assert shown["sender"]["pid"] == sender.pid
        time.sleep(max(0.0, outage_start + 20 - time.time()))
        outage_end = time.time()
        during = [r for r in simulator.requests if outage_start <= r.time < outage_end]
        # One sender: the failures that open its breaker, then a probe every ~2 s.
        # Four senders would make four times as many.
        assert len(during) <= 4 + 5 + 20 / 2 + 3, len(during)
        assert wait_for(lambda: all(host.done for host in hosts), 60)
        printed = {i for host in hosts for i in host.ids}
        assert wait_for(lambda: printed <= simulator.accepted_ids(), 90)
        print(f"requests during the 20 s outage: {len(during)}")


class TestFleetRateCap:
    """max_requests_per_second holds for the fleet: the one sender's cap is the fleet's."""

    @pytest.mark.slow
    def test_no_second_at_the_server_holds_more(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path, hosts: list[Host]
    ) -> None:
        for number in range(4):
            hosts.append(
                Host(
                    simulator,
                    pg_url,
                    tmp_path / f"host{number}",
                    100,
                    "--max-rps",
                    "5",
                    "--data-bytes",
                    "30000",
                )
            )
        assert wait_for(lambda: all(host.done for host in hosts), 60)
        printed = {i for host in hosts for i in host.ids}
        assert wait_for(lambda: printed <= simulator.accepted_ids(), 120)
        times = sorted(record.time for record in simulator.requests)
        first, peak = 0, 0
        for last, arrived in enumerate(times):
            while arrived - times[first] >= 1.0:
                first += 1
            peak = max(peak, last - first + 1)
        print(f"{len(times)} requests, at most {peak} in one second")
        assert peak <= 5


class TestDatabaseDown:
    """PostgreSQL stopped for 10 s while events are logged; the app restarts meanwhile."""

    @pytest.mark.slow
    def test_nothing_lost_and_emit_stays_fast(
        self, simulator: TrackAPISimulator, own_cluster: Cluster, tmp_path: Path
    ) -> None:
        url = own_cluster.url()
        queue_dir = tmp_path / "app"
        normal = Host(simulator, url, queue_dir, 200, "--pause", "0.01", "--exit-after")
        assert normal.finish() == 0, normal.errors[-20:]
        usual = normal.emit_max()
        own_cluster.stop()
        stopped_at = time.monotonic()
        first = Host(simulator, url, queue_dir, 200, "--pause", "0.01", "--exit-after")
        assert first.finish() == 0, "\n".join(
            first.errors[-60:]
        )  # the application exits (a restart)
        second = Host(simulator, url, queue_dir, 200, "--pause", "0.01")
        assert wait_for(lambda: second.done, 60)
        time.sleep(max(0.0, stopped_at + 10 - time.monotonic()))
        own_cluster.start()
        printed = set(normal.ids) | set(first.ids) | set(second.ids)
        assert len(printed) == 600
        assert wait_for(lambda: printed <= simulator.accepted_ids(), 60), len(
            printed - simulator.accepted_ids()
        )
        assert second.finish() == 0
        errors = "\n".join(first.errors + second.errors)
        assert "Traceback" not in errors
        # The worst emit while the database was away: one wait for the timeout (0.5 s),
        # then the spill; never the database's whole outage.
        usual_p99 = normal.emit_p99()
        during_p99 = max(first.emit_p99(), second.emit_p99())
        print(
            f"emit max: usual {usual:.4f} s, during {first.emit_max():.4f} s; "
            f"p99: usual {usual_p99:.4f} s, during {during_p99:.4f} s"
        )
        assert first.emit_max() < 0.5 + 0.5
        assert second.emit_max() < 0.5 + 0.5
        # Allowance for a noisy shared machine: a few milliseconds over the 2x.
        assert during_p99 <= 2 * usual_p99 + 0.005


class TestFleetCommands:
    """status and dlq with --queue-url from a process that does not send."""

    def test_status_and_dead_letters(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path
    ) -> None:
        simulator.poison_names.add("broken")
        handler = CustomerIOHandler(
            **handler_settings(simulator, tmp_path / "app", queue_url=pg_url, lease_seconds=3)
        )
        logger = handler_logger(handler)
        try:
            for number in range(3):
                logger.info("broken", extra=cio_event(f"u{number}"))
            logger.info("purchase", extra=cio_event("ok"))
            handler.flush()
            assert wait_for(lambda: handler.status()["dead_letters"] == 3)
            env = child_environment(simulator, tmp_path / "operator")

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                result = subprocess.run(
                    [*CLI, *args, "--queue-url", pg_url],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert "Traceback" not in result.stderr, result.stderr
                assert APP_PASSWORD not in result.stdout + result.stderr
                return result

            status = cli("status")
            assert status.returncode == 0, status.stderr
            assert f"pid {os.getpid()}" in status.stdout
            assert "closed" in status.stdout
            assert "postgresql://cio_app:***@" in status.stdout
            counted = json.loads(cli("dlq", "count", "--by", "event", "--json").stdout)
            assert counted["counts"] == {"broken": 3}
            listed = json.loads(cli("dlq", "list", "--json").stdout)
            assert len(listed) == 3
            shown = cli("dlq", "show", listed[0]["id"], "--json")
            assert shown.returncode == 0
            dry = json.loads(cli("dlq", "replay", "--dry-run", "--json").stdout)
            assert sorted(e["id"] for e in dry["entries"]) == sorted(x["id"] for x in listed)
            purged = cli("dlq", "purge", "--yes", "--event", "broken")
            assert purged.returncode == 0, purged.stderr
            assert handler.status()["dead_letters"] == 0
            # A wrong password: one line, no traceback, the password not echoed.
            wrong = pg_url.replace(APP_PASSWORD, "not-the-password")
            refused = subprocess.run(
                [*CLI, "status", "--queue-url", wrong],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0
            assert "Traceback" not in refused.stderr
            assert "not-the-password" not in refused.stdout + refused.stderr
        finally:
            handler.close()


def handler_logger(handler: CustomerIOHandler) -> Any:
    import logging

    logger = logging.getLogger(f"test.fleetcli.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


class TestFleetDrain:
    """cio-logging drain --queue-url sends what the fleet left, taking the lease."""

    def test_drain_sends_the_backlog(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path
    ) -> None:
        from cio_logging.store import WriteAheadLog
        from cio_logging.store.postgres import Database, PostgresLog

        from ..helpers import make_event

        database = Database(pg_url)
        workspace = f"{simulator.site_id}@{simulator.url}"
        log = PostgresLog(database, workspace, WriteAheadLog(tmp_path / "left"))
        events = [make_event(n) for n in range(40)]
        for event in events:
            log.append(event)  # left by a fleet whose processes are all gone
        log.close()
        result = subprocess.run(
            [*CLI, "drain", "--queue-url", pg_url, "--queue-dir", str(tmp_path / "op"), "--json"],
            env=child_environment(simulator, tmp_path / "op"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert APP_PASSWORD not in result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert (report["delivered"], report["queued"], report["held_lock"]) == (40, 0, True)
        assert {e.id for e in events} <= simulator.accepted_ids()


class TestForkedChildren:
    """Fleet mode across fork: each child opens its own pool and commits its events."""

    @pytest.mark.parametrize("mode", ["parent-logs-first", "mp-fork"])
    def test_forked_children_deliver(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path, mode: str
    ) -> None:
        result = subprocess.run(
            [PYTHON, str(PROJECT_ROOT / "tests" / "apps" / "fork_app.py"), mode, "3", "20"],
            env=child_environment(simulator, tmp_path / "q", CIO_LOGGING_QUEUE_URL=pg_url),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert APP_PASSWORD not in result.stdout + result.stderr
        ids = [line for line in result.stdout.splitlines() if len(line) == 26]
        assert len(ids) == 3 * 20 + (2 if mode == "parent-logs-first" else 1)
        assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 30), (
            f"missing {len(set(ids) - simulator.accepted_ids())}"
        )


class TestThroughPgBouncer:
    """Fleets reach PostgreSQL through PgBouncer in transaction pooling mode: server
    sessions are shared between clients, so nothing may rely on session state (a
    prepared statement, a SET) surviving from one transaction to the next."""

    def test_three_apps_then_the_sender_killed_lose_nothing(
        self,
        simulator: TrackAPISimulator,
        pg_bouncer: Any,
        pg_url: str,
        tmp_path: Path,
        hosts: list[Host],
    ) -> None:
        url = pg_bouncer.url(pg_url.rsplit("/", 1)[1])
        lease_seconds = 2.0
        for number in range(3):
            hosts.append(
                Host(
                    simulator,
                    url,
                    tmp_path / f"host{number}",
                    400,
                    "--pause",
                    "0.005",
                    "--lease",
                    str(lease_seconds),
                )
            )
        sender = _sender(pg_url, hosts)
        assert wait_for(lambda: len(simulator.accepted) >= 100, 60), "\n".join(
            line for host in hosts for line in host.errors[-5:]
        )
        killed_ids = set(sender.ids)
        sender.kill()
        survivors = [host for host in hosts if host is not sender]
        assert wait_for(lambda: all(host.done for host in survivors), 60)
        expected = killed_ids | {i for host in survivors for i in host.ids}
        assert wait_for(lambda: expected <= simulator.accepted_ids(), 60), (
            f"{len(expected - simulator.accepted_ids())} of {len(expected)} events lost; "
            + "\n".join(line for host in hosts for line in host.errors[-5:])
        )
        for host in survivors:
            assert host.finish() == 0
        errors = "\n".join(line for host in survivors for line in host.errors)
        assert "prepared statement" not in errors, errors[-3000:]
        assert "Traceback" not in errors, errors[-3000:]


# A record of every write to the dead letters and the sender state, with who wrote it
# (application_name is "cio_logging pid N") and who held the lease at that moment.
_AUDIT = """
CREATE TABLE cio_audit (
    tbl text, op text, at timestamptz DEFAULT clock_timestamp(), app text,
    holder_pid int, holder_term bigint, row_id text, state_pid int
);
CREATE FUNCTION cio_audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cio_audit (tbl, op, app, holder_pid, holder_term, row_id, state_pid)
    SELECT TG_TABLE_NAME, TG_OP, current_setting('application_name'), l.pid, l.term,
           to_jsonb(NEW) ->> 'id', (to_jsonb(NEW) -> 'state' ->> 'pid')::int
    FROM (SELECT 1) AS one LEFT JOIN cio_lease AS l ON l.workspace = NEW.workspace;
    RETURN NEW;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE ON cio_dead_letter
    FOR EACH ROW EXECUTE FUNCTION cio_audit_write();
CREATE TRIGGER audit AFTER INSERT OR UPDATE ON cio_sender_state
    FOR EACH ROW EXECUTE FUNCTION cio_audit_write();
"""


class TestFencedWrites:
    """A sender paused past its lease (SIGSTOP), a takeover, then SIGCONT: whatever it
    still had in hand (answers to requests in flight, with rejections to dead-letter,
    its state to record) is refused by the term, and it stops. Every write to the dead
    letters and the sender state comes from the lease's holder of that moment, and no
    event is both delivered and dead-lettered."""

    def test_a_stale_sender_writes_nothing(
        self, simulator: TrackAPISimulator, fleet_url: str, tmp_path: Path, hosts: list[Host]
    ) -> None:
        from cio_logging.store.postgres import Database

        database = Database(fleet_url)
        database.check()  # the schema, for the audit triggers
        database.close()
        with psycopg.connect(fleet_url, autocommit=True, prepare_threshold=None) as conn:
            conn.execute(_AUDIT)
        simulator.poison_names.add("broken")
        simulator.set_latency(1.0)  # requests in flight when the sender is stopped
        lease_seconds = 2.0
        for number in range(2):
            hosts.append(
                Host(
                    simulator,
                    fleet_url,
                    tmp_path / f"host{number}",
                    300,
                    "--pause",
                    "0.005",
                    "--lease",
                    str(lease_seconds),
                    "--poison-every",
                    "3",
                    "--batch-size",
                    "20",
                )
            )
        sender = _sender(fleet_url, hosts)
        other = next(host for host in hosts if host is not sender)
        assert wait_for(lambda: len(simulator.accepted) >= 40, 60)
        os.kill(sender.pid, signal.SIGSTOP)
        try:

            def moved() -> bool:
                current = lease(fleet_url)
                return current is not None and current[1] == other.pid and current[2]

            assert wait_for(moved, lease_seconds + 15)
            # The new sender works (sends, writes dead letters and its state) meanwhile.
            sent = len(simulator.accepted)
            assert wait_for(lambda: len(simulator.accepted) >= sent + 20, 30)
        finally:
            os.kill(sender.pid, signal.SIGCONT)
        assert wait_for(lambda: sender.done and other.done, 60)
        printed = set(sender.ids) | set(other.ids)
        assert len(printed) == 600
        assert wait_for(lambda: _queue_rows(fleet_url) == 0, 90)
        with psycopg.connect(fleet_url, prepare_threshold=None) as conn:
            audit = conn.execute(
                "SELECT tbl, op, app, holder_pid, holder_term, row_id, state_pid"
                " FROM cio_audit ORDER BY at"
            ).fetchall()
            dead = {key for (key,) in conn.execute("SELECT id FROM cio_dead_letter").fetchall()}
        # Every write by the lease's holder of that moment: the sender state names its
        # writer; connections name their process (application_name "cio_logging pid N").
        stale = [
            row
            for row in audit
            if (row[6] is not None and row[6] != row[3])
            or (row[2].startswith("cio_logging pid ") and row[2] != f"cio_logging pid {row[3]}")
        ]
        assert stale == [], f"{len(stale)} write(s) by a process not holding the lease: {stale[:5]}"
        # Each dead letter written once by each holder: a stale sender's answers are the
        # new sender's rows too, which it dead-letters (or delivers) itself. A sender
        # writes a batch's dead letters, then acknowledges the batch (in both stores a
        # call may be in both, never in neither); a holder that lost the lease between
        # the two leaves the call queued, and the next holder writes the same dead letter
        # again, under a later term. The same term writing one twice is a defect.
        first_term = {
            row[5]: row[4] for row in audit if row[0] == "cio_dead_letter" and row[1] == "INSERT"
        }
        rewritten = [
            row
            for row in audit
            if row[0] == "cio_dead_letter"
            and row[1] == "UPDATE"
            and not (row[4] is not None and row[4] > first_term.get(row[5], row[4]))
        ]
        assert rewritten == [], f"{len(rewritten)} dead letter(s) written twice by one holder"
        both = dead & simulator.accepted_ids()
        assert both == set(), f"{len(both)} event(s) delivered and dead-lettered"
        assert printed <= dead | simulator.accepted_ids()
        assert sender.finish() == 0
        assert other.finish() == 0


class TestClocksThatDisagree:
    """One clock for a fleet: the database's. Three hosts whose wall clocks are five
    minutes fast, five minutes slow and right; the sender is killed halfway, so hosts of
    two different clocks send. Nothing waits for a clock to catch up (a due time five
    minutes ahead), and nothing ages early (max_event_age of two minutes against a
    clock five minutes behind): every event is delivered, none dead-lettered."""

    def test_opposite_skews_delay_and_lose_nothing(
        self, simulator: TrackAPISimulator, pg_url: str, tmp_path: Path, hosts: list[Host]
    ) -> None:
        lease_seconds = 2.0
        for number, skew in enumerate([300.0, -300.0, 0.0]):
            hosts.append(
                Host(
                    simulator,
                    pg_url,
                    tmp_path / f"host{number}",
                    150,
                    "--pause",
                    "0.01",
                    "--lease",
                    str(lease_seconds),
                    "--max-event-age",
                    "120",
                    clock_skew=skew,
                )
            )
        first = _sender(pg_url, hosts)
        assert wait_for(lambda: len(simulator.accepted) >= 60, 60)
        term = lease(pg_url)
        assert term is not None
        first.kill()
        survivors = [host for host in hosts if host is not first]

        def taken_over() -> bool:
            current = lease(pg_url)
            return current is not None and current[0] > term[0] and current[2]

        assert wait_for(taken_over, lease_seconds + 15)
        assert wait_for(lambda: all(host.done for host in survivors), 60)
        printed = set(first.ids) | {i for host in survivors for i in host.ids}
        # Well within the five minutes a host's clock is off by (a due time on the
        # sender's clock would wait that long, or past max_event_age).
        assert wait_for(lambda: printed <= simulator.accepted_ids(), 90), (
            f"{len(printed - simulator.accepted_ids())} of {len(printed)} not delivered"
        )
        with psycopg.connect(pg_url) as conn:
            (dead,) = conn.execute("SELECT count(*) FROM cio_dead_letter").fetchall()[0]
        assert dead == 0
        for host in survivors:
            assert host.finish() == 0
