"""examples/otel: the Prometheus app is scraped, the OTLP app exports, the dashboard fits."""

from __future__ import annotations

import http.server
import json
import logging
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from cio_logging import cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import (
    OTEL_EXAMPLES,
    PYTHON,
    HandlerFactory,
    child_environment,
    free_port,
    wait_for,
)

METRIC_NAME = re.compile(r"\bcio_[a-z_]+\b")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def sample_names(exposition: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line.startswith("cio_")
    }


def test_prometheus_example_serves_the_metrics(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    simulator.poison_names = {"poison_pill"}
    port = free_port()
    with subprocess.Popen(
        [PYTHON, str(OTEL_EXAMPLES / "prometheus_app.py"), "--port", str(port), "--seconds", "60"],
        env=child_environment(simulator, queue_dir),
        stdout=subprocess.PIPE,
        text=True,
    ) as app:
        try:
            assert app.stdout is not None
            assert app.stdout.readline().strip() == "serving metrics"
            assert wait_for(lambda: len(simulator.accepted) == 2, 15)
            assert wait_for(lambda: "cio_events_dead_lettered_total{" in scrape(port), 15)
            text = scrape(port)
        finally:
            app.terminate()
            app.wait(10)
    names = sample_names(text)
    for expected in (
        "cio_events_enqueued_total",
        "cio_events_delivered_total",
        "cio_events_dead_lettered_total",
        "cio_events_dropped_total",
        "cio_queue_depth",
        "cio_dead_letter_depth",
        "cio_queue_oldest_age_seconds",
        "cio_circuit_state",
        "cio_delivery_duration_seconds_bucket",
        "cio_event_lag_seconds_bucket",
    ):
        assert expected in names, f"{expected} not scraped; got {sorted(names)}"
    assert re.search(r"cio_events_delivered_total\{[^}]*\} 2\.0", text)
    assert 'cio_drop_reason="invalid_event"' in text


@pytest.fixture
def every_metric_exposed(
    make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> Iterator[set[str]]:
    """Drive a handler until every instrument fired; the real exporter's sample names."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader])
    handler = make_handler(
        meter_provider=provider,
        consecutive_failures=1,
        reset_timeout=0.2,
        max_backoff=0.05,
        max_attempts=1000,
    )
    logger = logging.getLogger(f"dashboard.{time.monotonic_ns()}")
    logger.propagate = False
    logger.addHandler(handler)
    simulator.fail(503)
    logger.warning("purchase", extra=cio_event("u1"))
    assert wait_for(lambda: handler.status()["breaker"] == "open", 10)
    simulator.clear_faults()
    simulator.poison_names = {"poison"}
    logger.warning("poison", extra=cio_event("u2"))
    logger.warning("bad", extra=cio_event("u3", x=float("nan")))
    assert wait_for(lambda: handler.status()["dead_letters"] == 1, 10)
    assert wait_for(lambda: handler.status()["queued"] == 0, 10)
    yield sample_names(generate_latest(registry).decode())
    provider.shutdown()


def test_dashboard_uses_exactly_the_emitted_metrics(every_metric_exposed: set[str]) -> None:
    dashboard = json.loads((OTEL_EXAMPLES / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # Label names (cio_circuit_from, cio_drop_reason) live in "by (...)" clauses.
    without_groupings = [re.sub(r"\bby \([^)]*\)", "", expr) for expr in expressions]
    used = {name for expr in without_groupings for name in METRIC_NAME.findall(expr)}
    unknown = used - every_metric_exposed
    assert not unknown, f"the dashboard names metrics the handler never emits: {unknown}"

    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count|created)$", "", name)

    unused = {family(n) for n in every_metric_exposed} - {family(n) for n in used}
    assert not unused, f"metrics the dashboard does not show: {unused}"


class _OTLPReceiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_example_exports_spans_and_metrics(
    simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    _OTLPReceiver.received = []
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OTLPReceiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        env = child_environment(
            simulator,
            queue_dir,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.server_address[1]}",
        )
        subprocess.run(
            [
                PYTHON,
                str(OTEL_EXAMPLES / "otlp_app.py"),
                "--seconds",
                "1.5",
                "--export-interval",
                "0.5",
            ],
            env=env,
            check=True,
            timeout=60,
        )
    finally:
        receiver.shutdown()
        receiver.server_close()
    paths = {path for path, _, _ in _OTLPReceiver.received}
    assert {"/v1/metrics", "/v1/traces"} <= paths
    assert all(kind == "application/x-protobuf" for _, kind, _ in _OTLPReceiver.received)
    names: set[str] = set()
    for path, _, body in _OTLPReceiver.received:
        if path == "/v1/metrics":
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    names.update(metric.name for metric in scope.metrics)
    assert {"cio.events.enqueued", "cio.events.delivered", "cio.delivery.duration"} <= names
    assert len(simulator.accepted) >= 10
