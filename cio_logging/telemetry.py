"""OpenTelemetry spans and metrics, on the API alone.

The handler makes its own tracer and meter from the providers it is given (default:
the global ones), so a process can run several handlers and set its providers late.
Without an SDK every call here is one of the API's no-ops.

Metric names are a contract with dashboards (examples/otel/): change one only with the
dashboard and a CHANGELOG entry. On the caller's thread only the two counters
``cio.events.enqueued`` and ``cio.events.dropped`` are touched; everything else runs on
the flush thread or in the metric reader's callbacks.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from .config import Endpoint
from .metadata import PACKAGE_VERSION

#: The breaker's states as metric attribute values and gauge numbers.
_STATE_NAMES = {"closed": "closed", "half-open": "half_open", "open": "open"}
# Shared by every measurement of delivered events: never changed after this.
_ESSENTIAL_ATTRIBUTES: dict[bool, dict[str, Any]] = {
    essential: {"cio.event.essential": essential} for essential in (False, True)
}
_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}

_INSTRUMENTATION_NAME = "cio_logging"

#: Bucket boundaries (seconds) the two latency histograms advise. Each boundary is at
#: most twice the one before, so a quantile read from the buckets (Prometheus's
#: histogram_quantile) is within 2x of the truth between 1 ms and 60 s. The SDK's
#: default (0, 5, 10 ... 10000) is made for milliseconds and put every request under
#: 5 s in one bucket. A View on the MeterProvider overrides them
#: (docs/how-to/prometheus-grafana.md).
DELIVERY_DURATION_BOUNDARIES: tuple[float, ...] = (
    0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8,
    1.5, 3.0, 6.0, 10.0, 20.0, 40.0, 60.0,
)  # fmt: skip
#: The lag goes on to 72 hours, when Customer.io stops triggering campaigns for an event.
EVENT_LAG_BOUNDARIES: tuple[float, ...] = (
    *DELIVERY_DURATION_BOUNDARIES,
    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 259200.0,
)  # fmt: skip


@dataclass
class QueueProbes:
    """How the observable gauges read one handler's queue (called by the metric reader)."""

    queue_dir: str
    queue_depth: Callable[[], int]
    dead_letter_depth: Callable[[], int]
    oldest_age: Callable[[], float | None]
    breaker_state: Callable[[], str]


class RequestSpan:
    """What the sender learns about one request, recorded on its span and histogram."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self.status_code: int | None = None
        self.error_type: str | None = None

    def answered(self, status_code: int) -> None:
        self.status_code = status_code
        self._span.set_attribute("http.response.status_code", status_code)

    def failed(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR, message))


class Telemetry:
    """The handler's instruments and its tracer."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        probes: QueueProbes,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        package_version = PACKAGE_VERSION
        self._tracer = trace.get_tracer(
            _INSTRUMENTATION_NAME, package_version, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter(
            _INSTRUMENTATION_NAME, package_version, meter_provider=meter_provider
        )
        self._endpoint = endpoint
        self._probes = probes
        self._gauges = _gauges_of(meter)
        self._gauges.watch(probes)
        self.transitions = meter.create_counter(
            "cio.circuit.transitions",
            unit="{transition}",
            description="Circuit breaker state changes (cio.circuit.from, cio.circuit.to)",
        )
        self.openings = meter.create_counter(
            "cio.circuit.open", unit="{opening}", description="Times the circuit breaker opened"
        )
        self.enqueued = meter.create_counter(
            "cio.events.enqueued", unit="{event}", description="Events written to the queue"
        )
        self.delivered = meter.create_counter(
            "cio.events.delivered", unit="{event}", description="Events accepted by Customer.io"
        )
        self.retried = meter.create_counter(
            "cio.events.retried",
            unit="{event}",
            description="Failed event attempts scheduled for a retry",
        )
        self.dead_lettered = meter.create_counter(
            "cio.events.dead_lettered",
            unit="{event}",
            description="Events moved to the dead-letter store (error.type)",
        )
        self.dropped = meter.create_counter(
            "cio.events.dropped",
            unit="{event}",
            description="Events dropped at emit (cio.drop.reason)",
        )
        self.past_window = meter.create_counter(
            "cio.events.past_window",
            unit="{event}",
            description="Events sent past Customer.io's 72-hour window: recorded there, "
            "but they trigger no campaign",
        )
        self.delivery_duration = meter.create_histogram(
            "cio.delivery.duration",
            unit="s",
            description="Duration of one request to the Track API",
            explicit_bucket_boundaries_advisory=DELIVERY_DURATION_BOUNDARIES,
        )
        self.event_lag = meter.create_histogram(
            "cio.event.lag",
            unit="s",
            description="From the log record's time to acceptance by Customer.io",
            explicit_bucket_boundaries_advisory=EVENT_LAG_BOUNDARIES,
        )

    # -- the caller's thread: one counter add each ------------------------------------

    def event_enqueued(self, essential: bool) -> None:
        self.enqueued.add(1, {"cio.event.essential": essential})

    def event_dropped(self, reason: str, essential: bool | None) -> None:
        attributes: dict[str, Any] = {"cio.drop.reason": reason}
        if essential is not None:
            attributes["cio.event.essential"] = essential
        self.dropped.add(1, attributes)

    # -- the flush thread -------------------------------------------------------------

    def events_past_window(self, count: int) -> None:
        self.past_window.add(count)

    @contextlib.contextmanager
    def request(self, route: str, message_count: int) -> Iterator[RequestSpan]:
        """A client span and a duration measurement around one Track API request.

        Instrumentation is suppressed inside, so an instrumented ``requests`` library
        does not add a second span for the same call.
        """
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": self._endpoint.host,
            "server.port": self._endpoint.port,
            "messaging.batch.message_count": message_count,
            "cio.route": route,
        }
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            "cio.deliver",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            recorder = RequestSpan(span)
            token = otel_context.attach(
                otel_context.set_value(
                    otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY,
                    True,
                    otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True),
                )
            )
            try:
                yield recorder
            finally:
                otel_context.detach(token)
                measured: dict[str, Any] = {"cio.route": route}
                if recorder.error_type is not None:
                    measured["error.type"] = recorder.error_type
                if recorder.status_code is not None:
                    measured["http.response.status_code"] = recorder.status_code
                self.delivery_duration.record(time.perf_counter() - started, measured)

    def events_delivered(self, logged_at: Iterable[tuple[float, bool]], now: float) -> None:
        """Count accepted events and their lag; ``logged_at`` pairs time and essential.

        One count per batch and kind, and the lag per event with attributes built once:
        this runs on the sender's thread for every event delivered.
        """
        counts = {False: 0, True: 0}
        record = self.event_lag.record
        for created, essential in logged_at:
            counts[essential] += 1
            lag = now - created
            record(lag if lag > 0.0 else 0.0, _ESSENTIAL_ATTRIBUTES[essential])
        for essential, count in counts.items():
            if count:
                self.delivered.add(count, _ESSENTIAL_ATTRIBUTES[essential])

    def event_retried(self, essential: bool) -> None:
        self.retried.add(1, {"cio.event.essential": essential})

    def event_dead_lettered(self, error_type: str, essential: bool | None) -> None:
        attributes: dict[str, Any] = {"error.type": error_type}
        if essential is not None:
            attributes["cio.event.essential"] = essential
        self.dead_lettered.add(1, attributes)

    def breaker_transition(self, old: str, new: str) -> None:
        source, target = _STATE_NAMES.get(old, old), _STATE_NAMES.get(new, new)
        self.transitions.add(1, {"cio.circuit.from": source, "cio.circuit.to": target})
        if target == "open":
            self.openings.add(1)
        # A span of its own, so a trace backend shows every transition on a timeline.
        with self._tracer.start_as_current_span(
            "cio.circuit.transition",
            attributes={"cio.circuit.from": source, "cio.circuit.to": target},
        ) as span:
            span.add_event("transition", {"cio.circuit.from": source, "cio.circuit.to": target})

    def close(self) -> None:
        """Stop reporting this handler's queue in the shared gauges."""
        self._gauges.forget(self._probes)


