"""The operator commands, run as subprocesses against the simulator.

``status``, ``dlq count|list|show|replay|purge`` and ``drain``, with and without
``--json``, on missing directories, and next to a live handler process that holds the
queue directory's delivery lock.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging import cio_event, operations
from cio_logging.cli import main
from cio_logging.events import Event
from cio_logging.operations import ExitCode, parse_time
from cio_logging.simulator import TrackAPISimulator
from cio_logging.state_record import read_state
from cio_logging.store import DeadLetterStore, WriteAheadLog

from ..helpers import (
    CLI,
    PROJECT_ROOT,
    PYTHON,
    HandlerFactory,
    child_environment,
    run_child_app,
    run_cli,
    wait_for,
)

LIVE_APP = str(PROJECT_ROOT / "tests" / "apps" / "live_app.py")
SIGNUPS, PURCHASES = "bad_signup", "bad_purchase"


def run_json(
    simulator: TrackAPISimulator, queue_dir: Path, *args: str, expect: int = 0, **env: str
) -> Any:
    result = run_cli(simulator, queue_dir, *args, "--json", **env)
    assert result.returncode == expect, result.stderr
    return json.loads(result.stdout)


def run_many(
    simulator: TrackAPISimulator, queue_dir: Path, *commands: list[str]
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands side by side; results in the order given."""
    env = child_environment(simulator, queue_dir)
    running = [
        subprocess.Popen(
            [*CLI, *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    for command, process in zip(commands, running, strict=True):
        stdout, stderr = process.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr
        assert simulator.api_key not in stdout + stderr
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


@pytest.fixture
def dead_letters(
    simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
) -> dict[str, list[str]]:
    """Three bad_signup and two bad_purchase events rejected into the dead-letter store."""
    simulator.poison_names.update({SIGNUPS, PURCHASES})
    handler = make_handler()
    logger = logging.getLogger("test.operations.events")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for number in range(3):
        logger.info(SIGNUPS, extra=cio_event(f"user-{number}", plan="pro"))
    for number in range(2):
        logger.info(PURCHASES, extra=cio_event(f"user-{number}", amount=number))
    logger.info("fine", extra=cio_event("user-9"))
    # Not "queued == 0": "fine" is committed in the background, and a queue polled
    # before that looks empty. It was once left for close() to deliver, which ran out
    # of time on a busy machine, and the drain later sent 6 calls, not 5.
    assert wait_for(lambda: handler.flush(1.0), 30)  # every call logged has left the queue
    assert handler.status()["dead_letters"] == 5
    assert handler.status()["queued"] == 0
    logger.removeHandler(handler)
    handler.close()
    simulator.clear_poison()  # a replay may now deliver them
    simulator.clear()
    dead = run_json(simulator, queue_dir, "dlq", "list")
    return {
        name: [entry["id"] for entry in dead if entry["event"] == name]
        for name in (SIGNUPS, PURCHASES)
    }


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses a test starts; any still running at teardown are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def start_live_app(
    simulator: TrackAPISimulator,
    queue_dir: Path,
    processes: list[subprocess.Popen[str]],
    *args: str,
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [PYTHON, LIVE_APP, *args],
        env=child_environment(simulator, queue_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def read_until_done(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    ids: list[str] = []
    for line in process.stdout:
        if line.strip() == "done":
            return ids
        ids.append(line.strip())
    raise AssertionError("the live app ended without logging everything")


class TestHelpAndErrors:
    """Exit codes are documented; expected errors are one clear line, never a traceback."""

    def test_help_lists_the_exit_codes(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Every operator command's --help ends with the exit codes."""
        for command in (["status"], ["dlq", "replay"], ["drain"]):
            with pytest.raises(SystemExit) as exit_:
                main([*command, "--help"])
            assert exit_.value.code == 0
            text = capsys.readouterr().out
            assert "exit codes:" in text
            assert "130" in text

    def test_a_missing_subcommand_is_named_by_its_choices(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Not "required: dlq_command": the words an operator can type."""
        top = "demo, simulator, status, dlq, drain, deliver"
        for command, choices in [([], top), (["dlq"], "count, ")]:
            with pytest.raises(SystemExit):
                main(command)
            error = capsys.readouterr().err.splitlines()[-1]
            assert f"a command is required (one of {choices}" in error
            assert "_command" not in error

    def test_help_says_exit_code_5_covers_tls_failures(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for command in ([], ["status"], ["dlq"], ["dlq", "replay"], ["drain"]):
            with pytest.raises(SystemExit):
                main([*command, "--help"])
            text = " ".join(capsys.readouterr().out.split())
            assert "5 delivery refused by the set-up" in text
            assert "TLS verification failed" in text

    def test_json_is_accepted_before_the_subcommand(
        self, simulator: TrackAPISimulator, queue_dir: Path, make_handler: HandlerFactory
    ) -> None:
        make_handler().close()  # an empty queue directory
        for command in (
            ["--json", "status"],
            ["--json", "dlq", "count"],
            ["dlq", "--json", "count"],
        ):
            result = run_cli(simulator, queue_dir, *command)
            assert result.returncode == ExitCode.OK, (command, result.stderr)
            json.loads(result.stdout)
        bad = run_cli(simulator, queue_dir, "--json", "dlq", "show")
        assert bad.returncode == ExitCode.USAGE
        assert json.loads(bad.stdout.splitlines()[0])["exit_code"] == ExitCode.USAGE

    def test_a_missing_queue_directory_is_reported_and_never_created(
        self, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        """Exit 3 and one line from every command; the path is not created."""
        missing = tmp_path / "no" / "such" / "queue"
        commands = [
            ["status"],
            ["dlq", "count"],
            ["dlq", "list"],
            ["dlq", "show", "01J00000000000000000000000"],
            ["dlq", "replay"],
            ["dlq", "purge", "--yes"],
            ["drain", "--timeout", "1"],
        ]
        results = run_many(simulator, missing, *([*command, "--json"] for command in commands))
        for command, result in zip(commands, results, strict=True):
            assert result.returncode == ExitCode.NO_QUEUE, (command, result.stderr)
            assert f"queue directory {missing} does not exist" in result.stderr
            assert json.loads(result.stdout)["exit_code"] == ExitCode.NO_QUEUE
        assert not missing.exists()
        assert not missing.parent.exists()

    def test_a_directory_that_is_not_a_queue_is_refused(
        self, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        """A directory without wal/ or dead/ is not taken for an empty queue."""
        result = run_cli(simulator, tmp_path, "status")
        assert result.returncode == ExitCode.NO_QUEUE
        assert "is not a cio_logging queue directory" in result.stderr
        assert list(tmp_path.iterdir()) == [tmp_path / "simulator"]  # nothing created

    def test_a_store_file_sqlite_deletes_during_the_check_is_not_an_error(
        self, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A -wal file removed by another command's last close is not "unwritable".

        SQLite deletes a store's -wal and -shm files when its last connection closes.
        Here that happens at the worst moment: as the check asks for access to it.
        """
        WriteAheadLog(queue_dir / "wal").close()
        dead = DeadLetterStore(queue_dir / "dead")
        wal_file = queue_dir / "dead" / "cache.db-wal"
        assert wal_file.exists()
        real_access = os.access

        def access_after_the_last_close(path: Any, mode: int, **kwargs: Any) -> bool:
            if Path(path) == wal_file:
                dead.close()  # the last connection: SQLite removes the file
                assert not wal_file.exists()
            return real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access_after_the_last_close)
        assert operations.check_queue_dir(queue_dir) == queue_dir

    def test_read_only_commands_beside_opening_and_closing_stores(self, queue_dir: Path) -> None:
        """The check never fails while other processes open and close the stores.

        Seen in CI: one of 15 read-only commands run side by side exited 3, calling a
        -wal file that had just been deleted "not writable".
        """
        WriteAheadLog(queue_dir / "wal").close()
        DeadLetterStore(queue_dir / "dead").close()
        churn = (
            "import sys, diskcache\n"
            "for done in range(10_000_000):\n"
            "    cache = diskcache.Cache(sys.argv[1]); cache.get('x'); cache.close()\n"
            "    if done == 0: print('churning', flush=True)\n"
        )
        churners = [
            subprocess.Popen(
                [PYTHON, "-c", churn, str(queue_dir / name)], stdout=subprocess.PIPE, text=True
            )
            for name in ("wal", "dead")
        ]
        try:
            for churner in churners:
                assert churner.stdout is not None
                assert churner.stdout.readline() == "churning\n"
            refused = []
            for _ in range(5_000):
                try:
                    operations.check_queue_dir(queue_dir)
                except operations.QueueDirectoryError as exc:
                    refused.append(str(exc))
            assert all(churner.poll() is None for churner in churners)  # churned throughout
        finally:
            for churner in churners:
                churner.kill()
                churner.communicate()
        assert refused == []

    def test_missing_credentials_are_a_usage_error(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        """No site id and no queue directory, or a bad time: exit 2 and the flag to use."""
        # No queue directory and no site id: the default directory cannot be worked out.
        result = run_cli(
            simulator, queue_dir, "status", CUSTOMERIO_SITE_ID="", CIO_LOGGING_QUEUE_DIR=""
        )
        assert result.returncode == ExitCode.USAGE
        assert "site_id is missing: pass --site-id or set CUSTOMERIO_SITE_ID" in result.stderr
        assert "--queue-dir" in result.stderr
        # A bad time is refused by the parser.
        result = run_cli(simulator, queue_dir, "dlq", "list", "--since", "yesterday")
        assert result.returncode == ExitCode.USAGE
        assert "neither an ISO 8601 time" in result.stderr


class TestTimes:
    """--since and --before take ISO 8601 or an age."""

    def test_ages_and_iso_times(self) -> None:
        """Ages count back from now; ISO times keep their zone."""
        now = 1_700_000_000.0
        assert parse_time("30m", now) == now - 1800
        assert parse_time("2h", now) == now - 7200
        assert parse_time("3d", now) == now - 3 * 86400
        assert parse_time("2023-11-14T22:13:20Z", now) == now
        assert parse_time("2023-11-14T23:13:20+01:00", now) == now
        with pytest.raises(ValueError, match="neither"):
            parse_time("soon", now)


class TestDeadLetterReading:
    """count, list and show, in text and JSON."""

    def test_count_list_show(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """Counts grouped by event and reason, filtered lists, one entry in full."""
        key = dead_letters[SIGNUPS][0]
        # Read-only commands: run them side by side.
        results = run_many(
            simulator,
            queue_dir,
            ["dlq", "count", "--json"],
            ["dlq", "count", "--by", "event", "--json"],
            ["dlq", "count", "--by", "reason", "--json"],
            ["dlq", "count", "--by", "event"],
            ["dlq", "list", "--event", PURCHASES, "--json"],
            ["dlq", "list", "--limit", "2", "--json"],
            ["dlq", "list", "--since", "1h", "--json"],
            ["dlq", "list", "--before", "1h", "--json"],
            ["dlq", "list", "--since", "2999-01-01T00:00:00Z", "--json"],
            ["dlq", "list", "--reason", "invalid name", "--json"],
            ["dlq", "list", "--reason", "http_400", "--json"],
            ["dlq", "list"],
            ["dlq", "show", key, "--json"],
            ["dlq", "show", key],
            ["dlq", "show", "01J00000000000000000000000"],
        )
        assert [result.returncode for result in results] == [0] * 14 + [ExitCode.INCOMPLETE]
        (total, by_event, by_reason, count_text, purchases, two, recent, old, later,
         by_message, by_type, listing, shown, show_text, missing) = results  # fmt: skip

        assert json.loads(total.stdout)["total"] == 5
        assert json.loads(by_event.stdout)["counts"] == {SIGNUPS: 3, PURCHASES: 2}
        assert json.loads(by_reason.stdout)["counts"] == {"item_rejected": 5}
        assert "dead letters: 5" in count_text.stdout
        assert re.search(rf"{SIGNUPS} +3\n", count_text.stdout)

        entries = json.loads(purchases.stdout)
        assert [entry["id"] for entry in entries] == dead_letters[PURCHASES]
        assert all(entry["error_type"] == "item_rejected" for entry in entries)
        assert "stored_event" not in entries[0]  # lists carry no event data
        assert len(json.loads(two.stdout)) == 2
        assert len(json.loads(recent.stdout)) == 5
        assert json.loads(old.stdout) == []
        assert json.loads(later.stdout) == []
        assert len(json.loads(by_message.stdout)) == 5
        assert json.loads(by_type.stdout) == []
        assert all(k in listing.stdout for k in dead_letters[SIGNUPS] + dead_letters[PURCHASES])

        detail = json.loads(shown.stdout)
        assert detail["stored_event"]["id"] == key
        assert detail["stored_event"]["data"] == {"plan": "pro"}
        assert key in show_text.stdout
        assert '"plan": "pro"' in show_text.stdout
        assert "no dead letter with id" in missing.stderr

    def test_status_counts_queue_and_dead_letters(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """status with no delivering process: counts, disk, the last record."""
        status = run_json(simulator, queue_dir, "status")
        assert status["queue_dir"] == str(queue_dir)
        assert status["queued"] == 0
        assert status["oldest_age_seconds"] is None
        assert status["dead_letters"] == 5
        assert status["disk_bytes"] > 0
        assert status["disk_free_bytes"] > 0
        assert status["delivering_pid"] is None  # the test's handler was closed
        assert status["breaker"] == "closed"
        assert status["recorder_is_delivering"] is False
        text = run_cli(simulator, queue_dir, "status").stdout
        assert "dead letters     5" in text
        assert "no process holds delivery.lock" in text


class TestPurge:
    """purge asks first, and refuses without --yes when it cannot ask."""

    def test_purge_needs_yes_without_a_terminal(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """No terminal and no --yes: exit 2 and nothing deleted; --yes deletes the match."""
        refused = run_cli(simulator, queue_dir, "dlq", "purge", "--event", SIGNUPS)
        assert refused.returncode == ExitCode.USAGE
        assert "refusing to purge 3 dead letter(s) without --yes" in refused.stderr
        assert run_json(simulator, queue_dir, "dlq", "count")["total"] == 5

        nothing = run_json(simulator, queue_dir, "dlq", "purge", "--before", "1h", "--yes")
        assert nothing["purged"] == 0
        purged = run_json(simulator, queue_dir, "dlq", "purge", "--event", SIGNUPS, "--yes")
        assert purged["purged"] == 3
        assert sorted(purged["ids"]) == sorted(dead_letters[SIGNUPS])
        remaining = run_json(simulator, queue_dir, "dlq", "list")
        assert [entry["id"] for entry in remaining] == dead_letters[PURCHASES]

    def test_purge_reports_carry_their_exit_code(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        nothing = run_json(simulator, queue_dir, "dlq", "purge", "--before", "1h", "--yes")
        assert nothing["exit_code"] == ExitCode.OK
        purged = run_json(simulator, queue_dir, "dlq", "purge", "--event", SIGNUPS, "--yes")
        assert (purged["purged"], purged["exit_code"]) == (3, ExitCode.OK)

    @pytest.mark.parametrize("json_mode", [False, True])
    def test_declining_at_the_prompt_is_said_plainly(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
        json_mode: bool,
    ) -> None:
        """On a terminal, answering no: exit 1 as documented, no "error:", nothing deleted."""
        controller, terminal = os.openpty()
        try:
            os.write(controller, b"n\n")
            result = subprocess.run(
                [*CLI, "dlq", "purge", *(["--json"] if json_mode else [])],
                env=child_environment(simulator, queue_dir),
                stdin=terminal,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            os.close(terminal)
            os.close(controller)
        assert result.returncode == ExitCode.INCOMPLETE, result.stderr
        assert "Delete 5 dead letter(s) for good? [y/N]" in result.stderr
        assert "error" not in result.stdout + result.stderr
        if json_mode:
            report = json.loads(result.stdout)
            assert report == {
                "selected": 5,
                "purged": 0,
                "ids": [],
                "declined": True,
                "exit_code": ExitCode.INCOMPLETE,
            }
        else:
            assert "declined: nothing purged; the 5 dead letter(s) stay" in result.stdout
        assert run_json(simulator, queue_dir, "dlq", "count")["total"] == 5


class TestTypedIds:
    """Ids typed by an operator are ULIDs, case-insensitive."""

    def test_show_and_replay_take_an_id_in_either_case(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        key = dead_letters[SIGNUPS][0]
        shown = run_json(simulator, queue_dir, "dlq", "show", key.lower())
        assert shown["id"] == key
        text = run_cli(simulator, queue_dir, "dlq", "show", f" {key.lower()}").stdout
        assert key in text
        dry = run_json(simulator, queue_dir, "dlq", "replay", "--dry-run", "--id", key.lower())
        assert ([entry["id"] for entry in dry["entries"]], dry["missing_ids"]) == ([key], [])


class TestReplay:
    """replay puts entries back in the queue with their ids; the sender delivers them."""

    def test_dry_run_changes_nothing(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """--dry-run lists what would go back and sends and changes nothing."""
        before = run_json(simulator, queue_dir, "dlq", "list")
        report = run_json(simulator, queue_dir, "dlq", "replay", "--dry-run")
        assert sorted(entry["id"] for entry in report["entries"]) == sorted(
            entry["id"] for entry in before
        )
        assert {entry["outcome"] for entry in report["entries"]} == {"would_queue"}
        assert run_json(simulator, queue_dir, "dlq", "list") == before
        assert simulator.requests == []
        text = run_cli(simulator, queue_dir, "dlq", "replay", "--dry-run", "--event", SIGNUPS)
        assert text.returncode == 0
        assert "3 dead letter(s) would go back in the queue; nothing changed" in text.stdout

    def test_replay_that_partly_fails_again(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """Delivered entries leave; rejected ones come back with the new reason and attempts."""
        before = {entry["id"]: entry for entry in run_json(simulator, queue_dir, "dlq", "list")}
        first = dead_letters[SIGNUPS][0]
        one = run_json(simulator, queue_dir, "dlq", "replay", "--wait", "--id", first)
        assert [(e["id"], e["outcome"]) for e in one["entries"]] == [(first, "delivered")]
        assert simulator.accepted_ids() == {first}

        simulator.poison_names.add(PURCHASES)  # these still fail; the signups now pass
        report = run_json(
            simulator, queue_dir, "dlq", "replay", "--wait", "--id", "01J00000000000000000000000",
            *(arg for key in before for arg in ("--id", key)),
            expect=ExitCode.INCOMPLETE,
        )  # fmt: skip
        outcomes = {entry["id"]: entry["outcome"] for entry in report["entries"]}
        assert sorted(k for k, v in outcomes.items() if v == "delivered") == sorted(
            dead_letters[SIGNUPS][1:]
        )
        assert sorted(k for k, v in outcomes.items() if v == "dead_lettered") == sorted(
            dead_letters[PURCHASES]
        )
        # The first one left the store with its earlier replay.
        assert sorted(report["missing_ids"]) == sorted([first, "01J00000000000000000000000"])
        # Sent with their own ids: Customer.io deduplicates a resend.
        assert simulator.accepted_ids() == set(dead_letters[SIGNUPS])
        assert simulator.duplicates == 0
        kept = run_json(simulator, queue_dir, "dlq", "list")
        assert sorted(entry["id"] for entry in kept) == sorted(dead_letters[PURCHASES])
        for entry in kept:
            assert entry["message"].startswith("rejected in a 207 batch answer")
            assert entry["attempts"] == before[entry["id"]]["attempts"] + 1
            assert entry["first_failure_at"] == before[entry["id"]]["first_failure_at"]
            assert entry["replay_count"] == 1

    def test_replay_during_an_outage_keeps_entries_with_the_new_reason(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """The sender retries them with backoff, then gives up: they come back."""
        simulator.fail(503)
        result = run_cli(
            simulator, queue_dir, "dlq", "replay", "--wait", "--event", SIGNUPS,
            "--timeout", "30", "-o", "max_attempts=2", "-o", "max_backoff=0.05",
            "-o", "consecutive_failures=50",
        )  # fmt: skip
        assert result.returncode == ExitCode.INCOMPLETE, result.stderr
        assert "0 delivered, 3 came back to the store" in result.stdout
        kept = run_json(simulator, queue_dir, "dlq", "list", "--event", SIGNUPS)
        assert {entry["error_type"] for entry in kept} == {"max_attempts"}
        assert all("HTTP 503" in entry["message"] for entry in kept)
        assert {entry["attempts"] for entry in kept} == {3}  # 1 before, 2 in the replay
        assert simulator.accepted == []

    def test_a_failed_replay_keeps_the_original_reason(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """A replay during an outage keeps the first reason and its time; --reason finds it."""
        expired = make_dead_letters(queue_dir, 2, "max_attempts")
        before = {entry["id"]: entry for entry in run_json(simulator, queue_dir, "dlq", "list")}
        assert len(before) == 7
        simulator.fail(503)
        report = run_json(
            simulator, queue_dir, "dlq", "replay", "--wait", "--timeout", "30",
            "-o", "max_attempts=1", "-o", "consecutive_failures=50",
            expect=ExitCode.INCOMPLETE,
        )  # fmt: skip
        simulator.clear_faults()
        # The runbook's command still finds what it is meant for, by either reason.
        by_first = run_json(simulator, queue_dir, "dlq", "replay", "--reason", "max_attempts",
                            "--dry-run")  # fmt: skip
        assert sorted(entry["id"] for entry in by_first["entries"]) == sorted(before)
        assert {entry["outcome"] for entry in report["entries"]} == {"dead_lettered"}
        assert report["left_in_store"] == 7
        assert "7 came back to the store" in report["work_left"]

        for entry in run_json(simulator, queue_dir, "dlq", "list"):
            assert entry["error_type"] == "max_attempts"  # the latest reason
            first = before[entry["id"]]
            assert entry["original"] == {
                "error_type": first["error_type"],
                "status": first["status"],
                "message": first["message"],
                "at": first["last_failure_at"],
            }
            assert entry["replay_count"] == 1
            (record,) = entry["replays"]
            assert record["error_type"] == "max_attempts"
            assert "HTTP 503" in record["message"]
        by_original = run_json(simulator, queue_dir, "dlq", "list", "--reason", "item_rejected")
        assert len(by_original) == 5
        shown = run_cli(simulator, queue_dir, "dlq", "show", expired[0]).stdout
        assert "original          max_attempts at" in shown
        assert "came back" in shown
        # A second replay that works empties the store.
        done = run_json(simulator, queue_dir, "dlq", "replay", "--wait", "--reason", "max_attempts")
        assert sorted(entry["id"] for entry in done["entries"]) == sorted(before)
        assert {entry["outcome"] for entry in done["entries"]} == {"delivered"}
        assert done["work_left"] is None

    def test_a_replay_that_selects_nothing_is_work_left(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """Nothing matched while dead letters remain: exit 1 and a line saying so, not done."""
        result = run_cli(simulator, queue_dir, "dlq", "replay", "--reason", "max_attempts")
        assert result.returncode == ExitCode.INCOMPLETE, result.stderr
        assert (
            "work left: no dead letter matched the selection; 5 dead letter(s) remain "
            "in the store" in result.stderr
        )
        report = run_json(
            simulator, queue_dir, "dlq", "replay", "--reason", "max_attempts",
            expect=ExitCode.INCOMPLETE,
        )  # fmt: skip
        assert report["selected"] == 0
        assert report["left_in_store"] == 5
        assert report["work_left"].startswith("no dead letter matched the selection")
        dry = run_cli(simulator, queue_dir, "dlq", "replay", "--event", "nope", "--dry-run")
        assert dry.returncode == ExitCode.INCOMPLETE
        assert simulator.requests == []
        # Once the store is empty, nothing selected is nothing left.
        run_json(simulator, queue_dir, "dlq", "purge", "--yes")
        empty = run_json(simulator, queue_dir, "dlq", "replay", "--reason", "max_attempts")
        assert empty["work_left"] is None
        assert empty["exit_code"] == ExitCode.OK

    def test_wrong_credentials_pause_and_the_entries_wait_in_the_queue(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        dead_letters: dict[str, list[str]],
    ) -> None:
        """401 stops the replay's wait with exit 5 and never prints the key; the entries
        wait in the queue for a sender whose credentials work."""
        secret = "wrong-secret-api-key-1234"
        result = run_cli(simulator, queue_dir, "dlq", "replay", "--wait", CUSTOMERIO_API_KEY=secret)
        assert result.returncode == ExitCode.AUTH
        assert "refused the credentials" in result.stderr
        assert secret not in result.stdout + result.stderr
        assert run_json(simulator, queue_dir, "dlq", "list") == []
        drained = run_json(simulator, queue_dir, "drain")
        assert drained["delivered"] == 5
        assert simulator.accepted_ids() == {key for keys in dead_letters.values() for key in keys}


class TestDrain:
    """drain delivers a backlog under the application's own delivery lock."""

    def test_drain_delivers_a_backlog_left_by_a_process(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        """What a dead process left is delivered with its ids; wrong credentials exit 5."""
        simulator.fail(503)  # the application cannot deliver, then goes away
        ids = run_child_app(simulator, queue_dir, "25", "--no-close")
        assert len(ids) == 25
        simulator.clear_faults()
        status = run_json(simulator, queue_dir, "status")
        assert status["queued"] == 25
        assert status["oldest_age_seconds"] >= 0

        secret = "wrong-secret-api-key-1234"
        refused = run_cli(simulator, queue_dir, "drain", CUSTOMERIO_API_KEY=secret)
        assert refused.returncode == ExitCode.AUTH
        assert "refused the credentials" in refused.stderr
        assert secret not in refused.stdout + refused.stderr
        assert simulator.accepted == []

        report = run_json(simulator, queue_dir, "drain", "--timeout", "20")
        assert report["queued_at_start"] == 25
        assert report["queued"] == 0
        assert report["delivered"] == 25
        assert report["held_lock"] is True
        assert simulator.accepted_ids() == set(ids)
        assert simulator.duplicates == 0
        again = run_cli(simulator, queue_dir, "drain")
        assert again.returncode == 0
        assert "0 left (of 0)" in again.stdout

    def test_status_and_drain_next_to_a_live_process_in_an_outage(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        processes: list[subprocess.Popen[str]],
    ) -> None:
        """status shows a live process's open breaker; drain waits for its lock, takes over."""
        simulator.fail(503)
        live = start_live_app(
            simulator, queue_dir, processes, "8",
            "-o", "consecutive_failures=2", "-o", "reset_timeout=60",
        )  # fmt: skip
        ids = read_until_done(live)
        assert wait_for(lambda: (read_state(queue_dir) or {}).get("breaker") == "open")

        status = run_json(simulator, queue_dir, "status")
        assert status["breaker"] == "open"
        assert status["delivering_pid"] == live.pid
        assert status["recorded_by_pid"] == live.pid
        assert status["recorder_is_delivering"] is True
        assert "HTTP 503" in status["last_error"]
        assert status["queued"] == 8
        text = run_cli(simulator, queue_dir, "status").stdout
        assert f"pid {live.pid} (holds delivery.lock)" in text
        assert "open (recorded by pid" in text

        blocked = run_cli(simulator, queue_dir, "drain", "--timeout", "0.5", "--json")
        assert blocked.returncode == ExitCode.LOCKED
        assert json.loads(blocked.stdout)["lock_holder_pid"] == live.pid
        assert f"pid {live.pid} held delivery.lock" in blocked.stderr

        live.send_signal(signal.SIGKILL)  # the application dies; the kernel frees the lock
        live.wait(timeout=10)
        simulator.clear_faults()
        report = run_json(simulator, queue_dir, "drain", "--timeout", "20")
        assert report["delivered"] == 8
        assert simulator.accepted_ids() == set(ids)
        assert simulator.duplicates == 0
        after = run_json(simulator, queue_dir, "status")
        assert after["breaker"] == "closed"
        assert after["recorder_is_delivering"] is False  # the drain has exited

    def test_drain_while_a_live_process_delivers_sends_nothing_twice(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        processes: list[subprocess.Popen[str]],
    ) -> None:
        """A live process and a drain share the directory: nothing lost, nothing sent twice."""
        # A backlog from a process that died, then a live one delivering slowly.
        simulator.fail(503)
        ids = run_child_app(simulator, queue_dir, "30", "--no-close")
        simulator.clear_faults()
        simulator.set_latency(0.1)
        live = start_live_app(
            simulator, queue_dir, processes, "40", "--pause", "0.01", "-o", "batch_size=2"
        )
        drain = subprocess.Popen(
            [*CLI, "drain", "--timeout", "30", "--json"],
            env=child_environment(simulator, queue_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(drain)
        ids += read_until_done(live)
        assert wait_for(lambda: len(simulator.accepted) > 0)
        assert live.stdin is not None
        live.stdin.close()  # the application closes; the drain takes over what is left
        assert live.wait(timeout=20) == 0
        stdout, stderr = drain.communicate(timeout=40)
        assert drain.returncode == 0, stderr
        assert "Traceback" not in stderr
        report = json.loads(stdout)
        assert report["lock_holder_pid"] in (None, live.pid)
        assert report["held_lock"] is True
        assert report["delivered"] > 0  # both processes delivered some
        assert simulator.accepted_ids() == set(ids)  # none lost
        assert simulator.duplicates == 0  # none sent twice
        assert len(simulator.accepted) == len(ids)


# -- a queue directory owned by another user ---------------------------------------------

APP_USER = "nobody"


def _interpreter_for(user: str) -> list[str] | None:
    """A command that runs this project's CLI as ``user``, or None when none can.

    The test's own interpreter may live where ``user`` cannot read (a pyenv under
    /root): try it, then the system's interpreter of the same minor version, with this
    project and the virtual environment's site-packages on the path.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = os.pathsep.join([str(PROJECT_ROOT), *sorted(set(site.getsitepackages()))])
    for candidate in (sys.executable, f"/usr/bin/python{version}"):
        command = ["runuser", "-u", user, "--", "env", f"PYTHONPATH={path}", candidate]
        probe = subprocess.run(
            [*command, "-c", "import cio_logging.cli"],
            capture_output=True,
            timeout=60,
            cwd="/",
            check=False,
        )
        if probe.returncode == 0:
            return [*command, "-m", "cio_logging.cli"]
    return None


@pytest.fixture
def app_user_cli() -> list[str]:
    """The CLI as run by the application's (unprivileged) user; skips unless root."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as another user")
    command = _interpreter_for(APP_USER)
    if command is None:
        pytest.skip(f"no interpreter that {APP_USER} can run with this project's packages")
    return command


@pytest.fixture
def app_queue_dir() -> Iterator[Path]:
    """A queue directory owned by the application's user, where that user can reach it."""
    parent = Path(tempfile.mkdtemp(prefix="cio-owner-", dir="/tmp"))
    user = pwd.getpwnam(APP_USER)
    os.chown(parent, user.pw_uid, user.pw_gid)
    yield parent / "queue"
    shutil.rmtree(parent, ignore_errors=True)


def make_dead_letters(queue_dir: Path, count: int, reason: str = "max_attempts") -> list[str]:
    """``count`` dead letters written through the store, as a handler would."""
    WriteAheadLog(queue_dir / "wal").close()
    store = DeadLetterStore(queue_dir / "dead")
    keys = []
    for number in range(count):
        key = f"01J{number:023d}"
        event = Event(key, "purchase", f"user-{number}", None, "{}", int(time.time()), time.time())
        store.add(key, event, status=None, error_type=reason, message=reason, attempts=5)
        keys.append(key)
    store.close()
    return keys


def chown_tree(top: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, directories, files in os.walk(top):
        for name in [root, *(os.path.join(root, d) for d in directories)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def foreign_entries(top: Path, user: str) -> list[str]:
    """Every path under ``top`` (itself included) not owned by ``user``'s uid and gid."""
    entry = pwd.getpwnam(user)
    wrong = []
    for root, directories, files in os.walk(top):
        for name in [root, *(os.path.join(root, n) for n in directories + files)]:
            status = os.lstat(name)
            if (status.st_uid, status.st_gid) != (entry.pw_uid, entry.pw_gid):
                wrong.append(f"{name} ({status.st_uid}:{status.st_gid})")
    return sorted(set(wrong))


class TestAnotherUsersQueue:
    """root works on the application user's queue directory without locking that user out."""

    def test_a_lock_file_left_by_root_is_one_clear_line(
        self, app_user_cli: list[str], app_queue_dir: Path
    ) -> None:
        """A root-owned 0600 dlq.lock: the user's purge exits 3 naming the file, no traceback."""
        make_dead_letters(app_queue_dir, 2)
        chown_tree(app_queue_dir, APP_USER)
        lock = app_queue_dir / "dlq.lock"
        lock.touch(mode=0o600)  # as root: what an earlier version's root replay left
        result = subprocess.run(
            [*app_user_cli, "dlq", "purge", "--yes", "--queue-dir", str(app_queue_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert result.returncode == ExitCode.NO_QUEUE, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{lock} is owned by root" in lines[0]
        assert "not writable by this user" in lines[0]
        as_json = subprocess.run(
            [*app_user_cli, "dlq", "purge", "--yes", "--json", "--queue-dir", str(app_queue_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert json.loads(as_json.stdout)["exit_code"] == ExitCode.NO_QUEUE

    def test_root_leaves_every_file_to_the_directory_owner(
        self,
        simulator: TrackAPISimulator,
        app_user_cli: list[str],
        app_queue_dir: Path,
    ) -> None:
        """root's drain and replay create locks, state.json and dead/ as the owner's."""
        # The application's backlog (it could not deliver), in a directory of its user.
        simulator.fail(503)
        assert len(run_child_app(simulator, app_queue_dir, "3", "--no-close")) == 3
        simulator.clear_faults()
        shutil.rmtree(app_queue_dir / "dead")  # no dead letters yet: the drain makes dead/
        chown_tree(app_queue_dir, APP_USER)
        # root drains it; the events are rejected, so the drain writes dead letters.
        simulator.poison_names.add("purchase")
        drained = run_cli(simulator, app_queue_dir, "drain", "--timeout", "20")
        assert drained.returncode == 0, drained.stderr
        assert "3 dead-lettered" in drained.stdout
        replayed = run_cli(simulator, app_queue_dir, "dlq", "replay", "--wait", "--timeout", "5")
        assert replayed.returncode == ExitCode.INCOMPLETE, replayed.stderr  # rejected again
        assert run_cli(simulator, app_queue_dir, "status").returncode == 0
        assert foreign_entries(app_queue_dir, APP_USER) == []
        # And the application's user can still do everything in it.
        for command in (["status"], ["dlq", "count"], ["dlq", "purge", "--yes"]):
            result = subprocess.run(
                [*app_user_cli, *command, "--queue-dir", str(app_queue_dir)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
            )
            assert result.returncode == 0, (command, result.stderr)

    def test_a_store_directory_left_by_root_is_one_clear_line(
        self, app_user_cli: list[str], app_queue_dir: Path
    ) -> None:
        """A root-owned 0700 dead/ (an earlier version's root run): exit 3, never a traceback."""
        make_dead_letters(app_queue_dir, 1)
        chown_tree(app_queue_dir, APP_USER)
        os.chown(app_queue_dir / "dead", 0, 0)
        for command in (["status"], ["dlq", "count"], ["dlq", "list"]):
            result = subprocess.run(
                [*app_user_cli, *command, "--queue-dir", str(app_queue_dir)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
            )
            assert result.returncode == ExitCode.NO_QUEUE, (command, result.stderr)
            assert result.stderr.count("\n") == 1, result.stderr
            assert f"{app_queue_dir / 'dead'} is owned by root" in result.stderr
            assert "chown -R nobody:" in result.stderr

    def test_an_application_with_a_delivery_lock_left_by_root_says_so(
        self,
        simulator: TrackAPISimulator,
        app_user_cli: list[str],
        app_queue_dir: Path,
    ) -> None:
        """The app's user cannot open delivery.lock: one clear error, no traceback."""
        make_dead_letters(app_queue_dir, 0)
        chown_tree(app_queue_dir, APP_USER)
        (app_queue_dir / "delivery.lock").touch(mode=0o600)  # root's, from a root drain
        ca_file = app_queue_dir.parent / "ca.pem"
        shutil.copy(simulator.ca_file, ca_file)
        os.chmod(ca_file, 0o644)
        env = child_environment(simulator, app_queue_dir, CIO_LOGGING_CA_BUNDLE=str(ca_file))
        python = app_user_cli[: app_user_cli.index("-m")]
        result = subprocess.run(
            [*python, str(PROJECT_ROOT / "tests" / "apps" / "child_app.py"), "2", "--linger", "1",
             "--no-close"],
            env={name: env[name] for name in env if name != "PYTHONPATH"},
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert f"cannot open {app_queue_dir / 'delivery.lock'}" in result.stderr
        assert "belongs to root" in result.stderr
        assert result.stderr.count("delivery.lock") == 1  # said once, not every poll

    def test_a_lock_file_that_is_a_link_is_never_opened(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        """dlq.lock planted as a symlink: exit 3, and the file it points at is untouched."""
        make_dead_letters(queue_dir, 1)
        target = tmp_path / "precious"
        target.write_text("keep me\n")
        (queue_dir / "dlq.lock").symlink_to(target)
        result = run_cli(simulator, queue_dir, "dlq", "purge", "--yes")
        assert target.read_text() == "keep me\n"
        assert result.returncode == ExitCode.NO_QUEUE, result.stderr
        assert f"{queue_dir / 'dlq.lock'} is a symbolic link" in result.stderr
        assert run_json(simulator, queue_dir, "dlq", "count")["total"] == 1
