"""Fleet mode's figures (issue 12), on a throwaway PostgreSQL cluster of this machine:

- the caller's cost of one ``logger.info``, essential and non-essential, on the
  PostgreSQL store against the diskcache store;
- delivered events/s with 50 ms added to every answer, one process and four;
- the time another process takes the lease over after the sender is SIGKILLed.

The cluster is started as tests/pg_cluster.py does (as the postgres user when root).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .processes import PROJECT_ROOT, run_case, simulator
from .report import Check, Section, number
from .workload import ESSENTIAL_NAME, NON_ESSENTIAL_NAME, Control, wait_until

LATENCY = 0.05
LEASE_SECONDS = 3.0


def _cluster() -> Any:
    sys.path.insert(0, str(PROJECT_ROOT))
    from tests.pg_cluster import Cluster, server_binaries

    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries are not installed")
    return Cluster(binaries)


def _database(cluster: Any, stem: str) -> str:
    url: str = cluster.new_database(f"bench_{stem}_{time.monotonic_ns() % 10**9}")
    return url


def fleet_section(run: Any, attempt: Any) -> Section:
    section = Section("6. Fleet mode on PostgreSQL")
    calls = max(run.sizes.emit_calls // 4, 1_000)
    events = max(run.sizes.delivery_events // 5, 4_000)
    cluster = _cluster()
    try:
        _emit_rows(section, cluster, calls, attempt)
        _delivery_rows(section, cluster, events, attempt)
        _takeover_rows(section, cluster, attempt)
    finally:
        cluster.destroy()
    return section


def _emit_rows(section: Section, cluster: Any, calls: int, attempt: Any) -> None:
    medians: dict[tuple[str, str], float] = {}
    rows = []
    with simulator() as sim:
        for store in ("diskcache", "postgresql"):
            for label, name in (
                ("non-essential", NON_ESSENTIAL_NAME),
                ("essential", ESSENTIAL_NAME),
            ):
                options = {} if store == "diskcache" else {"queue_url": _database(cluster, "emit")}
                arguments = {
                    "url": sim.url,
                    "ca_file": sim.ca_file,
                    "threads": [1],
                    "name": name,
                    "calls": calls,
                    "options": options,
                }
                result = attempt(
                    f"fleet emit: {store} {label}",
                    functools.partial(run_case, "benchmarks.cases", "emit_cio", arguments),
                )
                if result is None:
                    continue
                summary = result["runs"][0]
                medians[(store, label)] = summary["median_us"]
                rows.append(
                    [
                        store,
                        label,
                        number(summary["median_us"]),
                        number(summary["p99_us"]),
                        number(summary["events_per_s"], 0),
                    ]
                )
    section.table(["store", "event", "median us", "p99 us", "events/s"], rows)
    section.note(
        f"{calls:,} calls each, one thread, the simulator without added latency; the "
        "PostgreSQL server is local (a loopback TCP connection), so a remote database adds "
        "its round trip to every essential commit."
    )
    for label in ("non-essential", "essential"):
        pg, disk = medians.get(("postgresql", label)), medians.get(("diskcache", label))
        section.checks.append(
            Check(
                f"{label} emit median, PostgreSQL / diskcache",
                f"{number(pg)} us vs {number(disk)} us",
                None if pg is None or not disk else pg / disk,
                # Essential events wait for a network round trip on PostgreSQL.
                2.0 if label == "non-essential" else 20.0,
            )
        )


def _delivery_rows(section: Section, cluster: Any, events: int, attempt: Any) -> None:
    rows = []
    rates: dict[int, float] = {}
    for processes in (1, 4):
        with simulator(LATENCY) as sim:
            url = _database(cluster, "delivery")
            result = attempt(
                f"fleet delivery: {processes} process(es)",
                functools.partial(_deliver_with, sim, url, events, processes),
            )
        if result is None:
            continue
        rates[processes] = result["events_per_s"]
        rows.append(
            [
                str(processes),
                f"{result['accepted']:,} / {events:,}",
                number(result["seconds"], 2),
                number(result["events_per_s"], 0),
                f"{result['requests']:,}",
            ]
        )
    section.table(
        [
            "processes logging",
            "accepted / logged",
            "s, first log to last accepted",
            "events/s",
            "requests",
        ],
        rows,
    )
    section.note(
        f"{LATENCY * 1000:.0f} ms added to every answer; every process logs its share of "
        f"{events:,} non-essential events as fast as it can; one of them (the lease holder) "
        "sends for all."
    )
    one, four = rates.get(1), rates.get(4)
    section.checks.append(
        Check(
            "delivered events/s, four processes / one (one sender either way)",
            f"{number(four, 0)} vs {number(one, 0)} events/s",
            None if one is None or four is None else four / one,
            0.5,
            at_most=False,
        )
    )


def _deliver_with(sim: Any, url: str, events: int, processes: int) -> dict[str, Any]:
    control = Control(sim.url, sim.ca_file, "/_simulator/")
    share = events // processes
    release = Path(tempfile.mkdtemp(prefix="cio-bench-release-")) / "release"
    arguments = {
        "url": sim.url,
        "ca_file": sim.ca_file,
        "queue_url": url,
        "events": share,
        "release_file": str(release),
    }
    results: list[dict[str, Any]] = []
    began = time.perf_counter()
    threads = [
        threading.Thread(
            target=lambda: results.append(run_case("benchmarks.cases", "fleet_log", arguments))
        )
        for _ in range(processes)
    ]
    for thread in threads:
        thread.start()
    total = share * processes
    accepted = 0

    def done() -> bool:
        nonlocal accepted
        records = control.call("requests")["requests"]
        accepted = sum(r["item_count"] for r in records if r["status"] == 200)
        return accepted >= total

    wait_until(done, 600, interval=0.05)
    finished_at = time.time()
    release.touch()
    for thread in threads:
        thread.join(120)
    requests = len(control.call("requests")["requests"])
    # From the first event logged (not from the processes' start-up) to the last accepted.
    first_log = min((r["started_at"] for r in results), default=None)
    elapsed = time.perf_counter() - began if first_log is None else finished_at - first_log
    return {
        "accepted": accepted,
        "seconds": elapsed,
        "events_per_s": accepted / elapsed,
        "requests": requests,
    }


def _takeover_rows(section: Section, cluster: Any, attempt: Any) -> None:
    with simulator() as sim:
        url = _database(cluster, "takeover")
        result = attempt("fleet takeover", functools.partial(_takeover, sim, url))
    if result is None:
        return
    section.table(
        ["lease_seconds", "takeover after SIGKILL, s (median of runs)", "runs"],
        [[number(LEASE_SECONDS, 1), number(result["median"], 2), str(result["runs"])]],
    )
    section.note(
        "Two idle processes on one workspace; the lease holder is SIGKILLed and the time "
        "until the other holds a new term is measured from the database's lease row. The "
        "bound is the lease (the dead holder's last renewal plus lease_seconds) plus one "
        "poll of the survivor (flush_interval)."
    )
    section.checks.append(
        Check(
            "takeover after SIGKILL / lease_seconds",
            f"{number(result['median'], 2)} s vs {LEASE_SECONDS:g} s",
            result["median"] / LEASE_SECONDS,
            1.5,
        )
    )


def _lease_row(url: str) -> tuple[int, int, bool] | None:
    import psycopg

    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute("SELECT term, pid, expires_at > now() FROM cio_lease").fetchall()
        except psycopg.errors.UndefinedTable:
            return None
    return None if not rows else (int(rows[0][0]), int(rows[0][1]), bool(rows[0][2]))


def _moved_past(url: str, term: int) -> bool:
    row = _lease_row(url)
    return row is not None and row[0] > term and row[2]


def _takeover(sim: Any, url: str, runs: int = 3) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    arguments = [
        sys.executable,
        "-m",
        "benchmarks.fleet_host",
        sim.url,
        sim.ca_file,
        url,
        str(LEASE_SECONDS),
    ]
    with tempfile.TemporaryDirectory(prefix="cio-bench-fleet-") as work:
        hosts: list[subprocess.Popen[bytes]] = []
        try:
            for number_ in range(runs + 1):
                host_env = {**env, "CIO_LOGGING_QUEUE_DIR": str(Path(work) / f"h{number_}")}
                hosts.append(subprocess.Popen([*arguments], env=host_env))
            times = []
            for _ in range(runs):
                wait_until(lambda: (row := _lease_row(url)) is not None and row[2], 60)
                row = _lease_row(url)
                assert row is not None
                term, pid = row[0], row[1]
                holder = next(host for host in hosts if host.pid == pid)
                killed = time.monotonic()
                os.kill(holder.pid, signal.SIGKILL)
                holder.wait()
                wait_until(
                    functools.partial(_moved_past, url, term), LEASE_SECONDS * 5, interval=0.02
                )
                times.append(time.monotonic() - killed)
        finally:
            for host in hosts:
                if host.poll() is None:
                    host.kill()
                host.wait()
    times.sort()
    return {"median": times[len(times) // 2], "runs": len(times), "all": times}
