"""What OpenTelemetry costs on the caller's thread, measured in one run.

    python -m benchmarks.telemetry_overhead [--events 3000]

Logs the same events through three handlers against the local simulator: with no
OpenTelemetry SDK (the API's no-ops, the default), and with the SDK's meter and
tracer providers. It prints the median and p99 of one ``logger.info`` call for each,
their ratio, and, as the anchor, the cost of one no-op ``counter.add``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from cio_logging import CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator


def measure(
    simulator: TrackAPISimulator, queue_dir: Path, events: int, **providers: Any
) -> list[float]:
    handler = CustomerIOHandler(
        simulator.site_id,
        simulator.api_key,
        track_url=simulator.url,
        ca_bundle=simulator.ca_file,
        queue_dir=queue_dir,
        **providers,
    )
    logger = logging.getLogger(f"bench.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    costs = []
    for number in range(events):
        extra = cio_event(f"user-{number % 50}", amount=number)
        started = time.perf_counter()
        logger.info("page_viewed", extra=extra)
        costs.append(time.perf_counter() - started)
    handler.flush()
    handler.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000)
    args = parser.parse_args()
    noop_counter = metrics.NoOpMeterProvider().get_meter("x").create_counter("c")
    noop_add = (
        min(timeit.repeat(lambda: noop_counter.add(1, {"a": True}), number=10_000, repeat=5))
        / 10_000
    )
    with (
        tempfile.TemporaryDirectory() as work,
        TrackAPISimulator(state_dir=Path(work) / "sim") as simulator,
    ):
        results = {
            "no SDK (API no-ops)": measure(simulator, Path(work) / "q1", args.events),
            "SDK meter + tracer": measure(
                simulator,
                Path(work) / "q2",
                args.events,
                meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
                tracer_provider=TracerProvider(),
            ),
        }
    baseline = statistics.median(results["no SDK (API no-ops)"])
    print("| configuration | median us | p99 us | median / no SDK |")
    print("| --- | --- | --- | --- |")
    for name, costs in results.items():
        costs.sort()
        median, p99 = statistics.median(costs), costs[int(len(costs) * 0.99)]
        print(f"| {name} | {median * 1e6:.1f} | {p99 * 1e6:.1f} | {median / baseline:.2f} |")
    print(f"| anchor: one no-op counter.add | {noop_add * 1e6:.2f} | | |")


if __name__ == "__main__":
    main()
