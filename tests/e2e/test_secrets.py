"""The API key never appears in a repr, an exception, a log line, a status, the CLI's
output, a dead-letter reason, a span or a file in the queue directory.

These tests use a canary key of their own (watched by conftest's output check for the
whole suite too) and attack the places it could leak through: bad settings, server
answers that quote the credentials back (400, 401, 5xx, 207), a failing TLS set-up.
The Basic authorization value (base64 of ``site_id:api_key``) is watched as well.
"""

from __future__ import annotations

import gc
import json
import logging
import logging.config
import os
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.errors import ConfigurationError
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    CANARY_BASIC,
    CANARY_FORMS,
    CANARY_KEY,
    CANARY_SITE,
    PROJECT_ROOT,
    PYTHON,
    child_environment,
    handler_settings,
    wait_for,
)

CLI = [PYTHON, "-m", "cio_logging.cli"]


def leaks(text: str) -> list[str]:
    """Every form of the canary, or a 12-character piece of the key, found in ``text``."""
    pieces = [CANARY_KEY[i : i + 12] for i in range(len(CANARY_KEY) - 11)]
    found = [form for form in CANARY_FORMS if form in text]
    found += [piece for piece in pieces if piece in text and piece not in found]
    return found


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record logged anywhere in this process while the test runs, from DEBUG up."""
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    keeper = Keep(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(keeper)
    root.setLevel(logging.DEBUG)
    yield kept
    root.removeHandler(keeper)
    root.setLevel(level)


def logged_text(kept: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in kept)


def canary_handler(
    simulator: TrackAPISimulator, queue_dir: Path, **options: Any
) -> CustomerIOHandler:
    settings = handler_settings(simulator, queue_dir, **options)
    settings.update(site_id=CANARY_SITE, api_key=CANARY_KEY)
    return CustomerIOHandler(**settings)


def every_file(directory: Path) -> str:
    """The bytes of every file under ``directory``, as text (SQLite pages included)."""
    return "\n".join(
        path.read_bytes().decode("latin-1")
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    )


def run_cli(
    simulator: TrackAPISimulator, queue_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    credentials = {"CUSTOMERIO_SITE_ID": CANARY_SITE, "CUSTOMERIO_API_KEY": CANARY_KEY}
    environment = child_environment(simulator, queue_dir, **{**credentials, **env})
    return subprocess.run(
        [*CLI, *args],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def event_logger(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"test.secrets.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


class TestConfigurationErrors:
    """A bad setting next to a good key: the error never carries the key."""

    @pytest.mark.parametrize(
        "options",
        [
            {"site_id": ""},
            {"region": "mars"},
            {"track_url": "http://127.0.0.1:9"},
            {"track_url": f"https://{CANARY_SITE}:{CANARY_KEY}@127.0.0.1:9"},
            {"track_url": "https://127.0.0.1:9/api"},
            {"track_url": "https://127.0.0.1:notaport"},
            {"ca_bundle": "/no/such/ca.pem"},
            {"flush_interval": "soon"},
            {"max_attempts": 0},
            {"degradation": "half"},
            {"essential_events": 5},
            {"fsync": "maybe"},
            {"no_such_option": 1},
            {"queue_dir": "/proc/cannot/be/a/queue"},
        ],
        ids=lambda options: "-".join(f"{k}" for k in options),
    )
    def test_constructor_and_dictconfig_errors(
        self,
        canary: TrackAPISimulator,
        queue_dir: Path,
        records: list[logging.LogRecord],
        options: dict[str, Any],
    ) -> None:
        """str, repr and the whole chained traceback, from the constructor and dictConfig."""
        settings = handler_settings(canary, queue_dir)
        settings.update(site_id=CANARY_SITE, api_key=CANARY_KEY)
        settings.update(options)
        with pytest.raises(ConfigurationError) as raised:
            CustomerIOHandler(**settings)
        error = raised.value
        text = "\n".join([str(error), repr(error), *traceback.format_exception(error)])
        assert leaks(text) == [], text
        # Let the half-built handler go before dictConfig runs logging.shutdown on every
        # live handler (a known bug: it would raise AttributeError from flush()).
        del raised, error
        gc.collect()

        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"cio": {"class": "cio_logging.CustomerIOHandler", **settings}},
            "loggers": {"test.secrets.dictconfig": {"handlers": ["cio"]}},
        }
        with pytest.raises(ValueError, match="cio") as configured:
            logging.config.dictConfig(config)
        text = "".join(traceback.format_exception(configured.value))
        del configured
        gc.collect()
        assert "ConfigurationError" in text
        assert leaks(text) == [], text
        assert leaks(logged_text(records)) == []

    def test_a_key_of_the_wrong_type_is_not_quoted(
        self, canary: TrackAPISimulator, queue_dir: Path
    ) -> None:
        settings = handler_settings(canary, queue_dir)
        settings.update(site_id=CANARY_SITE, api_key=CANARY_KEY.encode())
        with pytest.raises(ConfigurationError) as raised:
            CustomerIOHandler(**settings)
        assert leaks("".join(traceback.format_exception(raised.value))) == []


class TestAHandlerAtWork:
    """repr, status, logs, spans, metrics and the queue's files while events flow and fail."""

    def test_delivery_failures_that_quote_the_credentials(
        self, canary: TrackAPISimulator, queue_dir: Path, records: list[logging.LogRecord]
    ) -> None:
        """A 5xx, then a 400 and a 207 whose answers quote the key and the Authorization
        value back: nothing of them reaches a log, status, span, metric, dead letter or file."""
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryMetricReader()
        handler = canary_handler(
            canary,
            queue_dir,
            consecutive_failures=50,
            max_attempts=2,
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[reader]),
        )
        logger = event_logger(handler)
        quoted = f"bad auth Basic {CANARY_BASIC} for {CANARY_SITE}:{CANARY_KEY}"
        try:
            assert leaks(repr(handler)) == []
            # 5xx quoting the credentials: retried, then dead-lettered as max_attempts.
            canary.fail(503, body={"meta": {"error": quoted}})
            logger.info("signup", extra=cio_event("user-1", plan="pro"))
            assert wait_for(lambda: handler.status()["dead_letters"] == 1, 15)
            # 400 quoting them: dead-lettered at once.
            canary.fail(400, body={"meta": {"errors": [quoted]}})
            logger.info("signup", extra=cio_event("user-2"))
            assert wait_for(lambda: handler.status()["dead_letters"] == 2, 15)
            # The key pushed past the 200 characters of server words the handler keeps.
            canary.fail(400, body={"meta": {"error": "x" * 190 + CANARY_KEY}})
            logger.info("signup", extra=cio_event("user-3"))
            assert wait_for(lambda: handler.status()["dead_letters"] == 3, 15)
            canary.clear_faults()
            # 207 item error for a poison name.
            canary.poison_names.add("poisoned")
            logger.info("poisoned", extra=cio_event("user-4"))
            logger.info("fine", extra=cio_event("user-5"))
            assert wait_for(lambda: handler.status()["dead_letters"] == 4, 15)
            assert wait_for(lambda: handler.status()["queued"] == 0, 15)
            status = handler.status()
            assert leaks(repr(handler) + json.dumps(status, default=str)) == []
        finally:
            handler.close()
        assert leaks(logged_text(records)) == [], logged_text(records)
        for span in spans.get_finished_spans():
            assert leaks(span.to_json()) == [], span.to_json()
        metrics = reader.get_metrics_data()
        assert metrics is not None
        assert leaks(metrics.to_json()) == []
        assert leaks(every_file(queue_dir)) == []

        listing = run_cli(canary, queue_dir, "dlq", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        letters = json.loads(listing.stdout)
        assert {letter["error_type"] for letter in letters} >= {"http_400", "item_rejected"}
        outputs = [listing.stdout + listing.stderr]
        for letter in letters:
            shown = run_cli(canary, queue_dir, "dlq", "show", letter["id"], "--json")
            assert shown.returncode == 0, shown.stderr
            outputs.append(shown.stdout + shown.stderr)
        for problem in [leaks(output) for output in outputs]:
            assert problem == [], outputs

    def test_refused_credentials(
        self, canary: TrackAPISimulator, queue_dir: Path, records: list[logging.LogRecord]
    ) -> None:
        """401 whose answer quotes the credentials: status, state.json, logs stay clean."""
        canary.fail(401, body={"meta": {"error": f"Basic {CANARY_BASIC} ({CANARY_KEY}) refused"}})
        handler = canary_handler(canary, queue_dir)
        logger = event_logger(handler)
        try:
            logger.info("signup", extra=cio_event("user-1"))
            assert wait_for(lambda: handler.status()["delivery_paused"] is not None, 15)
            status = handler.status()
            assert status["dead_letters"] == 0
            assert leaks(json.dumps(status, default=str)) == [], status
        finally:
            handler.close()
        assert (queue_dir / "state.json").exists()
        assert leaks(every_file(queue_dir)) == []
        assert leaks(logged_text(records)) == [], logged_text(records)

    def test_failing_tls(
        self,
        canary: TrackAPISimulator,
        queue_dir: Path,
        tmp_path: Path,
        records: list[logging.LogRecord],
    ) -> None:
        """A CA that did not sign the server's certificate: paused, and nothing leaks."""
        wrong_ca = tmp_path / "wrong-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(wrong_ca))
        handler = canary_handler(canary, queue_dir, ca_bundle=str(wrong_ca))
        logger = event_logger(handler)
        try:
            logger.info("signup", extra=cio_event("user-1"))
            assert wait_for(lambda: handler.status()["delivery_paused"] is not None, 15)
            assert leaks(json.dumps(handler.status(), default=str)) == []
        finally:
            handler.close()
        assert canary.accepted == []
        assert leaks(logged_text(records)) == [], logged_text(records)
        assert leaks(every_file(queue_dir)) == []
        drain = run_cli(
            canary,
            queue_dir,
            "drain",
            "--timeout",
            "5",
            "--json",
            CIO_LOGGING_CA_BUNDLE=str(wrong_ca),
        )
        assert drain.returncode == 5, drain.stderr
        assert leaks(drain.stdout + drain.stderr) == []


class TestOperatorCommands:
    """status, dlq and drain print nothing of the key, whether it came by variable or flag."""

    def test_every_command_and_its_errors(self, canary: TrackAPISimulator, queue_dir: Path) -> None:
        canary.poison_names.add("poisoned")
        handler = canary_handler(canary, queue_dir)
        logger = event_logger(handler)
        logger.info("poisoned", extra=cio_event("user-1"))
        assert wait_for(lambda: handler.status()["dead_letters"] == 1, 15)
        canary.fail(503)  # one event left on disk, for drain to send
        logger.info("signup", extra=cio_event("user-2"))
        assert wait_for(lambda: handler.status()["failed_requests"] >= 1, 15)
        handler.close()
        canary.clear_faults()
        # Wrong credentials: replay and drain refuse (exit 5) and print neither key.
        wrong = "0123456789abcdef0123"
        for command in (["dlq", "replay"], ["drain", "--timeout", "5"]):
            result = run_cli(canary, queue_dir, *command, CUSTOMERIO_API_KEY=wrong)
            assert result.returncode == 5, (command, result.stdout, result.stderr)
            output = result.stdout + result.stderr
            assert leaks(output) == []
            assert wrong not in output
        letter = json.loads(run_cli(canary, queue_dir, "dlq", "list", "--json").stdout)[0]["id"]
        commands = [
            ["status"],
            ["status", "--json"],
            ["dlq", "count", "--json"],
            ["dlq", "list"],
            ["dlq", "show", letter],
            ["dlq", "replay", "--dry-run", "--json"],
            ["drain", "--timeout", "5", "--json"],
            ["status", "--json", "--api-key", CANARY_KEY],
            ["drain", "--timeout", "5", "--api-key", CANARY_KEY],
            ["status", "--api-key", CANARY_KEY, "--no-such-flag"],
            ["drain", "--api-key", CANARY_KEY, "-o", "max_attempts=zero"],
        ]
        for command in commands:
            result = run_cli(canary, queue_dir, *command)
            assert "Traceback" not in result.stderr, (command, result.stderr)
            assert leaks(result.stdout + result.stderr) == [], (
                command,
                result.stdout,
                result.stderr,
            )
        assert leaks(every_file(queue_dir)) == []


HOOK_PROBE = "tests/apps/output_probe.py"  # not collected by default: not named test_*


class TestTheOutputCheck:
    """conftest's check fails a test whose output carries the key, and only then."""

    @pytest.mark.parametrize(("kind", "fails"), [("print", True), ("log", True), ("input", False)])
    def test_it_catches_output_and_ignores_inputs(
        self, tmp_path: Path, kind: str, fails: bool
    ) -> None:
        result = subprocess.run(
            [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", HOOK_PROBE],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "CIO_TEST_OUTPUT_PROBE": kind,
                "CIO_TEST_PROBE_QUEUE": str(tmp_path / "queue"),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fails:
            assert result.returncode == 1, result.stdout
            assert "the API key (or its Basic authorization value) appeared in" in result.stdout
        else:
            assert result.returncode == 0, result.stdout
            assert "1 passed" in result.stdout
