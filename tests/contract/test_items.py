"""Batch items built by each store from the stored text are, byte for byte, what the
clients build in Python (transport/track.py, transport/pipelines.py): any name,
identifier, time and data the emit checks let through."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cio_logging.events import CALLS, Event
from cio_logging.store import BatchQuery, EventLog, WriteAheadLog, encode_row
from cio_logging.templates import Templates
from cio_logging.testing import InMemoryStore
from cio_logging.transport.pipelines import TEMPLATES as PIPELINES_TEMPLATES
from cio_logging.transport.pipelines import call_text
from cio_logging.transport.track import TEMPLATES as TRACK_TEMPLATES
from cio_logging.transport.track import item_text

# Text as a person could log it: any character but a lone surrogate (refused at emit).
# Names and identifiers also go in columns of their own, and PostgreSQL text cannot
# hold NUL (fleet mode's own tests cover such rows): NUL only in the data here.
TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=24
)
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24)
DATA = st.dictionaries(
    ANY_TEXT,
    st.one_of(
        ANY_TEXT,
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.lists(TEXT, max_size=3),
    ),
    max_size=4,
)
PERSON_CALLS = sorted(CALLS)


@st.composite
def events(draw: st.DrawFn) -> Event:
    """A call as emit would accept it, with times that probe the ISO rendering."""
    call = draw(st.sampled_from(PERSON_CALLS))
    anonymous = call in ("event", "page", "screen") and draw(st.booleans())
    logged_at = draw(
        st.one_of(
            st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
            st.integers(0, 4_102_444_800).map(lambda s: s + 0.9995),
            st.integers(0, 4_102_444_800).map(lambda s: s + 0.0005),
        )
    )
    given_time = draw(st.booleans())
    timestamp = draw(st.integers(0, 4_102_444_800)) if given_time else int(logged_at)
    name = call if call not in ("event", "page", "screen") else draw(TEXT)
    return Event(
        id=str(uuid.uuid4().int % 10**26).rjust(26, "0"),
        name=name,
        customer_id=None if anonymous else draw(TEXT),
        anonymous_id=draw(TEXT) if anonymous else None,
        data_json=json.dumps(draw(DATA), ensure_ascii=False, separators=(",", ":")),
        timestamp=timestamp,
        logged_at=logged_at,
        call=call,
    )


@pytest.fixture(
    scope="module", params=["local", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def log(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EventLog]:
    tmp_path: Path = tmp_path_factory.mktemp("items")
    if request.param == "local":
        wal = WriteAheadLog(tmp_path / "wal")
        yield wal
        wal.close()
    elif request.param == "memory":
        yield InMemoryStore()
    else:
        from cio_logging.store.postgres import Database, PostgresLog

        database = Database(request.getfixturevalue("pg_cluster").url())
        workspace = f"site-{uuid.uuid4().hex[:8]}@https://track.example"
        postgres = PostgresLog(database, workspace, WriteAheadLog(tmp_path / "spill"))
        yield postgres
        postgres.close()
        database.close()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(events(), min_size=1, max_size=6))
def test_the_database_builds_each_item_as_python_does(log: EventLog, batch: list[Event]) -> None:
    log.append_rows([encode_row(event) for event in batch])
    query = BatchQuery(now=5e9, limit=100, budget=10**9, item_limit=10**9)
    try:
        apis: list[tuple[Templates, Callable[[Event], str]]] = [
            (TRACK_TEMPLATES, item_text),
            (PIPELINES_TEMPLATES, call_text),
        ]
        for templates, render in apis:
            # A merge waits for its people's earlier calls to leave: read batch after
            # batch (taking each out), then put them all back for the other API.
            items: dict[str, str] = {}
            while built := log.next_batch(query, templates):
                items.update(zip(built.ids, built.items, strict=True))
                log.acknowledge(built.positions)
            assert sorted(items) == sorted(event.id for event in batch)
            log.append_rows([encode_row(event) for event in batch])
            for event in batch:
                item = items[event.id]
                if (event.call, event.customer_id is not None) not in templates:
                    assert item == ""  # Python builds it (or sends it alone)
                elif item == "" and "\\u0000" in encode_row(event)[2]:
                    assert type(log).__name__ == "PostgresLog"  # it cannot read such text
                else:
                    assert item == render(event), event
    finally:
        while leftover := log.next_batch(query, TRACK_TEMPLATES):
            log.acknowledge(leftover.positions)
