"""Every Customer.io call, exactly as logged (issue 22), over real HTTPS to the simulator on
both APIs: values arrive as logged or are refused at emit; sizes are counted on the bytes
sent, at the boundary; every request validates against the published specs; the calls
the SDKs have (devices, merges, relationships, group, alias) go durably and in order; the
72-hour window is visible; host names with underscores and adapters work."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cio_logging import (
    CioAdapter,
    CustomerIOHandler,
    cio_add_device,
    cio_add_relationships,
    cio_alias,
    cio_delete,
    cio_delete_device,
    cio_delete_relationships,
    cio_event,
    cio_group,
    cio_identify,
    cio_merge,
    cio_page,
    cio_screen,
    cio_suppress,
    cio_unsuppress,
)
from cio_logging.simulator import AcceptedEvent, TrackAPISimulator
from cio_logging.wire import MAX_CALL_BYTES, REQUEST_BYTES_LIMIT

from ..helpers import (
    APIS,
    PROJECT_ROOT,
    HandlerFactory,
    handler_settings,
    padding_for,
    run_cli,
    wait_for,
)
from ..spec_check import (
    ANONYMOUS_EVENTS_REQUEST,
    BATCH_BODY,
    EVENTS_REQUEST,
    PIPELINES_BATCH_BODY,
    PIPELINES_CALLS,
    PIPELINES_OVERLAPS,
    PIPELINES_SEMANTIC,
    TRACK_OVERLAPS,
    Spec,
    load_pipelines_spec,
    load_spec,
)

D = decimal.Decimal
COMPACT = {"ensure_ascii": False, "separators": (",", ":"), "allow_nan": False}


@pytest.fixture
def logger() -> logging.Logger:
    logger = logging.getLogger(f"test.every_call.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


@pytest.fixture
def attached(
    make_handler: HandlerFactory, logger: logging.Logger
) -> Iterator[tuple[logging.Logger, CustomerIOHandler]]:
    handler = make_handler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def delivered(handler: CustomerIOHandler) -> dict[str, Any]:
    """Flush; the handler's status once nothing waits."""
    handler.flush()
    status = handler.status()
    assert status["queued"] == 0, status
    return status


def only(simulator: TrackAPISimulator, person: str) -> AcceptedEvent:
    (call,) = simulator.history(person)
    return call


@pytest.mark.parametrize("api", APIS)
class TestValuesExactlyAsLogged:
    def test_decimals_arrive_as_their_exact_value_or_are_refused(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
    ) -> None:
        """The issue's two Decimals were sent as 1.2345678901234567e+19 and 0.0."""
        log, handler = attached
        log.info("exact", extra=cio_event("d-1", price=D("9.99"), big=D("12345678901234567890")))
        log.info("x", extra=cio_event("d-2", v=D("12345678901234567890.12345678901234567890")))
        log.info("x", extra=cio_event("d-3", v=D("1e-400")))
        status = delivered(handler)
        assert only(simulator, "d-1").raw_data == '{"price":9.99,"big":12345678901234567890}'
        assert (simulator.history("d-2"), simulator.history("d-3")) == ([], [])
        assert status["refused"] == {"decimal_not_exact": 2}
        assert status["dropped"] == {"invalid_event": 2}

    def test_keys_that_collide_as_text_are_refused_at_emit(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
    ) -> None:
        """{1: 'int-one', '1': 'str-one'} went out with the key "1" twice."""
        log, handler = attached
        log.info("keys", extra=cio_event("k-1", data={1: "int-one", "1": "str-one"}))
        log.info("keys", extra=cio_event("k-2", data={1: "int-one", 2.5: "x", None: "n"}))
        status = delivered(handler)
        assert simulator.history("k-1") == []
        assert only(simulator, "k-2").raw_data == '{"1":"int-one","2.5":"x","null":"n"}'
        assert status["refused"] == {"key_collision": 1}
        assert status["dead_letters"] == 0

    def test_a_record_that_cannot_become_a_call_is_the_librarys_warning(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
        api: str,
    ) -> None:
        """Not logging's "--- Logging error ---" traceback and a queue_error count."""

        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("personal data")

        class BadZone(dt.tzinfo):
            def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta:
                raise RuntimeError("personal data")

            def dst(self, moment: dt.datetime | None) -> dt.timedelta:
                raise RuntimeError("personal data")

            def tzname(self, moment: dt.datetime | None) -> str:
                return "X"

        # Made here, not in a fixture: pytest gives its own capture handler to every
        # logger that does not propagate when the test starts, and it would raise on
        # the records this test logs.
        handler = make_handler()
        log = logging.getLogger(f"test.every_call.records.{api}")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            log.info("%s %s", "only-one", extra=cio_event("r-1"))
            log.info("%s", Unprintable(), extra=cio_event("r-2"))
            log.info(
                "x", extra=cio_event("r-3", timestamp=dt.datetime(2026, 1, 2, tzinfo=BadZone()))
            )
            log.info("ok", extra=cio_event("r-4"))
            status = delivered(handler)
        assert [call.customer_id for call in simulator.accepted] == ["r-4"]
        assert status["dropped"] == {"invalid_event": 3}
        assert status["refused"] == {"message_unformattable": 2, "timestamp_unreadable": 1}
        warnings = [r.getMessage() for r in caplog.records if "refused at emit" in r.getMessage()]
        assert len(warnings) == 3
        assert "personal data" not in caplog.text
        assert "--- Logging error ---" not in capsys.readouterr().err


