"""The simplest set-up, no collector: Prometheus scrapes the application itself.

pip install opentelemetry-sdk opentelemetry-exporter-prometheus
export CUSTOMERIO_SITE_ID=... CUSTOMERIO_API_KEY=...
python examples/otel/prometheus_app.py --port 9464
curl -s localhost:9464/metrics | grep ^cio_
"""

from __future__ import annotations

import argparse
import logging
import time

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

from cio_logging import CustomerIOHandler, cio_event


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--seconds", type=float, default=3600.0)
    args = parser.parse_args()

    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    start_http_server(args.port, addr="127.0.0.1")
    handler = CustomerIOHandler(meter_provider=meter_provider)
    events = logging.getLogger("shop.events")
    events.setLevel(logging.INFO)
    events.addHandler(handler)

    events.info("signup", extra=cio_event("user-1", plan="pro"))
    events.info("purchase", extra=cio_event("user-1", amount=9.99))
    events.info("poison_pill", extra=cio_event("user-1"))  # rejected when the API says so
    events.info("bad", extra=cio_event("user-1", ratio=float("nan")))  # refused at emit
    print("serving metrics", flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
    handler.close()


if __name__ == "__main__":
    main()
