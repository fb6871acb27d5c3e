"""Every form of the database password in ``queue_url`` stays out of every output: the
application's, a ``deliver="process"`` sender's, the CLI's, exceptions, reprs and log
lines. Above all a password given as typed, with characters a URL reserves, which
libpq reads wrongly and then quotes in pieces."""

from __future__ import annotations

import logging
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.errors import DatabaseError
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store.postgres import DRIVER_LOGGERS, Database
from cio_logging.store.queue_url import remember

from ..helpers import CLI, PROJECT_ROOT, PYTHON, child_environment, free_port, handler_settings
from ..pg_cluster import Cluster

pytestmark = pytest.mark.postgres

FLEET_APP = str(PROJECT_ROOT / "tests" / "apps" / "fleet_app.py")

#: Needs URL encoding: @ : / ? # %.
SPECIAL = "p@ss:w/rd?#%9Zq"
#: A wrong password of the same kind.
WRONG = "w@ng:p/ss?#%7Yk"


def _pieces(secret: str) -> set[str]:
    """Every piece of ``secret`` (raw or percent-encoded) long enough to give it away:
    libpq quotes the part of a URL it could not read, which is part of the password."""
    found: set[str] = set()
    for form in (secret, quote(secret, safe=""), quote(secret)):
        found |= {form[i:j] for i in range(len(form)) for j in range(i + 5, len(form) + 1)}
    return found


PIECES = _pieces(SPECIAL) | _pieces(WRONG)


def leaks(text: str) -> list[str]:
    return sorted(piece for piece in PIECES if piece in text)


@dataclass
class Role:
    """A role whose password needs URL encoding, and its database."""

    cluster: Cluster
    name: str
    dbname: str

    def url(self, password: str = SPECIAL, *, port: int | None = None, dbname: str = "") -> str:
        """A URL with the password as typed (not encoded)."""
        host = f"127.0.0.1:{port or self.cluster.port}"
        return f"postgresql://{self.name}:{password}@{host}/{dbname or self.dbname}"


@pytest.fixture
def role(pg_cluster: Cluster) -> Role:
    suffix = uuid.uuid4().hex[:8]
    name, dbname = f"special_{suffix}", f"special_db_{suffix}"
    with pg_cluster.admin() as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{SPECIAL}'")
        conn.execute(f"CREATE DATABASE {dbname} OWNER {name}")
    return Role(pg_cluster, name, dbname)


