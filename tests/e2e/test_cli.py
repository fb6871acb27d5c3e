"""The cio-logging command: the demo (the main job) and the simulator."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from cio_logging.cli import main
from cio_logging.demo import run_demo

from ..helpers import PYTHON


@pytest.mark.parametrize("api", ["track", "pipelines"])
def test_demo_accounts_for_every_event(tmp_path: Path, api: str) -> None:
    out = io.StringIO()
    assert run_demo(out=out, outage_seconds=1.0, directory=tmp_path, api=api) == 0
    text = out.getvalue()
    assert ("Pipelines API" if api == "pipelines" else "Track API") in text
    # user-1's identify is the first call Customer.io received for them.
    assert re.search(r"received identify for user-1 \(.*\n.*received event 'page_viewed'", text)
    # A person call is not named twice, and no call shows an id it does not have.
    assert "'identify'" not in text
    assert "id None" not in text
    assert "every event accounted for" in text
    assert "closed->open" in text  # the outage opened the breaker ...
    assert "half-open->closed" in text  # ... and a probe closed it
    assert "waiting on disk 30" in text
    assert "degradation_essential_only" in text
    assert re.search(r"dead-lettered +1\n", text)


def test_demo_run_again_in_the_same_directory_counts_its_own_events(tmp_path: Path) -> None:
    """--dir kept from an earlier run holds its dead letter: not this run's missing event."""
    assert run_demo(out=io.StringIO(), outage_seconds=0.5, directory=tmp_path) == 0
    out = io.StringIO()
    assert run_demo(out=out, outage_seconds=0.5, directory=tmp_path) == 0
    text = out.getvalue()
    assert "the directory holds 1 dead letter(s) and 0 queued event(s) from an earlier run" in text
    assert re.search(r"dead-lettered +1\n", text)
    assert "every event accounted for" in text


def test_demo_says_what_it_does_and_keeps_its_queue_for_the_commands_it_suggests(
    tmp_path: Path,
) -> None:
    """The poison name is announced, each phase's count said, and every command it
    suggests works on the queue directory it kept, with no credentials in the environment."""
    # As the README's first command runs it: the virtual environment's script, with the
    # environment not active (its bin/ is not on PATH).
    script = Path(PYTHON).parent / "cio-logging"
    bin_dir = str(script.parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTOMERIO_", "CIO_"))}
    env["PATH"] = path
    result = subprocess.run(
        [str(script), "demo", "--outage-seconds", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    text = result.stdout
    assert "every event accounted for" in text
    assert "it was told to reject events named 'poison_pill'" in text
    assert "phase 1 logged 7 identifies and 30 events" in text
    for phase, count in [(2, 30), (3, 10), (4, 2)]:
        assert f"phase {phase} logged {count} events" in text, phase
    queue_dir = tmp_path / "queue"
    assert f"the queue directory is kept: {queue_dir}" in text
    assert (queue_dir / "wal").is_dir()
    assert not (tmp_path / "simulator").exists()  # its CA is of no use once it stopped
    assert re.search(r"breaker transitions closed->open, open->half-open, ", text)
    # The commands it suggests, run as printed, in the shell the demo ran in.
    suggested = [line.strip() for line in text.splitlines() if line.startswith(f"  {script} ")]
    assert [shlex.split(line)[1:3] for line in suggested] == [
        ["status", "--queue-dir"],
        ["dlq", "count"],
        ["dlq", "list"],
        ["dlq", "show"],
    ]
    outputs = []
    for line in suggested:
        ran = subprocess.run(
            ["/bin/bash", "-c", line], capture_output=True, text=True, timeout=60, env=env
        )
        assert ran.returncode == 0, (line, ran.stderr)
        outputs.append(ran.stdout)
    assert "dead letters     1" in outputs[0]
    assert re.search(r"\ndelivered +73 from this directory, by any process\n", outputs[0])
    last = r"\nlast recorded +by pid \d+ .* ago, since it started: delivered 73"
    assert re.search(last, outputs[0])
    assert "item_rejected  1" in outputs[1]
    assert "poison_pill" in outputs[2]
    assert '"name": "poison_pill"' in outputs[3]
    assert f"when done: rm -rf {tmp_path}" in text


def test_simulator_command_prints_url_and_ca(tmp_path: Path) -> None:
    """The export line works in any shell: the CA path in it is absolute, even for a
    relative --state-dir."""
    with subprocess.Popen(
        [PYTHON, "-m", "cio_logging.cli", "simulator", "--port", "0", "--state-dir", "sim"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    text = "".join(lines)
    assert "https://127.0.0.1:" in text
    assert "CIO_LOGGING_TRACK_URL=" in text
    export = next(line for line in lines if line.startswith("export "))
    variables = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    ca_file = Path(variables["CIO_LOGGING_CA_BUNDLE"])
    assert ca_file.is_absolute()
    assert ca_file == tmp_path / "sim" / "cio-track-simulator-ca.pem"


def test_unknown_arguments_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--nope"])
    assert exit_.value.code == 2
