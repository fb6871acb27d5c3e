"""Fleet mode's figures (issues 12 and 21), on a throwaway PostgreSQL cluster of this
machine:

- the caller's cost of one ``logger.info``, essential and non-essential, on the
  PostgreSQL store against the diskcache store;
- delivered events/s with 50 ms added to every answer, one process and four;
- eight processes logging essential events, directly and through PgBouncer in
  transaction mode, with one process beside them in the same run: delivery counted
  from the first emit and for the backlog left once logging stopped, and the logging
  call's p50/p99/worst per process;
- the queue table's size after 200,000 events, before and after autovacuum, three times
  (whether its space is reused);
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
#: Issue 21's fleet: eight processes of 5,000 events each (a fifth with --quick).
FLEET_PROCESSES = 8


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
    per_process = 1_000 if run.quick else 5_000
    table_events = 40_000 if run.quick else 200_000
    cluster = _cluster()
    try:
        _emit_rows(section, cluster, calls, attempt)
        _delivery_rows(section, cluster, events, attempt)
        _scale_rows(section, cluster, per_process, attempt)
        _large_rows(section, cluster, 200 if run.quick else 600, attempt)
        _table_rows(section, cluster, table_events, attempt)
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


def _deliver_with(
    sim: Any, url: str, events: int, processes: int, already: int = 0
) -> dict[str, Any]:
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
        accepted = int(sum(r["item_count"] for r in records if r["status"] == 200)) - already
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


# -- eight processes, directly and through PgBouncer (issue 21) -------------------------


def _bouncer(cluster: Any) -> Any:
    """A PgBouncer in transaction mode in front of ``cluster``, or None (not installed)."""
    from tests.pg_cluster import Bouncer, pgbouncer_binary

    binary = pgbouncer_binary()
    return None if binary is None else Bouncer(binary, cluster)


#: Table A's pace: events/s of each process (eight of them: 1,600/s for the fleet).
PACE = 200


def _scale_rows(section: Section, cluster: Any, per_process: int, attempt: Any) -> None:
    bouncer = _bouncer(cluster)
    paced: dict[tuple[str, int], dict[str, Any]] = {}
    backlog: dict[tuple[str, int], dict[str, Any]] = {}
    routes = ["direct"] if bouncer is None else ["direct", "pgbouncer"]
    if bouncer is None:
        section.note("PgBouncer is not installed: its rows are missing.")
    try:
        for route in routes:
            for processes in (1, FLEET_PROCESSES):
                for table, name, events, rate in (
                    (paced, ESSENTIAL_NAME, per_process, PACE),
                    # The same total backlog, split or not.
                    (backlog, NON_ESSENTIAL_NAME, per_process * FLEET_PROCESSES // processes, 0),
                ):
                    with simulator(LATENCY) as sim:
                        url = _database(cluster, "scale")
                        if route == "pgbouncer":
                            url = bouncer.url(url.rsplit("/", 1)[1])
                        kind = "paced essential" if rate else "flat-out backlog"
                        result = attempt(
                            f"fleet scale: {processes} process(es), {route}, {kind}",
                            functools.partial(_fleet_run, sim, url, processes, events, name, rate),
                        )
                    if result is not None:
                        table[(route, processes)] = result
    finally:
        if bouncer is not None:
            bouncer.destroy()
    section.table(
        [
            "route",
            "processes",
            "accepted / logged",
            "events/s delivered from first emit",
            "emit p50 ms (median of processes)",
            "emit p99 ms (median of processes)",
            "emit p99 ms (worst process)",
            "emit worst ms",
        ],
        [
            [
                route,
                str(processes),
                f"{result['accepted']:,} / {result['logged']:,}",
                number(result["from_first_emit"], 0),
                number(result["p50_ms"], 2),
                number(result["p99_ms"], 2),
                number(result["worst_p99_ms"], 2),
                number(result["max_ms"], 1),
            ]
            for (route, processes), result in paced.items()
        ],
    )
    section.note(
        f"Each process logs {per_process:,} essential events at {PACE}/s (each committed "
        "into PostgreSQL before the call returns), then stays up; one of them holds the "
        f"lease and sends for all, with {LATENCY * 1000:.0f} ms added to every answer."
    )
    section.table(
        [
            "route",
            "processes",
            "accepted / logged",
            "backlog when logging ended",
            "backlog drained, events/s",
            "events/s delivered from first emit",
        ],
        [
            [
                route,
                str(processes),
                f"{result['accepted']:,} / {result['logged']:,}",
                f"{result['backlog']:,}",
                number(result["backlog_rate"], 0),
                number(result["from_first_emit"], 0),
            ]
            for (route, processes), result in backlog.items()
        ],
    )
    section.note(
        f"{per_process * FLEET_PROCESSES:,} non-essential events logged flat out, by one "
        f"process or shared by {FLEET_PROCESSES}, so that most wait when logging ends: the "
        "backlog's rate is counted from then to the last acceptance. With eight, the "
        "seven that do not send stay up, competing for the lease and the CPU."
    )
    for route in routes:
        one, many = backlog.get((route, 1)), backlog.get((route, FLEET_PROCESSES))
        if one is not None and many is not None:
            section.checks.append(
                Check(
                    f"{route}: backlog drained with {FLEET_PROCESSES} processes / by one alone",
                    f"{number(many['backlog_rate'], 0)} vs {number(one['backlog_rate'], 0)} "
                    "events/s",
                    many["backlog_rate"] / one["backlog_rate"] if one["backlog_rate"] else None,
                    1.0,
                    at_most=False,
                )
            )
        eight = paced.get((route, FLEET_PROCESSES))
        if eight is not None:
            section.checks.append(
                Check(
                    f"{route}: emit p99 with {FLEET_PROCESSES} processes (worst process) / 5 ms",
                    f"{number(eight['worst_p99_ms'], 2)} ms",
                    eight["worst_p99_ms"] / 5.0,
                    1.0,
                )
            )


def _fleet_run(
    sim: Any, url: str, processes: int, per_process: int, name: str, rate: float
) -> dict[str, Any]:
    control = Control(sim.url, sim.ca_file, "/_simulator/")
    work = Path(tempfile.mkdtemp(prefix="cio-bench-scale-"))
    release = work / "release"
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one(index: int) -> None:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "queue_url": url,
            "events": per_process,
            "offset": index * per_process,
            "name": name,
            "rate": rate,
            "release_file": str(release),
            "logged_file": str(work / f"logged-{index}"),
        }
        try:
            results.append(run_case("benchmarks.cases", "fleet_log_timed", arguments))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(processes)]
    for thread in threads:
        thread.start()
    total = per_process * processes

    def accepted() -> int:
        records = control.call("requests")["requests"]
        return sum(r["item_count"] for r in records if r["status"] == 200)

    try:
        wait_until(lambda: accepted() >= total or bool(errors), 1800, interval=0.2)
    finally:
        release.touch()
        for thread in threads:
            thread.join(300)
    if errors:
        raise errors[0]
    records = [r for r in control.call("requests")["requests"] if r["status"] == 200]
    first_emit = min(r["started_at"] for r in results)
    logging_ended = max(r["ended_at"] for r in results)
    last = max(r["time"] for r in records)
    backlog = sum(r["item_count"] for r in records if r["time"] > logging_ended)
    p50s = sorted(r["p50_ms"] for r in results)
    p99s = sorted(r["p99_ms"] for r in results)
    return {
        "logged": total,
        "accepted": sum(r["item_count"] for r in records),
        "from_first_emit": total / (last - first_emit),
        "backlog": backlog,
        "backlog_rate": backlog / (last - logging_ended) if backlog else 0.0,
        "p50_ms": p50s[len(p50s) // 2],
        "p99_ms": p99s[len(p99s) // 2],
        "worst_p99_ms": p99s[-1],
        "max_ms": max(r["max_ms"] for r in results),
    }


# -- large events through the spill (issue 21) ------------------------------------------


def _large_rows(section: Section, cluster: Any, events: int, attempt: Any) -> None:
    arguments = {
        "events": events,
        "direct_url": _database(cluster, "large"),
        "spill_url": _database(cluster, "large"),
    }
    result = attempt(
        f"fleet large events: {events} of 99 KB",
        functools.partial(run_case, "benchmarks.cases", "fleet_large_rows", arguments),
    )
    if result is None:
        return
    section.table(
        ["99 KB events", "committed into PostgreSQL, s", "moved from the spill, s"],
        [[f"{events:,}", number(result["direct"], 2), number(result["spill"], 2)]],
    )
    section.note(
        "Committed by groups of ten (as a group commit would), and moved from a spill "
        "that holds them all (at most 4 MB a statement)."
    )
    section.checks.append(
        Check(
            "99 KB events: moved from the spill / committed directly",
            f"{number(result['spill'], 2)} s vs {number(result['direct'], 2)} s",
            result["spill"] / result["direct"] if result["direct"] else None,
            2.0,
        )
    )


# -- the queue table's size after 200,000 events (issue 21) ----------------------------

_SIZES = """
SELECT pg_total_relation_size('cio_queue'), pg_relation_size('cio_queue'),
       pg_indexes_size('cio_queue'),
       (SELECT coalesce(sum(pg_column_size(q.*)), 0) FROM cio_queue AS q),
       (SELECT count(*) FROM cio_queue),
       s.n_dead_tup, s.autovacuum_count
