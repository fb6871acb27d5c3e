"""The command line answers in one line, with the exit code its reference documents.

Usage errors are one line on stderr (the usage itself only with --help), each defect
found by trying the commands from outside has its test, a test walks the table of exit
codes in docs/reference/cli.md running a command for each code, and long commands show
a counter with a rate on a terminal, and only there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_logging import cio_event
from cio_logging.cli import main
from cio_logging.operations import ExitCode
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    CHILD_APP,
    PROJECT_ROOT,
    PYTHON,
    HandlerFactory,
    child_environment,
    run_child_app,
    wait_for,
)

CLI = [PYTHON, "-m", "cio_logging"]
CLI_REFERENCE = PROJECT_ROOT / "docs" / "reference" / "cli.md"


def clean_environment(**variables: str) -> dict[str, str]:
    """The environment without any of the handler's variables, plus ``variables``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CIO_LOGGING_", "CUSTOMERIO_"))
    }
    env.update(variables)
    return env


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def poisoned_dead_letters(
    simulator: TrackAPISimulator, make_handler: HandlerFactory, count: int
) -> None:
    """``count`` events the simulator rejected into the dead-letter store; afterwards it
    accepts that name again, so that a replay delivers them."""
    simulator.poison("bad_signup")
    handler = make_handler()
    logger = logging.getLogger(f"test.cli.answers.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for number in range(count):
        logger.info("bad_signup", extra=cio_event(f"user-{number}"))
    assert wait_for(lambda: handler.status()["dead_letters"] == count, 30)
    logger.removeHandler(handler)
    handler.close()
    simulator.clear_poison()
    simulator.clear()


@pytest.fixture
def one_dead_letter(
    simulator: TrackAPISimulator, make_handler: HandlerFactory, queue_dir: Path
) -> Path:
    poisoned_dead_letters(simulator, make_handler, 1)
    return queue_dir


class TestUsageErrorsAreOneLine:
    """Each usage error: one line on stderr, exit 2, no usage (that is for --help)."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["dlq", "count", "--by", "colour"],
            ["dlq", "list", "--since", "yesterday"],
            ["dlq", "list", "--before", "soon"],
            ["dlq", "list", "--limit", "-3"],
            ["dlq", "list", "--limit", "many"],
            ["dlq", "replay", "--timeout", "abc"],
            ["drain", "--timeout", "-5"],
            ["drain", "--timeout", "abc"],
            ["status", "--api", "soap"],
            ["deliver", "--api", "soap"],
            ["demo", "--api", "soap"],
            ["dlq", "count", "--bogus"],
            ["dlq", "show"],
            ["dlq", "nope"],
            ["dlq"],
            ["nope"],
            [],
            ["simulator", "--port", "abc"],
        ],
        ids=lambda argv: " ".join(argv) or "(nothing)",
    )
    def test_one_line_and_exit_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == ExitCode.USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith("cio-logging: error: ")
        assert "usage:" not in captured.err
        assert lines[0].endswith("--help)")  # where the usage is

    @pytest.mark.parametrize("command", [["dlq", "count"], ["status"], ["simulator"]])
    def test_an_unknown_option_reads_the_same_for_every_command(
        self, command: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        # The simulator's parser is argparse's own; the others' extras were spelt
        # "unrecognised" by the command line itself.
        with pytest.raises(SystemExit):
            main([*command, "--bogus", "x"])
        assert "error: " + " ".join(command) + ": unrecognized arguments: --bogus x (see" in (
            capsys.readouterr().err
        )

    def test_with_json_the_error_is_a_json_document_too(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit):
            main(["--json", "dlq", "list", "--limit", "-3"])
        captured = capsys.readouterr()
        assert json.loads(captured.out)["exit_code"] == ExitCode.USAGE
        assert len(captured.err.splitlines()) == 1

    def test_help_still_prints_the_usage(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_:
            main(["dlq", "list", "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith("usage: cio-logging dlq list")


class TestTheDefects:
    """Each found by trying the commands from outside; each failed on the old code."""

    def test_a_dry_run_replay_with_no_environment_needs_no_credentials(
        self, one_dead_letter: Path
    ) -> None:
        result = run(
            "dlq",
            "replay",
            "--dry-run",
            "--queue-dir",
            str(one_dead_letter),
            env=clean_environment(),
        )
        assert result.returncode == ExitCode.OK, result.stderr
        assert "1 dead letter(s) would go back in the queue; nothing changed" in result.stdout

    def test_read_only_commands_with_a_queue_dir_need_no_site_id(
        self, one_dead_letter: Path
    ) -> None:
        for command in (["status"], ["dlq", "count"], ["dlq", "list"]):
            result = run(*command, "--queue-dir", str(one_dead_letter), env=clean_environment())
            assert result.returncode == ExitCode.OK, (command, result.stderr)

    def test_deliver_to_a_directory_that_cannot_be_made_is_exit_3(self, tmp_path: Path) -> None:
        a_file = tmp_path / "a-file"
        a_file.write_text("")
        env = clean_environment(CUSTOMERIO_SITE_ID="site", CUSTOMERIO_API_KEY="key")
        for command in (["deliver"], ["drain", "--timeout", "1"]):
            for where in ("/proc/nope", str(a_file), str(a_file / "queue")):
                result = run(*command, "--queue-dir", where, env=env)
                assert result.returncode == ExitCode.NO_QUEUE, (command, where, result.stderr)
                assert len(result.stderr.splitlines()) == 1, result.stderr
                assert where in result.stderr

    @pytest.mark.parametrize(
        "command",
        [
            ["status"],
            ["dlq", "count"],
            ["dlq", "list"],
            ["dlq", "show", "01J00000000000000000000000"],
            ["dlq", "replay", "--dry-run"],
            ["dlq", "purge", "--yes"],
            ["drain"],
            ["deliver"],
        ],
        ids=" ".join,
    )
    def test_a_bad_setting_is_refused_by_every_command(
        self, command: list[str], one_dead_letter: Path
    ) -> None:
        """``--region mars`` (and any bad setting) is a usage error everywhere, with or
        without --queue-dir: a command that only reads must not accept it silently."""
        env = clean_environment(CUSTOMERIO_SITE_ID="site", CUSTOMERIO_API_KEY="key")
        for bad in (["--region", "mars"], ["-o", "max_attempts=lots"], ["-o", "no_such=1"]):
            result = run(*command, "--queue-dir", str(one_dead_letter), *bad, env=env)
            assert result.returncode == ExitCode.USAGE, (bad, result.stderr)
            assert result.stderr.startswith("cio-logging: error: configuration:")
            assert len(result.stderr.splitlines()) == 1, result.stderr


class TestStatusCountsFromTheQueue:
    """status reads what was delivered from the queue itself, not from state.json alone
    (rewritten at most every 2 s, and by nobody once its process is killed)."""

    def test_delivered_so_far_counts_every_process_even_one_killed(
        self,
        simulator: TrackAPISimulator,
        queue_dir: Path,
        processes: list[subprocess.Popen[str]],
    ) -> None:
        env = child_environment(simulator, queue_dir)
        first = run_child_app(simulator, queue_dir, "30")  # delivers, exits normally
        assert len(first) == 30
        # A second process delivers 20 more and is SIGKILLed once the queue is empty,
        # before it would rewrite state.json.
        second = subprocess.Popen(
            [PYTHON, CHILD_APP, "20", "--linger", "60"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(second)
        assert wait_for(lambda: len(simulator.accepted) == 50, 60)

        def queue_empty() -> bool:
            report = json.loads(run("--json", "status", env=env).stdout)
            return bool(report["queued"] == 0)

        assert wait_for(queue_empty, 60)
        second.kill()
        second.communicate(timeout=30)
        report = json.loads(run("--json", "status", env=env).stdout)
        assert report["delivered_total"] == 50, report
        assert report["queued"] == 0
        shown = run("status", env=env).stdout
        assert re.search(r"^delivered +50 from this directory", shown, re.M), shown


def documented_exit_codes() -> dict[int, str]:
    """The table under "Exit codes" in docs/reference/cli.md: code -> meaning."""
    text = CLI_REFERENCE.read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE)
    return {int(code): meaning for code, meaning in rows}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


class TestTheTableOfExitCodes:
    """docs/reference/cli.md's table, walked: each code, from a command that gives it."""

    def test_the_table_is_the_enum_and_the_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        documented = documented_exit_codes()
        assert sorted(documented) == sorted(int(code) for code in ExitCode)
        with pytest.raises(SystemExit):
            main(["status", "--help"])
        epilog = capsys.readouterr().out.split("exit codes:", 1)[1]
        assert sorted(int(code) for code in re.findall(r"^  (\d+) ", epilog, re.M)) == sorted(
            documented
        )

    def test_each_documented_code_is_what_a_command_returns(
        self,
        simulator: TrackAPISimulator,
        make_handler: HandlerFactory,
        queue_dir: Path,
        tmp_path: Path,
        processes: list[subprocess.Popen[str]],
    ) -> None:
        poisoned_dead_letters(simulator, make_handler, 2)
        env = child_environment(simulator, queue_dir)
        seen: dict[int, list[str]] = {}

        def check(code: int, *args: str, **variables: str) -> None:
            result = run(*args, env={**env, **variables})
            assert result.returncode == code, (args, result.stdout, result.stderr)
            seen.setdefault(code, []).append(" ".join(args))

        check(ExitCode.OK, "status")
        check(ExitCode.OK, "dlq", "replay", "--dry-run")
        check(ExitCode.INCOMPLETE, "dlq", "show", "01J00000000000000000000000")
        check(ExitCode.INCOMPLETE, "dlq", "replay", "--event", "no_such_event")
        check(ExitCode.USAGE, "dlq", "count", "--by", "colour")
        check(ExitCode.USAGE, "dlq", "purge")  # stdin is not a terminal: --yes needed
        check(ExitCode.NO_QUEUE, "status", "--queue-dir", str(tmp_path / "missing"))
        with open(queue_dir / "dlq.lock", "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            check(ExitCode.LOCKED, "dlq", "purge", "--yes")
        check(ExitCode.AUTH, "dlq", "replay", "--wait", CUSTOMERIO_API_KEY="not-the-key")
        check(ExitCode.OK, "drain")  # the replayed dead letters wait in the queue: delivered

        # Interrupted: a drain that cannot deliver (every answer 503) gets a SIGTERM
        # once it holds delivery.lock.
        logger = logging.getLogger(f"test.cli.answers.drain.{time.monotonic_ns()}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        handler = make_handler(deliver="none")
        logger.addHandler(handler)
        logger.info("signup", extra=cio_event("user-1"))
        handler.close()
        simulator.fail(503)
        drain = subprocess.Popen(
            [*CLI, "drain", "--timeout", "120"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(drain)
        lock = queue_dir / "delivery.lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(drain.pid), 60)
        drain.send_signal(signal.SIGTERM)
        _, stderr = drain.communicate(timeout=60)
        assert drain.returncode == ExitCode.INTERRUPTED, stderr
        seen.setdefault(ExitCode.INTERRUPTED, []).append("drain, SIGTERM")

        assert sorted(seen) == sorted(documented_exit_codes()), seen


def read_terminal(descriptor: int, process: subprocess.Popen[str]) -> str:
    """Everything written to the pseudo-terminal until the process exits."""
    chunks = []
    while True:
        ready, _, _ = select.select([descriptor], [], [], 1.0)
        if ready:
            try:
                data = os.read(descriptor, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


class TestProgress:
    """Long commands show a counter with a rate on a terminal, and only there."""

    def replay(self, env: dict[str, str], *extra: str, terminal: bool) -> tuple[int, str, str]:
        return self.command(env, "dlq", "replay", *extra, terminal=terminal)

    def command(self, env: dict[str, str], *args: str, terminal: bool) -> tuple[int, str, str]:
        """Run a command with stderr on a pseudo-terminal (or a pipe); (code, out, err)."""
        if not terminal:
            result = run(*args, env=env)
            return result.returncode, result.stdout, result.stderr
        controller, terminal_end = pty.openpty()
        process = subprocess.Popen(
            [*CLI, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal_end,
            text=True,
        )
        os.close(terminal_end)
        try:
            shown = read_terminal(controller, process)
            stdout = process.stdout.read() if process.stdout else ""
            process.wait(timeout=60)
        finally:
            os.close(controller)
            if process.stdout:
                process.stdout.close()
        return process.returncode, stdout, shown

    def test_a_replay_on_a_terminal_counts_with_a_rate(
        self, simulator: TrackAPISimulator, make_handler: HandlerFactory, queue_dir: Path
    ) -> None:
        poisoned_dead_letters(simulator, make_handler, 120)
        env = child_environment(simulator, queue_dir, CIO_LOGGING_OPTIONS="")
        code, stdout, shown = self.replay(env, "--wait", "-o", "batch_size=25", terminal=True)
        assert code == ExitCode.OK, shown
        counters = re.findall(r"\rreplay: ([\d,]+) of 120 delivered or back, [\d,]+/s", shown)
        assert counters, shown
        assert counters[-1] == "120"
        assert "replayed 120 dead letter(s)" in stdout  # the summary, on stdout

    def test_no_progress_in_json_or_when_stderr_is_not_a_terminal(
        self, simulator: TrackAPISimulator, make_handler: HandlerFactory, queue_dir: Path
    ) -> None:
        poisoned_dead_letters(simulator, make_handler, 30)
        env = child_environment(simulator, queue_dir)
        code, stdout, shown = self.replay(
            env, "--json", "--wait", "-o", "batch_size=10", terminal=True
        )
        assert code == ExitCode.OK
        assert "replay:" not in shown
        assert {entry["outcome"] for entry in json.loads(stdout)["entries"]} == {"delivered"}
        poisoned_dead_letters(simulator, make_handler, 30)
        code, _, stderr = self.replay(env, "-o", "batch_size=10", terminal=False)
        assert code == ExitCode.OK
        assert "\r" not in stderr
        assert "replay:" not in stderr

    def test_a_drain_on_a_terminal_counts_too(
        self, simulator: TrackAPISimulator, make_handler: HandlerFactory, queue_dir: Path
    ) -> None:
        handler = make_handler(deliver="none")  # appends only: the drain sends
        logger = logging.getLogger(f"test.cli.answers.progress.{time.monotonic_ns()}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        for number in range(200):
            logger.info("page_viewed", extra=cio_event(f"user-{number}"))
        logger.removeHandler(handler)
        handler.close()
        env = child_environment(simulator, queue_dir)
        code, stdout, shown = self.command(env, "drain", "--timeout", "60", terminal=True)
        assert code == ExitCode.OK, shown
        assert re.search(r"\rdrain: [\d,]+ of 200 done \(", shown), shown
        assert "drain: 200 delivered" in stdout
