"""Issue 14's figures: what cio_logging costs a web-like application, and its sender's CPU.

- A web-like process (``benchmarks.webapp_cases.webapp``): 8 request threads, each
  request about 150 us of Python work and one logging call, the handler delivering in
  the same process to the Track API simulator with 50 ms added to every answer. For no
  logging, the stdlib QueueHandler + QueueListener (a NullHandler behind it) and
  cio_logging's non-essential and essential events: requests/s of the process and the
  p99 / p99.9 of the logging call.
- The caller's cost of one call, one thread (``benchmarks.cases`` emit cases): the
  median of a non-essential call against QueueHandler's, of an essential call against
  a bare diskcache push.
- CPU seconds per delivered event in the delivering process while it drains a backlog
  at 50 ms latency (``drain_cpu``), for this checkout and for today's release
  (``RELEASE_COMMIT``, installed in its own environment by ``benchmarks.baseline``).

Every contender runs in a fresh process against a fresh simulator, the contenders
taking turns round after round so a drift in the machine's load weighs on all alike;
the figures are medians over the rounds.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baseline import Baseline, baseline, git
from .processes import PROJECT_ROOT, BenchmarkError, run_case, simulator
from .report import Check, Section, number
from .workload import ESSENTIAL_NAME, NON_ESSENTIAL_NAME

LATENCY = 0.05
THREADS = 8
#: Today's release: the sender's CPU per event is measured against it.
RELEASE_COMMIT = "f62ab90"
#: How long a drain may take before it is reported as not finished.
DRAIN_TIMEOUT = 180.0

Attempt = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any] | None]

WEBAPP_CONTENDERS = {
    "none": "no logging (the ceiling)",
    "queue_handler": "stdlib QueueHandler + QueueListener",
    "non_essential": "cio_logging non-essential",
    "non_essential_process": 'cio_logging non-essential, deliver="process"',
    "essential": "cio_logging essential",
    "diskcache_push": "bare diskcache push per event",
}


@dataclass(frozen=True)
class WebappSizes:
    """How much the section does: the full mode or --quick."""

    requests: int  # per contender and round
    rounds: int
    call_count: int  # one-thread calls per contender and round
    call_rounds: int
    drain_events: tuple[int, ...]
    drain_rounds: int


FULL = WebappSizes(40_000, 3, 20_000, 3, (20_000, 100_000), 2)
QUICK = WebappSizes(8_000, 2, 3_000, 2, (5_000, 20_000), 2)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _current_commit() -> str:
    described = subprocess.run(
        git("describe", "--always", "--dirty", "--abbrev=12"),
        capture_output=True,
        text=True,
        check=False,
    )
    return described.stdout.strip() or "unknown"


def _webapp_run(contender: str, requests: int) -> dict[str, Any]:
    with simulator(LATENCY) as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "contender": contender,
            "threads": THREADS,
            "requests": requests,
            "essential_name": ESSENTIAL_NAME,
        }
        return run_case("benchmarks.webapp_cases", "webapp", arguments)


def _call_run(case: str, name: str, calls: int) -> dict[str, Any]:
    with simulator(LATENCY) as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "threads": [1],
            "name": name,
            "calls": calls,
        }
        result: dict[str, Any] = run_case("benchmarks.cases", case, arguments)["runs"][0]
        return result


def _drain_run(version: Baseline | None, events: int) -> dict[str, Any]:
    with simulator() as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "events": events,
            "latency": LATENCY,
            "timeout": DRAIN_TIMEOUT,
        }
        if version is None:
            result = run_case("benchmarks.webapp_cases", "drain_cpu", arguments)
            expected = PROJECT_ROOT / "cio_logging"
        else:
            result = run_case(
                "benchmarks.webapp_cases",
                "drain_cpu",
                arguments,
                python=version.python,
                root=version.root,
            )
            expected = version.package_dir
    imported = Path(result["cio_logging_file"]).resolve().parent
    if imported != expected.resolve():
        raise BenchmarkError(f"the case imported cio_logging from {imported}, not {expected}")
    return result


def _installed_release() -> Baseline:
    try:
        return baseline(RELEASE_COMMIT)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise BenchmarkError(f"could not install the release at {RELEASE_COMMIT}: {exc}") from exc


def webapp_section(run: Any, attempt: Attempt) -> Section:
    sizes = QUICK if run.quick else FULL
    section = Section("8. The application's own speed: a web-like process (issue 14)")
    _webapp_rows(section, sizes, attempt)
    _call_rows(section, sizes, attempt)
    _drain_rows(section, sizes, attempt)
    return section


def _webapp_rows(section: Section, sizes: WebappSizes, attempt: Attempt) -> None:
    section.lines += [f"### {THREADS} request threads, simulator at {LATENCY * 1000:.0f} ms", ""]
    order = list(WEBAPP_CONTENDERS)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    for repeat in range(sizes.rounds):
        for contender in order if repeat % 2 == 0 else order[::-1]:
            result = attempt(
                f"webapp: {contender}, round {repeat + 1}",
                functools.partial(_webapp_run, contender, sizes.requests),
            )
            if result is not None:
                results[contender].append(result)
    medians: dict[str, dict[str, float | None]] = {}
    for contender in order:
        runs = results[contender]
        medians[contender] = {
            key: _median([r[key] for r in runs])
            for key in ("requests_per_s", "median_us", "p99_us", "p999_us", "cpu_s")
        }
        group_sizes = [r["rows_per_commit"] for r in runs if r.get("rows_per_commit")]
        medians[contender]["rows_per_commit"] = _median(group_sizes)
    rows = []
    anchor = medians["queue_handler"]
    for contender in order:
        runs, figures = results[contender], medians[contender]
        if not runs:
            rows.append([WEBAPP_CONTENDERS[contender], "failed", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                WEBAPP_CONTENDERS[contender],
                ", ".join(number(r["requests_per_s"], 0) for r in runs),
                number(figures["requests_per_s"], 0)
                + _times(figures["requests_per_s"], anchor["requests_per_s"]),
                "-" if contender == "none" else number(figures["median_us"]),
                "-"
                if contender == "none"
                else number(figures["p99_us"]) + _times(figures["p99_us"], anchor["p99_us"]),
                "-"
                if contender == "none"
                else number(figures["p999_us"]) + _times(figures["p999_us"], anchor["p999_us"]),
                number(figures["cpu_s"], 2),
                number(figures["rows_per_commit"], 1),
            ]
        )
    section.table(
        [
            "contender",
            "requests/s, each round",
            "requests/s, median (x QueueHandler)",
            "logging call median us",
            "p99 us (x QueueHandler)",
            "p99.9 us (x QueueHandler)",
            "process CPU s",
            "rows per commit",
        ],
        rows,
    )
    section.note(
        f"{sizes.requests:,} requests per contender and round over {THREADS} threads; a "
        "request is about 150 us of pure-Python work (2,000 multiply-and-modulo steps), "
        "then one `logger.info` with a customer id and three attributes, timed alone with "
        "`perf_counter_ns` (its arguments built outside). cio_logging delivers from the "
        f"same process, with default settings, to the simulator (its own process, "
        f'{LATENCY * 1000:.0f} ms added to every answer), or with `deliver="process"` '
        "from the `cio-logging deliver` child the handler starts (whose CPU is not in the "
        "process CPU column); QueueHandler's listener hands each record to a NullHandler; "
        "the bare diskcache push (the essential event's anchor) is one committed "
        "`Cache.push` of the event's JSON, encoded in the call. Requests/s is requests "
        "over the wall time from the start signal to the last thread's end; percentiles "
        f"are over every call of every thread. Rows per commit: the rows the handler's "
        "group committer wrote over its transactions while the requests ran "
        '(`status()["commits"]`). '
        f"{sizes.rounds} round(s), contenders taking "
        "turns (reversed every other round); medians over the rounds."
    )
    cio, apart = medians["non_essential"], medians["non_essential_process"]
    essential, push = medians["essential"], medians["diskcache_push"]
    section.checks += [
        Check(
            "webapp requests/s, cio_logging non-essential / QueueHandler",
            f"{number(cio['requests_per_s'], 0)} vs {number(anchor['requests_per_s'], 0)}",
            _ratio(cio["requests_per_s"], anchor["requests_per_s"]),
            0.95,
            at_most=False,
        ),
        Check(
            'webapp requests/s, non-essential, deliver="process" / QueueHandler',
            f"{number(apart['requests_per_s'], 0)} vs {number(anchor['requests_per_s'], 0)}",
            _ratio(apart["requests_per_s"], anchor["requests_per_s"]),
            1.0,
            at_most=False,
        ),
        Check(
            "webapp p99 of the non-essential call / QueueHandler's p99",
            f"{number(cio['p99_us'])} us vs {number(anchor['p99_us'])} us",
            _ratio(cio["p99_us"], anchor["p99_us"]),
            1.5,
        ),
        Check(
            "webapp p99.9 of the non-essential call / QueueHandler's p99.9",
            f"{number(cio['p999_us'])} us vs {number(anchor['p999_us'])} us",
            _ratio(cio["p999_us"], anchor["p999_us"]),
            2.0,
        ),
        Check(
            "webapp rows per commit, essential, 8 threads",
            number(essential["rows_per_commit"], 1),
            essential["rows_per_commit"],
            3.5,
            at_most=False,
        ),
        Check(
            "webapp p99 of the essential call / a bare diskcache push's p99 (8 threads)",
            f"{number(essential['p99_us'])} us vs {number(push['p99_us'])} us",
            _ratio(essential["p99_us"], push["p99_us"]),
            2.0,
        ),
    ]


def _times(value: float | None, anchor: float | None) -> str:
    ratio = _ratio(value, anchor)
    return "" if ratio is None else f" ({ratio:.2f}x)"


def _call_rows(section: Section, sizes: WebappSizes, attempt: Attempt) -> None:
    section.lines += ["### One call, one thread", ""]
    contenders = {
        "cio_logging non-essential": ("emit_cio", NON_ESSENTIAL_NAME),
        "stdlib QueueHandler + QueueListener": ("emit_queue_handler", NON_ESSENTIAL_NAME),
        "cio_logging essential": ("emit_cio", ESSENTIAL_NAME),
        "bare diskcache push": ("emit_diskcache_push", NON_ESSENTIAL_NAME),
    }
    order = list(contenders)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in order}
    for repeat in range(sizes.call_rounds):
        for label in order if repeat % 2 == 0 else order[::-1]:
            case, name = contenders[label]
            result = attempt(
                f"webapp one call: {label}, round {repeat + 1}",
                functools.partial(_call_run, case, name, sizes.call_count),
            )
            if result is not None:
                results[label].append(result)
    medians = {label: _median([r["median_us"] for r in results[label]]) for label in order}
    p99s = {label: _median([r["p99_us"] for r in results[label]]) for label in order}
    rows = [
        [
            label,
            ", ".join(number(r["median_us"]) for r in results[label]) or "failed",
            number(medians[label]),
            number(p99s[label]),
        ]
        for label in order
    ]
    section.table(["contender", "median us, each round", "median us", "p99 us"], rows)
    section.note(
        f"{sizes.call_count:,} calls per contender and round from one thread, each timed "
        "alone (the emit section's cases); cio_logging against the simulator at "
        f"{LATENCY * 1000:.0f} ms. The diskcache push is one committed push of the event's "
        "JSON with cio_logging's settings (synchronous NORMAL, no eviction)."
    )
    non_essential, queue_handler = medians[order[0]], medians[order[1]]
    essential, push = medians[order[2]], medians[order[3]]
    section.checks += [
        Check(
            "median non-essential call / QueueHandler median (1 thread)",
            f"{number(non_essential)} us vs {number(queue_handler)} us",
            _ratio(non_essential, queue_handler),
            1.3,
        ),
        Check(
            "median essential call / bare diskcache push median (1 thread)",
            f"{number(essential)} us vs {number(push)} us",
            _ratio(essential, push),
            1.2,
        ),
    ]


def _drain_rows(section: Section, sizes: WebappSizes, attempt: Attempt) -> None:
    section.lines += [
        f"### The sender's CPU per delivered event, draining at {LATENCY * 1000:.0f} ms",
        "",
    ]
    installed = attempt(
        "webapp: the release's environment", lambda: {"release": _installed_release()}
    )
    old: Baseline | None = None if installed is None else installed["release"]
    release, current = f"today's release ({RELEASE_COMMIT})", f"current ({_current_commit()})"
    versions: list[tuple[str, Baseline | None]] = [(current, None)]
    if old is not None:
        versions.insert(0, (release, old))
    rows = []
    for events in sizes.drain_events:
        results: dict[str, list[dict[str, Any]]] = {release: [], current: []}
        for repeat in range(sizes.drain_rounds):
            for label, version in versions if repeat % 2 == 0 else versions[::-1]:
                result = attempt(
                    f"webapp drain CPU: {label}, {events:,} events, run {repeat + 1}",
                    functools.partial(_drain_run, version, events),
                )
                if result is not None:
                    results[label].append(result)
        # A run that did not finish has no cost per delivered event: it is shown, and
        # left out of the median.
        medians = {
            label: _median([r["cpu_us_per_event"] for r in runs if r["finished"]])
            for label, runs in results.items()
        }
        for label, runs in results.items():
            rows.append(_drain_row(label, events, runs, medians[label]))
        section.checks.append(
            Check(
                f"sender CPU s per delivered event, current / today's release ({events:,})",
                f"{number(medians.get(current))} us vs {number(medians.get(release))} us",
                _ratio(medians.get(current), medians.get(release)),
                0.5,
            )
        )
    section.table(
        [
            "version",
            "events",
            "CPU us per delivered event, each run",
            "median",
            "events/s while draining, each run",
            "distinct ids accepted",
        ],
        rows,
    )
    section.note(
        "N non-essential events logged in a fresh process while the simulator answered "
        "503; once the breaker was open the outage ended (latency kept: "
        f"{LATENCY * 1000:.0f} ms) and the process's user + system CPU (`os.times`, every "
        "thread) was counted until the handler had delivered all of them, the main thread "
        "only reading `status()` every 100 ms; divided by the events. A run that had not "
        f"delivered them all after {DRAIN_TIMEOUT:.0f} s is shown as not finished, with the "
        "CPU it had spent by then per event logged, and left out of the median. Today's "
        f"release is commit {RELEASE_COMMIT} of this repository, installed from `git "
        "archive` in its own environment (`~/.cache/cio-logging-bench/venvs/"
        "baseline-<commit>`); each case checks which cio_logging it imported. "
        f"{sizes.drain_rounds} run(s) of each, taking turns."
    )


def _drain_row(
    label: str, events: int, runs: list[dict[str, Any]], median: float | None
) -> list[str]:
    if not runs:
        return [label, f"{events:,}", "failed", "-", "-", "-"]
    return [
        label,
        f"{events:,}",
        ", ".join(
            number(r["cpu_us_per_event"])
            if r["finished"]
            else f"not finished ({r['delivered']:,} delivered in {r['seconds']:.0f} s, "
            f"{number(r['cpu_us_per_event'])} us of CPU per event logged)"
            for r in runs
        ),
        number(median),
        ", ".join(number(r["delivered"] / r["seconds"], 0) for r in runs),
        ", ".join(f"{r['unique_accepted']:,}" for r in runs),
    ]
