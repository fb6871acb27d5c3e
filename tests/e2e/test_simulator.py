"""Tests for the Track API simulator: real HTTPS, the real customerio SDK, the published spec."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from customerio import CustomerIO, CustomerIOException
from ulid import ULID

from cio_logging.simulator import AcceptedEvent, TrackAPISimulator

from ..spec_check import BATCH, BATCH_BODY, PROJECT_ROOT, Spec

BATCH_207 = f"{BATCH}/responses/207/content/application~1json/schema"
BATCH_400 = f"{BATCH}/responses/400/content/application~1json/schema"
RESPONSE_400 = "/components/responses/400/content/application~1json/schema"
SITE_ID, API_KEY = "site-test", "key-test"
UNAUTHORIZED = "Unauthorized request. Make sure that you provided the right credentials."


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[TrackAPISimulator]:
    with TrackAPISimulator(SITE_ID, API_KEY, state_dir=tmp_path / "sim") as simulator:
        yield simulator


def sdk_client(sim: TrackAPISimulator, api_key: str = API_KEY) -> Any:
    client = CustomerIO(SITE_ID, api_key, host="127.0.0.1", port=sim.port, retries=0, timeout=5)
    client.http.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would win over verify
    client.http.verify = sim.ca_file
    return client


@pytest.fixture
def client(sim: TrackAPISimulator) -> Iterator[Any]:
    with sdk_client(sim) as sdk:
        yield sdk


def call(
    sim: TrackAPISimulator,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    raw: bytes | None = None,
    auth: tuple[str, str] | None = (SITE_ID, API_KEY),
) -> requests.Response:
    """One request outside the SDK, for bodies and headers the SDK would never send."""
    with requests.Session() as session:
        session.trust_env = False
        return session.request(
            method,
            sim.url + path,
            json=body if raw is None else None,
            data=raw,
            auth=auth,
            verify=sim.ca_file,
            timeout=5,
        )


def ulid() -> str:
    return str(ULID())


def event_item(name: str = "purchase", **extra: Any) -> dict[str, Any]:
    return {"type": "person", "identifiers": {"id": "42"}, "action": "event", "name": name} | extra


class TestV1Events:
    """POST /api/v1/customers/{identifier}/events and POST /api/v1/events."""

    def test_identified_event_is_recorded_with_its_fields(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """Every field the SDK sends ends up in the accepted event."""
        event_id = ulid()
        client.track("42", "purchase", {"price": 9.5}, id=event_id, timestamp=1764300000)
        [event] = sim.accepted
        assert (event.id, event.name, event.customer_id, event.anonymous_id) == (
            event_id,
            "purchase",
            "42",
            None,
        )
        assert (event.data, event.timestamp, event.route) == ({"price": 9.5}, 1764300000, "v1")
        assert abs(event.received_at - time.time()) < 5
        [record] = sim.requests
        assert (record.method, record.status, record.item_count) == ("POST", 200, 1)
        assert record.path == "/api/v1/customers/42/events"

    def test_anonymous_event_is_recorded(self, sim: TrackAPISimulator, client: Any) -> None:
        """track_anonymous lands on the anonymous route with its anonymous_id."""
        response = client.track_anonymous("cookie-1", "viewed", {"page": "/"})
        assert (response.status_code, response.json()) == (200, {})
        [event] = sim.accepted
        assert (event.anonymous_id, event.customer_id, event.route) == (
            "cookie-1",
            None,
            "v1_anonymous",
        )
        assert (event.id, event.timestamp, event.data) == (None, None, {"page": "/"})

    @pytest.mark.parametrize("identifier", ["a/b ?#c", "josé@example.com", "100%"])
    def test_identifier_is_url_decoded(
        self, sim: TrackAPISimulator, client: Any, identifier: str
    ) -> None:
        """The SDK quotes the identifier with safe=''; the simulator decodes it exactly once."""
        client.track(identifier, "signed_up")
        assert [event.customer_id for event in sim.accepted] == [identifier]

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"data": {}}, "name is required"),
            ({"name": "  "}, "name must not be empty"),
            ({"name": 7}, "name must be a string"),
            ({"name": "x" * 101}, "101 bytes"),
            ({"name": "é" * 51}, "102 bytes"),
            ({"name": "a", "id": "not-a-ulid"}, "ULID"),
            ({"name": "a", "id": "81ARZ3NDEKTSV4RRFFQ69G5FAV"}, "ULID"),
            ({"name": "a", "timestamp": 1.5}, "timestamp"),
            ({"name": "a", "timestamp": True}, "timestamp"),
            ({"name": "a", "data": []}, "data must be an object"),
            ({"name": "a", "data": {"b": "x" * 100_000}}, "over 100000"),
            ({"name": "a", "type": "click"}, "type"),
            (["name"], "JSON object"),
        ],
    )
    def test_invalid_body_is_a_400_with_meta_error(
        self, sim: TrackAPISimulator, spec: Spec, body: Any, message: str
    ) -> None:
        """An invalid v1 event is refused whole, answered {"meta": {"error": "..."}}."""
        response = call(sim, "/api/v1/customers/42/events", body)
        assert response.status_code == 400
        assert message in response.json()["meta"]["error"]
        assert spec.errors(RESPONSE_400, response.json()) == []
        assert sim.accepted == []

    def test_body_that_is_not_json_is_a_400(self, sim: TrackAPISimulator) -> None:
        """NaN is not JSON either, though Python's json module would take it."""
        for raw in (b"{nope", b'{"name": "a", "data": {"x": NaN}}'):
            response = call(sim, "/api/v1/events", raw=raw)
            assert response.status_code == 400
            assert response.json() == {"meta": {"error": "the body is not valid JSON"}}

    def test_identifier_limits(self, sim: TrackAPISimulator, client: Any) -> None:
        """An identifier is 1 to 150 bytes."""
        client.track("x" * 150, "ok")
        with pytest.raises(CustomerIOException, match=r"^400: .*over 150"):
            client.track("x" * 151, "too_long")
        assert call(sim, "/api/v1/customers//events", {"name": "a"}).status_code == 400
        assert len(sim.accepted) == 1

    def test_poison_name_is_a_400(self, sim: TrackAPISimulator, client: Any) -> None:
        """poison_names turns a valid event into an invalid one."""
        sim.poison_names.add("bad_event")
        with pytest.raises(CustomerIOException, match=r"^400: "):
            client.track("42", "bad_event")
        client.track("42", "good_event")
        assert [event.name for event in sim.accepted] == ["good_event"]


