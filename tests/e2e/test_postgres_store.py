"""The PostgreSQL store on a real server: schema, the seed's psql query, workspaces,
the lease and its fencing, the spill while the database is away, secrets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from cio_logging.errors import DatabaseError, LeaseLostError
from cio_logging.store import WriteAheadLog
from cio_logging.store.postgres import (
    SCHEMA_VERSION,
    Database,
    Fence,
    PostgresDeadLetters,
    PostgresLease,
    PostgresLog,
    display_url,
    migrations,
)

from ..helpers import make_event
from ..pg_cluster import APP_PASSWORD, Bouncer, Cluster

pytestmark = pytest.mark.postgres


def _workspace() -> str:
    return f"site-{uuid.uuid4().hex[:8]}@https://track.example"


def _columns(url: str, table: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
    return [(str(name), str(kind)) for name, kind in rows]


class TestSchema:
    """Created on first use, versioned, never dropping data."""

    def test_first_use_creates_the_current_schema(self, pg_url: str, tmp_path: Path) -> None:
        database = Database(pg_url)
        log = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "spill"))
        assert len(log) == 0
        with psycopg.connect(pg_url) as conn:
            (version,) = conn.execute("SELECT max(version) FROM cio_schema_version").fetchall()[0]
            tables = {
                name
                for (name,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
            }
        assert version == SCHEMA_VERSION == migrations()[-1][0]
        assert tables == {
            "cio_schema_version",
            "cio_queue",
            "cio_dead_letter",
            "cio_dead_letter_later",
            "cio_lease",
            "cio_sender_state",
            "cio_spill",
        }
        columns = dict(_columns(pg_url, "cio_dead_letter"))
        for name in ("event", "customer_id", "data", "error", "attempts", "created_at"):
            assert name in columns
        assert columns["data"] == "jsonb"
        log.close()
        database.close()

    def test_applying_the_migrations_again_changes_nothing(
        self, pg_url: str, tmp_path: Path
    ) -> None:
        first = Database(pg_url)
        log = PostgresLog(first, _workspace(), WriteAheadLog(tmp_path / "spill"))
        log.append(make_event())
        before = _columns(pg_url, "cio_queue")
        first.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for _, sql in migrations():  # every file is idempotent
                conn.execute(sql)
        second = Database(pg_url)
        again = PostgresLog(second, log.workspace, WriteAheadLog(tmp_path / "spill2"))
        assert len(again) == 1
        assert _columns(pg_url, "cio_queue") == before
        again.close()
        second.close()

    def test_a_role_with_only_dml_works_once_the_schema_exists(
        self, pg_url: str, pg_cluster: Cluster, tmp_path: Path
    ) -> None:
        owner = Database(pg_url)
        owner.run("count_rows", {"workspace": "x"})  # the owner creates it
        owner.close()
        dbname = pg_url.rsplit("/", 1)[1]
        role = f"dml_{uuid.uuid4().hex[:6]}"
        with pg_cluster.admin(dbname) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
            conn.execute(f"GRANT CONNECT ON DATABASE {dbname} TO {role}")
            conn.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
            )
            conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
            conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        url = pg_url.replace("cio_app:", f"{role}:")
        database = Database(url)
        log = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "spill"))
        log.append(make_event())
        assert len(log) == 1
        log.close()
        database.close()


class TestReadableDeadLetters:
    """The reference design's runbook query works verbatim."""

    def test_the_seed_query(self, pg_url: str, tmp_path: Path) -> None:
        database = Database(pg_url)
        dead = PostgresDeadLetters(database, _workspace(), tmp_path)
        for number, name in enumerate(["purchase", "signup", "purchase"]):
            event = make_event(number, name)
            dead.add(event.id, event, status=400, error_type="invalid", message="m", attempts=1)
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT count(*), event FROM cio_dead_letter GROUP BY event ORDER BY count DESC"
            ).fetchall()
            (data,) = conn.execute(
                "SELECT data->>'n' FROM cio_dead_letter WHERE event = 'signup'"
            ).fetchall()[0]
        assert rows == [(2, "purchase"), (1, "signup")]
        assert data == "1"
        database.close()


