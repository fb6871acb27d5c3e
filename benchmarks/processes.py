"""The processes a benchmark runs: servers, peers' virtual environments, measurement cases.

Every server runs in its own process so it never shares the measured client's GIL, and
every measurement runs in a fresh process so one contender's threads, caches and heap
never weigh on the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workload import Control

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_ROOT = Path(
    os.environ.get("CIO_BENCH_VENVS", Path.home() / ".cache" / "cio-logging-bench" / "venvs")
)
_RESULT_MARK = "@@RESULT@@"

#: Peers measured in their own virtual environment: name -> pip requirement. The
#: customerio-cdp-analytics wheel ships a customerio/__init__.py that would shadow the
#: customerio SDK cio_logging needs, so it can never share the project's environment.
PEERS = {
    "cdp-analytics": "customerio-cdp-analytics",
    "logstash-async": "python-logstash-async",
}


class BenchmarkError(RuntimeError):
    """A measurement process or server failed; the message carries its stderr tail."""


@dataclass
class Server:
    """A local HTTPS server in its own process."""

    url: str
    ca_file: str
    control: Control


def _read_banner(process: subprocess.Popen[str]) -> tuple[str, str]:
    url = ca_file = ""
    assert process.stdout is not None
    while not (url and ca_file):
        line = process.stdout.readline()
        if not line:
            raise BenchmarkError(f"server exited before printing its address: {process.args!r}")
        if "listening on " in line:
            url = line.split("listening on ", 1)[1].strip()
        elif line.startswith("CA file: "):
            ca_file = line.split("CA file: ", 1)[1].strip()
    return url, ca_file


@contextlib.contextmanager
def _server(command: list[str], prefix: str) -> Iterator[Server]:
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT, env=_project_env()
    )
    try:
        url, ca_file = _read_banner(process)
        yield Server(url, ca_file, Control(url, ca_file, prefix))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def simulator(latency: float = 0.0) -> Iterator[Server]:
    """The project's Track API simulator (``run_from_command_line``) in its own process."""
    with (
        tempfile.TemporaryDirectory(prefix="cio-bench-sim-") as state,
        _server(
            [sys.executable, "-m", "cio_logging.simulator", "--port", "0", "--state-dir", state],
            "/_simulator/",
        ) as server,
    ):
        if latency:
            server.control.call("faults", {"latency": latency})
        yield server


@contextlib.contextmanager
def cdp_stub(latency: float = 0.0) -> Iterator[Server]:
    """The CDP ``/v1/batch`` stub (benchmarks/stub_server.py) in its own process."""
    with (
        tempfile.TemporaryDirectory(prefix="cio-bench-stub-") as state,
        _server(
            [
                sys.executable,
                "-m",
                "benchmarks.stub_server",
                "--latency",
                str(latency),
                "--state-dir",
                state,
            ],
            "/_stub/",
        ) as server,
    ):
        yield server


def _project_env(root: Path = PROJECT_ROOT, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(root), env.get("PYTHONPATH", "")) if part
    )
    env.update(extra)
    return env


def peer_python(peer: str) -> Path:
    """The peer's own interpreter, making its virtual environment on first use."""
    directory = VENV_ROOT / peer
    python = directory / "bin" / "python"
    marker = directory / ".installed"
    if not marker.exists():
        print(f"  making a virtual environment for {PEERS[peer]} in {directory}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(directory)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEERS[peer]], check=True)
        marker.write_text(PEERS[peer])
    return python


def run_case(
    module: str,
    case: str,
    arguments: dict[str, Any],
    *,
    python: Path | str = sys.executable,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
    root: Path = PROJECT_ROOT,
) -> dict[str, Any]:
    """Run one measurement case in a fresh process and return the JSON it printed.

    ``root`` is the process's working directory and the head of its ``PYTHONPATH``: a
    directory holding only the ``benchmarks`` package lets another version of
    cio_logging, installed in ``python``'s environment, be the one imported.
    """
    completed = subprocess.run(
        [str(python), "-m", module, case, json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=root,
        env=_project_env(root, **(env or {})),
        timeout=timeout,
        check=False,
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(_RESULT_MARK) :])
            return result
    tail = "\n".join((completed.stderr or "").splitlines()[-15:])
    raise BenchmarkError(f"{module} {case} exited {completed.returncode}:\n{tail}")


def run_killed_case(
    module: str,
    case: str,
    arguments: dict[str, Any],
    *,
    python: Path | str = sys.executable,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    root: Path = PROJECT_ROOT,
) -> None:
    """Run a case that ends by SIGKILLing itself; anything else is a BenchmarkError."""
    completed = subprocess.run(
        [str(python), "-m", module, case, json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=root,
        env=_project_env(root, **(env or {})),
        timeout=timeout,
        check=False,
    )
    if completed.returncode != -signal.SIGKILL:
        tail = "\n".join((completed.stderr or "").splitlines()[-15:])
        raise BenchmarkError(
            f"{module} {case} exited {completed.returncode}, not by SIGKILL:\n{tail}"
        )
