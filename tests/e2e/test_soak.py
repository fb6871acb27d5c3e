"""The long-outage soak (marked slow: ``pytest -m slow``).

An application logs essential events at a steady rate through a long outage (the first
half answered 503, the second half refused connections), then Customer.io recovers:
its memory stays flat, everything is delivered once, nothing is dead-lettered, and the
breaker goes closed -> open -> (half-open -> open)... -> half-open -> closed.

``CIO_SOAK_SECONDS`` sets the outage (default 600); ``CIO_SOAK_RATE`` the events per
second (default 50). The figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cio_logging.simulator import TrackAPISimulator

from ..helpers import PROJECT_ROOT, PYTHON, child_environment, printed_ids, wait_for

SOAK_SECONDS = float(os.environ.get("CIO_SOAK_SECONDS", "600"))
RATE = float(os.environ.get("CIO_SOAK_RATE", "50"))
SOAK_APP = str(PROJECT_ROOT / "tests" / "apps" / "soak_app.py")
WARM_UP = 10.0  # seconds of normal delivery before the outage
RECOVERY = 20.0  # seconds of logging after it
SAMPLE_EVERY = 2.0
MAX_GROWTH = 30 * 2**20  # bytes of RSS growth allowed after the warm-up
TRANSITION = re.compile(r"circuit breaker (?:opened |closed )?\(?([a-z_-]+) -> ([a-z_-]+)\)?")


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Output:
    """Reads one stream of the app on a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line.rstrip("\n"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_long_outage_at_a_steady_rate(
    simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
) -> None:
    app = subprocess.Popen(
        [PYTHON, SOAK_APP, str(RATE)],
        env=child_environment(simulator, queue_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    assert app.stderr is not None
    assert app.stdin is not None
    out, err = Output(app.stdout), Output(app.stderr)
    samples: list[tuple[float, int]] = []  # (seconds since the outage began, RSS)
    try:
        assert wait_for(lambda: out.lines[:1] == ["ready"], 30), err.lines
        time.sleep(WARM_UP)
        assert wait_for(lambda: len(simulator.accepted) > 0, 10)

        outage_began = time.monotonic()
        simulator.fail(503)
        refused = False
        while (elapsed := time.monotonic() - outage_began) < SOAK_SECONDS:
            if not refused and elapsed >= SOAK_SECONDS / 2:
                simulator.clear_faults()
                simulator.refuse_connections()
                refused = True
            assert app.poll() is None, err.lines[-20:]
            samples.append((elapsed, rss(app.pid)))
            time.sleep(SAMPLE_EVERY)
        accepted_before_recovery = len(simulator.accepted)
        simulator.clear_faults()
        recovered_at = time.monotonic()
        backlog = set(printed_ids("\n".join(out.lines)))
        assert wait_for(lambda: simulator.accepted_ids() >= backlog, RECOVERY + 60), (
            f"{len(backlog - simulator.accepted_ids())} of {len(backlog)} still missing"
        )
        caught_up = time.monotonic() - recovered_at
        time.sleep(max(0.0, RECOVERY - caught_up))
        samples.append((time.monotonic() - outage_began, rss(app.pid)))
        app.stdin.close()
        assert app.wait(120) == 0, err.lines[-20:]
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
    out.thread.join(10)
    err.thread.join(10)
    app.stdout.close()
    app.stderr.close()

    ids = printed_ids("\n".join(out.lines))
    statuses = [
        json.loads(line[len("status ") :]) for line in out.lines if line.startswith("status ")
    ]
    assert out.lines[-1] == "done"
    expected = RATE * (WARM_UP + SOAK_SECONDS + RECOVERY)
    assert len(ids) >= 0.9 * expected, f"logged {len(ids)} events, expected about {expected:.0f}"

    # Everything delivered after the recovery, each once, nothing dead-lettered.
    assert wait_for(lambda: simulator.accepted_ids() >= set(ids), 60), (
        f"missing {len(set(ids) - simulator.accepted_ids())} of {len(ids)}"
    )
    assert simulator.duplicates == 0
    assert len(simulator.accepted) == len(ids)
    final = statuses[-1]
    assert final["dead_letters"] == 0
    assert sum(final["dropped"].values()) == 0

    # Memory stays flat: after the warm-up, RSS grows by less than MAX_GROWTH.
    warm_up = min(60.0, SOAK_SECONDS / 4)
    baseline = max(size for at, size in samples if at <= warm_up)
    peak = max(size for _, size in samples)
    growth = peak - baseline

    # Breaker: closed -> open, then only open <-> half-open, then half-open -> closed.
    transitions = [
        (match[1].replace("_", "-"), match[2].replace("_", "-"))
        for line in err.lines
        if (match := TRANSITION.search(line))
    ]
    assert transitions, err.lines[-20:]
    assert transitions[0] == ("closed", "open"), transitions
    assert transitions[-1] == ("half-open", "closed"), transitions
    for (_, reached), (left, _) in itertools.pairwise(transitions):
        assert reached == left, transitions  # one chain of states
    middle = transitions[1:-1]
    assert set(middle) <= {("open", "half-open"), ("half-open", "open")}, transitions
    probes = sum(1 for pair in middle if pair == ("half-open", "open"))
    assert probes >= SOAK_SECONDS / 5 / 3  # a probe every reset_timeout (5 s), give or take

    figures = {
        "outage_seconds": SOAK_SECONDS,
        "rate": RATE,
        "events": len(ids),
        "accepted_before_recovery": accepted_before_recovery,
        "max_queued": max(status["queued"] for status in statuses),
        "backlog_at_recovery": len(backlog),
        "backlog_delivered_seconds_after_recovery": round(caught_up, 1),
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_growth_mb": round(growth / 2**20, 2),
        "rss_samples": len(samples),
        "breaker_transitions": len(transitions),
        "failed_probes": probes,
        "requests": len(simulator.requests),
    }
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print(f"\nsoak figures: {json.dumps(figures)}")
    assert growth < MAX_GROWTH, figures
