"""Issue 13's figures: the Pipelines API beside customerio-cdp-analytics, and the cost of
the order guarantee.

Against the CDP stub (``benchmarks/stub_server.py``, ``/v1/batch``) with 50 ms added to
every answer, cio_logging's ``api="pipelines"`` and customerio-cdp-analytics:

- the caller's cost of one call, one thread (median and p99);
- calls delivered per second;
- calls lost when the process is SIGKILLed as its last call returns: what reached the
  stub, and for cio_logging what a second process on the same queue directory (the
  ``drain`` that ``cio-logging drain`` runs) delivers afterwards.

On the Track API simulator with 50 ms added latency, delivered events/s of the release
before the order guarantee (``BASELINE_COMMIT``, installed in its own environment by
``benchmarks.baseline``) and of this checkout, same case, same run: events spread
round-robin over 10,000 people, and all for one person. The simulator's record of what
it accepted also gives how many events arrived after a later-logged one of their person.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baseline import Baseline, baseline, git
from .processes import (
    PROJECT_ROOT,
    BenchmarkError,
    Server,
    cdp_stub,
    peer_python,
    run_case,
    run_killed_case,
    simulator,
)
from .report import Check, Section, number
from .workload import ESSENTIAL_NAME, NON_ESSENTIAL_NAME

LATENCY = 0.05
#: The last commit before the order guarantee.
BASELINE_COMMIT = "57f0ea4"
MANY_PEOPLE = 10_000
ORDER_TARGET = 0.9  # current / baseline delivered events/s with many people, at least

Attempt = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any] | None]


@dataclass(frozen=True)
class PipelineSizes:
    """How much the section does: the full mode or --quick."""

    emit_calls: int
    delivery_events: int
    cdp_delivery_events: int
    kill_calls: int
    order_events: int
    order_runs: int


FULL = PipelineSizes(20_000, 100_000, 20_000, 2_000, 100_000, 3)
QUICK = PipelineSizes(3_000, 20_000, 5_000, 2_000, 20_000, 1)


def pipelines_section(run: Any, attempt: Attempt) -> Section:
    sizes = QUICK if run.quick else FULL
    section = Section("7. The Pipelines API, and what the order guarantee costs")
    _emit_rows(section, run, sizes, attempt)
    _delivery_rows(section, run, sizes, attempt)
    _kill_rows(section, run, sizes, attempt)
    _order_rows(section, sizes, attempt)
    return section


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _stub_env(stub: Server) -> dict[str, str]:
    return {"REQUESTS_CA_BUNDLE": stub.ca_file}


# -- the caller's cost -----------------------------------------------------------------


def _emit_rows(section: Section, run: Any, sizes: PipelineSizes, attempt: Attempt) -> None:
    section.lines += ["### Cost of one call on the caller's thread (Pipelines stub)", ""]
    arguments: dict[str, Any] = {
        "threads": [1],
        "name": NON_ESSENTIAL_NAME,
        "calls": sizes.emit_calls,
    }
    with cdp_stub(LATENCY) as stub:
        on_stub = {**arguments, "url": stub.url, "ca_file": stub.ca_file, "api": "pipelines"}
        cio = attempt(
            "pipelines emit: cio_logging",
            functools.partial(run_case, "benchmarks.cases", "emit_cio", on_stub),
        )
    with cdp_stub(LATENCY) as stub:
        on_stub = {**arguments, "url": stub.url, "ca_file": stub.ca_file}
        cdp = attempt(
            "pipelines emit: customerio-cdp-analytics",
            lambda: run.peer("cdp-analytics", "emit_cdp", on_stub, _stub_env(stub)),
        )
    figures: dict[str, dict[str, Any]] = {}
    rows = []
    for label, result in (
        ('cio_logging api="pipelines", non-essential event', cio),
        ("customerio-cdp-analytics Client.track", cdp),
    ):
        if result is None:
            rows.append([label, "failed", "-", "-"])
            continue
        summary = result["runs"][0]
        figures[label] = summary
        rows.append(
            [
                label,
                number(summary["median_us"]),
                number(summary["p99_us"]),
                number(summary["events_per_s"], 0),
            ]
        )
    section.table(["contender", "median us", "p99 us", "calls/s (one thread)"], rows)
    ours = figures.get('cio_logging api="pipelines", non-essential event', {})
    theirs = figures.get("customerio-cdp-analytics Client.track", {})
    median = _ratio(ours.get("median_us"), theirs.get("median_us"))
    p99 = _ratio(ours.get("p99_us"), theirs.get("p99_us"))
    section.note(
        f"{sizes.emit_calls:,} calls each, one thread, each timed alone with "
        "`perf_counter_ns`; the same customer id and three attributes for both; each "
        f"against its own CDP stub answering after {LATENCY * 1000:.0f} ms. cio_logging / "
        f"cdp-analytics: median {number(median, 2)}x, p99 {number(p99, 2)}x."
    )


# -- delivery --------------------------------------------------------------------------


def _delivery_rows(section: Section, run: Any, sizes: PipelineSizes, attempt: Attempt) -> None:
    section.lines += [
        f"### Calls delivered per second, {LATENCY * 1000:.0f} ms added to every answer",
        "",
    ]
    with cdp_stub(LATENCY) as stub:
        arguments = {"url": stub.url, "ca_file": stub.ca_file, "events": sizes.delivery_events}
        cio = attempt(
            "pipelines delivery: cio_logging",
            functools.partial(run_case, "benchmarks.cases", "delivery_pipelines", arguments),
        )
    with cdp_stub(LATENCY) as stub:
        arguments = {
            "url": stub.url,
            "ca_file": stub.ca_file,
            "events": sizes.cdp_delivery_events,
        }
        cdp = attempt(
            "pipelines delivery: customerio-cdp-analytics",
            lambda: run.peer("cdp-analytics", "delivery_cdp", arguments, _stub_env(stub)),
        )
    rows = []
    if cio is not None:
        rows.append(
            [
                f'cio_logging api="pipelines" (defaults: batch_size {cio["batch_size"]}, '
                f"max_in_flight {cio['max_in_flight']})",
                f"{cio['delivered']:,} ({cio['unique']:,} distinct) / {cio['events']:,}",
                number(cio["seconds"], 2),
                number(cio["log_seconds"], 2),
                number(cio["events_per_s"], 0),
                f"{cio['requests']:,}",
            ]
        )
    else:
        rows.append(['cio_logging api="pipelines"', "failed", "-", "-", "-", "-"])
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
    else:
        rows.append(["customerio-cdp-analytics", "failed", "-", "-", "-", "-"])
    section.table(
        [
            "sender",
            "delivered / logged",
            "s, first call to last delivered",
            "s calling",
            "calls/s",
            "requests",
        ],
        rows,
    )
    ratio = _ratio(
        None if cio is None else cio["events_per_s"], None if cdp is None else cdp["events_per_s"]
    )
    section.note(
        f"Each sender in a fresh process logs its calls from one thread as fast as it goes "
        f"({sizes.delivery_events:,} for cio_logging, {sizes.cdp_delivery_events:,} for "
        "cdp-analytics, as the delivery section does, with its queue sized to the run), "
        "then the clock runs until the stub has counted all of them; calls/s counts from "
        f"the first call. cio_logging / cdp-analytics: {number(ratio, 2)}x."
    )


# -- SIGKILL ---------------------------------------------------------------------------


def _counts(stub: Server) -> dict[str, Any]:
    counts: dict[str, Any] = stub.control.call("count")
    return counts


def _settled(stub: Server, quiet: float = 1.0, timeout: float = 60.0) -> dict[str, Any]:
    """The stub's counts once no item arrived for ``quiet`` seconds (requests in flight
    when the client died still finish: the stub reads a body before its latency)."""
    last = _counts(stub)
    changed = time.monotonic()
    deadline = changed + timeout
    while time.monotonic() - changed < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _counts(stub)
        if now["events"] != last["events"]:
            last, changed = now, time.monotonic()
    return last


def _received(counts: dict[str, Any]) -> int:
    """Distinct calls received: by messageId, or every item when some had none."""
    return int(counts["unique"] if not counts["without_id"] else counts["events"])


def _kill_cio(stub: Server, calls: int, name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cio-bench-kill-") as work:
        note_file = Path(work) / "note.json"
        arguments = {
            "url": stub.url,
            "ca_file": stub.ca_file,
            "api": "pipelines",
            "queue_dir": str(Path(work) / "queue"),
            "note_file": str(note_file),
            "name": name,
            "events": calls,
        }
        run_killed_case("benchmarks.cases", "log_then_sigkill", arguments)
        note = _note(note_file)
        at_kill = _settled(stub)
        drained = run_case("benchmarks.cases", "drain_queue", arguments)
        after = _settled(stub)
    return {
        **note,
        "at_kill": _received(at_kill),
        "after_recovery": _received(after),
        "items_after": after["events"],
        "recovery": drained,
    }


def _kill_cdp(run: Any, stub: Server, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cio-bench-kill-") as work:
        note_file = Path(work) / "note.json"
        arguments = {
            "url": stub.url,
            "note_file": str(note_file),
            "name": NON_ESSENTIAL_NAME,
            "events": calls,
        }
        run_killed_case(
            "benchmarks.peer_cases",
            "kill_cdp",
            arguments,
            python=peer_python("cdp-analytics"),
            env=_stub_env(stub),
        )
        note = _note(note_file)
        at_kill = _settled(stub)
    run.peer_versions.setdefault("customerio-cdp-analytics", str(note.get("version")))
    return {**note, "at_kill": _received(at_kill), "items_after": at_kill["events"]}


def _note(path: Path) -> dict[str, Any]:
    try:
        note: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"the killed process left no note of its calls: {exc}") from exc
    return note


def _kill_rows(section: Section, run: Any, sizes: PipelineSizes, attempt: Attempt) -> None:
    calls = sizes.kill_calls
    section.lines += [f"### Calls lost when the process is SIGKILLed after {calls:,} calls", ""]
    results: list[tuple[str, dict[str, Any] | None]] = []
    for label, name in (
        ('cio_logging api="pipelines", non-essential events', NON_ESSENTIAL_NAME),
        ('cio_logging api="pipelines", essential events', ESSENTIAL_NAME),
    ):
        with cdp_stub(LATENCY) as stub:
            results.append(
                (
                    label,
                    attempt(
                        f"pipelines kill: {label}", functools.partial(_kill_cio, stub, calls, name)
                    ),
                )
            )
    with cdp_stub(LATENCY) as stub:
        results.append(
            (
                "customerio-cdp-analytics Client.track",
                attempt(
                    "pipelines kill: customerio-cdp-analytics",
                    functools.partial(_kill_cdp, run, stub, calls),
                ),
            )
        )
    rows = []
    for label, result in results:
        if result is None:
            rows.append([label, "failed", "-", "-", "-", "-", "-"])
            continue
        recovery = result.get("recovery")
        rows.append(
            [
                label,
                number(result["log_seconds"] * 1000, 1),
                f"{result['at_kill']:,}",
                f"{calls - result['at_kill']:,}",
                "-"
                if recovery is None
                else f"{result['after_recovery']:,} (drain: {recovery['delivered']:,} "
                f"delivered in {number(recovery['seconds'], 1)} s)",
                f"{calls - result.get('after_recovery', result['at_kill']):,}",
                f"{result['items_after'] - result.get('after_recovery', result['at_kill']):,}",
            ]
        )
    section.table(
        [
            "contender",
            "ms calling",
            "received at the stub by the kill",
            "lost at the kill",
            "received after a second process on the queue directory",
            "lost in the end",
            "items received twice",
        ],
        rows,
    )
    section.note(
        f"A fresh process makes {calls:,} calls (the same customer ids and attributes as "
        "above) and SIGKILLs itself as the last call returns (one `os.write` of the time "
        "taken in between). Received counts distinct `messageId`s at the stub once nothing "
        f"more arrived for 1 s ({LATENCY * 1000:.0f} ms latency). For cio_logging a second "
        "process then runs `cio_logging.operations.drain` (what `cio-logging drain` runs) on "
        "the same queue directory and the stub is counted again; an event sent but not yet "
        "acknowledged on disk when the process died is sent again (same `messageId`: "
        "the last column). cdp-analytics keeps its "
        "queue in memory: nothing is left for a second process. Essential events are on "
        "disk when the call returns; non-essential ones are committed by a background "
        "writer within `commit_interval` (default 0.05 s), so those of the last interval "
        "die with the process."
    )


# -- the order guarantee ---------------------------------------------------------------


def _current_commit() -> str:
    described = subprocess.run(
        git("describe", "--always", "--dirty", "--abbrev=12"),
        capture_output=True,
        text=True,
        check=False,
    )
    return described.stdout.strip() or "unknown"


def _installed_baseline() -> Baseline:
    try:
        return baseline(BASELINE_COMMIT)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise BenchmarkError(f"could not install the baseline at {BASELINE_COMMIT}: {exc}") from exc


def _order_delivery(version: Baseline | None, events: int, customers: int) -> dict[str, Any]:
    with simulator(LATENCY) as sim:
        arguments = {
            "url": sim.url,
            "ca_file": sim.ca_file,
            "events": events,
            "customers": customers,
            "check_order": True,
        }
        if version is None:
            result = run_case("benchmarks.cases", "delivery_cio", arguments)
            expected = PROJECT_ROOT / "cio_logging"
        else:
            result = run_case(
                "benchmarks.cases",
                "delivery_cio",
                arguments,
                python=version.python,
                root=version.root,
            )
            expected = version.package_dir
    imported = Path(result["cio_logging_file"]).resolve().parent
    if imported != expected.resolve():
        raise BenchmarkError(f"the case imported cio_logging from {imported}, not {expected}")
    return result


def _people(customers: int) -> str:
    return "one person" if customers == 1 else f"{customers:,} people"


def _order_rows(section: Section, sizes: PipelineSizes, attempt: Attempt) -> None:
    section.lines += [
        f"### The order guarantee's cost: Track API simulator, {LATENCY * 1000:.0f} ms latency",
        "",
    ]
    installed = attempt(
        "order: the baseline's environment", lambda: {"baseline": _installed_baseline()}
    )
    old: Baseline | None = None if installed is None else installed["baseline"]
    before = f"before the order guarantee ({BASELINE_COMMIT})"
    current = f"current ({_current_commit()})"
    versions: list[tuple[str, Baseline | None]] = [(current, None)]
    if old is not None:
        versions.insert(0, (before, old))
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for repeat in range(sizes.order_runs):
        for customers in (MANY_PEOPLE, 1):
            # ABBA: a drift in the machine's load weighs on both versions alike.
            for label, version in versions if repeat % 2 == 0 else versions[::-1]:
                result = attempt(
                    f"order: {label}, {_people(customers)}, run {repeat + 1}",
                    functools.partial(_order_delivery, version, sizes.order_events, customers),
                )
                if result is not None:
                    results.setdefault((customers, label), []).append(result)
    rows = []
    medians: dict[tuple[int, str], float] = {}
    for customers in (MANY_PEOPLE, 1):
        for label in (before, current):
            runs = results.get((customers, label), [])
            if not runs:
                rows.append([f"{customers:,}", label, "failed", "-", "-", "-"])
                continue
            rates = [r["events_per_s"] for r in runs]
            medians[(customers, label)] = statistics.median(rates)
            complete = all(r["finished"] and r["unique_accepted"] >= r["events"] for r in runs)
            rows.append(
                [
                    f"{customers:,}",
                    label,
                    ", ".join(number(rate, 0) for rate in rates),
                    number(medians[(customers, label)], 0),
                    ", ".join(f"{r['overtaken_events']:,}" for r in runs),
                    "yes" if complete else "NO",
                ]
            )
    section.table(
        [
            "people",
            "version",
            "events/s, each run",
            "median events/s",
            "accepted after a later-logged event of their person, each run",
            "all accepted",
        ],
        rows,
    )
    ratios = {
        customers: _ratio(medians.get((customers, current)), medians.get((customers, before)))
        for customers in (MANY_PEOPLE, 1)
    }
    section.note(
        f"{sizes.order_events:,} non-essential events logged from one thread in a fresh "
        f"process, spread round-robin over {MANY_PEOPLE:,} customer ids or all for one, "
        "default settings; the clock runs from the first call until the simulator (its own "
        f"process, {LATENCY * 1000:.0f} ms added to every answer) has accepted all of them. "
        f"{sizes.order_runs} run(s) of each, the versions taking turns to go first. The "
        f"release before the order guarantee is commit {BASELINE_COMMIT} of this "
        "repository, installed from `git archive` in its own environment "
        "(`~/.cache/cio-logging-bench/venvs/baseline-<commit>`); each case checks which "
        "cio_logging it imported. Each event carries its call's number; the last column "
        "but one counts events the simulator accepted after a later-logged event of the "
        f"same person. Current / before, median events/s: {MANY_PEOPLE:,} people "
        f"{number(ratios[MANY_PEOPLE], 2)}x, one person {number(ratios[1], 2)}x (no target)."
    )
    section.checks.append(
        Check(
            f"order guarantee: delivered events/s, current / before ({MANY_PEOPLE:,} people)",
            f"{number(medians.get((MANY_PEOPLE, current)), 0)} vs "
            f"{number(medians.get((MANY_PEOPLE, before)), 0)} events/s",
            ratios[MANY_PEOPLE],
            ORDER_TARGET,
            at_most=False,
        )
    )
