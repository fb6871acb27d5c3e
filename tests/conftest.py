"""Shared fixtures: a real Track API simulator over HTTPS, handlers in tmp_path, clean logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cio_logging import CustomerIOHandler, resilience
from cio_logging.simulator import TrackAPISimulator
from cio_logging.testing import simulator_handler_settings

from .spec_check import PIPELINES_SPEC_PATH, SPEC_PATH, Spec, load_pipelines_spec, load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]

HandlerFactory = Callable[..., CustomerIOHandler]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the logging tree as each test found it."""
    root = logging.getLogger()
    saved_handlers = list(root.handlers)
    saved_level = root.level
    saved_loggers = dict(logging.Logger.manager.loggerDict)
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name in set(logging.Logger.manager.loggerDict) - set(saved_loggers):
        logger = logging.Logger.manager.loggerDict[name]
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()


#: Why the spec checks did not run; the start of the skip reason, counted in the summary.
SPEC_MISSING = (
    "Customer.io's Track API spec is absent, so the checks against it did not run: "
    f"put it at {SPEC_PATH} (shared/spec beside the checkout) or set CIO_TRACK_SPEC to its path"
)
PIPELINES_SPEC_MISSING = (
    "Customer.io's Pipelines API spec is absent, so the checks against it did not run: "
    f"put it at {PIPELINES_SPEC_PATH} (shared/spec beside the checkout) or set "
    "CIO_PIPELINES_SPEC to its path"
)


def running_in_ci() -> bool:
    """CI=true (or 1, yes): a skip that would hide a missing requirement must fail instead."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(autouse=True)
def _fresh_workspace_windows() -> Iterator[None]:
    """Each test starts with no workspace's rate-cap slots or Retry-After pause.

    They are shared per workspace (site id and endpoint) in a process, and every
    simulator has the same site id: a later test whose simulator got a port an earlier
    one had used would inherit its pause (seen on CI: a flush that returned at once,
    held by a Retry-After from another test).
    """
    yield
    with resilience._WINDOWS_GUARD:
        resilience._WINDOWS.clear()


def _required_spec(loaded: Spec | None, missing: str) -> Spec:
    """``loaded``, or skip with ``missing`` as the reason; under CI=true fail instead."""
    if loaded is None:
        if running_in_ci():
            pytest.fail(f"{missing} (CI=true, so this fails rather than skips)", pytrace=False)
        pytest.skip(missing)
    return loaded


@pytest.fixture(scope="session")
def spec() -> Spec:
    """Customer.io's published Track API spec: skipped with the reason when absent, or failed
    under CI=true, where the spec checks must run."""
    return _required_spec(load_spec(), SPEC_MISSING)


@pytest.fixture(scope="session")
def pipelines_spec() -> Spec:
    """Customer.io's published Pipelines API spec (its ``oneOf`` read as ``anyOf``, formats
    checked): skipped with the reason when absent, or failed under CI=true."""
    return _required_spec(load_pipelines_spec(), PIPELINES_SPEC_MISSING)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say in one line, whatever the -r flags, how many tests a missing spec skipped."""
    for missing in (SPEC_MISSING, PIPELINES_SPEC_MISSING):
        skipped = [
            report
            for report in terminalreporter.stats.get("skipped", [])
            if isinstance(report.longrepr, tuple) and missing in str(report.longrepr[2])
        ]
        if skipped:
            terminalreporter.write_line(f"{len(skipped)} test(s) skipped: {missing}", yellow=True)


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[TrackAPISimulator]:
    with TrackAPISimulator(state_dir=tmp_path / "simulator") as sim:
        yield sim


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    return tmp_path / "queue"


def handler_settings(sim: TrackAPISimulator, queue_dir: Path, **options: Any) -> dict[str, Any]:
    """Constructor arguments for a handler talking to ``sim``, fast enough for tests:
    the same the shipped testing helpers give applications."""
    return simulator_handler_settings(sim, queue_dir, **options)


#: The two APIs, for the tests that run on both: parametrize ``api`` with it, and every
#: handler ``make_handler`` builds and every ``child_environment`` speaks that API.
APIS = ["track", "pipelines"]


@pytest.fixture
def api() -> str:
    """The API handlers talk to; a test parametrized over ``api`` overrides it."""
    return "track"


@pytest.fixture
def make_handler(
    simulator: TrackAPISimulator, queue_dir: Path, api: str
) -> Iterator[HandlerFactory]:
    """Build handlers against the simulator; every one is closed at teardown."""
    made: list[CustomerIOHandler] = []

    def factory(**options: Any) -> CustomerIOHandler:
        options.setdefault("api", api)
        handler = CustomerIOHandler(**handler_settings(simulator, queue_dir, **options))
        made.append(handler)
        return handler

    yield factory
    for handler in made:
        handler.close()