def _identify_padded(padding: str) -> dict[str, Any]:
    return cio_identify("size-ü", bio=padding)


def _event_padded(padding: str) -> dict[str, Any]:
    return cio_event("size-ü", name="sized", bio=padding)


def _control_padded(padding: str) -> dict[str, Any]:
    return cio_event("\x02" * 150, name="\x03" * 100, bio=padding)


def _numbered(person: str) -> Any:
    return lambda padding: cio_event(person, name="b", pad=padding)


@pytest.mark.parametrize("api", APIS)
class TestSizesAsTheServerCountsThem:
    """The simulator counts the bytes it receives; the handler counts the same bytes."""

    @pytest.mark.parametrize("kind", ["two-byte", "escaped"])
    def test_a_call_of_32_768_bytes_arrives_and_32_769_is_refused_at_emit(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
        kind: str,
    ) -> None:
        """Once refused as "about 33,190 bytes": the check assumed a 512-byte frame."""
        make = _identify_padded if api == "track" else _event_padded
        log, handler = attached
        log.info("sized", extra=make(padding_for(make, api, MAX_CALL_BYTES, kind)))
        log.info("sized", extra=make(padding_for(make, api, MAX_CALL_BYTES + 1, kind)))
        status = delivered(handler)
        (call,) = simulator.accepted
        assert len(call.raw.encode()) == MAX_CALL_BYTES  # counted by the receiver
        assert status["refused"] == {"call_too_large": 1}
        assert status["dead_letters"] == 0

    def test_control_characters_are_counted_six_bytes_each(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
    ) -> None:
        """A name of 100 and an identifier of 150 control characters went out as 33,702
        bytes, got a 400 and were dead-lettered. On Track the larger one goes by v1."""
        log, handler = attached
        for target in (MAX_CALL_BYTES, MAX_CALL_BYTES + 1):
            log.info("c", extra=_control_padded(padding_for(_control_padded, api, target)))
        status = delivered(handler)
        assert status["dead_letters"] == 0
        routes = [call.route for call in simulator.accepted]
        if api == "track":
            assert routes == ["v2_batch", "v1"]
        else:
            assert routes == ["pipelines_batch"]
            assert status["refused"] == {"call_too_large": 1}

    def test_request_bodies_stay_under_500_000_bytes(
        self, simulator: TrackAPISimulator, queue_dir: Path, api: str
    ) -> None:
        """A body of 499,999 bytes goes in one request; one byte more takes two. The old
        budget (507,904) sent 500,000 and got a 400 from a server reading 500 KB as
        500,000 bytes."""
        for extra_byte, requests in ((0, 1), (1, 2)):
            simulator.clear()
            make = [_numbered(f"b{extra_byte}-{n:02d}") for n in range(50)]
            paddings = [padding_for(make[n], api, 10_000) for n in range(49)]
            last = REQUEST_BYTES_LIMIT - 1 - (12 + 49 * 10_000 + 49) + extra_byte
            paddings.append(padding_for(make[49], api, last))
            # Logged with no sender, then sent by one that reads them all at once.
            writer = CustomerIOHandler(
                **handler_settings(simulator, queue_dir, api=api, deliver="none")
            )
            for n, padding in enumerate(paddings):
                record = logging.makeLogRecord({"msg": "b", "cio": make[n](padding)["cio"]})
                writer.handle(record)
            writer.close()
            sender = CustomerIOHandler(**handler_settings(simulator, queue_dir, api=api))
            try:
                assert delivered(sender)["dead_letters"] == 0
            finally:
                sender.close()
            sizes = [request.body_bytes for request in simulator.requests]
            assert all(request.status == 200 for request in simulator.requests)
            assert len(sizes) == requests, sizes
            assert max(sizes) == REQUEST_BYTES_LIMIT - 1 if requests == 1 else max(sizes) < 500_000
            assert len(simulator.accepted) == 50


