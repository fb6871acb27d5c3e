"""Batch items built by the database from the stored text (see templates.py).

:func:`sqlite_item` and :func:`postgres_item` compile an API's templates into one SQL
expression over a queue row: the item's text, or NULL where Python must build it (a
call without a template, a row that is not the compact text ``encode_row`` writes).
Each field is the stored JSON text of that value (SQLite's ``->`` and PostgreSQL's
``json ->`` return a value's text as written, escapes included), so the item is byte
for byte what :func:`~cio_logging.templates.render` makes from the decoded
event; the unit tests hold the renderings equal.

The stored row (``rows.py``): ``[2, name, customer_id, anonymous_id, timestamp,
logged_at, history, data]``; a person call ``[3, ..., history, call, data]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..templates import Field, Templates


@dataclass(frozen=True)
class _Dialect:
    """How one database reads a row's values and writes the item's parts."""

    element: Callable[[str, int], str]  # (body, index) -> the element's JSON text
    element_text: Callable[[str, int], str]  # (body, index) -> the element as SQL text
    quote: Callable[[str], str]  # SQL text -> a JSON string
    to_int: Callable[[str], str]  # SQL text of an integer -> integer
    truncate: Callable[[str], str]  # a number -> its integer part
    to_float: Callable[[str], str]  # SQL text of a number -> double
    to_text: Callable[[str], str]  # integer -> its decimal text
    shape_ok: Callable[[str], str]  # body -> the row is ours, compact, well typed
    unreadable: Callable[[str], str]  # body -> true where the JSON functions would fail
    iso_time: Callable[[str, str, str], str]  # (moment, seconds, micros) -> quoted ISO text

    def fields(self, body: str, ident: str) -> dict[Field, str]:
        version = self.to_int(self.element_text(body, 0))
        logged_at = self.to_float(self.element_text(body, 5))
        timestamp = self.to_int(self.element_text(body, 4))
        # The record's own time when the timestamp is that second (see iso_time).
        moment = (
            f"(CASE WHEN {self.truncate(logged_at)} = {timestamp}"
            f" THEN {logged_at} ELSE {timestamp} END)"
        )
        # Whole seconds and microseconds apart, as Python's datetime does: the
        # microsecond rounded (carrying into the second), then cut to the millisecond.
        micros = (
            f"{self.to_int('round((' + moment + ' - ' + self.truncate(moment) + ') * 1000000)')}"
        )
        seconds = f"({self.truncate(moment)} + (CASE WHEN {micros} >= 1000000 THEN 1 ELSE 0 END))"
        return {
            Field.CUSTOMER_ID: self.element(body, 2),
            Field.ANONYMOUS_ID: self.element(body, 3),
            Field.NAME: self.element(body, 1),
            Field.ID: self.quote(ident),
            Field.TIMESTAMP: self.to_text(timestamp),
            Field.ISO_TIME: self.iso_time(moment, seconds, f"(({micros}) % 1000000)"),
            Field.DATA: (
                f"(CASE {version} WHEN 3 THEN {self.element(body, 8)}"
                f" ELSE {self.element(body, 7)} END)"
            ),
        }

    def item(self, templates: Templates, body: str, ident: str) -> str:
        fields = self.fields(body, ident)
        version = self.to_int(self.element_text(body, 0))
        call = f"(CASE {version} WHEN 3 THEN {self.element_text(body, 7)} ELSE 'event' END)"
        identified = f"(CASE WHEN {self.element_text(body, 2)} IS NULL THEN '0' ELSE '1' END)"
        # One key, worked out once per row, picks the branch: "event|1" is an event of
        # an identified person. Events first: most rows are events.
        key = f"({call} || '|' || {identified})"
        branches = []
        for (name, named), template in sorted(templates.items(), key=_events_first):
            parts = [_literal(part) if isinstance(part, str) else fields[part] for part in template]
            branches.append(f"WHEN {_literal(f'{name}|{int(named)}')} THEN {' || '.join(parts)}")
        built = f"(CASE {key} {' '.join(branches)} END)"
        return (
            f"(CASE WHEN {self.unreadable(body)} THEN NULL"
            f" WHEN NOT ({self.shape_ok(body)}) THEN NULL ELSE {built} END)"
        )


def _events_first(entry: tuple[tuple[str, bool], object]) -> tuple[bool, bool, str]:
    (name, named), _ = entry
    return name != "event", not named, name


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _boolean(value: bool) -> str:
    return "TRUE" if value else "FALSE"


def _sqlite_shape(body: str) -> str:
    # The shape encode_row writes (json_valid was checked first, in ``unreadable``: the
    # arrows raise on a text that is not JSON): a version 2 or 3 array whose name is
    # text and whose data is an object. The other values are copied as they are: a
    # row is only ever written by encode_row.
    data = f"CASE ({body} ->> '$[0]') WHEN 3 THEN '$[8]' ELSE '$[7]' END"
    return (
        f"({body} ->> '$[0]') IN (2, 3) AND json_type({body}, '$[1]') = 'text'"
        f" AND json_type({body}, {data}) = 'object'"
    )


def _postgres_shape(body: str) -> str:
    # PostgreSQL cannot turn a \u0000 escape into text, and reading any element of a
    # row whose object keys hold one raises: such a row is left to Python (checked
    # first, alone, in a CASE of its own: an AND's operands may run in any order).
    # The rest as for SQLite, plus an integer timestamp (its cast would raise).
    json = f"({body})::json"
    data = f"CASE ({json} ->> 0) WHEN '3' THEN 8 ELSE 7 END"
    return (
        f"json_typeof({json}) = 'array' AND ({json} ->> 0) IN ('2', '3')"
        f" AND json_typeof({json} -> 1) = 'string'"
        f" AND ({json} ->> 4) ~ '^-?[0-9]+$' AND ({json} ->> 5) ~ '^-?[0-9.eE+-]+$'"
        f" AND json_typeof({json} -> {data}) = 'object'"
    )


_SQLITE = _Dialect(
    element=lambda body, index: f"({body} -> '$[{index}]')",
    element_text=lambda body, index: f"({body} ->> '$[{index}]')",
    quote=lambda value: f"json_quote({value})",
    to_int=lambda value: f"CAST({value} AS INTEGER)",
    truncate=lambda value: f"CAST({value} AS INTEGER)",
    to_float=lambda value: f"CAST({value} AS REAL)",
    to_text=lambda value: f"CAST({value} AS TEXT)",
    shape_ok=_sqlite_shape,
    unreadable=lambda body: f"NOT json_valid({body}) OR json_type({body}) != 'array'",
    iso_time=lambda moment, seconds, micros: (
        f"('\"' || strftime('%Y-%m-%dT%H:%M:%S', {seconds}, 'unixepoch')"
        f" || '.' || printf('%03d', {micros} / 1000) || 'Z\"')"
    ),
)

_POSTGRES = _Dialect(
    element=lambda body, index: f"((({body})::json -> {index})::text)",
    element_text=lambda body, index: f"(({body})::json ->> {index})",
    quote=lambda value: f"to_json(({value})::text)::text",
    to_int=lambda value: f"(({value})::numeric::bigint)",
    truncate=lambda value: f"(trunc(({value})::double precision)::bigint)",
    to_float=lambda value: f"(({value})::double precision)",
    to_text=lambda value: f"(({value})::text)",
    shape_ok=_postgres_shape,
    unreadable=lambda body: f"(strpos({body}, '\\u0000') > 0 OR {body} NOT LIKE '[%]')",
    iso_time=lambda moment, seconds, micros: (
        f"('\"' || to_char(to_timestamp({seconds}) AT TIME ZONE 'UTC',"
        f" 'YYYY-MM-DD\"T\"HH24:MI:SS') || '.' || lpad(({micros} / 1000)::text, 3, '0')"
        " || 'Z\"')"
    ),
)

# Compiled once per templates object (each API has one, made at import).
_COMPILED: dict[tuple[str, int, str, str], tuple[Templates, str]] = {}


def _compiled(dialect: str, templates: Templates, body: str, ident: str) -> str:
    key = (dialect, id(templates), body, ident)
    found = _COMPILED.get(key)
    if found is None or found[0] is not templates:
        chosen = _SQLITE if dialect == "sqlite" else _POSTGRES
        found = _COMPILED[key] = (templates, chosen.item(templates, body, ident))
    return found[1]


_BUILT: dict[tuple[int, int], tuple[Templates, str]] = {}


def per_templates(templates: Templates, build: Callable[[Templates], str]) -> str:
    """``build(templates)``, made once per templates object (each API has one)."""
    key = (id(templates), id(build))
    found = _BUILT.get(key)
    if found is None or found[0] is not templates:
        found = _BUILT[key] = (templates, build(templates))
    return found[1]


def sqlite_item(templates: Templates, body: str = "body", ident: str = "id") -> str:
    """The SQLite expression of a row's item (NULL: build it in Python)."""
    return _compiled("sqlite", templates, body, ident)


def postgres_item(templates: Templates, body: str = "body", ident: str = "id") -> str:
    """The PostgreSQL expression of a row's item (NULL: build it in Python)."""
    return _compiled("postgres", templates, body, ident)
