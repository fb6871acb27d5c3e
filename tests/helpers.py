"""Helpers shared by the tests: paths, handler settings, child processes, waiting, and the
secrets the suite watches for. Tests import them from here, never from another test module.

Fixtures and pytest hooks live in conftest.py; the throwaway PostgreSQL cluster in
pg_cluster.py and the published specs' loading in spec_check.py.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import http.client
import inspect
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.events import Event, event_from_record
from cio_logging.simulator import TrackAPISimulator
from cio_logging.testing import simulator_handler_settings
from cio_logging.wire import pipelines_call, track_item, utf8_size

from .pg_cluster import APP_PASSWORD

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

#: The scripts the tests run as subprocesses (and the servers' applications).
APPS = PROJECT_ROOT / "tests" / "apps"
CHILD_APP = str(APPS / "child_app.py")
OTEL_EXAMPLES = PROJECT_ROOT / "examples" / "otel"
CLI = [PYTHON, "-m", "cio_logging.cli"]

HandlerFactory = Callable[..., CustomerIOHandler]

#: The two APIs, for the tests that run on both: parametrize ``api`` with it, and every
#: handler ``make_handler`` builds and every ``child_environment`` speaks that API.
APIS = ["track", "pipelines"]


def running_in_ci() -> bool:
    """CI=true (or 1, yes): a skip that would hide a missing requirement must fail instead."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def handler_settings(sim: TrackAPISimulator, queue_dir: Path, **options: Any) -> dict[str, Any]:
    """Constructor arguments for a handler talking to ``sim``, fast enough for tests:
    the same the shipped testing helpers give applications."""
    return simulator_handler_settings(sim, queue_dir, **options)


