"""What each Python value becomes on the wire, and what is refused: the README's table of
conversions, checked value by value, with no network. Nothing changes silently: a value
is either encoded as the table says or refused at emit under a named rule."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cio_logging import (
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
from cio_logging.errors import InvalidEventError
from cio_logging.events import Event, encode_data, event_from_record

D = decimal.Decimal


def _record(extra: dict[str, Any], message: str = "msg", args: Any = ()) -> logging.LogRecord:
    return logging.getLogger("t").makeRecord(
        "t", logging.INFO, "f.py", 1, message, args, None, extra=extra
    )


def _event(extra: dict[str, Any], message: str = "msg", args: Any = ()) -> Event:
    event = event_from_record(_record(extra, message, args))
    assert event is not None
    return event


def _refused_rule(extra: dict[str, Any], message: str = "msg", args: Any = ()) -> str:
    with pytest.raises(InvalidEventError) as refused:
        event_from_record(_record(extra, message, args))
    return refused.value.rule


class _Color(enum.IntEnum):
    RED = 1


class _Broken(Mapping[str, Any]):
    """A Mapping whose iteration raises, as a lazy ORM row might."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("secret-value")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("secret-value")

    def __len__(self) -> int:
        return 1


class _RaisingZone(dt.tzinfo):
    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta:
        raise RuntimeError("secret-value")

    def dst(self, moment: dt.datetime | None) -> dt.timedelta:
        raise RuntimeError("secret-value")

    def tzname(self, moment: dt.datetime | None) -> str:
        return "X"


class _RaisingStr:
    def __str__(self) -> str:
        raise RuntimeError("secret-value")


class TestConversionTable:
    """Each row of the table: the JSON text a value becomes."""

    @pytest.mark.parametrize(
        ("value", "text"),
        [
            ("Zoë 東京 🎉", '"Zoë 東京 🎉"'),
            ('tab\tnul\x00quote"back\\', '"tab\\tnul\\u0000quote\\"back\\\\"'),
            (2**70, str(2**70)),
            (-(2**64) - 1, str(-(2**64) - 1)),
            (_Color.RED, "1"),
            (0.1, "0.1"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (True, "true"),
            (None, "null"),
            ([1, "a"], '[1,"a"]'),
            ((1, 2), "[1,2]"),
            (frozenset({"only"}), '["only"]'),
            (OrderedDict([("b", 1), ("a", 2)]), '{"b":1,"a":2}'),
            (MappingProxyType({"k": "v"}), '{"k":"v"}'),
            (
                {1: "a", 2.5: "b", None: "c", False: "d"},
                '{"1":"a","2.5":"b","null":"c","false":"d"}',
            ),
            (dt.datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=dt.UTC), "1767323045"),
            (dt.datetime(2026, 1, 2, 3, 4, 5), "1767323045"),  # naive: read as UTC
            (dt.date(2026, 1, 2), '"2026-01-02"'),
            (uuid.UUID(int=1), '"00000000-0000-0000-0000-000000000001"'),
            (D("9.99"), "9.99"),
            (D("0.1"), "0.1"),
            (D("1.10"), "1.1"),  # the same number
            (D("1E+2"), "100"),
            (D("-0"), "0"),
            (D("12345678901234567890"), "12345678901234567890"),  # integral: exact digits
        ],
    )
    def test_becomes(self, value: Any, text: str) -> None:
        assert encode_data({"v": value}) == f'{{"v":{text}}}'

    @pytest.mark.parametrize(
        ("value", "rule"),
        [
            (D("12345678901234567890.12345678901234567890"), "decimal_not_exact"),
            (D("1e-400"), "decimal_not_exact"),
            (D("0.3333333333333333333"), "decimal_not_exact"),
            (D("1e5000"), "decimal_not_exact"),  # more digits than JSON text allows
            (D("NaN"), "invalid"),
            (D("-Infinity"), "invalid"),
            (float("nan"), "invalid"),
            (float("inf"), "invalid"),
            (b"bytes", "invalid"),
            (object(), "invalid"),
            (dt.time(1, 2), "invalid"),
            ("\ud800", "invalid"),
            # Python refuses to print an int past 4,300 digits.
            pytest.param(10**5000, "invalid", id="int-of-5001-digits"),
            ({1: "int-one", "1": "str-one"}, "key_collision"),
            ({True: 1, "true": 2}, "key_collision"),
            ({None: 1, "null": 2}, "key_collision"),
            ([{"deep": [{2: "a", "2": "b"}]}], "key_collision"),
            ({(1, 2): "tuple key"}, "invalid"),
            (_Broken(), "data_unreadable"),
            (dt.datetime(2026, 1, 2, tzinfo=_RaisingZone()), "data_unreadable"),
        ],
    )
    def test_refused(self, value: Any, rule: str) -> None:
        with pytest.raises(InvalidEventError) as refused:
            encode_data({"v": value})
        assert refused.value.rule == rule
        assert "secret-value" not in str(refused.value)

    def test_a_colliding_mapping_given_as_the_data_is_refused(self) -> None:
        """The issue's case: the receiver would keep one of two "1" keys."""
        assert _refused_rule(cio_event("u", data={1: "int-one", "1": "str-one"})) == (
            "key_collision"
        )

    @given(
        st.decimals(allow_nan=False, allow_infinity=False)
        | st.builds(
            D, st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{1,25})?(E[+-]?[0-9]{1,3})?", fullmatch=True)
        )
    )
    def test_a_decimal_arrives_as_exactly_its_value_or_is_refused(self, value: D) -> None:
        try:
            text = encode_data({"v": value})
        except InvalidEventError as refused:
            text, rule = "", refused.rule
        if not text:
            assert rule == "decimal_not_exact"
            return
        exact = json.loads(text, parse_float=D, parse_int=D)["v"]
        assert exact == value
        # And a reader that takes numbers as doubles gets the same number too.
        assert D(repr(json.loads(text)["v"])) == value or value == value.to_integral_value()


