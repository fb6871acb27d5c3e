"""The sender's figures (issue 20), each measured in a fresh process (sender_cases.py):

- a 100,000-event backlog of 1,000 people, queued while nothing sent, delivered by one
  sender with 50 ms added to every answer: events/s and the sending process's CPU per
  delivered event, both APIs, the local store; the same backlog on PostgreSQL (fleet
  mode, one sender);
- the order guarantee's cost: CPU per call of reading and acknowledging a backlog of
  10,000 people batch after batch, with the order rule, against the same read without
  it (the anchor, same run, same rows).

The targets are absolute where the issue states them so (5 us, 40,000/s, 25,000/s): the
ratio shown is measured / target.
"""

from __future__ import annotations

import functools
from typing import Any

from .processes import run_case, simulator
from .report import Check, Section, number

LATENCY = 0.05
PEOPLE = 1_000
ORDER_PEOPLE = 10_000


def sender_section(run: Any, attempt: Any) -> Section:
    section = Section("9. The sender: throughput, CPU per event, the order rule's cost")
    events = 100_000 if not run.quick else 20_000
    rows: list[list[str]] = []
    figures: dict[str, dict[str, Any]] = {}
    for api in ("track", "pipelines"):
        with simulator(LATENCY) as sim:
            arguments = {
                "url": sim.url,
                "ca_file": sim.ca_file,
                "events": events,
                "people": PEOPLE,
                "latency": LATENCY,
                "api": api,
            }
            result = attempt(
                f"sender: drain {api}",
                functools.partial(run_case, "benchmarks.sender_cases", "drain", arguments),
            )
        if result is not None:
            figures[api] = result
            rows.append(_row(f"local store, {api}", result))
    postgres = _postgres_drain(events, attempt)
    if postgres is not None:
        figures["postgresql"] = postgres
        rows.append(_row("PostgreSQL (fleet, one sender), track", postgres))
    section.table(
        ["store, API", "delivered / logged", "seconds", "events/s", "CPU us / event", "requests"],
        rows,
    )
    section.note(
        f'{events:,} events of {PEOPLE:,} people queued with `deliver="none"`, then '
        f"delivered by one sender in a fresh process, {LATENCY * 1000:.0f} ms added to every "
        "answer by the simulator; CPU is the whole sending process's (`process_time`), its "
        "main thread only waiting."
    )
    order = attempt(
        "sender: the order rule's cost",
        functools.partial(
            run_case,
            "benchmarks.sender_cases",
            "read_cost",
            {"events": events // 2, "people": ORDER_PEOPLE},
        ),
    )
    if order is not None:
        reads = order["reads"]
        section.table(
            ["batch read + acknowledgement", "calls", "CPU us / call"],
            [
                [label, f"{figures_['calls']:,}", number(figures_["cpu_us_per_call"], 2)]
                for label, figures_ in reads.items()
            ],
        )
        section.note(
            f"{order['events']:,} calls of {ORDER_PEOPLE:,} people in the local store, read "
            "1,000 at a time (items built by SQLite) and acknowledged, with the order rule "
            "and without it (the anchor)."
        )
    for api in ("track", "pipelines"):
        result = figures.get(api)
        section.checks.append(
            Check(
                f"sender CPU per delivered event, {api}, local (target 5 us)",
                "-" if result is None else f"{number(result['cpu_us_per_event'])} us",
                None if result is None else result["cpu_us_per_event"] / 5.0,
                1.0,
            )
        )
        section.checks.append(
            Check(
                f"delivered events/s, {api}, local (target 40,000)",
                "-" if result is None else number(result["events_per_s"], 0),
                None if result is None else result["events_per_s"] / 40_000,
                1.0,
                at_most=False,
            )
        )
    section.checks.append(
        Check(
            "delivered events/s, one fleet sender on PostgreSQL (target 25,000)",
            "-" if postgres is None else number(postgres["events_per_s"], 0),
            None if postgres is None else postgres["events_per_s"] / 25_000,
            1.0,
            at_most=False,
        )
    )
    if order is not None:
        with_rule = order["reads"]["order rule"]["cpu_us_per_call"]
        without = order["reads"]["no order rule"]["cpu_us_per_call"]
        section.checks.append(
            Check(
                "the order rule's read cost / the same read without it (10,000 people)",
                f"{number(with_rule, 2)} us vs {number(without, 2)} us",
                with_rule / without if without else None,
                1.10,
            )
        )
    return section


def _row(label: str, result: dict[str, Any]) -> list[str]:
    return [
        label,
        f"{result['accepted']:,} / {result['events']:,}",
        number(result["seconds"], 2),
        number(result["events_per_s"], 0),
        number(result["cpu_us_per_event"], 1),
        f"{result['requests']:,}",
    ]


def _postgres_drain(events: int, attempt: Any) -> dict[str, Any] | None:
    from .fleet import _cluster, _database

    try:
        cluster = _cluster()
    except RuntimeError as exc:
        attempt("sender: PostgreSQL", functools.partial(_unavailable, str(exc)))
        return None
    try:
        with simulator(LATENCY) as sim:
            arguments = {
                "url": sim.url,
                "ca_file": sim.ca_file,
                "events": events,
                "people": PEOPLE,
                "latency": LATENCY,
                "api": "track",
                "options": {"queue_url": _database(cluster, "sender")},
            }
            result: dict[str, Any] | None = attempt(
                "sender: drain on PostgreSQL",
                functools.partial(run_case, "benchmarks.sender_cases", "drain", arguments),
            )
            return result
    finally:
        cluster.destroy()


def _unavailable(reason: str) -> dict[str, Any]:
    from .processes import BenchmarkError

    raise BenchmarkError(reason)
