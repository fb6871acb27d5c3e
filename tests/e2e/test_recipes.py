"""The recipes' claims, with the recipes' own code taken from docs/how-to.

tests/e2e/test_docs.py runs every block of every page; a recipe that needs a server
running until it is stopped is checked here, with the server and the signal it names.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, free_port, wait_for

HOW_TO = PROJECT_ROOT / "docs" / "how-to"


def recipe_file(page: str, name: str) -> str:
    """The block of ``page`` written to ``name`` (``<!-- file: name -->``)."""
    text = (HOW_TO / page).read_text(encoding="utf-8")
    match = re.search(rf"<!-- file: {re.escape(name)} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert match, f"{page} has no block written to {name}"
    return match.group(1) + "\n"


def post(port: int, path: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
        return int(answer.status)


def _answers(port: int, user: str) -> bool:
    try:
        return post(port, "/checkout", {"user": user, "amount": 1}) == 200
    except OSError:  # not listening yet
        return False


def queue_status(queue_dir: Path, env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [PYTHON, "-m", "cio_logging", "--json", "status", "--queue-dir", str(queue_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


class TestFlaskOnWaitress:
    """docs/how-to/flask.md: waitress has no SIGTERM handler; signal_handlers=True
    commits the buffered events before the process ends, so every answered request's
    event is on disk, and the next start delivers it."""

    def test_every_answered_event_survives_a_sigterm(
        self, simulator: TrackAPISimulator, tmp_path: Path
    ) -> None:
        (tmp_path / "shop.py").write_text(recipe_file("flask.md", "shop.py"))
        queue_dir = tmp_path / "queue"
        env = child_environment(simulator, queue_dir)
        env["PYTHONPATH"] = str(tmp_path)
        # Customer.io is down: nothing leaves the disk before the signal, so what the
        # queue holds afterwards is exactly what was committed.
        simulator.fail(503)
        port = free_port()
        server = subprocess.Popen(
            [PYTHON, "-m", "waitress", f"--listen=127.0.0.1:{port}", "shop:app"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # The first request, once waitress listens.
            assert wait_for(lambda: _answers(port, "user-0"), 60), "waitress never answered"
            answered = 1
            for number in range(1, 40):
                assert post(port, "/checkout", {"user": f"user-{number}", "amount": 1}) == 200
                answered += 1
            server.send_signal(signal.SIGTERM)
            output, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=10)
        assert server.returncode == -signal.SIGTERM, output  # ended by the signal itself
        assert "Traceback" not in output, output
        assert queue_status(queue_dir, env)["queued"] == answered
        # The next start (here a drain) delivers every one of them.
        simulator.clear_faults()
        drain = subprocess.run(
            [PYTHON, "-m", "cio_logging", "drain", "--timeout", "60"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert drain.returncode == 0, drain.stderr
        assert wait_for(lambda: len(simulator.accepted) == answered, 30)
        assert sorted(e.customer_id or "" for e in simulator.accepted) == sorted(
            f"user-{n}" for n in range(answered)
        )