FROM pg_stat_user_tables AS s WHERE s.relname = 'cio_queue'
"""


def _table_rows(section: Section, cluster: Any, events: int, attempt: Any) -> None:
    with simulator() as sim:
        url = _database(cluster, "table")
        result = attempt(
            f"fleet table size: three rounds of {events:,} events",
            functools.partial(_table_sizes, sim, cluster, url, events),
        )
    if result is None:
        return
    rows = []
    for label, sizes in result["readings"]:
        total, heap, indexes, live_bytes, live_rows, dead, vacuums = sizes
        rows.append(
            [
                label,
                number(total / 1e6, 1),
                number(heap / 1e6, 1),
                number(indexes / 1e6, 1),
                f"{live_rows:,}",
                number(live_bytes / 1e6, 2),
                f"{dead:,}",
                str(vacuums),
            ]
        )
    section.table(
        [
            "cio_queue",
            "total MB",
            "heap MB",
            "indexes MB",
            "live rows",
            "live rows MB",
            "dead tuples",
            "autovacuums",
        ],
        rows,
    )
    section.note(
        f"{events:,} non-essential events logged by {FLEET_PROCESSES} processes and "
        "delivered (no latency added), then the table as autovacuum leaves it (the "
        "cluster's defaults: a pass a minute at most); then the same twice more. Once "
        "every event is delivered no row is live, so the live rows' size is nil and no "
        "table is within twice it. The heap is given back; the indexes keep their pages "
        "(a B-tree page emptied by VACUUM is reused only once no transaction can still "
        "see it, and these keys, positions, due times and ULIDs, always grow to the "
        "right), so they grow over the second round and then hold: what shows that the "
        "table does not leak is the third round against the second."
    )
    _, second, third = result["after_vacuum"]
    section.checks.append(
        Check(
            f"cio_queue after a third {events:,} events and autovacuum / after the second",
            f"{number(third / 1e6, 1)} MB vs {number(second / 1e6, 1)} MB",
            third / second if second else None,
            1.25,
        )
    )


def _table_sizes(sim: Any, cluster: Any, url: str, events: int) -> dict[str, Any]:
    import psycopg

    readings: list[tuple[str, tuple[int, ...]]] = []
    after_vacuum: list[int] = []
    per_process = events // FLEET_PROCESSES
    for round_ in (1, 2, 3):
        control = Control(sim.url, sim.ca_file, "/_simulator/")
        before = sum(
            r["item_count"] for r in control.call("requests")["requests"] if r["status"] == 200
        )
        _deliver_with(sim, url, per_process * FLEET_PROCESSES, FLEET_PROCESSES, before)
        with psycopg.connect(url, autocommit=True) as conn:
            sizes = tuple(int(value or 0) for value in conn.execute(_SIZES).fetchone() or ())
            readings.append((f"round {round_}: all delivered", sizes))
            vacuums = sizes[6]

            def vacuumed(conn: Any = conn, vacuums: int = vacuums) -> bool:
                row = conn.execute(
                    "SELECT autovacuum_count, n_dead_tup FROM pg_stat_user_tables"
                    " WHERE relname = 'cio_queue'"
                ).fetchone()
                return row is not None and int(row[0]) > vacuums and int(row[1]) == 0

            wait_until(vacuumed, 300, interval=1.0)
            sizes = tuple(int(value or 0) for value in conn.execute(_SIZES).fetchone() or ())
            readings.append((f"round {round_}: after autovacuum", sizes))
            after_vacuum.append(sizes[0])
    return {"readings": readings, "after_vacuum": after_vacuum}
