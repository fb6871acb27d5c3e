"""Shared fixtures and hooks: a real Track API simulator over HTTPS, handlers in tmp_path,
clean logging, the output check for secrets, a throwaway PostgreSQL cluster.

Plain helpers live in helpers.py; tests import them from there.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from hypothesis import HealthCheck, settings

from cio_logging import CustomerIOHandler
from cio_logging.simulator import TrackAPISimulator

from .helpers import (
    CANARY_KEY,
    CANARY_SITE,
    HandlerFactory,
    handler_settings,
    leaked_secrets,
    running_in_ci,
)
from .pg_cluster import Bouncer, Cluster, pgbouncer_binary, server_binaries
from .spec_check import (
    PIPELINES_SPEC_PATH,
    SPEC_PATH,
    Spec,
    load_as_published,
    load_pipelines_spec,
    load_spec,
)

# Property tests judge values, never speed: no per-example deadline, and no health check
# that fails a test because generating its examples was slow on a busy machine.
settings.register_profile("no-timing", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("no-timing")


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


@pytest.fixture(scope="session")
def published_specs() -> dict[str, Spec]:
    """Both APIs' specs read literally except where their oneOf alternatives overlap
    (``spec_check.TRACK_OVERLAPS``, ``PIPELINES_OVERLAPS``), by API name."""
    return {
        "track": _required_spec(load_as_published("track"), SPEC_MISSING),
        "pipelines": _required_spec(load_as_published("pipelines"), PIPELINES_SPEC_MISSING),
    }


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


@pytest.fixture
def canary(simulator: TrackAPISimulator) -> TrackAPISimulator:
    """The simulator accepts only the canary credentials."""
    simulator.set_credentials(CANARY_SITE, CANARY_KEY)
    return simulator


# -- The API key never appears in any output of the suite ----------------------------
#
# Every test is watched: what it printed (stdout and stderr, its subprocesses' output
# that reached the terminal included) and every record logged in this process while it
# ran, at DEBUG, formatted with its traceback. A test whose output carries a watched
# secret fails, whatever it asserted. Inputs are not output: a test may pass the key
# as an argument, set it in a subprocess's environment or capture a subprocess's
# output into a variable (and check that itself). The watched secrets are
# helpers.WATCHED_SECRETS.

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


@pytest.fixture
def one_session_bouncer(pg_cluster: Cluster) -> Iterator[Bouncer]:
    """A PgBouncer of this test's own with one server connection: every client's
    transactions run in the same server session, one after the other."""
    bouncer = Bouncer(_pgbouncer_or_skip(), pg_cluster, pool_size=1)
    try:
        yield bouncer
    finally:
        bouncer.destroy()
