"""Delivery out of the application's process: ``deliver="process"`` and ``"none"``,
and ``cio-logging deliver``. Real processes, real HTTPS to the simulator."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cio_logging import ConfigurationError, CustomerIOHandler
from cio_logging.operations import lock_holder
from cio_logging.simulator import TrackAPISimulator
from cio_logging.store import WriteAheadLog

from ..helpers import (
    CHILD_APP,
    GUNICORN_WORKERS,
    PROJECT_ROOT,
    PYTHON,
    child_environment,
    handler_settings,
    listening_port,
    printed_ids,
    request_event,
    wait_for,
)

# Fast enough for tests; the sender child is handed the same through its environment.
FAST = {"flush_interval": 0.05, "max_backoff": 0.2, "request_timeout": 2, "close_timeout": 2}
# Generous: two cores shared with other work.
MARGIN = 10.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def senders_under(parents: Iterable[int]) -> list[int]:
    """The ``cio_logging deliver`` processes whose parent is one of ``parents``."""
    wanted = set(parents)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or parent_of(int(entry.name)) not in wanted:
            continue
        if "cio_logging deliver" in cmdline(int(entry.name)) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid
    ]


def start_app(
    simulator: TrackAPISimulator, queue_dir: Path, deliver: str, *args: str
) -> subprocess.Popen[str]:
    env = child_environment(simulator, queue_dir, CIO_LOGGING_DELIVER=deliver)
    return subprocess.Popen(
        [PYTHON, CHILD_APP, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_deliver(simulator: TrackAPISimulator, queue_dir: Path) -> subprocess.Popen[str]:
    env = child_environment(simulator, queue_dir, CIO_LOGGING_OPTIONS=json.dumps(FAST))
    return subprocess.Popen(
        [PYTHON, "-m", "cio_logging", "deliver"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> None:
    """Kill ``process`` if a failed assertion left it running; close its pipes."""
    if process.poll() is None:
        process.kill()
    process.communicate()


class TestDeliverProcess:
    """``deliver="process"``: the handler supervises one ``cio-logging deliver`` child."""

    def test_a_killed_sender_is_restarted_and_everything_is_delivered(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        app = start_app(simulator, queue_dir, "process", "80", "--pause", "0.05")
        try:
            assert wait_for(lambda: len(senders_under([app.pid])) == 1, 30)
            first = senders_under([app.pid])[0]
            # Its settings came through the environment: the key is not on its command line.
            assert simulator.api_key not in cmdline(first)
            assert "cio_logging deliver" in cmdline(first)
            # It is the sender: it holds delivery.lock, and writes state.json.
            assert wait_for(lambda: lock_holder(queue_dir) == first, 30)
            assert wait_for(lambda: len(simulator.accepted) > 0, 30)
            os.kill(first, signal.SIGKILL)
            assert wait_for(
                lambda: [p for p in senders_under([app.pid]) if p != first] != [], 30
            ), "the sender was not restarted"
            second = senders_under([app.pid])[0]
            assert second != first
            out, err = app.communicate(timeout=120)
        finally:
            finish(app)
        assert app.returncode == 0, err
        assert "Traceback" not in err, err
        ids = printed_ids(out)
        assert len(ids) == 80
        # The app's exit waited (flush) for the sender to deliver what it logged.
        assert not set(ids) - simulator.accepted_ids()
        assert len(WriteAheadLog(queue_dir / "wal")) == 0
        # close() stopped the child with the application.
        assert wait_for(lambda: not alive(second), MARGIN)

    def test_the_sender_dies_with_a_sigkilled_application(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        app = start_app(simulator, queue_dir, "process", "5", "--linger", "60")
        try:
            assert wait_for(lambda: len(senders_under([app.pid])) == 1, 30)
            sender = senders_under([app.pid])[0]
            assert wait_for(lambda: len(simulator.accepted) == 5, 30)
            app.kill()
            app.communicate()
        finally:
            finish(app)
        # No orphan sender: it asked for SIGTERM at its parent's death.
        assert wait_for(lambda: not alive(sender), MARGIN), cmdline(sender)

    def test_gunicorn_preload_runs_one_sender_and_its_sigterm_stops_it(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        options = {"deliver": "process", "close_timeout": 2}
        env = child_environment(
            simulator,
            queue_dir,
            CIO_TEST_REQUEST_PAUSE="0.005",
            CIO_TEST_HANDLER_OPTIONS=json.dumps(options),
        )
        arguments = [
            PYTHON, "-m", "gunicorn", "--preload", "--workers", str(GUNICORN_WORKERS),
            "--worker-class", "sync", "--bind", "127.0.0.1:0", "--chdir", str(PROJECT_ROOT),
            "--graceful-timeout", "30", "--timeout", "60", "--log-level", "info",
            "--no-control-socket",
        ]  # fmt: skip
        log = tmp_path / "gunicorn.log"
        with log.open("wb") as log_stream:
            gunicorn = subprocess.Popen(
                [*arguments, "tests.apps.wsgi_app:application"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_stream,
                stderr=subprocess.STDOUT,
            )
        senders: list[int] = []
        try:
            port = listening_port(log, gunicorn)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: request_event(port), range(200)))
            workers = children_of(gunicorn.pid)

            def one_sender() -> bool:
                senders[:] = senders_under([gunicorn.pid, *workers])
                return len(senders) == 1

            assert wait_for(one_sender, 30), senders
            # Stays one: no worker took the supervisor's role.
            time.sleep(1.0)
            assert one_sender(), senders
            assert parent_of(senders[0]) == gunicorn.pid
            assert wait_for(lambda: lock_holder(queue_dir) == senders[0], 30)
        finally:
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(timeout=60)
            finally:
                if gunicorn.poll() is None:
                    gunicorn.kill()
                    gunicorn.wait(10)
        stopped_at = time.monotonic()
        text = log.read_text(errors="replace")
        assert gunicorn.returncode == 0, text
        assert "Traceback" not in text, text
        assert len({pid for _, pid in answers} - {gunicorn.pid}) >= 1
        served = {event_id for event_id, _ in answers}
        assert not served - simulator.accepted_ids(), text
        assert len(WriteAheadLog(queue_dir / "wal")) == 0
        assert simulator.duplicates == 0
        # The master's close() stopped its child; the child is gone by gunicorn's exit
        # (a generous bound: close_timeout 2 s).
        assert wait_for(lambda: not alive(senders[0]), MARGIN)
        assert time.monotonic() - stopped_at < MARGIN


class TestDeliverNone:
    """``deliver="none"``: the application only appends; ``cio-logging deliver`` sends."""

    def test_nothing_is_sent_until_a_deliver_process_sends_everything(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        app = start_app(simulator, queue_dir, "none", "30")
        out, err = app.communicate(timeout=60)
        assert app.returncode == 0, err
        ids = printed_ids(out)
        assert len(ids) == 30
        assert simulator.accepted == []
        assert simulator.requests == []
        assert len(WriteAheadLog(queue_dir / "wal")) == 30

        sender = start_deliver(simulator, queue_dir)
        try:
            assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 30)
            # Events another process appends meanwhile are sent too.
            later = start_app(simulator, queue_dir, "none", "10")
            later_out, later_err = later.communicate(timeout=60)
            assert later.returncode == 0, later_err
            later_ids = printed_ids(later_out)
            assert wait_for(lambda: simulator.accepted_ids() >= set(later_ids), 30)
            sender.send_signal(signal.SIGTERM)
            _, sender_err = sender.communicate(timeout=MARGIN)
        finally:
            finish(sender)
        assert sender.returncode == 0, sender_err
        assert "Traceback" not in sender_err, sender_err
        assert len(WriteAheadLog(queue_dir / "wal")) == 0
        assert simulator.duplicates == 0

    def test_sigterm_stops_the_sender_in_an_outage_and_leaves_the_rest_on_disk(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        app = start_app(simulator, queue_dir, "none", "40")
        _, err = app.communicate(timeout=60)
        assert app.returncode == 0, err
        simulator.fail(503)
        sender = start_deliver(simulator, queue_dir)
        try:
            assert wait_for(lambda: len(simulator.requests) > 0, 30)
            assert lock_holder(queue_dir) == sender.pid
            signalled = time.monotonic()
            sender.send_signal(signal.SIGTERM)
            _, sender_err = sender.communicate(timeout=FAST["close_timeout"] + MARGIN)
            took = time.monotonic() - signalled
        finally:
            finish(sender)
        assert sender.returncode == 0, sender_err
        assert took < FAST["close_timeout"] + MARGIN
        assert simulator.accepted == []
        assert len(WriteAheadLog(queue_dir / "wal")) == 40  # nothing lost, nothing sent
        assert lock_holder(queue_dir) is None

    def test_status_says_no_sender_runs_while_events_wait(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        app = start_app(simulator, queue_dir, "none", "3")
        _, err = app.communicate(timeout=60)
        assert app.returncode == 0, err
        env = child_environment(simulator, queue_dir)
        text = subprocess.run(
            [PYTHON, "-m", "cio_logging", "status", "--queue-dir", str(queue_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "no sender has run here yet: events wait" in text, text
        report = json.loads(
            subprocess.run(
                [PYTHON, "-m", "cio_logging", "status", "--json", "--queue-dir", str(queue_dir)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )
        assert report["queued"] == 3
        assert report["events_wait_for_a_sender"] is True

    def test_flush_and_close_do_not_wait_for_delivery(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        handler = CustomerIOHandler(
            **handler_settings(simulator, queue_dir, deliver="none", flush_timeout=30)
        )
        try:
            logger = logging.getLogger("test.deliver.none")
            logger.propagate = False
            logger.addHandler(handler)
            logger.info("purchase", extra={"cio": {"customer_id": "c1"}})
            started = time.monotonic()
            handler.flush()
            assert time.monotonic() - started < 5.0  # far below flush_timeout
            status = handler.status()
            assert status["deliver"] == "none"
            assert status["delivery_external"] is True
            assert status["queued"] == 1
            assert handler._worker._thread is None  # no flush thread: nothing here sends
        finally:
            handler.close()
        assert simulator.requests == []


class TestDeliverSettings:
    """The option and the command refuse bad settings up front, in one line."""

    def test_an_unknown_deliver_mode_is_a_configuration_error(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        with pytest.raises(ConfigurationError, match="deliver must be one of"):
            CustomerIOHandler(**handler_settings(simulator, queue_dir, deliver="thraed"))

    def test_the_environment_variable_chooses_the_mode(
        self, simulator: TrackAPISimulator, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CIO_LOGGING_DELIVER", "none")
        handler = CustomerIOHandler(**handler_settings(simulator, queue_dir))
        try:
            assert handler.status()["deliver"] == "none"
        finally:
            handler.close()

    def test_deliver_without_credentials_says_so_and_exits_2(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        env = child_environment(simulator, queue_dir)
        del env["CUSTOMERIO_API_KEY"]
        result = subprocess.run(
            [PYTHON, "-m", "cio_logging", "deliver"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "cio-logging: error: configuration: api_key is missing: pass --api-key "
            "or set CUSTOMERIO_API_KEY"
        ]

    def test_bad_options_in_the_environment_exit_2(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        env = child_environment(simulator, queue_dir, CIO_LOGGING_OPTIONS="[1]")
        result = subprocess.run(
            [PYTHON, "-m", "cio_logging", "deliver"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert "CIO_LOGGING_OPTIONS must be a JSON object" in result.stderr