class _QueueGauges:
    """The observable gauges of one meter, reporting every live handler on it.

    A meter keeps the first callbacks registered under a name: per-handler gauges would
    report only the first handler, and go on reporting it after dictConfig replaced it.
    So the gauges are registered once per meter and observe each live handler, labelled
    with its queue directory (``cio.queue.dir``); a closed handler is forgotten.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self._watched: dict[int, QueueProbes] = {}
        self._guard = threading.Lock()
        meter.create_observable_gauge(
            "cio.circuit.state",
            callbacks=[self._observe(lambda p: _STATE_VALUES.get(p.breaker_state(), 0))],
            unit="{state}",
            description="Circuit breaker state: 0 closed, 1 half-open, 2 open",
        )
        meter.create_observable_gauge(
            "cio.queue.depth",
            callbacks=[self._observe(lambda p: p.queue_depth())],
            unit="{event}",
            description="Events waiting in the queue directory",
        )
        meter.create_observable_gauge(
            "cio.dead_letter.depth",
            callbacks=[self._observe(lambda p: p.dead_letter_depth())],
            unit="{event}",
            description="Events in the dead-letter store",
        )
        meter.create_observable_gauge(
            "cio.queue.oldest_age",
            callbacks=[self._observe(lambda p: p.oldest_age() or 0.0)],
            unit="s",
            description="Age of the oldest waiting event",
        )

    def watch(self, probes: QueueProbes) -> None:
        with self._guard:
            self._watched[id(probes)] = probes

    def forget(self, probes: QueueProbes) -> None:
        with self._guard:
            self._watched.pop(id(probes), None)

    def _observe(
        self, read: Callable[[QueueProbes], float]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            with self._guard:
                watched = list(self._watched.values())
            for probes in watched:
                try:
                    value = read(probes)
                except Exception:  # noqa: S112 - a store that cannot answer now (a failing
                    continue  # disk, PostgreSQL away) skips this reading; the SDK would log it
                yield Observation(value, {"cio.queue.dir": probes.queue_dir})

        return callback


_GAUGES: weakref.WeakKeyDictionary[metrics.Meter, _QueueGauges] = weakref.WeakKeyDictionary()
_GAUGES_GUARD = threading.Lock()


def _gauges_of(meter: metrics.Meter) -> _QueueGauges:
    with _GAUGES_GUARD:
        gauges = _GAUGES.get(meter)
        if gauges is None:
            gauges = _GAUGES[meter] = _QueueGauges(meter)
        return gauges
