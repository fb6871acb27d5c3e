"""The benchmark suite of issue 6: every figure measured in one run, printed as markdown.

    python -m benchmarks [--quick]
                         [--only emit,delivery,drain,rss,wal,fleet,pipelines,webapp,sender]
                         [--output PATH]

Sections:

- ``emit``: the cost of one ``logger.info`` on the caller's thread (median, p99; 1 and
  8 threads) for cio_logging's essential and non-essential events, against the stdlib
  QueueHandler, customerio-cdp-analytics ``Client.track``, python-logstash-async, a bare
  diskcache push per event and the reference design's direct SDK ``track()``;
- ``delivery``: events delivered per second when every answer takes 50 ms more;
- ``drain``: time to empty a backlog queued during an outage once it ends;
- ``rss``: peak RSS growth while events wait during an outage, beside the peers;
- ``wal``: bytes on disk per queued event against the JSON sent for it;
- ``fleet``: fleet mode on a throwaway PostgreSQL cluster: the caller's cost against the
  diskcache store, delivered events/s with one and four processes; eight processes
  logging essential events, directly and through PgBouncer, beside one: delivery from
  the first emit and of the backlog, the logging call's p50/p99 per process; the queue
  table's size after 200,000 events and autovacuum, three times; takeover time;
- ``pipelines``: the Pipelines API (``api="pipelines"``) against customerio-cdp-analytics
  on one stub at 50 ms: the caller's cost, calls delivered per second and calls lost on
  SIGKILL; and the order guarantee's cost in delivered events/s against the release
  before it (commit 57f0ea4, in its own environment), with 10,000 people and with one;
- ``webapp``: a web-like process (8 request threads, a little work and one logging call
  a request, delivery at 50 ms in the same process): requests/s and the logging call's
  p99 / p99.9 against the stdlib QueueHandler; one call's median against QueueHandler
  and a bare diskcache push; the sender's CPU per delivered event against today's
  release (commit f62ab90, in its own environment);
- ``sender``: the sender's targets (issue 20): events/s and CPU per delivered event
  draining a 100,000-event backlog of 1,000 people at 50 ms, both APIs, the local store
  and PostgreSQL; the order rule's read cost against the same read without it.

The simulator (``python -m cio_logging.simulator``) and the CDP stub run in their own
processes; every measurement runs in a fresh process; each peer runs from its own
virtual environment under ``~/.cache/cio-logging-bench/venvs`` (made on first use).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import processes
from .fleet import fleet_section
from .pipelines import pipelines_section
from .processes import BenchmarkError, cdp_stub, peer_python, run_case, simulator
from .report import Check, Section, machine, number, render
from .sender import sender_section
from .webapp import webapp_section
from .workload import ESSENTIAL_NAME, NON_ESSENTIAL_NAME

LATENCY = 0.05  # seconds added to every answer in the delivery and drain figures
TARGET_EVENTS = {"drain": 100_000, "rss": 1_000_000}


@dataclass(frozen=True)
class Sizes:
    """How much each section does: the full mode or --quick."""

    emit_calls: int
    direct_calls: int
    delivery_events: int
    cdp_delivery_events: int
    direct_delivery_events: int
    drain_events: int
    rss_events: int
    wal_events: int


FULL = Sizes(20_000, 400, 100_000, 20_000, 200, 100_000, 1_000_000, 100_000)
QUICK = Sizes(3_000, 120, 20_000, 5_000, 40, 20_000, 250_000, 5_000)
SECTIONS = ("emit", "delivery", "drain", "rss", "wal", "fleet", "pipelines", "webapp", "sender")


class Run:
    """One run of the suite: its sizes, and the peers' versions as they report them."""

    def __init__(self, sizes: Sizes, quick: bool) -> None:
        self.sizes, self.quick = sizes, quick
        self.peer_versions: dict[str, str] = {}

    def peer(
        self, peer: str, case: str, arguments: dict[str, Any], env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        result = run_case(
            "benchmarks.peer_cases", case, arguments, python=peer_python(peer), env=env
        )
        if "version" in result:
            self.peer_versions[processes.PEERS[peer]] = str(result["version"])
        return result


def _progress(text: str) -> None:
    print(f"[benchmarks] {text}", file=sys.stderr, flush=True)


def _attempt(label: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; a failure is reported and the suite goes on."""
    _progress(label)
    try:
        return measure()
    except (BenchmarkError, OSError) as exc:
        _progress(f"{label} FAILED: {exc}")
        return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# -- emit ----------------------------------------------------------------------------------


def emit_section(run: Run) -> Section:
    section = Section("1. Cost of one logging call on the caller's thread")
    calls, direct_calls, threads = run.sizes.emit_calls, run.sizes.direct_calls, [1, 8]
    results: dict[str, dict[str, Any] | None] = {}
    with simulator() as sim:
        base = {"url": sim.url, "ca_file": sim.ca_file, "threads": threads}
        for label, name in (
            ("cio_logging non-essential", NON_ESSENTIAL_NAME),
            ("cio_logging essential", ESSENTIAL_NAME),
        ):
            arguments = {**base, "name": name, "calls": calls}
            results[label] = _attempt(
                f"emit: {label}",
                functools.partial(run_case, "benchmarks.cases", "emit_cio", arguments),
            )
        simple = {**base, "name": NON_ESSENTIAL_NAME, "calls": calls}
        results["stdlib QueueHandler + QueueListener"] = _attempt(
            "emit: QueueHandler",
            lambda: run_case("benchmarks.cases", "emit_queue_handler", simple),
        )
        results["diskcache push per event"] = _attempt(
            "emit: diskcache push",
            lambda: run_case("benchmarks.cases", "emit_diskcache_push", simple),
        )
        direct = {**simple, "calls": direct_calls}
        results["direct SDK track() per event"] = _attempt(
            "emit: direct track()",
            lambda: run_case("benchmarks.cases", "emit_direct_track", direct),
        )
    with cdp_stub() as stub:
        arguments = {"url": stub.url, "ca_file": stub.ca_file, "threads": threads}
        arguments |= {"name": NON_ESSENTIAL_NAME, "calls": calls}
        results["customerio-cdp-analytics Client.track"] = _attempt(
            "emit: customerio-cdp-analytics",
            lambda: run.peer(
                "cdp-analytics", "emit_cdp", arguments, {"REQUESTS_CA_BUNDLE": stub.ca_file}
            ),
        )
    arguments = {"name": NON_ESSENTIAL_NAME, "calls": calls, "threads": threads}
    results["python-logstash-async (SQLite)"] = _attempt(
        "emit: python-logstash-async",
        lambda: run.peer("logstash-async", "emit_logstash", arguments),
    )

    rows, medians, throughput = [], {}, {}
    for label, result in results.items():
        if result is None:
            rows.append([label, "-", "failed", "-", "-", "-"])
            continue
        for summary in result["runs"]:
            medians[(label, summary["threads"])] = summary["median_us"]
            throughput[(label, summary["threads"])] = summary["events_per_s"]
            wait = summary.get("commit_wait_s")
            rows.append(
                [
                    label,
                    str(summary["threads"]),
                    number(summary["median_us"]),
                    number(summary["p99_us"]),
                    number(summary["events_per_s"], 0),
                    "-" if wait is None else number(wait * 1000, 1),
                ]
            )
    section.table(
        [
            "contender",
            "threads",
            "median us",
            "p99 us",
            "events/s (all threads)",
            "commit() wait after, ms",
        ],
        rows,
    )
    notes = sorted({note for r in results.values() if r is not None for note in r.get("notes", [])})
    section.note(
        f"{calls:,} calls per contender and thread count ({direct_calls:,} for the direct "
        "`track()`), split evenly over the threads; each call timed alone with "
        "`perf_counter_ns`, its arguments built outside the timed region. Same payload for "
        "everyone: a customer id and three attributes. cio_logging and the direct `track()` "
        "talk to the simulator (no added latency), cdp-analytics to the CDP stub, "
        "logstash-async to a closed port (it only queues). With 8 threads the per-call "
        "figures include waiting for the GIL. `commit() wait` is how long "
        "`handler.commit()` took after the last call (events still in the group-commit "
        "buffer); `-` where the handler has no `commit()`."
        + ("" if not notes else " Version notes: " + "; ".join(notes) + ".")
    )

    non_essential = medians.get(("cio_logging non-essential", 1))
    essential = medians.get(("cio_logging essential", 1))
    queue_handler = medians.get(("stdlib QueueHandler + QueueListener", 1))
    cdp = medians.get(("customerio-cdp-analytics Client.track", 1))
    push = medians.get(("diskcache push per event", 1))
    essential_8 = throughput.get(("cio_logging essential", 8))
    push_8 = throughput.get(("diskcache push per event", 8))
    section.checks += [
        Check(
            "non-essential emit median / QueueHandler median (1 thread)",
            f"{number(non_essential)} us vs {number(queue_handler)} us",
            _ratio(non_essential, queue_handler),
            1.5,
        ),
        Check(
            "non-essential emit median / cdp-analytics track() median (1 thread)",
            f"{number(non_essential)} us vs {number(cdp)} us",
            _ratio(non_essential, cdp),
            0.5,
        ),
        Check(
            "essential emit median / bare diskcache push median (1 thread)",
            f"{number(essential)} us vs {number(push)} us",
            _ratio(essential, push),
            1.0,
        ),
        Check(
            "essential throughput / push-per-event throughput (8 threads)",
            f"{number(essential_8, 0)} vs {number(push_8, 0)} events/s",
            _ratio(essential_8, push_8),
            3.0,
            at_most=False,
        ),
    ]
    return section


# -- delivery ------------------------------------------------------------------------------


def delivery_section(run: Run) -> Section:
    section = Section(f"2. Delivery throughput, {LATENCY * 1000:.0f} ms added to every answer")
    sizes = run.sizes
    with simulator(LATENCY) as sim:
        arguments = {"url": sim.url, "ca_file": sim.ca_file, "events": sizes.delivery_events}
        cio = _attempt(
            "delivery: cio_logging", lambda: run_case("benchmarks.cases", "delivery_cio", arguments)
        )
    with simulator(LATENCY) as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "events": sizes.direct_delivery_events,
        }
        direct = _attempt(
            "delivery: direct track()",
            lambda: run_case("benchmarks.cases", "delivery_direct_track", arguments),
        )
    with cdp_stub(LATENCY) as stub:
        arguments = {"url": stub.url, "ca_file": stub.ca_file, "events": sizes.cdp_delivery_events}
        cdp = _attempt(
            "delivery: customerio-cdp-analytics",
            lambda: run.peer(
                "cdp-analytics", "delivery_cdp", arguments, {"REQUESTS_CA_BUNDLE": stub.ca_file}
            ),
        )
    rows = []
    if cio is not None:
        rows.append(
            [
                "cio_logging (defaults)",
                f"{cio['accepted']:,} / {cio['events']:,}",
                number(cio["seconds"], 2),
                number(cio["log_seconds"], 2),
                number(cio["events_per_s"], 0),
                f"{cio['requests']:,}: mean {number(cio['requests_per_s_mean'])}/s, "
                f"peak {cio['requests_per_s_peak']} in 1 s (cap "
                f"{number(cio['max_requests_per_second'], 0)}/s)",
            ]
        )
    if cdp is not None:
        rows.append(
            [
                "customerio-cdp-analytics (its batching: 100/request, 1 thread)",
                f"{cdp['delivered']:,} / {cdp['events']:,}",
                number(cdp["seconds"], 2),
                number(cdp["log_seconds"], 2),
                number(cdp["events_per_s"], 0),
                f"{cdp['requests']:,}",
            ]
        )
    if direct is not None:
        rows.append(
            [
                "direct SDK track() per event (1 thread)",
                f"{direct['events']:,}",
                number(direct["seconds"], 2),
                "-",
                number(direct["events_per_s"], 1),
                f"{direct['events']:,}",
            ]
        )
    section.table(
        [
            "sender",
            "accepted / logged",
            "s, first log to last accepted",
            "s logging",
            "events/s",
            "requests",
        ],
        rows,
    )
    if cio is not None:
        section.note(
            f"cio_logging: {cio['events']:,} non-essential events logged from one thread as "
            "fast as it goes, then timed until the simulator (its own process) had accepted "
            f"all of them; events/s counts from the first log call. Logging took "
            f"{number(cio['log_seconds'], 2)} s, by which time {cio['accepted_when_logged']:,} "
            f"were accepted; from then on the simulator accepted "
            f"{number(cio['events_per_s_after_logging'], 0)} events/s. Settings seen: "
            f"batch_size {cio['batch_size']}, max_in_flight {cio['max_in_flight']}, "
            f"max_requests_per_second {cio['max_requests_per_second']}; "
            f"{cio['unique_accepted']:,} distinct event ids accepted, "
            f"{cio['failed_requests']} failed requests."
        )
    section.note(
        "customerio-cdp-analytics posts Segment-style batches to `{host}/v1/batch`, a CDP "
        "route the Track API simulator does not serve (it answers the Track API v1/v2 routes "
        "only). It is measured against `benchmarks/stub_server.py`, a minimal HTTPS endpoint "
        "that counts batch items and answers 200 after the same added latency, also in its "
        "own process; the client's host is the stub's URL and `REQUESTS_CA_BUNDLE` its CA. "
        "Its queue is sized to the run (the default 10,000 would drop part of the burst)."
    )
    if cio is not None:
        direct_rate = None if direct is None else direct["events_per_s"]
        cap = cio["max_requests_per_second"]
        section.checks += [
            Check(
                f"events/s delivered at {LATENCY * 1000:.0f} ms / 20,000",
                f"{number(cio['events_per_s'], 0)} events/s",
                cio["events_per_s"] / 20_000,
                1.0,
                at_most=False,
            ),
            Check(
                "cio_logging delivery / direct track() per event",
                f"{number(cio['events_per_s'], 0)} vs {number(direct_rate)} events/s",
                _ratio(cio["events_per_s"], direct_rate),
                100.0,
                at_most=False,
            ),
            Check(
                "peak requests in any 1 s / max_requests_per_second",
                f"{cio['requests_per_s_peak']} vs {number(cap, 0)}",
                _ratio(cio["requests_per_s_peak"], cap),
                1.0,
            ),
        ]
    return section


# -- drain ---------------------------------------------------------------------------------


def drain_section(run: Run) -> Section:
    section = Section("3. Draining a backlog after an outage")
    count = run.sizes.drain_events
    options = {"reset_timeout": 1.0}
    with simulator() as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "events": count,
            "latency": LATENCY,
            "options": options,
        }
        result = _attempt(
            "drain: cio_logging", lambda: run_case("benchmarks.cases", "drain_cio", arguments)
        )
    if result is None:
        section.note("The drain measurement failed; see the run's stderr.")
        return section
    section.table(
        [
            "events queued",
            "breaker open",
            "s, outage end to first accepted",
            "s, outage end to all accepted",
            "accepted (distinct ids)",
            "dead-lettered",
        ],
        [
            [
                f"{result['queued_at_outage_end']:,}",
                "yes" if result["breaker_opened"] else "no",
                number(result["first_accept_after_s"], 2),
                number(result["drain_seconds"], 2),
                f"{result['accepted']:,} ({result['unique_accepted']:,})",
                str(result["dead_lettered"]),
            ]
        ],
    )
    scaled = result["drain_seconds"] * TARGET_EVENTS["drain"] / count
    section.note(
        f"{count:,} events logged while the simulator answered every request 503 (with "
        f"{LATENCY * 1000:.0f} ms latency); once the breaker was open the outage ended "
        f"(faults cleared, latency kept) and the clock ran until the simulator had accepted "
        f"all of them. `reset_timeout=1` so the first probe comes within a second of the "
        f"outage's end (the default, 30 s, would add up to 30 s before anything is sent)."
        + (
            ""
            if count == TARGET_EVENTS["drain"]
            else f" This run queued {count:,} events, not 100,000: the target's figure below "
            f"is scaled linearly ({number(scaled, 2)} s)."
        )
    )
    section.checks.append(
        Check(
            "100,000-event backlog drained (s) / 10 s",
            f"{number(scaled, 2)} s" + ("" if count == TARGET_EVENTS["drain"] else " (scaled)"),
            scaled / 10.0,
            1.0,
        )
    )
    return section


# -- rss -----------------------------------------------------------------------------------


def rss_section(run: Run) -> Section:
    section = Section("4. Memory while events wait during an outage")
    count = run.sizes.rss_events
    scale = TARGET_EVENTS["rss"] / count
    arguments: dict[str, Any] = {"events": count}
    with simulator() as sim:
        with_sim = {**arguments, "url": sim.url, "ca_file": sim.ca_file}
        cio = _attempt(
            "rss: cio_logging", lambda: run_case("benchmarks.cases", "rss_cio", with_sim)
        )
    queue_handler = _attempt(
        "rss: stalled QueueHandler",
        lambda: run_case("benchmarks.cases", "rss_queue_handler", arguments),
    )
    cdp = _attempt(
        "rss: customerio-cdp-analytics", lambda: run.peer("cdp-analytics", "rss_cdp", arguments)
    )
    logstash = _attempt(
        "rss: python-logstash-async", lambda: run.peer("logstash-async", "rss_logstash", arguments)
    )
    described: list[tuple[str, dict[str, Any] | None, Callable[[dict[str, Any]], str]]] = [
        (
            "cio_logging (simulator answers 503)",
            cio,
            lambda r: (
                f"on disk after commit() (returned {r['committed']}): {r['queued']:,} "
                f"queued, {r['queue_bytes'] / 2**20:,.0f} MiB; dropped {r['dropped']:,} "
                f"{r['drop_reasons'] or ''}"
            ),
        ),
        (
            "stdlib QueueHandler, listener stalled",
            queue_handler,
            lambda r: f"all in RAM: {r['queued']:,} records in the queue",
        ),
        (
            "customerio-cdp-analytics (host refuses connections)",
            cdp,
            lambda r: (
                f"queue bound {r['queue_bound']:,}: keeps {r['queued']:,}, drops {r['dropped']:,}"
            ),
        ),
        (
            "python-logstash-async (port closed)",
            logstash,
            lambda r: (
                f"{r['queued_in_ram']:,} still in its RAM queue, "
                f"SQLite file {r['database_bytes'] / 2**20:,.1f} MiB so far; drops none"
            ),
        ),
    ]
    rows = []
    for label, result, does in described:
        if result is None:
            rows.append([label, "failed", "-", "-", "-", "-"])
            continue
        growth = result["growth_kib"] / 1024
        rows.append(
            [
                label,
                f"{result['events']:,}",
                number(growth),
                f"{number(result['anon_growth_kib'] / 1024)} / "
                f"{number(result['file_growth_kib'] / 1024)}",
                "-" if scale == 1 else number(growth * scale),
                does(result),
            ]
        )
    section.table(
        [
            "contender",
            "events logged",
            "peak RSS growth, MiB",
            "anon / file-backed RSS growth at the end, MiB",
            "scaled to 1,000,000 (linear)",
            "what it does with them",
        ],
        rows,
    )
    section.note(
        "Each contender in a fresh process: RSS (VmRSS) read after a warm-up, the peak "
        "(VmHWM, reset through /proc/self/clear_refs) read after the last event "
        "(for cio_logging after `commit()` when the handler has it). The anon / file-backed "
        "split is RssAnon and RssFile at the end: file-backed pages (memory-mapped files; "
        "cio_logging turns SQLite's mmap off) count in RSS but are the page cache's, "
        "which the kernel reclaims under pressure."
        + (
            ""
            if scale == 1
            else f" This run logged {count:,} events; the 1,000,000 column multiplies the "
            "growth linearly, an upper bound for a bounded buffer and a fair estimate for a "
            "queue that keeps every record in RAM."
        )
    )
    if cio is not None:
        growth_mb = cio["growth_kib"] * 1024 / 1e6 * scale
        # Scaled up from a smaller run, the figure is an upper bound, not a measurement:
        # cio_logging's memory does not grow with the queue. No verdict then.
        section.checks.append(
            Check(
                "RSS growth with 1,000,000 events queued (MB) / 60 MB",
                f"{number(growth_mb)} MB"
                + ("" if scale == 1 else " (scaled up linearly; the full mode measures it)"),
                growth_mb / 60.0 if scale == 1 else None,
                1.0,
            )
        )
    return section


# -- wal -----------------------------------------------------------------------------------


def wal_section(run: Run) -> Section:
    section = Section("5. Write-ahead log size on disk")
    with simulator() as sim:
        arguments = {"url": sim.url, "ca_file": sim.ca_file, "events": run.sizes.wal_events}
        result = _attempt("wal: size", lambda: run_case("benchmarks.cases", "wal_size", arguments))
    if result is None:
        section.note("The WAL measurement failed; see the run's stderr.")
        return section
    sent = result["sent_bytes_per_event"] or result["item_bytes_per_event"]
    section.table(
        [
            "events",
            "wal/ bytes after checkpoint",
            "bytes/event on disk",
            "JSON bytes/event as sent (v2 batch)",
            "v2 item JSON bytes/event (computed)",
            "disk / sent",
        ],
        [
            [
                f"{result['events']:,}",
                f"{result['wal_bytes']:,}",
                number(result["wal_bytes_per_event"]),
                number(result["sent_bytes_per_event"]),
                number(result["item_bytes_per_event"]),
                number(result["wal_bytes_per_event"] / sent, 2),
            ]
        ],
    )
    section.note(
        "Events queued during an outage (503), committed, the handler closed and the SQLite "
        "WAL checkpointed (TRUNCATE); bytes are every file under `queue_dir/wal/`. Then the "
        "outage ended and the simulator's request records give the bytes sent per event "
        '(request bodies / items, the `{"batch": [...]}` wrapper included).'
    )
    section.checks.append(
        Check(
            "WAL bytes per event / JSON payload bytes per event",
            f"{number(result['wal_bytes_per_event'])} vs {number(sent)} bytes",
            result["wal_bytes_per_event"] / sent,
            2.0,
        )
    )
    return section


BUILDERS: dict[str, Callable[[Run], Section]] = {
    "emit": emit_section,
    "delivery": delivery_section,
    "drain": drain_section,
    "rss": rss_section,
    "wal": wal_section,
    "fleet": lambda run: fleet_section(run, _attempt),
    "pipelines": lambda run: pipelines_section(run, _attempt),
    "webapp": lambda run: webapp_section(run, _attempt),
    "sender": lambda run: sender_section(run, _attempt),
}


def _sections(value: str) -> list[str]:
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}")
    return [name for name in SECTIONS if name in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts: a few minutes")
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        help="comma-separated: " + ",".join(SECTIONS),
    )
    parser.add_argument("--output", type=Path, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    run = Run(QUICK if args.quick else FULL, args.quick)
    sections = [BUILDERS[name](run) for name in args.only]
    markdown = render(command.strip(), started, [machine(run.peer_versions), *sections])
    print(markdown)
    if args.output is not None:
        args.output.write_text(markdown, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
