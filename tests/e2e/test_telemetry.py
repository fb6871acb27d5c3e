"""OpenTelemetry, checked with the real SDK's in-memory readers through an outage."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import HandlerFactory, wait_for


class ThreadRecorder(SpanProcessor):
    """Notes the thread each span starts on: the caller's thread must start none."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.threads.append(threading.current_thread().name)


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.threads = ThreadRecorder()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer_provider.add_span_processor(self.threads)
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def total(self, name: str, **attributes: Any) -> float:
        return float(
            sum(
                point.value
                for point in self.points(name)
                if all(point.attributes.get(k) == v for k, v in attributes.items())
            )
        )

    def gauge(self, name: str) -> float:
        (point,) = self.points(name)
        return float(point.value)

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.tracer_provider.shutdown()
    telemetry.meter_provider.shutdown()


def attach(handler: CustomerIOHandler) -> logging.Logger:
    logger = logging.getLogger(f"otel.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


LATENCY_HISTOGRAMS = ["cio.delivery.duration", "cio.event.lag"]


def bucket_bound_of(value: float, bounds: tuple[float, ...]) -> float:
    """The upper bound of the bucket a value falls in (buckets are (previous, bound])."""
    return next((bound for bound in bounds if value <= bound), float("inf"))


@pytest.mark.parametrize("name", LATENCY_HISTOGRAMS)
def test_latency_histograms_have_buckets_that_fit_seconds(
    make_handler: HandlerFactory, otel: Telemetry, name: str
) -> None:
    """Issue 15: the SDK's default buckets (0, 5, 10 ... 10000) put any request under 5 s
    in one bucket, so a quantile of a few milliseconds read as seconds."""
    logger = attach(make_handler(meter_provider=otel.meter_provider))
    for number in range(3):
        logger.info("purchase", extra=cio_event(f"u{number}"))
    assert wait_for(lambda: sum(p.count for p in otel.points(name)) >= 1, 10)
    (point, *_) = otel.points(name)
    bounds = tuple(point.explicit_bounds)
    assert bounds[0] <= 0.001, bounds
    upto_a_minute = [bound for bound in bounds if bound <= 60.0]
    assert upto_a_minute[-1] == 60.0, bounds
    ratios = [later / earlier for earlier, later in itertools.pairwise(upto_a_minute)]
    assert max(ratios) <= 2.0, bounds  # a quantile within 2x of the truth
    # What was measured here (loopback HTTPS) falls in a bucket less than twice its size.
    assert bucket_bound_of(point.max, bounds) <= 2 * point.max, (point.max, bounds)
    if name == "cio.event.lag":
        assert bounds[-1] >= 72 * 3600  # the lag is told apart up to Customer.io's 72 hours


@pytest.mark.parametrize("name", LATENCY_HISTOGRAMS)
def test_a_view_overrides_the_advised_buckets(make_handler: HandlerFactory, name: str) -> None:
    """The README's recipe: a View on the MeterProvider wins over the advisory."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(
        metric_readers=[reader],
        views=[
            View(
                instrument_name=name,
                aggregation=ExplicitBucketHistogramAggregation(boundaries=(0.05, 0.5, 5.0)),
            )
        ],
    )
    try:
        logger = attach(make_handler(meter_provider=provider))
        logger.info("purchase", extra=cio_event("u1"))

        def bounds() -> list[tuple[float, ...]]:
            data = reader.get_metrics_data()
            return [
                tuple(point.explicit_bounds)
                for resource in (data.resource_metrics if data else [])
                for scope in resource.scope_metrics
                for metric in scope.metrics
                if metric.name == name
                for point in metric.data.data_points
                if isinstance(point, HistogramDataPoint)
            ]

        assert wait_for(lambda: bool(bounds()), 10)
        assert set(bounds()) == {(0.05, 0.5, 5.0)}
    finally:
        provider.shutdown()


def test_every_instrument_through_an_outage_and_recovery(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, otel: Telemetry
) -> None:
    handler = make_handler(
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        consecutive_failures=2,
        reset_timeout=0.4,
        batch_size=5,
        max_backoff=0.1,
        max_attempts=1000,
    )
    logger = attach(handler)

    # Normal delivery: 3 essential, 3 not.
    for number in range(3):
        logger.info("purchase", extra=cio_event(f"u{number}"))
        logger.info("page_viewed", extra=cio_event(f"u{number}"))
    handler.flush()
    assert otel.total("cio.events.enqueued", **{"cio.event.essential": True}) == 3
    assert otel.total("cio.events.enqueued", **{"cio.event.essential": False}) == 3
    assert otel.total("cio.events.delivered") == 6
    lag = otel.points("cio.event.lag")
    assert sum(p.count for p in lag) == 6
    assert all(p.min >= 0 and p.max < 10 for p in lag)
    assert otel.gauge("cio.circuit.state") == 0

    # Outage: failures, retries, the breaker opens; the queue gauges rise.
    simulator.fail(503)
    for number in range(8):
        logger.info("purchase", extra=cio_event(f"v{number}"))
    assert wait_for(lambda: handler.status()["breaker"] == "open", 10)
    assert otel.gauge("cio.circuit.state") == 2
    assert otel.gauge("cio.queue.depth") == 8
    time.sleep(0.2)
    assert otel.gauge("cio.queue.oldest_age") >= 0.2
    assert otel.total("cio.events.retried") >= 2
    assert otel.total("cio.circuit.open") >= 1
    failed = [
        p
        for p in otel.points("cio.delivery.duration")
        if p.attributes.get("http.response.status_code") == 503
    ]
    assert failed
    assert all(p.attributes["error.type"] == "http_503" for p in failed)

    # Recovery: the probe closes the breaker and everything arrives.
    simulator.clear_faults()
    assert wait_for(lambda: len(simulator.accepted) == 14, 15)
    assert wait_for(lambda: handler.status()["breaker"] == "closed", 5)
    assert otel.gauge("cio.circuit.state") == 0
    # Accepted first, then acknowledged in the log once every request in flight is back.
    assert wait_for(lambda: otel.gauge("cio.queue.depth") == 0, 5)
    assert otel.total("cio.events.delivered") == 14
    transitions = {
        (p.attributes["cio.circuit.from"], p.attributes["cio.circuit.to"])
        for p in otel.points("cio.circuit.transitions")
    }
    assert {("closed", "open"), ("open", "half_open"), ("half_open", "closed")} <= transitions

    # A dead letter and drops, with their reasons.
    simulator.poison_names = {"poison"}
    logger.info("poison", extra=cio_event("p1"))
    logger.info("bad", extra=cio_event("p1", x=float("nan")))
    handler.set_degradation("essential_only")
    logger.info("page_viewed", extra=cio_event("p2"))
    handler.flush()
    assert otel.total("cio.events.dead_lettered", **{"error.type": "item_rejected"}) == 1
    assert otel.gauge("cio.dead_letter.depth") == 1
    assert otel.total("cio.events.dropped", **{"cio.drop.reason": "invalid_event"}) == 1
    assert (
        otel.total(
            "cio.events.dropped",
            **{"cio.drop.reason": "degradation_essential_only", "cio.event.essential": False},
        )
        == 1
    )

    # Spans: one client span per request, errors marked; a span per transition.
    delivers = otel.finished("cio.deliver")
    assert delivers
    for span in delivers:
        assert span.kind == SpanKind.CLIENT
        attributes = span.attributes or {}
        assert attributes["http.request.method"] == "POST"
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == simulator.port
        count = attributes["messaging.batch.message_count"]
        assert isinstance(count, int)
        assert count >= 1
    errors = [s for s in delivers if s.status.status_code == StatusCode.ERROR]
    assert errors
    assert all((s.attributes or {})["error.type"] == "http_503" for s in errors)
    assert any((s.attributes or {}).get("http.response.status_code") == 200 for s in delivers)
    moves = {
        ((s.attributes or {})["cio.circuit.from"], (s.attributes or {})["cio.circuit.to"])
        for s in otel.finished("cio.circuit.transition")
    }
    assert ("closed", "open") in moves
    assert ("half_open", "closed") in moves
    # The caller's thread started no span: all telemetry beyond counters is elsewhere.
    assert "cio_logging-flush" in otel.threads.threads
    assert all(
        name == "cio_logging-flush" or name.startswith("cio_logging-send")
        for name in otel.threads.threads
    )


def test_an_instrumented_requests_library_adds_no_duplicate_span(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, otel: Telemetry
) -> None:
    RequestsInstrumentor().instrument(tracer_provider=otel.tracer_provider)
    try:
        handler = make_handler(tracer_provider=otel.tracer_provider)
        attach(handler).info("purchase", extra=cio_event("u1"))
        handler.flush()
        names = [s.name for s in otel.spans.get_finished_spans()]
        assert names == ["cio.deliver"]
    finally:
        RequestsInstrumentor().uninstrument()


def test_nothing_logged_while_delivering_comes_back(
    make_handler: HandlerFactory, simulator: TrackAPISimulator
) -> None:
    """Even a record that looks like an event, logged on the flush thread, is ignored."""
    handler = make_handler()
    root = logging.getLogger()
    root.addHandler(handler)
    # Filters apply where a record is logged: urllib3 logs on its connectionpool logger.
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    saved_level = urllib3_log.level
    urllib3_log.setLevel(logging.DEBUG)

    tagged: list[str] = []

    def tag_everything(record: logging.LogRecord) -> bool:
        record.cio = {"customer_id": "loop"}  # what a feedback loop would send
        tagged.append(record.getMessage())
        return True

    urllib3_log.addFilter(tag_everything)
    try:
        logging.getLogger("app").warning("purchase", extra=cio_event("u1"))
        handler.flush()
        time.sleep(0.3)
        handler.flush()
        assert [e.customer_id for e in simulator.accepted] == ["u1"]
        assert handler.status()["enqueued"] == 1
        assert tagged, "the filter never saw a urllib3 record: the test proves nothing"
    finally:
        urllib3_log.removeFilter(tag_everything)
        urllib3_log.setLevel(saved_level)
        root.removeHandler(handler)


def test_periodic_status_report(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="cio_logging.status"):
        handler = make_handler(status_log_interval=0.2)
        attach(handler).info("purchase", extra=cio_event("u1"))
        assert wait_for(lambda: sum(r.name == "cio_logging.status" for r in caplog.records) >= 2, 5)
    report = next(r for r in caplog.records if r.name == "cio_logging.status")
    assert report.getMessage().startswith("{")  # not "cio_logging.status: cio_logging status:"
    assert "'breaker': 'closed'" in report.getMessage()
    assert simulator.api_key not in report.getMessage()


def test_off_by_default_and_without_an_sdk(
    make_handler: HandlerFactory,
    simulator: TrackAPISimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No providers given and no SDK installed globally: the API's no-ops, and it works."""
    with caplog.at_level(logging.INFO, logger="cio_logging.status"):
        handler = make_handler()
        attach(handler).info("purchase", extra=cio_event("u1"))
        handler.flush()
        time.sleep(0.3)
    assert [e.name for e in simulator.accepted] == ["purchase"]
    assert not [r for r in caplog.records if r.name == "cio_logging.status"]