class TestWorkspaces:
    """Two workspaces on one database never see each other's rows."""

    def test_separation(self, pg_cluster: Cluster, tmp_path: Path) -> None:
        database = Database(pg_cluster.url())
        one = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "a"))
        two = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "b"))
        mine, theirs = make_event(1), make_event(2)
        one.append(mine)
        two.append(theirs)
        assert [q.key for q in one.read_due(10).events] == [mine.id]
        assert [q.key for q in two.read_due(10).events] == [theirs.id]
        two.remove([mine.id])
        assert len(one) == 1
        assert two.get(mine.id) is None
        dead_one = PostgresDeadLetters(database, one.workspace, tmp_path)
        dead_two = PostgresDeadLetters(database, two.workspace, tmp_path)
        dead_one.add(mine.id, mine, status=None, error_type="x", message="m", attempts=1)
        assert len(dead_two) == 0
        assert dead_two.purge(dead_one.select()) == 0
        assert len(dead_one) == 1
        database.close()


class TestLease:
    """One holder at a time; a new term on every take-over; stale writes refused."""

    def test_one_holder_then_takeover_after_expiry(self, pg_cluster: Cluster) -> None:
        database = Database(pg_cluster.url())
        workspace = _workspace()
        # Long enough that a stalled heartbeat on a busy machine does not lose it.
        first = PostgresLease(database, workspace, seconds=3.0, log=None)
        second = PostgresLease(database, workspace, seconds=3.0, log=None)
        assert first.try_acquire()
        assert not second.try_acquire()
        time.sleep(2.0)  # the heartbeat renews: still the first's
        assert first.held
        assert not second.try_acquire()
        first._stop.set()  # the first stops renewing (paused, cut off)
        started = time.monotonic()
        while not second.try_acquire():
            time.sleep(0.05)
        took = time.monotonic() - started
        assert took <= 3.0 + 2.0  # once the lease has run out, not never
        assert not first.held  # it stopped trusting it before the database let go
        assert (second.term, first._term) == (2, 1)
        info = second.info()
        assert info is not None
        assert (info.term, info.valid) == (2, True)
        second.release()
        assert first.try_acquire()  # released: free at once, a new term
        assert first.term == 3
        first.release()
        database.close()

    def test_a_lease_taken_at_interpreter_exit_starts_no_thread(self, pg_cluster: Cluster) -> None:
        # A short script's last delivery may take the lease after the main thread has
        # ended; Python 3.12 refuses new threads there ("can't create new thread at
        # interpreter shutdown"), so the heartbeat must not be started then.
        script = textwrap.dedent(
            f"""
            import atexit, threading
            from cio_logging.store.postgres import Database, PostgresLease

            def last_delivery():
                assert not threading.main_thread().is_alive()
                database = Database({pg_cluster.url()!r})
                lease = PostgresLease(database, {_workspace()!r}, seconds=5.0, log=None)
                print("acquired", lease.try_acquire(), "held", lease.held, flush=True)
                lease.release()
                database.close()

            atexit.register(last_delivery)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stdout.strip() == "acquired True held True"

    def test_a_stale_holder_cannot_delete_or_reschedule_rows(
        self, pg_cluster: Cluster, tmp_path: Path
    ) -> None:
        database = Database(pg_cluster.url())
        workspace = _workspace()
        stale_log = PostgresLog(database, workspace, WriteAheadLog(tmp_path / "a"))
        new_log = PostgresLog(database, workspace, WriteAheadLog(tmp_path / "b"))
        stale = PostgresLease(database, workspace, seconds=1.0, log=stale_log)
        new = PostgresLease(database, workspace, seconds=1.0, log=new_log)
        event = make_event()
        stale_log.append(event)
        assert stale.try_acquire()
        queued = stale_log.read_due(10).events
        stale._stop.set()
        while not new.try_acquire():
            time.sleep(0.05)
        # The paused process wakes up still believing its fence (term 1):
        stale_log.fence = Fence(stale.holder, 1)
        with pytest.raises(LeaseLostError):
            stale_log.remove([event.id])
        with pytest.raises(LeaseLostError):
            stale_log.record_failure([(queued[0], time.time() + 100)], "HTTP 503")
        with pytest.raises(LeaseLostError):
            stale_log.acknowledge([queued[0].position])
        with pytest.raises(LeaseLostError):
            stale_log.schedule_retries(
                [queued[0].position],
                count_attempt=True,
                delays=[100.0],
                now=time.time(),
                error="HTTP 503",
                max_attempts=8,
            )
        survivor = new_log.get(event.id)
        assert survivor is not None
        assert survivor.attempts == 0
        new_log.remove([event.id])  # the holder's own acknowledgement goes through
        assert len(new_log) == 0
        new.release()
        database.close()


class TestSpill:
    """A database that does not answer costs the caller at most the timeout, once."""

    def test_rows_spill_and_move_once_it_answers(
        self, own_cluster: Cluster, tmp_path: Path
    ) -> None:
        database = Database(own_cluster.url(), timeout=0.5)
        log = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "spill"), timeout=0.3)
        first = make_event(0)
        log.append(first)
        own_cluster.stop()
        events = [make_event(n) for n in range(1, 41)]
        slowest = 0.0
        for event in events:
            started = time.monotonic()
            log.append(event)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.3 + 0.2
        assert len(log.spill) == 40
        with pytest.raises(DatabaseError):
            log.move_spilled()
        own_cluster.start()
        deadline = time.monotonic() + 20
        while len(log.spill) and time.monotonic() < deadline:
            try:
                log.move_spilled()
            except DatabaseError:
                time.sleep(0.2)
        assert len(log.spill) == 0
        assert {q.key for q in log.read_due(100).events} == {e.id for e in [first, *events]}
        assert len(log) == 41
        log.close()
        database.close()


class TestSecrets:
    """The password appears in no repr, message or error."""

    def test_reprs_and_errors(self, pg_cluster: Cluster, tmp_path: Path) -> None:
        url = pg_cluster.url()
        database = Database(url)
        assert APP_PASSWORD not in repr(database)
        assert APP_PASSWORD not in display_url(url)
        assert display_url(url).startswith("postgresql://cio_app:***@127.0.0.1:")
        # The server quotes what it was given: a database named after the password.
        quoting = Database(pg_cluster.url(dbname=APP_PASSWORD), timeout=1.0)
        with pytest.raises(DatabaseError) as caught:
            quoting.check()
        assert APP_PASSWORD not in str(caught.value)
        assert APP_PASSWORD not in str(caught.value.__cause__)
        assert "***" in str(caught.value)
        log = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "spill"))
        assert APP_PASSWORD not in repr(log)
        quoting.close()
        database.close()


class TestPasswordForms:
    """A password given as a URL parameter is hidden too, and works."""

    def test_query_parameter_password(self, pg_cluster: Cluster) -> None:
        url = pg_cluster.url().replace(f":{APP_PASSWORD}@", "@") + f"?password={APP_PASSWORD}"
        assert APP_PASSWORD not in display_url(url)
        database = Database(url)
        database.check()
        assert APP_PASSWORD not in repr(database)
        database.close()


class TestTLSOptions:
    """sslmode and sslrootcert in the URL reach libpq as given."""

    def test_sslmode_passes_through(self, pg_cluster: Cluster, tmp_path: Path) -> None:
        plain = Database(pg_cluster.url(sslmode="disable"), timeout=2.0)
        plain.check()
        plain.close()
        # The throwaway server has no TLS: demanding it must fail, and say why.
        demanding = Database(
            pg_cluster.url(sslmode="verify-full", sslrootcert=str(tmp_path / "missing-ca.pem")),
            timeout=2.0,
        )
        with pytest.raises(DatabaseError) as caught:
            demanding.check()
        text = str(caught.value)
        assert "ssl" in text.lower() or "root certificate" in text.lower(), text
        assert APP_PASSWORD not in text
        demanding.close()


class TestThroughAPooler:
    """PgBouncer in transaction mode hands a server session to one client after another:
    the store leaves nothing in it for the next (no prepared statement, no setting)."""

    def test_nothing_is_left_in_the_session(
        self, one_session_bouncer: Bouncer, pg_url: str, tmp_path: Path
    ) -> None:
        dbname = pg_url.rsplit("/", 1)[1]
        database = Database(one_session_bouncer.url(dbname))
        log = PostgresLog(database, _workspace(), WriteAheadLog(tmp_path / "spill"))
        events = [make_event(n) for n in range(12)]
        for event in events:  # the same statements, again and again (psycopg prepares
            log.append(event)  # a statement after five by default)
            log.read_due(5)
        log.remove([event.id for event in events[:6]])  # a transaction
        assert len(log) == 6
        with psycopg.connect(
            one_session_bouncer.url(dbname), autocommit=True, prepare_threshold=None
        ) as other:
            settings = other.execute(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
            ).fetchall()
            (prepared,) = other.execute("SELECT count(*) FROM pg_prepared_statements").fetchall()[0]
        assert settings == [("0", "0")]
        assert prepared == 0
        log.close()
        database.close()
