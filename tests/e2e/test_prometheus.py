"""The example set-up end to end on a real Prometheus server (issue 15, item 2).

examples/otel/prometheus_app.py delivers to the simulator and suffers an outage while a
throwaway Prometheus (Debian's ``prometheus`` package; ``.ci/install-prometheus``)
scrapes it every second. Every panel query of examples/otel/grafana-dashboard.json is
then evaluated through Prometheus's HTTP API: each returns data, the breaker panel shows
the outage, and the latency quantiles are within 2x of what the simulator recorded.

Without the binary the test is skipped, saying why; under ``CI=true`` it fails instead.
Prometheus gets its own configuration and storage in ``tmp_path``, listens on loopback
only and scrapes only the app, so it reaches nothing beyond this machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from cio_logging.simulator import TrackAPISimulator

from ..helpers import OTEL_EXAMPLES, PYTHON, child_environment, free_port, wait_for

SCRAPE_INTERVAL = 1.0
OUTAGE_SECONDS = 5.0
#: What a Grafana variable in a panel query stands for in this run.
GRAFANA_VARIABLES = {
    "$__rate_interval": "15s",  # Grafana's floor: four scrape intervals, here 4 s
    "${__rate_interval}": "15s",
    "$__interval": "1s",
    "${__interval}": "1s",
    "$__range": "5m",
    "${__range}": "5m",
}
#: A fixed latency on every Track answer, so the request duration the client measures
#: (TLS and the SDK included) and the one the simulator records are the same size.
SIMULATED_LATENCY = 0.04


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        reason = "no prometheus binary on PATH (Debian: .ci/install-prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this test may not be skipped")
        pytest.skip(reason)
    return found


@dataclass
class Prometheus:
    port: int

    def api(self, path: str, **parameters: str | float) -> Any:
        query = urllib.parse.urlencode({k: str(v) for k, v in parameters.items()})
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10
        ) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr, time=at)["result"]
        return result

    def series(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=SCRAPE_INTERVAL)
        result: list[dict[str, Any]] = data["result"]
        return result

    def scraped_up(self) -> bool:
        return any(sample["value"][1] == "1" for sample in self.instant("up", time.time()))


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A throwaway server scraping 127.0.0.1:<app port> every second; the app's port."""
    binary = prometheus_binary()
    app_port, port = free_port(), free_port()
    config = {  # JSON is YAML
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL:g}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL:g}s",
        },
        "scrape_configs": [
            {"job_name": "cio_app", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]}
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_stream:
        server = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    return True
            except OSError:
                return server.poll() is not None

        assert wait_for(ready, 30), log.read_text(errors="replace")
        assert server.poll() is None, log.read_text(errors="replace")
        yield Prometheus(port), app_port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target of the dashboard, variables substituted."""
    dashboard = json.loads((OTEL_EXAMPLES / "grafana-dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
            queries.append((panel["title"], expr))
    return queries


def finite_values(series: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [
        (float(when), float(value))
        for one in series
        for when, value in one["values"]
        if math.isfinite(float(value))
    ]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_every_dashboard_panel_tells_the_truth_through_an_outage(
    prometheus: tuple[Prometheus, int], simulator: TrackAPISimulator, queue_dir: Path
) -> None:
    server, app_port = prometheus
    simulator.poison_names = {"poison_pill"}
    simulator.set_latency(SIMULATED_LATENCY)
    started = time.time()
    with subprocess.Popen(
        [
            PYTHON, str(OTEL_EXAMPLES / "prometheus_app.py"), "--port", str(app_port),
            "--rate", "20", "--quick", "--seconds", "120",
        ],
        env=child_environment(simulator, queue_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    ) as app:  # fmt: skip
        try:
            assert app.stdout is not None
            assert app.stdout.readline().strip() == "serving metrics"
            assert wait_for(server.scraped_up, 20), "Prometheus never scraped the app"
            time.sleep(4)  # traffic before the outage
            assert len(simulator.accepted) > 20
            outage_start = time.time()
            simulator.fail(503, duration=OUTAGE_SECONDS)
            time.sleep(OUTAGE_SECONDS)
            outage_end = time.time()
            # Recovered once events logged after the outage arrive, the backlog with them.
            assert wait_for(
                lambda: any(e.received_at > outage_end + 3 for e in simulator.accepted), 20
            )
            time.sleep(3 * SCRAPE_INTERVAL)  # the last deliveries scraped
            end = time.time()
            accepted, requests = simulator.accepted, simulator.requests
        finally:
            app.send_signal(signal.SIGTERM)
            app.wait(15)
    assert any(r.status == 503 for r in requests)

    # 1. Every panel query returns data.
    results = {expr: server.series(expr, started, end) for _, expr in panel_queries()}
    empty = [(t, e) for t, e in panel_queries() if not finite_values(results[e])]
    assert not empty, f"panel queries that return nothing: {empty}"

    # 2. The breaker panel: closed before the outage, open during it, closed again after.
    (breaker_expr,) = [e for t, e in panel_queries() if t == "Circuit breaker"]
    states = finite_values(results[breaker_expr])
    opened = [when for when, value in states if value == 2]
    assert opened, f"the breaker panel never showed the outage: {states}"
    assert outage_start <= min(opened) <= outage_end, (outage_start, opened, outage_end)
    assert max(opened) <= outage_end + 10, (opened, outage_end)
    assert all(value == 0 for when, value in states if when < outage_start - 1), states
    assert states[-1][1] == 0, states

    # 3. The latency quantiles are within 2x of what the simulator recorded.
    truths = {
        "cio_delivery_duration_seconds_bucket": [r.duration for r in requests],
        "cio_event_lag_seconds_bucket": [
            e.received_at - ULID.from_str(str(e.id)).timestamp for e in accepted
        ],
    }
    compared = []
    for title, expr in panel_queries():
        match = re.match(r"histogram_quantile\(([0-9.]+),.*\b(cio_[a-z_]+_bucket)\b", expr)
        if match is None:
            continue
        q, metric = float(match.group(1)), match.group(2)
        (sample,) = server.instant(expr, end)
        measured, truth = float(sample["value"][1]), quantile(truths[metric], q)
        compared.append((title, q, measured, truth))
    print("quantiles (panel, q, Prometheus, simulator):", compared)
    assert len(compared) >= 4
    wrong = [c for c in compared if not c[3] / 2 <= c[2] <= c[3] * 2]
    assert not wrong, f"quantiles more than 2x off the simulator's: {wrong}"