def _forms(role: Role) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (queue_url, extra environment): each way of giving the password."""
    encoded = quote(SPECIAL, safe="")
    plain = f"postgresql://{role.name}@127.0.0.1:{role.cluster.port}/{role.dbname}"
    return {
        "as typed": (role.url(), {}),
        "encoded": (role.url(encoded), {}),
        "parameter": (f"{plain}?password={encoded}", {}),
        "PGPASSWORD": (plain, {"PGPASSWORD": SPECIAL}),
    }


def _failing(role: Role) -> dict[str, str]:
    return {
        "wrong password": role.url(WRONG),
        "unreachable": role.url(port=free_port()),
        "no such database": role.url(dbname="no_such_database"),
    }


def _run_app(
    simulator: TrackAPISimulator, queue_dir: Path, url: str, deliver: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, FLEET_APP, "3", "--exit-after"],
        env=child_environment(
            simulator, queue_dir, CIO_LOGGING_QUEUE_URL=url, CIO_LOGGING_DELIVER=deliver, **env
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestApplicationOutput:
    """The application's output and its sender child's, whatever form the password has."""

    @pytest.mark.parametrize("deliver", ["thread", "process"])
    def test_working_forms_deliver_and_leak_nothing(
        self, simulator: TrackAPISimulator, role: Role, tmp_path: Path, deliver: str
    ) -> None:
        logged: set[str] = set()
        for name, (url, env) in _forms(role).items():
            result = _run_app(simulator, tmp_path / name, url, deliver, **env)
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
            assert leaks(output) == [], f"{name}: {output[-2000:]}"
            ids = {line for line in result.stdout.splitlines() if len(line) == 26}
            assert len(ids) == 3, name
            logged |= ids
        # Each run reached the database: its events were sent, or wait there (a run
        # ends as soon as it logged; the next one sends what it left).
        with psycopg.connect(role.url(quote(SPECIAL, safe=""))) as conn:
            queued = {key for (key,) in conn.execute("SELECT id FROM cio_queue").fetchall()}
        assert logged <= simulator.accepted_ids() | queued

    def test_failing_connections_leak_nothing(
        self, simulator: TrackAPISimulator, role: Role, tmp_path: Path
    ) -> None:
        for name, url in _failing(role).items():
            result = _run_app(simulator, tmp_path / name, url, "thread")
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
            assert leaks(output) == [], f"{name}: {output[-2000:]}"
            assert "Traceback" not in output, f"{name}: {output[-2000:]}"


class TestCommandLine:
    """status and dlq with each form: one line on failure, never a piece of the password."""

    def test_every_form(self, simulator: TrackAPISimulator, role: Role, tmp_path: Path) -> None:
        cases = [(name, url, env, True) for name, (url, env) in _forms(role).items()]
        cases += [(name, url, {}, False) for name, url in _failing(role).items()]
        for name, url, env, works in cases:
            for command in (["status"], ["dlq", "list"]):
                result = subprocess.run(
                    [*CLI, *command, "--queue-url", url],
                    env=child_environment(simulator, tmp_path / "operator", **env),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                output = result.stdout + result.stderr
                assert leaks(output) == [], f"{name} {command}: {output}"
                assert "Traceback" not in output, f"{name} {command}: {output}"
                assert (result.returncode == 0) == works, f"{name} {command}: {output}"
                if not works:
                    assert len(result.stderr.strip().splitlines()) == 1, output


class TestInProcess:
    """Reprs, status(), exceptions and log lines of a handler given the password as typed."""

    def test_reprs_status_errors_and_log_lines(
        self,
        simulator: TrackAPISimulator,
        role: Role,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        handler = CustomerIOHandler(
            **handler_settings(simulator, tmp_path / "app", queue_url=role.url())
        )
        try:
            logger = logging.getLogger(f"test.secrets.{uuid.uuid4().hex}")
            logger.propagate = False
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.info("purchase", extra=cio_event("u1"))
            handler.flush()
            assert simulator.wait_for_events(1)
            status = handler.status()
            assert status["queue_url"].startswith(f"postgresql://{role.name}:***@127.0.0.1:")
            shown = " ".join([repr(handler), repr(handler.settings), repr(status)])
            assert leaks(shown) == []
        finally:
            handler.close()
        for url in _failing(role).values():
            database = Database(url, timeout=1.0)
            assert leaks(repr(database)) == []
            with pytest.raises(DatabaseError) as caught:
                database.check()
            assert leaks(str(caught.value)) == []
            assert leaks(repr(caught.value.__cause__)) == []
            database.close()
        assert leaks(caplog.text) == [], [line for line in caplog.text.splitlines() if leaks(line)]


class TestDriverLogLines:
    """What psycopg logs, on any of its loggers, never shows a queue password."""

    @pytest.mark.parametrize("logger_name", DRIVER_LOGGERS)
    def test_message_arguments_traceback_and_stack_are_scrubbed(
        self, logger_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        password = f"Zq{uuid.uuid4().hex}"
        remember(f"postgresql://app:{password}@db.example/queue")
        caplog.set_level(logging.DEBUG, logger=logger_name)
        driver_log = logging.getLogger(logger_name)
        try:
            raise psycopg.OperationalError(f"connection failed: password={password}")
        except psycopg.OperationalError:
            driver_log.debug("connect to %s failed", f"app:{password}@db", exc_info=True)
        driver_log.warning(f"conninfo password={password}", stack_info=True)
        assert len(caplog.records) == 2
        formatter = logging.Formatter("%(message)s")
        output = "\n".join(formatter.format(record) for record in caplog.records)
        assert "connect to app:***@db failed" in output
        assert "OperationalError: connection failed: password=***" in output  # kept, scrubbed
        assert password not in output
        assert password not in caplog.text