class TestRecordsThatCannotBecomeCalls:
    """Refused under a rule of their own, named by the exception's type, never its text."""

    def test_a_message_that_cannot_be_formatted(self) -> None:
        assert _refused_rule(cio_event("u"), "%s %s", ("only-one",)) == "message_unformattable"

    def test_an_argument_whose_str_raises(self) -> None:
        assert _refused_rule(cio_event("u"), "%s", (_RaisingStr(),)) == "message_unformattable"

    def test_a_name_given_needs_no_message(self) -> None:
        assert _event(cio_event("u", name="purchase"), "%s %s", ("only-one",)).name == "purchase"

    def test_a_timestamp_whose_zone_raises(self) -> None:
        moment = dt.datetime(2026, 1, 2, tzinfo=_RaisingZone())
        assert _refused_rule(cio_event("u", timestamp=moment)) == "timestamp_unreadable"

    def test_a_data_mapping_whose_iteration_raises(self) -> None:
        tag = cio_event("u", data=_Broken())  # never raises
        assert _refused_rule(tag) == "data_unreadable"

    def test_the_handler_warns_and_counts_never_logging_errors_traceback(
        self,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        handler = CustomerIOHandler(
            "site", "key", queue_dir=tmp_path / "q", track_url="https://127.0.0.1:9"
        )
        log = logging.getLogger("test_conversions.records")
        log.propagate = False
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            with caplog.at_level(logging.WARNING, logger="cio_logging"):
                log.info("%s %s", "only-one", extra=cio_event("u"))
                log.info("%s", _RaisingStr(), extra=cio_event("u"))
                log.info(
                    "t",
                    extra=cio_event("u", timestamp=dt.datetime(2026, 1, 2, tzinfo=_RaisingZone())),
                )
                log.info("d", extra=cio_event("u", data=_Broken()))
                log.info("k", extra=cio_event("u", data={1: "a", "1": "b"}))
                log.info("x", extra=cio_event("u", price=D("1e-400")))
            status = handler.status()
        finally:
            log.removeHandler(handler)
            handler.close()
        assert status["dropped"] == {"invalid_event": 6}
        assert status["refused"] == {
            "message_unformattable": 2,
            "timestamp_unreadable": 1,
            "data_unreadable": 1,
            "key_collision": 1,
            "decimal_not_exact": 1,
        }
        assert status["queued"] == 0
        warnings = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert len(warnings) == 6
        assert all("event refused at emit" in warning for warning in warnings)
        assert not any("secret-value" in warning for warning in warnings)
        assert "--- Logging error ---" not in capsys.readouterr().err


_ANYTHING = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.builds(_Broken),
    st.builds(object),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([float("nan"), b"x", ("1",), ("1", "2", "3"), [("1", None)]]),
)