@pytest.fixture
def event_logger(make_handler: HandlerFactory) -> tuple[logging.Logger, CustomerIOHandler]:
    """A fresh logger with one handler attached, not propagating."""
    handler = make_handler()
    logger = logging.getLogger(f"test.events.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


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


PYTHON = sys.executable
CHILD_APP = str(PROJECT_ROOT / "tests" / "child_app.py")


def printed_ids(output: str) -> list[str]:
    """The event ids a child app printed, one a line, once each emit returned."""
    return [line for line in output.splitlines() if len(line) == 26]


def run_child_app(sim: TrackAPISimulator, queue_dir: Path, *args: str) -> list[str]:
    """Run tests/child_app.py to its end on ``queue_dir``; the ids it logged."""
    result = subprocess.run(
        [PYTHON, CHILD_APP, *args],
        env=child_environment(sim, queue_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return printed_ids(result.stdout)


# -- The API key never appears in any output of the suite ----------------------------
#
# Every test is watched: what it printed (stdout and stderr, its subprocesses' output
# that reached the terminal included) and every record logged in this process while it
# ran, at DEBUG, formatted with its traceback. A test whose output carries a watched
# secret fails, whatever it asserted. Inputs are not output: a test may pass the key
# as an argument, set it in a subprocess's environment or capture a subprocess's
# output into a variable (and check that itself).


from collections.abc import Generator  # noqa: E402

import pluggy  # noqa: E402  # appended block: the shared imports above stay untouched


def _simulator_default(name: str) -> str:
    import inspect  # here, not at the top: this block is appended to the shared conftest

    default: str = inspect.signature(TrackAPISimulator).parameters[name].default
    return default


#: The credentials every ``simulator`` fixture accepts, unless a test changes them.
SIMULATOR_SITE_ID = _simulator_default("site_id")
SIMULATOR_API_KEY = _simulator_default("api_key")


def secret_forms(site_id: str, api_key: str) -> list[str]:
    """The key, and the Basic authorization values built from it (with and without
    padding): Track's ``site_id:api_key``, then the Pipelines API's ``api_key:``."""
    import base64

    basic = base64.b64encode(f"{site_id}:{api_key}".encode()).decode()
    # The Pipelines API's: the key as the username, a blank password.
    pipelines = base64.b64encode(f"{api_key}:".encode()).decode()
    return [api_key, basic, basic.rstrip("="), pipelines, pipelines.rstrip("=")]


#: What no output may contain. Tests that use a key of their own add its forms here.
WATCHED_SECRETS: list[str] = secret_forms(SIMULATOR_SITE_ID, SIMULATOR_API_KEY)

_RECORDER_KEY = pytest.StashKey["_RecordingHandler"]()
_SAVED_ROOT_LEVEL = pytest.StashKey[int]()


class _RecordingHandler(logging.Handler):
    """Keeps every record logged while one test runs, formatted, traceback included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.checked = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is the test's business
            self.lines.append(f"{record.name} {record.levelname} {record.msg!r} {record.args!r}")


def leaked_secrets(text: str) -> list[str]:
    """The watched secrets found in ``text``."""
    return [secret for secret in WATCHED_SECRETS if secret in text]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    recorder = _RecordingHandler()
    root = logging.getLogger()
    item.stash[_RECORDER_KEY] = recorder
    item.stash[_SAVED_ROOT_LEVEL] = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    yield


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    recorder = item.stash.get(_RECORDER_KEY, None)
    root = logging.getLogger()
    if recorder is not None:
        root.removeHandler(recorder)
    root.setLevel(item.stash.get(_SAVED_ROOT_LEVEL, logging.WARNING))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    places: list[str] = []
    for title, content in report.sections:
        # Sections accumulate over setup, call and teardown: look at this phase's only.
        if title.endswith(f" {report.when}") and leaked_secrets(content):
            places.append(title)
    recorder = item.stash.get(_RECORDER_KEY, None)
    if recorder is not None:
        new_lines = recorder.lines[recorder.checked :]
        recorder.checked = len(recorder.lines)
        places += [f"a log record: {line[:200]!r}" for line in new_lines if leaked_secrets(line)]
    if places and not report.failed:
        report.outcome = "failed"
        report.longrepr = "the API key (or its Basic authorization value) appeared in:\n" + (
            "\n".join(f"  - {place}" for place in places)
        )


# -- PostgreSQL: a throwaway cluster for the fleet-mode tests -------------------------
#
# Started once per session, as the postgres user when the suite runs as root, and
# stopped at the end. Without server binaries the tests that need it are skipped with
# the reason; under CI=true that is a failure instead, so CI always runs them. The
# application role's password is watched like the API key.

from .pg_cluster import (  # noqa: E402
    APP_PASSWORD,
    Bouncer,
    Cluster,
    pgbouncer_binary,
    server_binaries,
)

WATCHED_SECRETS.append(APP_PASSWORD)


def _postgres_or_skip() -> Any:
    binaries = server_binaries()
    if binaries is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true: the fleet-mode tests must run in CI")
        pytest.skip(reason)
    return binaries


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster on a free port of 127.0.0.1, for the whole session."""
    cluster = Cluster(_postgres_or_skip())
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database for this test (the app role owns it)."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return pg_cluster.new_database(f"t_{stem}_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own, which it may stop and start (an outage)."""
    cluster = Cluster(_postgres_or_skip())
    try:
        yield cluster
    finally:
        cluster.destroy()


def _pgbouncer_or_skip() -> Any:
    binary = pgbouncer_binary()
    if binary is None:
        reason = "PgBouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true: the fleet tests through PgBouncer must run")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def pg_bouncer(pg_cluster: Cluster) -> Iterator[Bouncer]:
    """PgBouncer in transaction pooling mode in front of the session's cluster: four
    server connections shared by every client, as fleets reach PostgreSQL."""
    bouncer = Bouncer(_pgbouncer_or_skip(), pg_cluster)
    try:
        yield bouncer
    finally:
        bouncer.destroy()


@pytest.fixture(params=["direct", "pgbouncer"])
def fleet_url(request: pytest.FixtureRequest, pg_url: str) -> str:
    """A fresh database's URL, straight to PostgreSQL and through PgBouncer: the fleet
    tests that use it run both ways."""
    if request.param == "direct":
        return pg_url
    bouncer: Bouncer = request.getfixturevalue("pg_bouncer")
    return bouncer.url(pg_url.rsplit("/", 1)[1])
