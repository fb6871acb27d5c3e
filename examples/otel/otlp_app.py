"""An application that sends cio_logging's spans and metrics to a collector over OTLP.

pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
export OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318   # the collector
export CUSTOMERIO_SITE_ID=... CUSTOMERIO_API_KEY=...
python examples/otel/otlp_app.py --seconds 30
"""

from __future__ import annotations

import argparse
import logging
import time

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cio_logging import CustomerIOHandler, cio_event


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--export-interval", type=float, default=5.0)
    args = parser.parse_args()

    resource = Resource.create({"service.name": "shop"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[
            PeriodicExportingMetricReader(
                OTLPMetricExporter(), export_interval_millis=args.export_interval * 1000
            )
        ],
    )
    handler = CustomerIOHandler(tracer_provider=tracer_provider, meter_provider=meter_provider)
    events = logging.getLogger("shop.events")
    events.setLevel(logging.INFO)
    events.addHandler(handler)

    deadline = time.monotonic() + args.seconds
    number = 0
    while time.monotonic() < deadline:
        events.info("purchase", extra=cio_event(f"user-{number % 10}", amount=number))
        number += 1
        time.sleep(0.1)
    handler.close()
    meter_provider.shutdown()  # exports what is left
    tracer_provider.shutdown()


if __name__ == "__main__":
    main()
