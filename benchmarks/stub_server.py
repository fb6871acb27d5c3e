"""A tiny HTTPS stand-in for Customer.io's CDP ``/v1/batch`` endpoint, for one peer only.

customerio-cdp-analytics posts Segment-style batches to ``{host}/v1/batch``, which the
Track API simulator does not serve (it speaks the Track API's v1 and v2 routes only).
This stub accepts those batches, counts their items and answers 200 ``{}`` after the
configured latency, like the simulator's ``set_latency``. It validates nothing (neither
credentials nor headers), so it also stands in for the Pipelines API that cio_logging's
``api="pipelines"`` posts to.

    python -m benchmarks.stub_server [--latency 0.05] [--state-dir DIR]

It prints ``listening on https://127.0.0.1:PORT`` and ``CA file: PATH`` like the
simulator. ``GET /_stub/count`` returns ``{"events", "unique", "without_id", "requests",
"times"}``: items counted, distinct ``messageId`` values among them, items without one;
``POST /_stub/latency`` with ``{"latency": seconds}`` changes the latency.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import trustme


class _Counts:
    def __init__(self, latency: float) -> None:
        self.lock = threading.Lock()
        self.latency = latency
        self.events = 0
        self.message_ids: set[str] = set()
        self.without_id = 0
        self.times: list[float] = []


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _StubServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _answer(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        counts = self.server.counts
        if self.path != "/_stub/count":
            self._answer(404, {})
            return
        with counts.lock:
            body = {
                "events": counts.events,
                "unique": len(counts.message_ids),
                "without_id": counts.without_id,
                "requests": len(counts.times),
                "times": counts.times,
            }
            self._answer(200, body)

    def do_POST(self) -> None:
        counts = self.server.counts
        length = int(self.headers.get("Content-Length", "0"))
        payload = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/_stub/latency":
            with counts.lock:
                counts.latency = float(payload["latency"])
            self._answer(200, {})
            return
        if self.path != "/v1/batch":
            self._answer(404, {})
            return
        received = time.time()
        with counts.lock:
            latency = counts.latency
        if latency:
            time.sleep(latency)
        items = payload.get("batch", [])
        ids = [item.get("messageId") for item in items if isinstance(item, dict)]
        with counts.lock:
            counts.events += len(items)
            counts.message_ids.update(i for i in ids if isinstance(i, str))
            counts.without_id += len(items) - sum(isinstance(i, str) for i in ids)
            counts.times.append(received)
        self._answer(200, {})


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, context: ssl.SSLContext, counts: _Counts) -> None:
        self.context, self.counts = context, counts
        super().__init__(("127.0.0.1", 0), _StubHandler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients hang up at exit."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stub_server")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args(argv)
    directory = Path(args.state_dir or tempfile.mkdtemp(prefix="cio-bench-stub-"))
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "stub-ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    server = _StubServer(context, _Counts(args.latency))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    print(f"listening on https://127.0.0.1:{server.server_address[1]}", flush=True)
    print(f"CA file: {ca_file}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