class TestHelpersNeverRaise:
    """Every helper returns a tag whatever it is given; a mistake is refused at emit."""

    @given(_ANYTHING, _ANYTHING, _ANYTHING)
    def test_with_anything(self, first: Any, second: Any, third: Any) -> None:
        tags = [
            cio_event(first, data=second),
            cio_identify(first, attributes=second),
            cio_page(first, second, properties=third),
            cio_screen(first, second, properties=third),
            cio_delete(first),
            cio_suppress(first),
            cio_unsuppress(first),
            cio_add_device(first, second, third, attributes=first),
            cio_delete_device(first, second, platform=third),
            cio_merge(first, second),
            cio_add_relationships(first, second),
            cio_delete_relationships(first, third),
            cio_group(first, second, traits=third, object_type_id=first),
            cio_alias(first, second),
        ]
        for tag in tags:
            assert set(tag) == {"cio"}
            message = ""
            try:
                event_from_record(_record(tag))
            except InvalidEventError as refused:
                message = str(refused)
            assert "secret-value" not in message


class TestNewCallsAtEmit:
    def test_each_new_call_stores_its_own_fields(self) -> None:
        device = _event(cio_add_device("u1", "tok", "ios", last_used=1_700_000_000, app="2"))
        assert (device.call, device.name, device.customer_id) == ("add_device", "add_device", "u1")
        assert device.data == {
            "token": "tok",
            "platform": "ios",
            "last_used": 1_700_000_000,
            "attributes": {"app": "2"},
        }
        assert _event(cio_delete_device("u1", "tok")).data == {"token": "tok"}
        merge = _event(cio_merge("primary-1", "secondary-1"))
        assert (merge.customer_id, merge.data) == ("secondary-1", {"primary": "primary-1"})
        assert merge.people == ("c:secondary-1", "c:primary-1")
        related = _event(
            cio_add_relationships(
                "u1",
                [("1", "acme"), {"cio_object_id": "ob1", "relationship_attributes": {"r": 1}}],
            )
        )
        assert related.data == {
            "cio_relationships": [
                {"identifiers": {"object_type_id": "1", "object_id": "acme"}},
                {"identifiers": {"cio_object_id": "ob1"}, "relationship_attributes": {"r": 1}},
            ]
        }
        group = _event(cio_group(anonymous_id="a1", group_id="acme", object_type_id=1, size=5))
        assert group.data == {"groupId": "acme", "traits": {"size": 5, "object_type_id": "1"}}
        assert _event(cio_alias("u1", "anon-1")).data == {"previousId": "anon-1"}
        for event in (device, merge, related, group):
            assert event.is_essential(frozenset())

    @pytest.mark.parametrize(
        "tag",
        [
            cio_add_device("u1", "tok", "windows"),
            cio_add_device("u1", "", "ios"),
            cio_add_device("u1", "tok", "ios", count="3", other=3),  # type: ignore[arg-type]
            cio_add_device("u1", "tok", "ios", push_enabled="yes"),
            cio_merge("same", "same"),
            cio_add_relationships("u1", []),
            cio_add_relationships("u1", "acme"),
            cio_add_relationships("u1", [{"object_id": "acme"}]),
            cio_add_relationships("u1", [("1", "x" * 151)]),
            cio_group("u1", None),
            cio_alias("u1", "u1"),
            {"cio": {"customer_id": "u1", "call": "delete", "data": {"why": "gdpr"}}},
            {"cio": {"customer_id": "u1", "call": "add_device", "data": {"token": "t", "x": 1}}},
        ],
    )
    def test_a_malformed_call_is_refused_by_shape(self, tag: dict[str, Any]) -> None:
        assert _refused_rule(tag) == "call_shape"