class TestTrackV1Bodies:
    """v1 bodies go compact and UTF-8: the SDK's ensure_ascii and ", " sent 100,000 bytes
    of data as 300,089, and a server counting bytes refused them."""

    @pytest.mark.parametrize(
        "data",
        [
            pytest.param({"text": "é" * 49_994 + "x"}, id="all-two-byte"),
            pytest.param({f"k{n}": n for n in range(7_000)}, id="7000-small-keys"),
        ],
    )
    def test_data_of_100_000_bytes_arrives_by_v1_as_counted(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        data: dict[str, Any],
    ) -> None:
        log, handler = attached
        text = json.dumps(data, **COMPACT)  # type: ignore[arg-type]
        assert len(text.encode()) <= 100_000
        log.info("big", extra=cio_event("v1-1", data=data))
        log.info("big", extra=cio_event(anonymous_id="v1-anon", data=data))
        assert delivered(handler)["dead_letters"] == 0
        for person, route in (("v1-1", "v1"), ("v1-anon", "v1_anonymous")):
            call = only(simulator, person)
            assert (call.route, call.raw_data) == (route, text)

    def test_data_one_byte_over_is_refused_at_emit(
        self, attached: tuple[logging.Logger, CustomerIOHandler], simulator: TrackAPISimulator
    ) -> None:
        log, handler = attached
        # {"text":"..."} takes 11 bytes around the text.
        log.info("big", extra=cio_event("v1-2", text="é" * 49_994 + "xx"))  # 100,001
        log.info("big", extra=cio_event("v1-3", text="é" * 49_994 + "x"))  # 100,000
        status = delivered(handler)
        assert [call.customer_id for call in simulator.accepted] == ["v1-3"]
        assert status["dropped"] == {"invalid_event": 1}

    def test_an_identified_screen_view_over_32_kb_is_refused_at_emit(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """It went to v1 as type screen without anonymous_id, which no alternative of the
        spec's eventsRequest accepts: a strict server answered 400."""
        log, handler = attached
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            log.info("feed", extra=cio_screen("s-1", bio="x" * 40_000))
            log.info("feed", extra=cio_page("s-2", bio="x" * 40_000))
            log.info("feed", extra=cio_screen(anonymous_id="s-3", bio="x" * 40_000))
            status = delivered(handler)
        assert {
            (call.customer_id or call.anonymous_id, call.route) for call in simulator.accepted
        } == {("s-2", "v1"), ("s-3", "v1_anonymous")}
        assert status["refused"] == {"call_too_large": 1}
        assert "v1 takes a screen view only for an anonymous person" in caplog.text


def _every_call(api: str) -> list[dict[str, Any]]:
    """One of every call ``api`` carries, in its known and anonymous forms, small and by
    every route (v1 for large Track events and page views)."""
    calls = [
        cio_identify("p-1", email="a@example.com", plan="pro"),
        cio_event("p-1", amount=D("9.99"), when=dt.date(2026, 1, 2)),
        cio_event(anonymous_id="anon-1", source="ads"),
        cio_page("p-1", "/pricing", referrer="ads"),
        cio_page(anonymous_id="anon-1", name="/home"),
        cio_screen("p-1", "feed", build="7"),
        cio_screen(anonymous_id="anon-1", name="feed"),
        cio_add_device("p-1", "tok-1", "ios", last_used=1_764_300_000, app_version="2.1"),
        cio_delete_device("p-1", "tok-1", platform="ios"),
        cio_suppress("p-2"),
        cio_unsuppress("p-2"),
        cio_delete("p-2"),
    ]
    if api == "track":
        calls += [
            cio_event("p-1", name="large", blob="x" * 40_000),
            cio_page("p-1", "/large", blob="x" * 40_000),
            cio_add_relationships(
                "p-1",
                [("1", "acme"), {"cio_object_id": "ob1", "relationship_attributes": {"r": 1}}],
            ),
            cio_delete_relationships("p-1", [("1", "acme")]),
            cio_merge("p-1", "p-3"),
        ]
    else:
        calls += [
            cio_identify(anonymous_id="anon-1", createdAt="2026-01-02T03:04:05Z"),
            cio_group("p-1", "acme", object_type_id="1", relationship_attributes={"r": 1}, n=5),
            cio_group(anonymous_id="anon-1", group_id="acme"),
            cio_alias("p-1", "anon-1"),
        ]
    return calls


@pytest.mark.parametrize("api", APIS)
class TestShapesTheSpecsAccept:
    def test_every_request_validates_against_the_published_spec(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        published_specs: dict[str, Spec],
        api: str,
    ) -> None:
        """Read literally, except at the places listed in spec_check.*_OVERLAPS."""
        simulator.record_bodies = True
        log, handler = attached
        calls = _every_call(api)
        for tag in calls:
            log.info("call", extra=tag)
        status = delivered(handler)
        assert status["dead_letters"] == 0
        assert status["dropped"] == {}
        assert len(simulator.accepted) == len(calls)
        spec = published_specs[api]
        schemas = {
            "/api/v2/batch": BATCH_BODY,
            "/api/v1/events": ANONYMOUS_EVENTS_REQUEST,
            "/v1/batch": PIPELINES_BATCH_BODY,
            "/v1/alias": PIPELINES_CALLS["alias"],
        }
        semantic = {
            "User Deleted": "delete",
            "User Suppressed": "suppress",
            "User Unsuppressed": "unsuppress",
            "Device Created or Updated": "add_device",
            "Device Deleted": "delete_device",
        }
        for request in simulator.requests:
            assert request.status == 200
            schema = schemas.get(request.path, EVENTS_REQUEST)
            assert spec.errors(schema, request.payload) == [], request.payload
            for call in (request.payload.get("batch") or []) if api == "pipelines" else []:
                if call.get("event") in semantic:
                    own = PIPELINES_SEMANTIC[semantic[call["event"]]]
                    assert spec.errors(own, call) == [], call
                if call["type"] == "identify":
                    assert "context" not in call  # the spec's identify refuses any context
        assert {call.route for call in simulator.accepted} == (
            {"v2_batch", "v1", "v1_anonymous"}
            if api == "track"
            else {"pipelines_batch", "pipelines_alias"}
        )

    def test_the_listed_overlaps_are_the_only_ones_needed(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        published_specs: dict[str, Spec],
        api: str,
    ) -> None:
        """Each place listed is needed: read literally there, a request the handler sends
        is refused. (Everywhere else the test above reads the spec literally.)"""
        simulator.record_bodies = True
        log, handler = attached
        log.info("viewed", extra=cio_page(anonymous_id="anon-1", name="/home"))
        log.info("bought", extra=cio_event("p-1"))
        delivered(handler)
        literal = load_spec() if api == "track" else load_pipelines_spec(literal=True)
        assert literal is not None
        places = TRACK_OVERLAPS if api == "track" else PIPELINES_OVERLAPS
        assert len(places) == 1
        path = "/api/v1/events" if api == "track" else "/v1/batch"
        schema = ANONYMOUS_EVENTS_REQUEST if api == "track" else PIPELINES_BATCH_BODY
        sent = [request.payload for request in simulator.requests if request.path == path]
        assert any(literal.errors(schema, payload) for payload in sent)
        assert all(published_specs[api].errors(schema, payload) == [] for payload in sent)


@pytest.mark.parametrize("api", APIS)
class TestTheMissingCalls:
    def test_each_call_arrives_on_the_api_that_carries_it(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
    ) -> None:
        log, handler = attached
        log.info("d", extra=cio_add_device("m-1", "tok-1", "android", push_enabled="true"))
        log.info("d", extra=cio_delete_device("m-1", "tok-1"))
        if api == "track":
            log.info("r", extra=cio_add_relationships("m-1", [("1", "acme")]))
            log.info("r", extra=cio_delete_relationships("m-1", [("1", "acme")]))
            log.info("m", extra=cio_merge("m-1", "m-2"))
            expected = [
                "add_device",
                "delete_device",
                "add_relationships",
                "delete_relationships",
                "merge",
            ]
        else:
            log.info("g", extra=cio_group("m-1", "acme", object_type_id="1", name="Acme"))
            log.info("a", extra=cio_alias("m-1", "anon-9"))
            expected = ["add_device", "delete_device", "group", "alias"]
        assert delivered(handler)["dead_letters"] == 0
        assert [call.call for call in simulator.history("m-1")] == expected
        by_call = {call.call: call for call in simulator.accepted}
        if api == "track":
            assert by_call["add_device"].data == {
                "token": "tok-1",
                "platform": "android",
                "attributes": {"push_enabled": "true"},
            }
            assert by_call["add_relationships"].data == {
                "cio_relationships": [{"identifiers": {"object_type_id": "1", "object_id": "acme"}}]
            }
            assert by_call["merge"].data == {"primary": {"id": "m-1"}, "secondary": {"id": "m-2"}}
        else:
            assert by_call["add_device"].data == {
                "device": {"token": "tok-1", "type": "android"},
                "properties": {"push_enabled": "true"},
            }
            assert json.loads(by_call["group"].raw)["groupId"] == "acme"
            assert by_call["group"].data == {"name": "Acme", "object_type_id": "1"}
            assert by_call["alias"].data == {"previousId": "anon-9"}

    def test_a_call_the_api_cannot_carry_is_refused_at_emit(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        api: str,
    ) -> None:
        log, handler = attached
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            if api == "track":
                log.info("g", extra=cio_group("u-1", "acme"))
                log.info("a", extra=cio_alias("u-1", "anon-1"))
                log.info("d", extra=cio_add_device("u-1", "t", "ios") | {})
                log.info("i", extra=cio_identify(anonymous_id="anon-1"))
            else:
                log.info("m", extra=cio_merge("u-1", "u-2"))
                log.info("r", extra=cio_add_relationships("u-1", [("1", "acme")]))
                log.info("r", extra=cio_delete_relationships("u-1", [("1", "acme")]))
                log.info(
                    "d",
                    extra={
                        "cio": {
                            "anonymous_id": "a",
                            "call": "delete_device",
                            "data": {"token": "t"},
                        }
                    },
                )
            status = delivered(handler)
        if api == "track":
            assert status["refused"] == {"unsupported_call": 2, "anonymous_person_call": 1}
            assert [call.call for call in simulator.accepted] == ["add_device"]
        else:
            assert status["refused"] == {"unsupported_call": 3, "anonymous_person_call": 1}
            assert simulator.accepted == []
        assert "rule unsupported_call" in caplog.text

    def test_new_calls_are_essential(self, make_handler: HandlerFactory, api: str) -> None:
        """Committed before emit returns, and kept at the essential-only level."""
        handler = make_handler(degradation="essential_only", deliver="none")
        log = logging.getLogger(f"test.every_call.essential.{api}")
        log.propagate = False
        log.addHandler(handler)
        try:
            log.warning("d", extra=cio_add_device("e-1", "t", "ios"))
            log.warning("e", extra=cio_event("e-1"))
            status = handler.status()
        finally:
            log.removeHandler(handler)
        assert (status["enqueued"], status["queued"]) == (1, 1)
        assert status["dropped"] == {"degradation_essential_only": 1}


class TestMergeOrder:
    """A merge goes after every earlier call of both people, before the later calls of
    the person merged away."""

    def test_a_merge_waits_for_the_primarys_earlier_call(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, logger: logging.Logger
    ) -> None:
        self._merge_waits(make_handler(max_in_flight=4, max_backoff=0.5), simulator, logger)

    @pytest.mark.postgres
    def test_in_the_fleet_store_too(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        logger: logging.Logger,
        pg_url: str,
    ) -> None:
        handler = make_handler(max_in_flight=4, max_backoff=0.5, queue_url=pg_url)
        self._merge_waits(handler, simulator, logger)

    @staticmethod
    def _merge_waits(
        handler: CustomerIOHandler, simulator: TrackAPISimulator, logger: logging.Logger
    ) -> None:
        logger.addHandler(handler)
        try:
            simulator.fail(503, count=1)  # the primary's identify waits for a retry
            logger.info("identify", extra=cio_identify("primary-1", plan="pro"))
            deadline = time.monotonic() + 10
            while not simulator.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            logger.info("before", extra=cio_event("secondary-1", step=1))
            logger.info("merge", extra=cio_merge("primary-1", "secondary-1"))
            logger.info("after", extra=cio_event("secondary-1", step=2))
            # flush() does not wait for a retry that is not due yet: ask until it says
            # every call has left the queue ("queued == 0" misses calls not committed).
            assert wait_for(lambda: handler.flush(1.0), timeout=30)
            status = handler.status()
        finally:
            logger.removeHandler(handler)
        assert status["dead_letters"] == 0
        order = [(call.call, call.customer_id) for call in simulator.accepted]
        merged = order.index(("merge", "secondary-1"))
        assert order.index(("identify", "primary-1")) < merged
        assert order.index(("event", "secondary-1")) < merged
        assert [call.data.get("step") for call in simulator.history("secondary-1")] == [
            1,
            None,
            2,
        ]


@pytest.fixture
def underscore_host() -> Iterator[str]:
    """``my_host`` resolves to the loopback address in this process, as a docker-compose
    service name would in its network (the connection, TLS and HTTP are real)."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return resolve("127.0.0.1" if host == "my_host" else host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        yield "my_host"
    finally:
        socket.getaddrinfo = resolve


@pytest.mark.parametrize("api", APIS)
class TestTraps:
    def test_a_host_name_with_an_underscore(
        self, underscore_host: str, tmp_path: Path, logger: logging.Logger, api: str
    ) -> None:
        with TrackAPISimulator(state_dir=tmp_path / "sim", server_names=[underscore_host]) as sim:
            options = handler_settings(sim, tmp_path / "queue", api=api)
            options["track_url"] = f"https://{underscore_host}:{sim.port}"
            handler = CustomerIOHandler(**options)
            logger.addHandler(handler)
            try:
                logger.info("purchase", extra=cio_event("u-1"))
                assert delivered(handler)["delivered"] == 1
            finally:
                logger.removeHandler(handler)
                handler.close()
            assert [call.customer_id for call in sim.accepted] == ["u-1"]

    def test_the_adapter_keeps_the_tag_the_stdlib_one_drops(
        self,
        attached: tuple[logging.Logger, CustomerIOHandler],
        simulator: TrackAPISimulator,
        api: str,
    ) -> None:
        log, handler = attached
        seen: list[logging.LogRecord] = []

        def keep(record: logging.LogRecord) -> bool:
            seen.append(record)
            return True

        log.addFilter(keep)
        CioAdapter(log, {"tenant": "acme"}).info("kept", extra=cio_event("a-1"))
        logging.LoggerAdapter(log, {"tenant": "acme"}).info("lost", extra=cio_event("a-2"))
        delivered(handler)
        assert [call.customer_id for call in simulator.accepted] == ["a-1"]
        assert [getattr(record, "tenant", None) for record in seen] == ["acme", "acme"]
        assert not hasattr(seen[1], "cio")  # what the README warns about


class TestThe72HourWindow:
    @pytest.mark.parametrize("api", APIS)
    def test_sending_events_past_72_hours_warns_and_is_counted(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        api: str,
    ) -> None:
        """Logged with no sender, then sent by one that reads them all at once: one
        delivery, one warning with its count (warnings come at most once a minute)."""
        now = time.time()
        writer = make_handler(deliver="none")
        for hours, name in ((73, "late"), (80, "late"), (71, "fresh")):
            tag = cio_event("w-1", timestamp=now - hours * 3600)["cio"]
            writer.handle(logging.makeLogRecord({"msg": name, "cio": tag}))
        writer.close()
        reader = InMemoryMetricReader()
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            handler = make_handler(meter_provider=MeterProvider(metric_readers=[reader]))
            delivered(handler)
        assert len(simulator.accepted) == 3
        (warning,) = [r.getMessage() for r in caplog.records if "72-hour" in r.getMessage()]
        assert warning.startswith("2 event(s) about to be sent are past Customer.io's 72-hour")
        assert "80.0 h ago" in warning
        data = reader.get_metrics_data()
        counted: list[Any] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "cio.events.past_window":
                        counted += [point.value for point in metric.data.data_points]  # type: ignore[union-attr]
        assert counted == [2]

    def test_status_and_the_cli_show_the_oldest_age(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        handler = CustomerIOHandler(**handler_settings(simulator, queue_dir, deliver="none"))
        try:
            assert handler.status()["oldest_age"] is None
            record = logging.makeLogRecord({"msg": "old", "cio": cio_event("o-1")["cio"]})
            record.created -= 75 * 3600  # logged 75 hours ago, waiting since
            handler.handle(record)
            handler.commit()
            assert 75 * 3600 <= handler.status()["oldest_age"] < 75 * 3600 + 60
        finally:
            handler.close()
        command = [sys.executable, "-m", "cio_logging.cli", "status", "--queue-dir", str(queue_dir)]
        shown = subprocess.run(
            command, capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, check=True
        )
        assert "(oldest 3d 3h: past Customer.io's 72-hour window" in shown.stdout
        as_json = subprocess.run(
            [*command, "--json"], capture_output=True, text=True, timeout=60, check=True
        )
        assert json.loads(as_json.stdout)["oldest_past_window"] is True

    def test_dlq_replay_says_how_many_are_past_the_window_before_it_sends(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        """Dead letters stamped 80 hours ago: the count comes before anything is sent (here
        every request fails, and the count is still said), in the dry run too."""
        simulator.poison("refused")
        handler = make_handler()
        log = logging.getLogger("test.every_call.replay")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            for number, hours in enumerate((80, 80, 1)):
                stamp = time.time() - hours * 3600
                log.info("refused", extra=cio_event(f"late-{number}", timestamp=stamp))
            assert wait_for(lambda: handler.status()["dead_letters"] == 3)
        finally:
            log.removeHandler(handler)
            handler.close()
        simulator.clear_poison()
        line = "2 of the 3 selected entr(ies) are past Customer.io's 72-hour window"
        dry = run_cli(simulator, queue_dir, "dlq", "replay", "--dry-run")
        assert line in dry.stdout
        report = json.loads(
            run_cli(simulator, queue_dir, "dlq", "replay", "--dry-run", "--json").stdout
        )
        assert report["past_window"] == 2
        simulator.fail(503)
        failing = run_cli(simulator, queue_dir, "dlq", "replay", "--timeout", "2")
        assert line in failing.stderr
        assert simulator.accepted == []


# JSON-compatible data, as logging it: str keys, every JSON value, with the awkward parts
# generated (control characters, astral characters, integers past 2**64, doubles at the
# edges, nesting).
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=["Cs"]), max_size=6), children, max_size=4
        )
    ),
    max_leaves=15,
)
_json_data = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8), _json_values, max_size=6
)


_TRACK_EVENT_STRINGS = ("recipient", "from_address", "reply_to")


@pytest.mark.parametrize("api", APIS)
def test_arbitrary_json_data_arrives_byte_for_byte(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, api: str
) -> None:
    """Whatever JSON-compatible data is logged arrives as exactly the compact UTF-8 JSON
    text the README says it becomes, on both APIs and by every route (on Track also
    padded past 32 KB, by v1): the receiver's bytes, not a decoding."""
    handler = make_handler()
    events = logging.getLogger(f"test.every_call.property.{api}")
    events.propagate = False
    events.addHandler(handler)
    expected: dict[str, str] = {}
    refused: list[str] = []

    def log(person: str, data: dict[str, Any]) -> None:
        # The one rule of the docs' that JSON data can break: on the Track API an
        # event's recipient, from_address and reply_to must be strings (Hypothesis
        # draws such keys from the library's own source).
        if api == "track" and any(
            key in data and not isinstance(data[key], str) for key in _TRACK_EVENT_STRINGS
        ):
            refused.append(person)
        else:
            expected[person] = json.dumps(data, **COMPACT)  # type: ignore[arg-type]
        events.info("property", extra=cio_event(person, data=data))

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=_json_data)
    def log_one(data: dict[str, Any]) -> None:
        person = f"prop-{len(expected) + len(refused)}"
        log(person, data)
        if api == "track":  # the same data by v1 too, padded past a v2 item's 32 KB
            log(f"{person}-v1", {"padding": "x" * MAX_CALL_BYTES, **data})

    try:
        log_one()
        status = delivered(handler)
    finally:
        events.removeHandler(handler)
    assert status["dead_letters"] == 0
    assert status["refused"] == ({"reserved_attribute": len(refused)} if refused else {})
    received = {call.customer_id: call.raw_data for call in simulator.accepted}
    assert received == expected
