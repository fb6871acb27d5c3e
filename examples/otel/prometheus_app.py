"""The simplest set-up, no collector: Prometheus scrapes the application itself.

pip install opentelemetry-sdk opentelemetry-exporter-prometheus
export CUSTOMERIO_SITE_ID=... CUSTOMERIO_API_KEY=...
python examples/otel/prometheus_app.py --port 9464
curl -s localhost:9464/metrics | grep ^cio_

``--rate 20`` keeps logging purchases (20 a second) so the dashboard has traffic to
show; ``--quick`` uses the demo's timings (a breaker that opens after 3 failures and
probes after 1.5 s) so an outage of the simulator shows in seconds, not minutes.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

from cio_logging import CustomerIOHandler, cio_event

#: The demo's settings (cio_logging/demo.py); the defaults are 5 failures, 30 s, 60 s.
QUICK = {"flush_interval": 0.2, "consecutive_failures": 3, "reset_timeout": 1.5, "max_backoff": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--rate", type=float, default=0.0, help="purchases logged a second")
    parser.add_argument("--quick", action="store_true", help="the demo's breaker timings")
    args = parser.parse_args()

    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    start_http_server(args.port, addr="127.0.0.1")
    options: dict[str, Any] = QUICK if args.quick else {}
    handler = CustomerIOHandler(meter_provider=meter_provider, **options)
    events = logging.getLogger("shop.events")
    events.setLevel(logging.INFO)
    events.addHandler(handler)

    events.info("signup", extra=cio_event("user-1", plan="pro"))
    events.info("purchase", extra=cio_event("user-1", amount=9.99))
    events.info("poison_pill", extra=cio_event("user-1"))  # rejected when the API says so
    events.info("bad", extra=cio_event("user-1", ratio=float("nan")))  # refused at emit
    print("serving metrics", flush=True)
    started = time.monotonic()
    deadline = started + args.seconds
    logged = 0
    while time.monotonic() < deadline:
        if args.rate > 0:
            due = int((time.monotonic() - started) * args.rate)
            for number in range(logged, due):
                events.info("purchase", extra=cio_event(f"user-{number % 7}", amount=1.0))
            logged = max(logged, due)
            time.sleep(min(0.5, 1 / args.rate))
        else:
            time.sleep(0.5)
    handler.close()


if __name__ == "__main__":
    main()