def child_environment(
    sim: TrackAPISimulator, queue_dir: Path, api: str = "track", **extra: str
) -> dict[str, str]:
    """Environment for a subprocess that configures its handler from variables only."""
    env = dict(os.environ)
    env.update(
        {
            "CIO_LOGGING_API": api,
            "CUSTOMERIO_SITE_ID": sim.site_id,
            "CUSTOMERIO_API_KEY": sim.api_key,
            "CUSTOMERIO_CDP_API_KEY": sim.api_key,
            "CIO_LOGGING_TRACK_URL": sim.url,
            "CIO_LOGGING_CA_BUNDLE": sim.ca_file,
            "CIO_LOGGING_QUEUE_DIR": str(queue_dir),
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]),
        }
    )
    env.update(extra)
    return env


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class HandlerInACycle(logging.Handler):
    """A handler only the garbage collector can free (it refers to itself), as an
    application's second ``dictConfig`` leaves the handlers of its first."""

    def __init__(self) -> None:
        super().__init__()
        self.itself = self

    def emit(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def collection_only_on_request() -> Iterator[None]:
    """Automatic collection stays on, but no allocation count will start one."""
    saved = gc.get_threshold()
    gc.set_threshold(1_000_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def printed_ids(output: str) -> list[str]:
    """The event ids a child app printed, one a line, once each emit returned."""
    return [line for line in output.splitlines() if len(line) == 26]


def run_child_app(sim: TrackAPISimulator, queue_dir: Path, *args: str) -> list[str]:
    """Run tests/apps/child_app.py to its end on ``queue_dir``; the ids it logged."""
    result = subprocess.run(
        [PYTHON, CHILD_APP, *args],
        env=child_environment(sim, queue_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return printed_ids(result.stdout)


def run_cli(
    simulator: TrackAPISimulator, queue_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cio-logging ARGS`` with the handler's variables pointing at the simulator."""
    result = subprocess.run(
        [*CLI, *args],
        env=child_environment(simulator, queue_dir, **env),
        stdin=subprocess.DEVNULL,  # never a terminal: no prompt, no progress bar
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert simulator.api_key not in result.stdout + result.stderr
    return result


def make_event(number: int = 0, name: str = "purchase") -> Event:
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, name, (), None, extra=cio_event(f"user-{number}", n=number)
    )
    event = event_from_record(record)
    assert event is not None
    return event


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- gunicorn serving tests/apps/wsgi_app.py -------------------------------------------

#: The sync workers each gunicorn test starts.
GUNICORN_WORKERS = 4


def listening_port(log: Path, gunicorn: subprocess.Popen[bytes]) -> int:
    """The port gunicorn bound (it was given port 0), once its workers booted."""
    found: list[int] = []

    def ready() -> bool:
        text = log.read_text(errors="replace")
        match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
        if match and text.count("Booting worker with pid") >= GUNICORN_WORKERS:
            found.append(int(match.group(1)))
            return True
        return gunicorn.poll() is not None

    assert wait_for(ready, 60), log.read_text(errors="replace")
    assert gunicorn.poll() is None, log.read_text(errors="replace")
    assert found
    return found[0]


def request_event(port: int, path: str = "/") -> tuple[str, int]:
    """One request; the event id the worker logged and the worker's pid."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
    finally:
        connection.close()
    event_id, pid = body.split()
    return event_id, int(pid)


# -- Secrets: what no output of the suite may contain ----------------------------------
#
# conftest's hooks fail any test whose output carries one of WATCHED_SECRETS.


def _simulator_default(name: str) -> str:
    default: str = inspect.signature(TrackAPISimulator).parameters[name].default
    return default


#: The credentials every ``simulator`` fixture accepts, unless a test changes them.
SIMULATOR_SITE_ID = _simulator_default("site_id")
SIMULATOR_API_KEY = _simulator_default("api_key")


def secret_forms(site_id: str, api_key: str) -> list[str]:
    """The key, and the Basic authorization values built from it (with and without
    padding): Track's ``site_id:api_key``, then the Pipelines API's ``api_key:``."""
    basic = base64.b64encode(f"{site_id}:{api_key}".encode()).decode()
    # The Pipelines API's: the key as the username, a blank password.
    pipelines = base64.b64encode(f"{api_key}:".encode()).decode()
    return [api_key, basic, basic.rstrip("="), pipelines, pipelines.rstrip("=")]


#: The secrets tests use a canary key of their own (the ``canary`` fixture's simulator).
CANARY_SITE = "canary-site-42"
CANARY_KEY = "5c1f0e9b7a3d24f86e01"  # shaped like a Track API key: 20 hex digits
CANARY_FORMS = secret_forms(CANARY_SITE, CANARY_KEY)
CANARY_BASIC = CANARY_FORMS[1]

#: What no output may contain: the simulator's key, the canary key, and the PostgreSQL
#: application role's password. Tests that use a key of their own add its forms here.
WATCHED_SECRETS: list[str] = [
    *secret_forms(SIMULATOR_SITE_ID, SIMULATOR_API_KEY),
    *CANARY_FORMS,
    APP_PASSWORD,
]


def leaked_secrets(text: str) -> list[str]:
    """The watched secrets found in ``text``."""
    return [secret for secret in WATCHED_SECRETS if secret in text]


def replay_into(store: Any, letters: list[Any], queue: Any) -> int:
    """Put dead letters back in the queue ahead of their people's queued calls, then out
    of the store (what ``dlq replay`` does); how many moved."""
    from cio_logging.events import event_from_dict
    from cio_logging.store import encode_row

    readable = [letter for letter in letters if letter.event is not None]
    now = time.time()
    queue.requeue(
        [
            encode_row(event_from_dict(letter.event), replayed_at=now, dead_letter=letter.history())
            for letter in readable
        ]
    )
    store.purge(readable)
    return len(readable)


# -- calls of an exact size on the wire (the size-limit tests) -------------------------

#: Padding of each kind: (character, bytes it takes on the wire).
PADDING = {
    "ascii": ("x", 1),
    "two-byte": ("é", 2),
    "four-byte": ("🎉", 4),
    "escaped": ("\x01", 6),  # json writes \u0001
}


def event_of(extra: dict[str, Any], message: str = "msg") -> Event:
    """The event the handler makes of a record tagged with ``extra``."""
    record = logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, message, (), None, extra=extra
    )
    event = event_from_record(record)
    assert event is not None
    return event


def wire_size(event: Event, api: str) -> int:
    """The bytes ``event`` takes as one call of a batch on ``api``."""
    return utf8_size(pipelines_call(event) if api == "pipelines" else track_item(event))


def padding_for(
    make: Callable[[str], dict[str, Any]], api: str, target: int, kind: str = "ascii"
) -> str:
    """The padding (of ``kind``, topped up with ASCII) that makes the call ``make(padding)``
    tags exactly ``target`` bytes as sent on ``api``."""
    char, width = PADDING[kind]
    units, rest = divmod(target - wire_size(event_of(make("")), api), width)
    padding = char * units + "x" * rest
    assert wire_size(event_of(make(padding)), api) == target
    return padding


def sized(
    make: Callable[[str], dict[str, Any]], api: str, target: int, kind: str = "ascii"
) -> Event:
    """The call ``make(padding)`` tags, exactly ``target`` bytes as sent on ``api``."""
    return event_of(make(padding_for(make, api, target, kind)))