class TestV2Batch:
    """POST /api/v2/batch: 200, per-item 207, whole-request 400."""

    def test_valid_batch_is_200_and_person_calls_are_recorded(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """A person's identify and a merge are recorded beside the events; objects are not."""
        event_id = ulid()
        response = client.batch(
            [
                event_item("purchase", id=event_id, timestamp=1764300000, attributes={"n": 1}),
                {"type": "person", "identifiers": {"id": "42"}, "action": "identify"},
                {
                    "type": "object",
                    "identifiers": {"object_type_id": "1", "object_id": "acme"},
                    "action": "identify",
                },
                {
                    "type": "person",
                    "primary": {"id": "1"},
                    "secondary": {"id": "2"},
                    "action": "merge",
                },
                event_item("refund") | {"identifiers": {"email": "a@example.com"}},
            ]
        )
        assert (response.status_code, response.json()) == (200, {})
        first, identify, merge, second = sim.accepted
        assert (merge.call, merge.customer_id, merge.data) == (
            "merge",
            "2",
            {"primary": {"id": "1"}, "secondary": {"id": "2"}},
        )
        assert sim.history("1") == sim.history("2") == [merge]
        assert first == AcceptedEvent(
            event_id,
            "purchase",
            "42",
            None,
            {"n": 1},
            1764300000,
            "v2_batch",
            first.received_at,
            raw=first.raw,
            raw_data='{"n": 1}',  # as the SDK sent it, with json.dumps's spaces
        )
        assert json.loads(first.raw)["name"] == "purchase"
        assert (first.call, first.api) == ("event", "track")
        assert (identify.call, identify.name, identify.customer_id, identify.id) == (
            "identify",
            "identify",
            "42",
            None,
        )
        assert (second.name, second.customer_id, second.data, second.id) == (
            "refund",
            "a@example.com",
            {},
            None,
        )
        assert sim.requests[0].item_count == 5

    def test_invalid_items_get_207_and_the_rest_are_accepted(
        self, sim: TrackAPISimulator, client: Any, spec: Spec
    ) -> None:
        """A poison item and a too-long name are reported by index; the others go through."""
        sim.poison_names.add("poison")
        names = ["ok0", "poison", "ok2", "n" * 101, "ok4"]
        response = client.batch([event_item(name) for name in names])
        assert response.status_code == 207  # the SDK treats 207 as success
        body = response.json()
        assert spec.errors(BATCH_207, body) == []
        assert [(e["batch_index"], e["field"]) for e in body["errors"]] == [
            (1, "name"),
            (3, "name"),
        ]
        assert body["errors"][1]["reason"] == "too_long"
        assert all(e["message"] for e in body["errors"])
        assert [event.name for event in sim.accepted] == ["ok0", "ok2", "ok4"]

    @pytest.mark.parametrize(
        ("item", "field"),
        [
            (event_item() | {"identifiers": {"id": "1", "email": "a@b.c"}}, "identifiers"),
            (event_item() | {"identifiers": {}}, "identifiers"),
            (event_item() | {"identifiers": {"id": 42}}, "identifiers.id"),
            (event_item() | {"identifiers": {"id": "x" * 151}}, "identifiers.id"),
            (event_item() | {"type": "company"}, "type"),
            (event_item() | {"action": "purchase"}, "action"),
            (event_item(id="01ARZ3NDEKTSV4RRFFQ69G5FA"), "id"),
            (event_item(timestamp=1764300000.0), "timestamp"),
            (event_item(attributes=[1]), "attributes"),
            (event_item(attributes={"blob": "x" * 33_000}), "item"),
            (event_item(""), "name"),
            ("purchase", "item"),
        ],
    )
    def test_item_errors_name_the_field(
        self, sim: TrackAPISimulator, spec: Spec, item: Any, field: str
    ) -> None:
        """Each item rule is reported in the 207 with the offending field."""
        response = call(sim, "/api/v2/batch", {"batch": [event_item("fine"), item]})
        assert response.status_code == 207
        assert spec.errors(BATCH_207, response.json()) == []
        [error] = response.json()["errors"]
        assert (error["batch_index"], error["field"]) == (1, field)
        assert [event.name for event in sim.accepted] == ["fine"]

    def test_request_over_500_kb_is_a_whole_request_400(
        self, sim: TrackAPISimulator, spec: Spec
    ) -> None:
        """Valid items do not save a request of 500,000 bytes or more: nothing is accepted."""
        items = [event_item(attributes={"blob": "x" * 20_000}) for _ in range(26)]
        response = call(sim, "/api/v2/batch", {"batch": items})
        assert response.status_code == 400
        body = response.json()
        assert "not under 500,000" in body["meta"]["errors"][0]
        assert spec.errors(BATCH_400, body) == []
        assert spec.errors(RESPONSE_400, body) == []
        assert sim.accepted == []
        assert sim.requests[0].item_count == 26

    @pytest.mark.parametrize(
        "raw", [b"not json", b"[]", b"{}", b'{"batch": {}}', b'{"batch": []}', b"\xff"]
    )
    def test_malformed_request_is_a_whole_request_400(
        self, sim: TrackAPISimulator, raw: bytes
    ) -> None:
        """No batch array, no request: 400 with {"meta": {"errors": [...]}}."""
        response = call(sim, "/api/v2/batch", raw=raw)
        assert response.status_code == 400
        assert isinstance(response.json()["meta"]["errors"][0], str)


class TestV2Entity:
    """POST /api/v2/entity: one operation, 400 when invalid."""

    def test_entity_event_is_recorded(self, sim: TrackAPISimulator) -> None:
        """A valid single operation is accepted on the v2_entity route."""
        assert call(sim, "/api/v2/entity", event_item(attributes={"a": 1})).status_code == 200
        [event] = sim.accepted
        assert (event.route, event.customer_id, event.data) == ("v2_entity", "42", {"a": 1})

    def test_invalid_entity_is_a_400(self, sim: TrackAPISimulator, spec: Spec) -> None:
        """The error names the field, in both 400 shapes."""
        response = call(sim, "/api/v2/entity", event_item(timestamp="yesterday"))
        assert response.status_code == 400
        body = response.json()
        assert body["errors"][0]["field"] == "timestamp"
        assert body["meta"]["errors"][0].startswith("timestamp: ")
        assert spec.errors(RESPONSE_400, body) == []
        assert sim.accepted == []


class TestDeduplication:
    """An id already accepted is answered with success and not recorded again."""

    def test_repeated_id_is_recorded_once(self, sim: TrackAPISimulator, client: Any) -> None:
        """Across v1 and v2, within one batch, and whatever the ULID's letter case."""
        event_id = ulid()
        client.track("42", "purchase", id=event_id)
        client.track("42", "purchase", id=event_id)
        response = client.batch([event_item(id=event_id), event_item(id=event_id.lower())])
        assert response.status_code == 200
        assert len(sim.accepted) == 1
        assert sim.duplicates == 3
        assert sim.accepted_ids() == {event_id}
        assert [record.status for record in sim.requests] == [200, 200, 200]

    def test_events_without_id_are_always_recorded(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """Without an id there is nothing to deduplicate on."""
        client.track("42", "purchase")
        client.batch([event_item(), event_item()])
        assert (len(sim.accepted), sim.duplicates, sim.accepted_ids()) == (3, 0, set())

    def test_clear_forgets_seen_ids(self, sim: TrackAPISimulator, client: Any) -> None:
        """After clear() the same id is new again."""
        event_id = ulid()
        client.track("42", "purchase", id=event_id)
        sim.clear()
        assert (sim.accepted, sim.requests, sim.duplicates) == ([], [], 0)
        client.track("42", "purchase", id=event_id)
        assert sim.accepted_ids() == {event_id}


class TestAuthAndRouting:
    """Basic auth on every Track route; 404 and 405."""

    def test_wrong_key_is_401_until_credentials_change(self, sim: TrackAPISimulator) -> None:
        """The SDK sees 401; set_credentials decides what is accepted from then on."""
        with sdk_client(sim, api_key="other-key") as wrong:
            with pytest.raises(CustomerIOException, match=r"^401: "):
                wrong.track("42", "purchase")
            sim.set_credentials(SITE_ID, "other-key")
            wrong.track("42", "purchase")
        assert call(sim, "/api/v1/events", {"name": "a"}).status_code == 401
        assert [record.status for record in sim.requests] == [401, 200, 401]
        assert len(sim.accepted) == 1

    def test_401_body(self, sim: TrackAPISimulator) -> None:
        """Missing or malformed credentials: a JSON body and a Basic challenge."""
        for auth in [None, (SITE_ID, "nope"), ("nope", API_KEY)]:
            response = call(sim, "/api/v2/batch", {"batch": [event_item()]}, auth=auth)
            assert response.status_code == 401
            assert response.json() == {"meta": {"error": UNAUTHORIZED}}
            assert response.headers["WWW-Authenticate"].startswith("Basic ")
        assert sim.accepted == []

    def test_unknown_path_is_404_and_wrong_method_405(self, sim: TrackAPISimulator) -> None:
        """Routing comes before auth."""
        assert call(sim, "/api/v1/customers/42", {}, method="PUT", auth=None).status_code == 404
        response = call(sim, "/api/v2/batch", method="GET")
        assert (response.status_code, response.headers["Allow"]) == (405, "POST")
        assert response.headers["Content-Type"] == "application/json"


class TestFaults:
    """fail, set_latency, reset_connections, refuse_connections, clear_faults."""

    def test_fail_count_then_success(self, sim: TrackAPISimulator, client: Any) -> None:
        """fail(503, count=2) answers two requests, then the API is back."""
        sim.fail(503, count=2)
        for _ in range(2):
            with pytest.raises(CustomerIOException, match="503") as caught:
                client.track("42", "purchase")
            # retries=0 keeps urllib3's status_forcelist: a 5xx surfaces as RetryError
            # ("too many 503 error responses"), not as "503: ...", yet is sent only once.
            assert isinstance(caught.value.__cause__, requests.exceptions.RetryError)
        client.track("42", "purchase")
        assert [record.status for record in sim.requests] == [503, 503, 200]
        assert len(sim.accepted) == 1

    def test_faults_answer_before_auth(self, sim: TrackAPISimulator) -> None:
        """An outage answers 503 whatever the credentials; the body is meta.error."""
        sim.fail(503)
        response = call(sim, "/api/v1/events", {"name": "a"}, auth=None)
        assert response.status_code == 503
        assert response.json() == {"meta": {"error": "Service Unavailable (simulated)"}}
        sim.clear_faults()
        assert call(sim, "/api/v1/events", {"name": "a"}, auth=None).status_code == 401

    def test_429_with_retry_after(self, sim: TrackAPISimulator) -> None:
        """retry_after becomes the Retry-After header."""
        sim.fail(429, count=1, retry_after="7")
        response = call(sim, "/api/v2/batch", {"batch": [event_item()]})
        assert (response.status_code, response.headers["Retry-After"]) == (429, "7")
        assert response.json() == {"meta": {"error": "Too Many Requests (simulated)"}}
        assert "Retry-After" not in call(sim, "/api/v2/batch", {"batch": [event_item()]}).headers

    def test_fail_for_a_duration_and_with_a_custom_body(self, sim: TrackAPISimulator) -> None:
        """duration bounds the fault in time; body replaces the default answer."""
        sim.fail(500, duration=0.3, body={"meta": {"error": "boom"}})
        response = call(sim, "/api/v1/events", {"name": "a"})
        assert (response.status_code, response.json()) == (500, {"meta": {"error": "boom"}})
        time.sleep(0.35)
        assert call(sim, "/api/v1/events", {"name": "a"}).status_code == 200

    def test_fault_400_and_401_bodies(self, sim: TrackAPISimulator) -> None:
        """Simulated 400 and 401 look like the real ones."""
        sim.fail(400, count=1)
        assert call(sim, "/api/v1/events", {"name": "a"}).json() == {
            "meta": {"errors": ["simulated bad request"]}
        }
        sim.fail(401, count=1)
        assert "credentials" in call(sim, "/api/v1/events", {"name": "a"}).json()["meta"]["error"]

    def test_latency_delays_track_answers_only(self, sim: TrackAPISimulator, client: Any) -> None:
        """Latency applies to Track requests, not to control requests."""
        sim.set_latency(0.4)
        started = time.monotonic()
        client.track("42", "purchase")
        assert time.monotonic() - started >= 0.4
        started = time.monotonic()
        call(sim, "/_simulator/events", method="GET")
        assert time.monotonic() - started < 0.4

    def test_each_request_records_how_long_its_answer_took(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """The duration of every request, latency included (the truth for the dashboards)."""
        client.track("42", "quick")
        sim.set_latency(0.3)
        started = time.perf_counter()
        client.track("42", "slow")
        seen_by_client = time.perf_counter() - started
        quick, slow = sim.requests
        assert 0 < quick.duration < 0.3
        assert 0.3 <= slow.duration <= seen_by_client
        (recorded,) = call(sim, "/_simulator/requests", method="GET").json()["requests"][1:]
        assert recorded["duration"] == slow.duration

    def test_reset_connections_gives_the_sdk_a_connection_error(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """The request is read and dropped unanswered; the next one succeeds."""
        client.track("42", "warm_up")  # a pooled keep-alive connection is the harder case
        sim.reset_connections(count=1)
        with pytest.raises(CustomerIOException) as caught:
            client.track("42", "dropped")
        assert isinstance(caught.value.__cause__, requests.ConnectionError)
        client.track("42", "after")
        assert [event.name for event in sim.accepted] == ["warm_up", "after"]
        assert [record.status for record in sim.requests] == [200, 0, 200]

    def test_refuse_connections_then_recover_on_the_same_port(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """Connections are refused, kept-alive ones included, until the timer listens again."""
        client.track("42", "before")
        port = sim.port
        sim.refuse_connections(0.5)
        with pytest.raises(CustomerIOException) as caught:
            client.track("42", "refused")
        assert isinstance(caught.value.__cause__, requests.ConnectionError)
        assert "refused" in str(caught.value).lower()
        time.sleep(0.5)
        deadline = time.monotonic() + 5  # the timer thread may run late on a busy machine
        while True:
            try:
                client.track("42", "after")
                break
            except CustomerIOException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert sim.port == port
        assert [event.name for event in sim.accepted] == ["before", "after"]

    def test_stop_and_start_keep_the_port(self, sim: TrackAPISimulator, client: Any) -> None:
        """stop() refuses until start(), which listens on the same port."""
        port = sim.port
        sim.stop()
        with pytest.raises(CustomerIOException):
            client.track("42", "refused")
        assert sim.start() is sim
        assert sim.start() is sim  # idempotent
        client.track("42", "after")
        assert (sim.port, len(sim.accepted)) == (port, 1)

    def test_clear_faults_removes_every_fault(self, sim: TrackAPISimulator, client: Any) -> None:
        """Failures, latency, resets and a refusal all go."""
        sim.fail(503)
        sim.set_latency(5)
        sim.reset_connections()
        sim.refuse_connections()
        sim.clear_faults()
        started = time.monotonic()
        client.track("42", "purchase")
        assert time.monotonic() - started < 2
        assert len(sim.accepted) == 1

    def test_clear_faults_keeps_poison_names_and_clear_poison_ends_them(
        self, sim: TrackAPISimulator, client: Any
    ) -> None:
        """An outage ending must not make a poison event acceptable: that is its own control."""
        sim.poison("bad_event")
        sim.fail(503)
        sim.clear_faults()
        with pytest.raises(CustomerIOException, match="400"):
            client.track("42", "bad_event")
        sim.clear_poison()
        client.track("42", "bad_event")
        assert [event.name for event in sim.accepted] == ["bad_event"]

    def test_fault_arguments_are_checked(self, sim: TrackAPISimulator) -> None:
        """Nonsense settings fail loudly instead of doing something odd."""
        bad_calls: list[Callable[[], None]] = [
            lambda: sim.fail(99),
            lambda: sim.fail(503, count=0),
            lambda: sim.fail(503, duration=-1),
            lambda: sim.set_latency(-0.1),
            lambda: sim.reset_connections(count=0),
            lambda: sim.refuse_connections(0),
        ]
        for bad in bad_calls:
            with pytest.raises(ValueError):  # noqa: PT011 - the message is not the point
                bad()


class TestControlAPI:
    """The unauthenticated /_simulator/ routes for a simulator in another process."""

    def test_control_routes(self, sim: TrackAPISimulator, client: Any) -> None:
        """Read records, set and clear faults, clear records; control is never recorded."""
        event_id = ulid()
        client.track("42", "purchase", {"a": 1}, id=event_id)
        client.track("42", "purchase", id=event_id)
        events = call(sim, "/_simulator/events", method="GET", auth=None).json()
        assert events["duplicates"] == 1
        assert [(e["id"], e["customer_id"], e["data"]) for e in events["events"]] == [
            (event_id, "42", {"a": 1})
        ]
        fault = {"status": 429, "count": 1, "retry_after": 3}
        assert call(sim, "/_simulator/faults", fault, auth=None).status_code == 200
        response = call(sim, "/api/v1/events", {"name": "a"})
        assert (response.status_code, response.headers["Retry-After"]) == (429, "3")
        call(sim, "/_simulator/faults", {"reset_connections": {"count": 1}}, auth=None)
        with pytest.raises(CustomerIOException):
            client.track("42", "dropped")
        call(sim, "/_simulator/faults", {"status": 503, "latency": 0.4}, auth=None)
        started = time.monotonic()
        requests_seen = call(sim, "/_simulator/requests", method="GET").json()["requests"]
        assert time.monotonic() - started < 0.4  # control is neither slowed nor failed
        assert [r["status"] for r in requests_seen] == [200, 200, 429, 0]
        assert call(sim, "/_simulator/clear_faults", {}).status_code == 200
        client.track("42", "after")
        assert call(sim, "/_simulator/clear", {}).status_code == 200
        assert (sim.accepted, sim.requests) == ([], [])

    def test_poison_names_over_http(self, sim: TrackAPISimulator, client: Any) -> None:
        """Set, read and clear poison names; clear_faults leaves them."""
        answer = call(sim, "/_simulator/poison", {"names": ["bad_event", "worse"]}, auth=None)
        assert (answer.status_code, answer.json()) == (200, {"names": ["bad_event", "worse"]})
        assert call(sim, "/_simulator/clear_faults", {}).status_code == 200
        listed = call(sim, "/_simulator/poison", method="GET", auth=None).json()
        assert listed == {"names": ["bad_event", "worse"]}
        with pytest.raises(CustomerIOException, match="400"):
            client.track("42", "bad_event")
        assert call(sim, "/_simulator/clear_poison", {}).status_code == 200
        assert call(sim, "/_simulator/poison", method="GET").json() == {"names": []}
        client.track("42", "bad_event")
        for bad in [{}, {"names": "bad_event"}, {"names": [1]}, ["bad_event"]]:
            assert call(sim, "/_simulator/poison", bad).status_code == 400
        assert call(sim, "/_simulator/clear_poison", method="GET").status_code == 405

    def test_bad_control_requests(self, sim: TrackAPISimulator) -> None:
        """Unknown routes, wrong methods and nonsense faults are refused."""
        assert call(sim, "/_simulator/nothing", method="GET").status_code == 404
        assert call(sim, "/_simulator/events").status_code == 405
        for fault in [{}, {"status": "soon"}, {"latency": -1}, {"reset_connections": 3}]:
            response = call(sim, "/_simulator/faults", fault)
            assert response.status_code == 400
            assert "bad fault request" in response.json()["meta"]["error"]
        assert sim.requests == []


class TestSpecConformance:
    """The SDK's own request bodies are what the published spec describes."""

    def test_the_validator_is_not_vacuous(self, spec: Spec) -> None:
        """References resolve and required fields are enforced."""
        assert spec.errors("/components/schemas/eventsRequest", {"data": {}}) != []
        assert spec.errors("/components/schemas/person_event", event_item() | {"name": 5}) != []

    def test_track_bodies_match_events_request(self, client: Any, spec: Spec) -> None:
        """track() sends an eventsRequest, with and without id and timestamp."""
        for kwargs in [{}, {"id": ulid(), "timestamp": 1764300000}]:
            response = client.track("42", "purchase", {"price": 1}, **kwargs)
            body = json.loads(response.request.body)
            assert spec.errors("/components/schemas/eventsRequest", body) == []

    def test_track_anonymous_body_matches_anonymous_events_request(
        self, client: Any, spec: Spec
    ) -> None:
        """track_anonymous() sends an anonymousEventsRequest."""
        response = client.track_anonymous("cookie-1", "viewed", {"a": 1}, id=ulid())
        body = json.loads(response.request.body)
        assert spec.errors("/components/schemas/anonymousEventsRequest", body) == []

    def test_batch_body_matches_the_batch_request(self, client: Any, spec: Spec) -> None:
        """batch() sends {"batch": [...]}; each event item is a person_event."""
        items = [event_item(id=ulid(), timestamp=1764300000, attributes={"a": 1}), event_item()]
        body = json.loads(client.batch(items).request.body)
        assert spec.errors(BATCH_BODY, body) == []
        for item in body["batch"]:
            assert spec.errors("/components/schemas/person_event", item) == []


class TestLifecycle:
    """Waiting, concurrency, cleanup and the command line."""

    def test_wait_for_events(self, sim: TrackAPISimulator, client: Any) -> None:
        """wait_for_events wakes when events arrive and gives up at its timeout."""
        sender = threading.Timer(0.1, lambda: client.track("42", "late"))
        sender.start()
        assert sim.wait_for_events(1, timeout=5)
        sender.join()
        started = time.monotonic()
        assert not sim.wait_for_events(2, timeout=0.1)
        assert 0.1 <= time.monotonic() - started < 1

    def test_concurrent_senders_lose_nothing(self, sim: TrackAPISimulator) -> None:
        """Eight SDK clients at once: every event and request is recorded exactly once."""
        errors: list[BaseException] = []

        def send(worker: int) -> None:
            try:
                with sdk_client(sim) as sdk:
                    for n in range(25):
                        sdk.track(f"user-{worker}", "tick", {"n": n}, id=ulid())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert (len(sim.accepted), len(sim.requests), len(sim.accepted_ids())) == (200, 200, 200)

    def test_close_removes_its_own_temp_dir(self) -> None:
        """Without state_dir the CA lives in a private temp dir that close() removes."""
        sim = TrackAPISimulator().start()
        ca_file = Path(sim.ca_file)
        assert ca_file.is_file()
        assert sim.url == f"https://127.0.0.1:{sim.port}"
        sim.close()
        sim.close()  # idempotent
        assert not ca_file.parent.exists()
        with pytest.raises(RuntimeError):
            sim.start()

    def test_state_dir_is_kept(self, tmp_path: Path) -> None:
        """A state_dir given by the caller is the caller's: the CA file stays."""
        with TrackAPISimulator(state_dir=tmp_path / "state") as sim:
            ca_file = Path(sim.ca_file)
        assert ca_file.parent == tmp_path / "state"
        assert "BEGIN CERTIFICATE" in ca_file.read_text()

    def test_help_describes_every_option_and_the_control_api(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "cio_logging.cli", "simulator", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        for option, words in [
            ("--host", "address to listen on"),
            ("--port", "0 picks a free one"),
            ("--site-id", "the site id it accepts"),
            ("--api-key", "the API key it accepts"),
            ("--state-dir", "where to write the CA file"),
            ("--poison NAME", "reject events with this name"),
        ]:
            assert f"{option} " in text, option
            assert words in text, option
        for route in ["events", "requests", "faults", "clear_faults", "poison", "clear_poison"]:
            assert f"/_simulator/{route} " in text, route
        assert "(poison names stay)" in text

    def test_poison_names_from_the_command_line(self, tmp_path: Path) -> None:
        command = [sys.executable, "-m", "cio_logging.simulator", "--port", "0"]
        command += ["--poison", "bad_event", "--poison", "worse", "--state-dir", str(tmp_path)]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
            try:
                assert process.stdout is not None
                lines = [process.stdout.readline() for _ in range(5)]
                assert lines[4] == "poison names (rejected): bad_event, worse\n", lines
                exports = dict(word.split("=", 1) for word in shlex.split(lines[3])[1:])
                with requests.Session() as session:
                    session.trust_env = False
                    session.verify = exports["CIO_LOGGING_CA_BUNDLE"]
                    url = exports["CIO_LOGGING_TRACK_URL"]
                    named = session.get(f"{url}/_simulator/poison").json()
                    assert named == {"names": ["bad_event", "worse"]}
                    rejected = session.post(
                        f"{url}/api/v1/events", json={"name": "worse"}, auth=("sim-site", "sim-key")
                    )
                    assert rejected.status_code == 400
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)

    def test_a_port_in_use_is_one_line_and_exit_1(self, sim: TrackAPISimulator) -> None:
        for command in (
            [sys.executable, "-m", "cio_logging.simulator"],
            [sys.executable, "-m", "cio_logging.cli", "simulator"],
        ):
            result = subprocess.run(
                [*command, "--port", str(sim.port)], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 1
            assert result.stderr.splitlines() == [
                f"cio-logging simulator: error: cannot listen on 127.0.0.1:{sim.port}: "
                "Address already in use; --port 0 picks a free one"
            ]

    @pytest.mark.parametrize(
        ("command", "code"), [("simulator", 1), ("demo", 2)], ids=["simulator", "demo"]
    )
    def test_trustme_missing_is_one_line(self, tmp_path: Path, command: str, code: int) -> None:
        """Without the simulator extra: one line naming the fix, no traceback, no leftovers."""
        arguments = ["--port", "0"] if command == "simulator" else ["--dir", str(tmp_path / "d")]
        script = (
            "import sys; sys.modules['trustme'] = None\n"  # what a missing package looks like
            "from cio_logging.cli import main\n"
            f"raise SystemExit(main({[command, *arguments]!r}))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        assert result.returncode == code
        assert result.stderr.splitlines() == [
            f"cio-logging {command}: error: the Track API simulator needs trustme, which is "
            "not installed: pip install 'cio-logging[simulator]'"
        ]
        assert [path.name for path in tmp_path.iterdir()] == []

    def test_command_line_serves_until_sigterm(self, tmp_path: Path) -> None:
        """python -m cio_logging.simulator prints what to export and exits 0 on SIGTERM."""
        command = [sys.executable, "-m", "cio_logging.simulator", "--port", "0"]
        command += ["--api-key", "cli-key", "--state-dir", str(tmp_path)]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        ) as process:
            try:
                assert process.stdout is not None
                lines = [process.stdout.readline() for _ in range(4)]
                assert lines[3].startswith("export "), lines
                exports = dict(word.split("=", 1) for word in shlex.split(lines[3])[1:])
                assert exports["CUSTOMERIO_API_KEY"] == "cli-key"
                url, ca_file = exports["CIO_LOGGING_TRACK_URL"], exports["CIO_LOGGING_CA_BUNDLE"]
                with requests.Session() as session:
                    session.trust_env = False
                    session.verify = ca_file
                    track = session.post(
                        f"{url}/api/v1/events", json={"name": "cli"}, auth=("sim-site", "cli-key")
                    )
                    assert track.status_code == 200
                    events = session.get(f"{url}/_simulator/events").json()["events"]
                    assert [event["name"] for event in events] == ["cli"]
                process.send_signal(signal.SIGTERM)
                _, stderr = process.communicate(timeout=10)
                assert (process.returncode, stderr) == (0, "")
            finally:
                if process.poll() is None:
                    process.kill()
