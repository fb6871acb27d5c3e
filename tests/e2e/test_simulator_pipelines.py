"""Tests for the simulator's Data Pipelines API and the person calls of both APIs: real
HTTPS through requests, checked against the published Pipelines spec."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import requests
from ulid import ULID

from cio_logging.simulator import AcceptedEvent, TrackAPISimulator

from ..spec_check import (
    BATCH_BODY,
    PIPELINES_BATCH_BODY,
    PIPELINES_CALLS,
    PIPELINES_RESPONSE_400,
    PIPELINES_SEMANTIC,
    Spec,
    load_pipelines_spec,
    run_in_a_fresh_clone,
)

SITE_ID, API_KEY = "site-test", "key-test"
PIPELINES_AUTH = (API_KEY, "")  # the source's API key as the username, a blank password
TRACK_AUTH = (SITE_ID, API_KEY)
UNAUTHORIZED = "Unauthorized request. Make sure that you provided the right credentials."
WHEN = "2026-11-28T10:00:00.000Z"
WHEN_SECONDS = 1_795_860_000


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[TrackAPISimulator]:
    with TrackAPISimulator(SITE_ID, API_KEY, state_dir=tmp_path / "sim") as simulator:
        simulator.record_bodies = True  # the spec checks read what was sent
        yield simulator


def post(
    sim: TrackAPISimulator,
    path: str,
    body: Any = None,
    *,
    strict: bool = False,
    auth: tuple[str, str] | None = PIPELINES_AUTH,
    raw: bytes | None = None,
    method: str = "POST",
) -> requests.Response:
    """One request, as a client of the Pipelines API sends it."""
    headers = {"X-Strict-Mode": "1"} if strict else {}
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would win
        return session.request(
            method,
            sim.url + path,
            json=body if raw is None else None,
            data=raw,
            auth=auth,
            headers=headers,
            verify=sim.ca_file,
            timeout=5,
        )


def message_id() -> str:
    return str(uuid.uuid4())


def identify(user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "traits": {"plan": "pro"}} | extra


def track(event: str = "purchase", user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": {"n": 1}} | extra


def page(name: str = "home", user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "page", "userId": user, "name": name, "properties": {"url": "/"}} | extra


def screen(name: str = "feed", user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "screen", "userId": user, "name": name, "properties": {}} | extra


def group(user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "group", "userId": user, "groupId": "acme", "traits": {"size": 5}} | extra


def alias(user: str = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "alias", "userId": user, "previousId": "anon-1"} | extra


def batch(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"batch": list(calls)}


def without_type(call: dict[str, Any]) -> dict[str, Any]:
    """A single-call route's body: the route implies the type."""
    return {key: value for key, value in call.items() if key != "type"}


def v2_person(action: str, **extra: Any) -> dict[str, Any]:
    return {"type": "person", "identifiers": {"id": "42"}, "action": action} | extra


#: Each kind of call a client sends, as it is sent and as the simulator records it:
#: (call, name, data). Semantic events are track calls with a reserved name.
EVERY_CALL: list[tuple[dict[str, Any], str, str, dict[str, Any]]] = [
    (identify(messageId=message_id(), timestamp=WHEN), "identify", "identify", {"plan": "pro"}),
    (track(messageId=message_id(), timestamp=WHEN), "event", "purchase", {"n": 1}),
    (page(messageId=message_id()), "page", "home", {"url": "/"}),
    (screen(messageId=message_id()), "screen", "feed", {}),
    (group(messageId=message_id()), "group", "group", {"size": 5}),
    (track("User Deleted", properties={}), "delete", "delete", {}),
    (
        track("User Suppressed", properties={"why": "bounce"}),
        "suppress",
        "suppress",
        {"why": "bounce"},
    ),
    (track("User Unsuppressed", properties={}), "unsuppress", "unsuppress", {}),
]

#: Invalid calls: the call, the field its error names, and whether the spec's JSON Schema
#: says it is invalid too (sizes, poison names and blank names are beyond it).
INVALID_CALLS = [
    pytest.param({"type": "track", "userId": "42"}, "event", True, id="no-event"),
    pytest.param(track(event=""), "event", False, id="blank-event"),
    pytest.param(track(timestamp="soon"), "timestamp", True, id="timestamp-soon"),
    pytest.param(track(timestamp="2026-02-30T10:00:00Z"), "timestamp", True, id="feb-30"),
    pytest.param(track(timestamp="2026-11-28T10:00:00"), "timestamp", True, id="no-zone"),
    pytest.param(track(timestamp=WHEN_SECONDS), "timestamp", True, id="unix-seconds"),
    pytest.param(track(properties=[1]), "properties", True, id="properties-list"),
    pytest.param(track(context="web"), "context", True, id="context-string"),
    pytest.param(track(messageId=7), "messageId", True, id="message-id-number"),
    pytest.param({"type": "track", "event": "purchase"}, "userId", True, id="track-nobody"),
    pytest.param({"type": "page", "name": "home"}, "userId", True, id="page-nobody"),
    # Empty, and no email trait to go by: the spec's schema takes any string.
    pytest.param(identify(user=""), "userId", False, id="identify-empty-user"),
    pytest.param(track(properties={"blob": "x" * 33_000}), "", False, id="over-32-kb"),
    pytest.param(track("poisoned"), "event", False, id="poison-event"),
    pytest.param(page("poisoned"), "name", False, id="poison-page"),
    pytest.param(group(groupId=None), "groupId", True, id="group-id-null"),
]
SEMANTIC_EVENTS = {
    "User Deleted": "delete",
    "User Suppressed": "suppress",
    "User Unsuppressed": "unsuppress",
}


def compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def accepted_fields(event: AcceptedEvent) -> tuple[Any, ...]:
    return (event.call, event.name, event.customer_id, event.anonymous_id, event.data)


class TestCalls:
    """Every call type, through /v1/batch and through its own route."""

    def test_every_call_type_in_a_batch_is_recorded(self, sim: TrackAPISimulator) -> None:
        """One batch of every call: each recorded in order, with the fields it carried."""
        calls = [call for call, *_ in EVERY_CALL]
        response = post(sim, "/v1/batch", batch(*calls), strict=True)
        assert (response.status_code, response.json()) == (200, {})
        assert [accepted_fields(event) for event in sim.accepted] == [
            (kind, name, "42", None, data) for _, kind, name, data in EVERY_CALL
        ]
        assert [event.id for event in sim.accepted] == [call.get("messageId") for call in calls]
        assert {(event.api, event.route) for event in sim.accepted} == {
            ("pipelines", "pipelines_batch")
        }
        first, second, third, *_ = sim.accepted
        assert (first.timestamp, second.timestamp, third.timestamp) == (
            WHEN_SECONDS,
            WHEN_SECONDS,
            None,
        )
        [record] = sim.requests
        assert (record.path, record.status, record.item_count, record.strict) == (
            "/v1/batch",
            200,
            len(calls),
            True,
        )

    @pytest.mark.parametrize(
        ("call", "kind", "name", "data"),
        [*EVERY_CALL, (alias(), "alias", "alias", {"previousId": "anon-1"})],
        ids=lambda value: value if isinstance(value, str) else None,
    )
    def test_each_single_route_records_its_call(
        self, sim: TrackAPISimulator, call: dict[str, Any], kind: str, name: str, data: Any
    ) -> None:
        """/v1/<type> takes one call, its type implied by the route (or repeated in the body)."""
        route = call["type"]
        for body in (without_type(call), call):
            response = post(sim, f"/v1/{route}", body, strict=True)
            assert (response.status_code, response.json()) == (200, {})
        recorded = 1 if "messageId" in call else 2  # the same messageId twice is one call
        assert (len(sim.accepted), sim.duplicates) == (recorded, 2 - recorded)
        first = sim.accepted[0]
        assert accepted_fields(first) == (kind, name, "42", None, data)
        assert (first.route, first.api, first.id) == (
            f"pipelines_{route}",
            "pipelines",
            call.get("messageId"),
        )
        assert [record.item_count for record in sim.requests] == [1, 1]

    def test_anonymous_and_known_ids(self, sim: TrackAPISimulator) -> None:
        """anonymousId is recorded beside userId, or alone."""
        calls = [
            {"type": "track", "anonymousId": "anon-1", "event": "viewed"},
            identify(anonymousId="anon-1"),
            {"type": "page", "anonymousId": "anon-1"},  # a page needs no name
        ]
        assert post(sim, "/v1/batch", batch(*calls), strict=True).status_code == 200
        assert [(e.customer_id, e.anonymous_id, e.name) for e in sim.accepted] == [
            (None, "anon-1", "viewed"),
            ("42", "anon-1", "identify"),
            (None, "anon-1", ""),
        ]

    def test_an_identify_may_name_its_person_by_email(self, sim: TrackAPISimulator) -> None:
        """The spec's exception: an empty userId with an email trait."""
        call = identify(user="", traits={"email": "a@example.com"})
        assert post(sim, "/v1/identify", call, strict=True).status_code == 200
        [event] = sim.accepted
        assert (event.customer_id, event.data) == (None, {"email": "a@example.com"})

    @pytest.mark.parametrize(
        ("stamp", "seconds"),
        [
            ("2026-11-28T10:00:00Z", WHEN_SECONDS),
            ("2026-11-28T10:00:00.999999999Z", WHEN_SECONDS),  # floored, not rounded
            ("2026-11-28T11:00:00.5+01:00", WHEN_SECONDS),
            ("1969-12-31T23:59:59.5Z", -1),
            ("2026-11-28t10:00:00z", WHEN_SECONDS),
        ],
    )
    def test_timestamp_becomes_unix_seconds(
        self, sim: TrackAPISimulator, stamp: str, seconds: int
    ) -> None:
        assert post(sim, "/v1/track", track(timestamp=stamp), strict=True).status_code == 200
        assert [event.timestamp for event in sim.accepted] == [seconds]

    def test_a_route_takes_only_its_own_type(self, sim: TrackAPISimulator) -> None:
        """A body whose type contradicts its route is invalid."""
        response = post(sim, "/v1/identify", track(), strict=True)
        assert response.status_code == 400
        assert response.json()["meta"]["errors"] == [
            "type: type must be 'identify' on this route, or left out"
        ]

    @pytest.mark.parametrize("kind", ["alias", "click", None])
    def test_a_batch_item_needs_a_batch_type(
        self, sim: TrackAPISimulator, kind: str | None
    ) -> None:
        """The spec's batch takes identify, track, page, screen and group: alias has its route."""
        item = alias() | {"type": kind} if kind else without_type(track())
        response = post(sim, "/v1/batch", batch(track(), item), strict=True)
        assert response.status_code == 400
        [error] = response.json()["meta"]["errors"]
        assert error.startswith("batch[1].type: type must be one of identify, track, page")
        assert ("/v1/alias" in error) is (kind == "alias")
        assert sim.accepted == []

    def test_semantic_events_need_a_user_id(self, sim: TrackAPISimulator) -> None:
        """Deleting or suppressing an anonymous visitor means nothing: the spec needs userId."""
        call = {"type": "track", "anonymousId": "anon-1", "event": "User Deleted"}
        response = post(sim, "/v1/track", call, strict=True)
        assert response.json() == {"meta": {"errors": ["userId: 'User Deleted' needs a userId"]}}

    def test_unknown_routes_and_methods(self, sim: TrackAPISimulator) -> None:
        """Routing comes before auth, as on the Track routes."""
        assert post(sim, "/v1/events", track(), auth=None).status_code == 404
        response = post(sim, "/v1/batch", method="GET")
        assert (response.status_code, response.headers["Allow"]) == (405, "POST")


class TestAuth:
    """HTTP Basic: the API key as the username and a blank password."""

    def test_blank_password_is_accepted(self, sim: TrackAPISimulator) -> None:
        assert post(sim, "/v1/track", track()).status_code == 200
        assert len(sim.accepted) == 1

    @pytest.mark.parametrize(
        "auth",
        [TRACK_AUTH, ("other-key", ""), (API_KEY, "secret"), (SITE_ID, ""), None],
        ids=["site-id-and-key", "wrong-key", "a-password", "site-id", "none"],
    )
    @pytest.mark.parametrize("strict", [True, False], ids=["strict", "permissive"])
    def test_other_credentials_are_refused(
        self, sim: TrackAPISimulator, auth: tuple[str, str] | None, strict: bool
    ) -> None:
        """401 with a Basic challenge, with or without strict mode; nothing is recorded."""
        response = post(sim, "/v1/batch", batch(track()), auth=auth, strict=strict)
        assert response.status_code == 401
        assert response.json() == {"meta": {"error": UNAUTHORIZED}}
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
        assert (sim.accepted, sim.silently_dropped) == ([], 0)

    def test_each_api_takes_its_own_credentials(self, sim: TrackAPISimulator) -> None:
        """Track keeps site_id:api_key; set_credentials changes both."""
        event = {"name": "purchase"}
        assert (
            post(sim, "/api/v1/customers/42/events", event, auth=PIPELINES_AUTH).status_code == 401
        )
        assert post(sim, "/api/v1/customers/42/events", event, auth=TRACK_AUTH).status_code == 200
        sim.set_credentials(SITE_ID, "new-key")
        assert post(sim, "/v1/track", track()).status_code == 401
        assert post(sim, "/v1/track", track(), auth=("new-key", "")).status_code == 200
        assert [event.api for event in sim.accepted] == ["track", "pipelines"]


class TestStrictMode:
    """X-Strict-Mode: 1 answers 400 and takes nothing; without it, 200 and a silent drop."""

    @pytest.fixture(autouse=True)
    def _poison(self, sim: TrackAPISimulator) -> None:
        sim.poison("poisoned")

    @pytest.mark.parametrize(("call", "field", "spec_says"), INVALID_CALLS)
    def test_strict_mode_refuses_the_whole_request(
        self, sim: TrackAPISimulator, call: dict[str, Any], field: str, spec_says: bool
    ) -> None:
        """The error names the item and field; the valid call beside it is not taken either."""
        response = post(sim, "/v1/batch", batch(track("fine"), call), strict=True)
        assert response.status_code == 400
        [error] = response.json()["meta"]["errors"]
        assert error.startswith(f"batch[1].{field}: " if field else "batch[1]: "), error
        assert (sim.accepted, sim.silently_dropped) == ([], 0)
        assert [(record.status, record.strict) for record in sim.requests] == [(400, True)]

    @pytest.mark.parametrize(("call", "field", "spec_says"), INVALID_CALLS)
    def test_without_strict_mode_the_bad_call_is_dropped_silently(
        self, sim: TrackAPISimulator, call: dict[str, Any], field: str, spec_says: bool
    ) -> None:
        """Like the real API: 200 {}, the valid calls accepted, the invalid one counted."""
        response = post(sim, "/v1/batch", batch(track("fine"), call, track("also_fine")))
        assert (response.status_code, response.json()) == (200, {})
        assert [event.name for event in sim.accepted] == ["fine", "also_fine"]
        assert sim.silently_dropped == 1
        assert [(record.status, record.strict) for record in sim.requests] == [(200, False)]

    def test_poison_is_named_as_the_reason(self, sim: TrackAPISimulator) -> None:
        """Poison names reach the Pipelines calls, from the control API too."""
        post(sim, "/_simulator/poison", {"names": ["worse"]}, auth=None)
        calls = [track("poisoned"), page("worse"), screen("poisoned"), track("fine")]
        response = post(sim, "/v1/batch", batch(*calls), strict=True)
        assert response.json()["meta"]["errors"] == [
            "batch[0].event: event 'poisoned' is rejected (poison name)",
            "batch[1].name: name 'worse' is rejected (poison name)",
            "batch[2].name: name 'poisoned' is rejected (poison name)",
        ]
        assert post(sim, "/v1/batch", batch(*calls)).status_code == 200
        assert ([event.name for event in sim.accepted], sim.silently_dropped) == (["fine"], 3)

    def test_an_oversized_single_call_is_refused(self, sim: TrackAPISimulator) -> None:
        """A request to a single-call route is one call: 32 KB at most."""
        call = without_type(track(properties={"blob": "x" * 33_000}))
        response = post(sim, "/v1/track", call, strict=True)
        [error] = response.json()["meta"]["errors"]
        assert (response.status_code, error.split(" is ")[0]) == (400, "body: the request")
        assert error.endswith("bytes, over 32,768")
        assert post(sim, "/v1/track", call).status_code == 200
        assert (sim.accepted, sim.silently_dropped) == ([], 1)

    def test_a_call_of_exactly_32_kb_is_taken(self, sim: TrackAPISimulator) -> None:
        """The limit is measured on the call's bytes as received, as on the Track v2 routes."""
        call = track(properties={"blob": ""})
        call["properties"]["blob"] = "x" * (32_768 - compact_size(call))
        compact = json.dumps(batch(call), separators=(",", ":")).encode()
        assert post(sim, "/v1/batch", raw=compact, strict=True).status_code == 200
        # The same call with json.dumps's default ", " and ": " is bigger as received.
        assert post(sim, "/v1/batch", batch(call), strict=True).status_code == 400
        call["properties"]["blob"] += "x"
        compact = json.dumps(batch(call), separators=(",", ":")).encode()
        assert post(sim, "/v1/batch", raw=compact, strict=True).status_code == 400

    @pytest.mark.parametrize("strict", [True, False], ids=["strict", "permissive"])
    def test_a_request_over_500_kb_is_refused(self, sim: TrackAPISimulator, strict: bool) -> None:
        """Valid calls do not save a request of 500,000 bytes or more: none is accepted."""
        calls = [track(properties={"blob": "x" * 20_000}) for _ in range(26)]
        response = post(sim, "/v1/batch", batch(*calls), strict=strict)
        assert sim.accepted == []
        assert sim.requests[0].item_count == 26
        if strict:
            assert response.status_code == 400
            [error] = response.json()["meta"]["errors"]
            assert error.startswith("body: the request is ")
            assert error.endswith("not under 500,000")
        else:
            assert (response.status_code, sim.silently_dropped) == (200, 26)

    def test_every_error_of_a_request_is_listed(self, sim: TrackAPISimulator) -> None:
        calls = [track(timestamp="soon"), track(), {"type": "page"}, track(properties=[])]
        response = post(sim, "/v1/batch", batch(*calls), strict=True)
        fields = [error.split(":")[0] for error in response.json()["meta"]["errors"]]
        assert fields == ["batch[0].timestamp", "batch[2].userId", "batch[3].properties"]

    @pytest.mark.parametrize(
        ("raw", "error", "dropped"),
        [
            (b"{nope", "body: the body is not valid JSON", 1),
            (b"[]", 'batch: the body must be {"batch": [call, ...]}', 1),
            (b'{"batch": {}}', 'batch: the body must be {"batch": [call, ...]}', 1),
            (
                b'{"batch": [{}, {}], "context": {}}',
                "context: a batch's context matches both the mobile and the non-mobile "
                "context of the spec's oneOf: leave it out",
                2,
            ),
            (
                b'{"batch": [{}], "b": 1, "b": 2}',
                "body: the body is not valid JSON for this API: an object names a key twice",
                1,
            ),
        ],
    )
    def test_a_malformed_request(
        self, sim: TrackAPISimulator, raw: bytes, error: str, dropped: int
    ) -> None:
        """Strict: 400 naming what is wrong. Permissive: 200, and the calls counted lost
        (one when there are none to count)."""
        response = post(sim, "/v1/batch", raw=raw, strict=True)
        assert (response.status_code, response.json()) == (400, {"meta": {"errors": [error]}})
        assert post(sim, "/v1/batch", raw=raw).status_code == 200
        assert (sim.accepted, sim.silently_dropped) == ([], dropped)

    def test_an_empty_batch_is_fine(self, sim: TrackAPISimulator) -> None:
        assert post(sim, "/v1/batch", batch(), strict=True).json() == {}

    def test_only_the_value_1_turns_strict_mode_on(self, sim: TrackAPISimulator) -> None:
        with requests.Session() as session:
            session.trust_env = False
            response = session.post(
                f"{sim.url}/v1/track",
                json=track(timestamp="soon"),
                auth=PIPELINES_AUTH,
                headers={"X-Strict-Mode": "true"},
                verify=sim.ca_file,
                timeout=5,
            )
        assert (response.status_code, sim.requests[0].strict, sim.silently_dropped) == (
            200,
            False,
            1,
        )

    def test_clear_resets_the_count(self, sim: TrackAPISimulator) -> None:
        post(sim, "/v1/track", track(timestamp="soon"))
        events = post(sim, "/_simulator/events", method="GET", auth=None).json()
        assert (events["silently_dropped"], sim.silently_dropped) == (1, 1)
        sim.clear()
        assert sim.silently_dropped == 0


class TestDeduplication:
    """A messageId already accepted is not recorded again, whatever its letter case."""

    def test_repeated_message_id_is_recorded_once(self, sim: TrackAPISimulator) -> None:
        repeated = message_id()
        post(sim, "/v1/batch", batch(track(messageId=repeated), track(messageId=repeated.upper())))
        response = post(sim, "/v1/track", track(messageId=repeated), strict=True)
        assert (response.status_code, response.json()) == (200, {})  # a duplicate is no error
        assert (len(sim.accepted), sim.duplicates) == (1, 2)
        assert sim.accepted_ids() == {repeated}

    def test_ids_are_shared_with_the_track_api(self, sim: TrackAPISimulator) -> None:
        """A call resent through the other API is still the same call."""
        event_id = str(ULID())
        event = {"name": "purchase", "id": event_id}
        post(sim, "/api/v1/customers/42/events", event, auth=TRACK_AUTH)
        post(sim, "/v1/track", track(messageId=event_id.lower()))
        assert ([e.api for e in sim.accepted], sim.duplicates) == (["track"], 1)

    def test_calls_without_message_id_are_always_recorded(self, sim: TrackAPISimulator) -> None:
        post(sim, "/v1/batch", batch(track(), track(), identify()))
        assert (len(sim.accepted), sim.duplicates) == (3, 0)

    def test_an_empty_message_id_is_invalid(self, sim: TrackAPISimulator) -> None:
        """It would make every call that sends one a duplicate of the first."""
        response = post(sim, "/v1/track", track(messageId=""), strict=True)
        assert response.json() == {"meta": {"errors": ["messageId: messageId must not be empty"]}}


class TestFaults:
    """Faults answer Pipelines requests exactly as they answer Track requests."""

    def test_fail_answers_a_pipelines_request(self, sim: TrackAPISimulator) -> None:
        """fail(count=1, status=503): one 503, before auth and validation, then back to 200."""
        sim.fail(status=503, count=1)
        response = post(sim, "/v1/batch", batch(track()), strict=True, auth=None)
        assert response.status_code == 503
        assert response.json() == {"meta": {"error": "Service Unavailable (simulated)"}}
        assert post(sim, "/v1/batch", batch(track()), strict=True).status_code == 200
        assert [record.status for record in sim.requests] == [503, 200]
        assert len(sim.accepted) == 1

    def test_retry_after_passes_through(self, sim: TrackAPISimulator) -> None:
        sim.fail(429, count=1, retry_after="7")
        response = post(sim, "/v1/track", track())
        assert (response.status_code, response.headers["Retry-After"]) == (429, "7")
        assert "Retry-After" not in post(sim, "/v1/track", track()).headers

    def test_reset_connections_drops_a_pipelines_request(self, sim: TrackAPISimulator) -> None:
        sim.reset_connections(count=1)
        with pytest.raises(requests.ConnectionError):
            post(sim, "/v1/track", track("dropped"))
        post(sim, "/v1/track", track("after"))
        assert [event.name for event in sim.accepted] == ["after"]
        assert [record.status for record in sim.requests] == [0, 200]

    def test_faults_from_the_control_api(self, sim: TrackAPISimulator) -> None:
        fault = {"status": 500, "count": 1, "body": {"meta": {"error": "boom"}}}
        assert post(sim, "/_simulator/faults", fault, auth=None).status_code == 200
        response = post(sim, "/v1/identify", identify())
        assert (response.status_code, response.json()) == (500, {"meta": {"error": "boom"}})


class TestTrackPersonCalls:
    """Track API v2 person actions, and v1 page and screen views, are recorded too."""

    def test_v2_person_actions_are_recorded(self, sim: TrackAPISimulator) -> None:
        """identify, delete, suppress, unsuppress, page, screen and devices, in order."""
        page_id = str(ULID())
        items = [
            v2_person("identify", attributes={"plan": "pro"}, timestamp=WHEN_SECONDS),
            v2_person("page", name="/pricing", id=page_id, attributes={"ref": "ad"}),
            v2_person("screen", name="feed"),
            v2_person("add_device", device={"token": "t", "platform": "ios"}),
            v2_person("suppress"),
            v2_person("unsuppress"),
            v2_person("delete"),
            v2_person("event", name="purchase"),
        ]
        response = post(sim, "/api/v2/batch", batch(*items), auth=TRACK_AUTH)
        assert (response.status_code, response.json()) == (200, {})
        assert [accepted_fields(event) for event in sim.accepted] == [
            ("identify", "identify", "42", None, {"plan": "pro"}),
            ("page", "/pricing", "42", None, {"ref": "ad"}),
            ("screen", "feed", "42", None, {}),
            ("add_device", "add_device", "42", None, {"token": "t", "platform": "ios"}),
            ("suppress", "suppress", "42", None, {}),
            ("unsuppress", "unsuppress", "42", None, {}),
            ("delete", "delete", "42", None, {}),
            ("event", "purchase", "42", None, {}),
        ]
        identified, viewed, *_ = sim.accepted
        assert (identified.id, identified.timestamp, viewed.id) == (None, WHEN_SECONDS, page_id)
        assert {(event.api, event.route) for event in sim.accepted} == {("track", "v2_batch")}

    def test_v2_entity_identify(self, sim: TrackAPISimulator) -> None:
        item = v2_person("identify", attributes={"a": 1})
        assert post(sim, "/api/v2/entity", item, auth=TRACK_AUTH).status_code == 200
        [event] = sim.accepted
        assert (event.call, event.route, event.data) == ("identify", "v2_entity", {"a": 1})

    def test_an_invalid_person_action_is_a_207_item_error(self, sim: TrackAPISimulator) -> None:
        items = [v2_person("identify", timestamp="now"), v2_person("delete", attributes=[])]
        response = post(sim, "/api/v2/batch", batch(*items, v2_person("suppress")), auth=TRACK_AUTH)
        assert response.status_code == 207
        assert [(e["batch_index"], e["field"]) for e in response.json()["errors"]] == [
            (0, "timestamp"),
            (1, "attributes"),
        ]
        assert [event.call for event in sim.accepted] == ["suppress"]

    def test_a_person_action_with_an_id_is_deduplicated(self, sim: TrackAPISimulator) -> None:
        action_id = str(ULID())
        item = v2_person("identify", id=action_id)
        post(sim, "/api/v2/batch", batch(item, item), auth=TRACK_AUTH)
        assert (len(sim.accepted), sim.duplicates) == (1, 1)

    @pytest.mark.parametrize("kind", ["page", "screen"])
    def test_v1_anonymous_page_and_screen(self, sim: TrackAPISimulator, kind: str) -> None:
        body = {"name": "/pricing", "type": kind, "anonymous_id": "anon-1", "data": {"a": 1}}
        assert post(sim, "/api/v1/events", body, auth=TRACK_AUTH).status_code == 200
        post(sim, "/api/v1/events", {"name": "clicked", "anonymous_id": "anon-1"}, auth=TRACK_AUTH)
        viewed, clicked = sim.accepted
        assert accepted_fields(viewed) == (kind, "/pricing", None, "anon-1", {"a": 1})
        assert (viewed.route, clicked.call) == ("v1_anonymous", "event")


class TestHistory:
    """One person's calls across both APIs, in order; one kind of call."""

    def send_a_story(self, sim: TrackAPISimulator) -> None:
        post(sim, "/api/v2/batch", batch(v2_person("identify")), auth=TRACK_AUTH)
        post(sim, "/v1/page", {"anonymousId": "anon-1", "name": "home"})
        post(sim, "/v1/batch", batch(identify(anonymousId="anon-1"), track("purchase")))
        post(sim, "/v1/track", track("clicked", user="7"))
        post(sim, "/v1/track", track("User Deleted"))

    def test_history_is_in_acceptance_order(self, sim: TrackAPISimulator) -> None:
        self.send_a_story(sim)
        assert [(e.api, e.call, e.name) for e in sim.history("42")] == [
            ("track", "identify", "identify"),
            ("pipelines", "identify", "identify"),
            ("pipelines", "event", "purchase"),
            ("pipelines", "delete", "delete"),
        ]
        assert [e.call for e in sim.history("anon-1")] == ["page", "identify"]
        assert sim.history("nobody") == []
        # The same objects as in accepted, not copies that could drift.
        assert all(any(e is a for a in sim.accepted) for e in sim.history("42"))

    def test_calls_of_one_kind(self, sim: TrackAPISimulator) -> None:
        self.send_a_story(sim)
        assert [e.api for e in sim.calls("identify")] == ["track", "pipelines"]
        assert [e.name for e in sim.calls("event")] == ["purchase", "clicked"]
        assert sim.calls("alias") == []
        with pytest.raises(ValueError, match="call must be one of"):
            sim.calls("identity")

    def test_clear_forgets_history(self, sim: TrackAPISimulator) -> None:
        self.send_a_story(sim)
        sim.clear()
        assert (sim.history("42"), sim.calls("identify")) == ([], [])

    def test_history_over_the_control_api(self, sim: TrackAPISimulator) -> None:
        """Unauthenticated, never recorded; the person is URL-decoded."""
        self.send_a_story(sim)
        post(sim, "/v1/identify", identify(user="a b&c@example.com"))
        recorded = len(sim.requests)
        answer = post(sim, "/_simulator/history?person=42", method="GET", auth=None)
        assert answer.status_code == 200
        assert answer.json() == {"calls": [asdict(event) for event in sim.history("42")]}
        odd = post(sim, "/_simulator/history?person=a+b%26c%40example.com", method="GET")
        assert [call["customer_id"] for call in odd.json()["calls"]] == ["a b&c@example.com"]
        for query in ("", "?who=42", "?person=1&person=2"):
            bad = post(sim, f"/_simulator/history{query}", method="GET", auth=None)
            assert (bad.status_code, bad.json()) == (
                400,
                {"meta": {"error": "expected ?person=ID, once"}},
            )
        assert post(sim, "/_simulator/history?person=42", auth=None).status_code == 405
        assert len(sim.requests) == recorded


class TestCommandLine:
    def test_help_describes_the_pipelines_api_and_history(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "cio_logging.simulator", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        for words in [
            "Data Pipelines API",
            "blank password",
            "X-Strict-Mode: 1",
            "GET /_simulator/history?person=ID",
            '{"calls": [...]}',
            '"silently_dropped": N',
            "Pipelines track, page and screen calls with it",
        ]:
            assert words in text, words


class TestAgainstThePublishedSpec:
    """The requests these tests send and the answers the simulator gives are what
    Customer.io's published Pipelines spec describes."""

    def test_every_call_sent_conforms(self, sim: TrackAPISimulator, pipelines_spec: Spec) -> None:
        """Each call, in a batch and on its own route, and each semantic event's own schema."""
        calls = [call for call, *_ in EVERY_CALL]
        assert post(sim, "/v1/batch", batch(*calls), strict=True).json() == {}
        for call in [*calls, alias()]:
            assert post(sim, f"/v1/{call['type']}", call, strict=True).json() == {}
        for record in sim.requests:
            assert record.status == 200
            if record.path == "/v1/batch":
                assert pipelines_spec.errors(PIPELINES_BATCH_BODY, record.payload) == []
                sent = record.payload["batch"]
            else:
                sent = [record.payload]
            for call in sent:
                assert pipelines_spec.errors(PIPELINES_CALLS[call["type"]], call) == [], call
                semantic = SEMANTIC_EVENTS.get(call.get("event", ""))
                if semantic is not None:
                    assert pipelines_spec.errors(PIPELINES_SEMANTIC[semantic], call) == []

    def test_the_other_calls_sent_conform(
        self, sim: TrackAPISimulator, pipelines_spec: Spec
    ) -> None:
        """The valid bodies of the other tests: anonymous calls, timestamps, context."""
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("track", {"type": "track", "anonymousId": "anon-1", "event": "viewed"}),
            ("identify", identify(anonymousId="anon-1")),
            ("identify", identify(user="", traits={"email": "a@example.com"})),
            ("page", {"type": "page", "anonymousId": "anon-1"}),
            ("track", track(timestamp="2026-11-28T11:00:00.5+01:00")),
        ]
        for kind, body in bodies:
            assert post(sim, f"/v1/{kind}", body, strict=True).status_code == 200
            assert pipelines_spec.errors(PIPELINES_CALLS[kind], body) == [], body
        batched = batch(track(context={"ip": "8.8.8.8"}), page())
        assert post(sim, "/v1/batch", batched, strict=True).status_code == 200
        assert pipelines_spec.errors(PIPELINES_BATCH_BODY, batched) == []

    def test_a_context_the_published_schema_refuses_is_refused(
        self, sim: TrackAPISimulator, pipelines_spec: Spec
    ) -> None:
        """Where the spec reads a context through its mobile/non-mobile oneOf (a batch's,
        an identify's, a single-call route's), every context matches both alternatives:
        read as published, such a call is invalid, and the simulator refuses it."""
        literal = load_pipelines_spec(literal=True)
        assert literal is not None
        refused = [
            ("/v1/batch", batch(track()) | {"context": {"ip": "8.8.8.8"}}, PIPELINES_BATCH_BODY),
            ("/v1/batch", batch(identify(context={"ip": "1"})), PIPELINES_BATCH_BODY),
            ("/v1/identify", identify(context={"ip": "1"}), PIPELINES_CALLS["identify"]),
            ("/v1/track", track(context={"ip": "1"}), PIPELINES_CALLS["track"]),
        ]
        for path, body, schema in refused:
            assert literal.errors(schema, body) != [], body
            response = post(sim, path, body, strict=True)
            assert response.status_code == 400, body
            assert "context" in response.json()["meta"]["errors"][0]

    @pytest.mark.parametrize(("call", "field", "spec_says"), INVALID_CALLS)
    def test_what_the_spec_can_say_is_invalid_it_says_too(
        self,
        sim: TrackAPISimulator,
        pipelines_spec: Spec,
        call: dict[str, Any],
        field: str,
        spec_says: bool,
    ) -> None:
        """The simulator's 400 conforms; the invalid call breaks the spec wherever JSON
        Schema can express the rule (sizes, poison and blank names it cannot)."""
        sim.poison("poisoned")
        response = post(sim, "/v1/batch", batch(call), strict=True)
        assert response.status_code == 400
        assert pipelines_spec.errors(PIPELINES_RESPONSE_400, response.json()) == []
        assert (pipelines_spec.errors(PIPELINES_CALLS[call["type"]], call) != []) is spec_says

    def test_the_check_is_not_vacuous(self, pipelines_spec: Spec) -> None:
        """References resolve, required fields and formats are enforced."""
        assert pipelines_spec.errors(PIPELINES_CALLS["alias"], {"type": "alias"}) != []
        assert pipelines_spec.errors(PIPELINES_BATCH_BODY, batch(alias())) != []
        assert pipelines_spec.errors(PIPELINES_SEMANTIC["delete"], track("purchase")) != []
        assert pipelines_spec.errors(PIPELINES_RESPONSE_400, {"meta": {"errors": [1]}}) != []

    def test_read_literally_the_spec_rejects_what_it_documents(self, pipelines_spec: Spec) -> None:
        """Why the loader reads oneOf as anyOf: the literal reading refuses a plain batched
        track, any context, and a semantic delete. If this fails, the published spec was
        fixed and the relaxation in spec_check.any_of_for_one_of can go."""
        literal = load_pipelines_spec(literal=True)
        assert literal is not None
        assert literal.errors(PIPELINES_BATCH_BODY, batch(track())) != []
        assert literal.errors(PIPELINES_CALLS["identify"], identify(context={"ip": "1"})) != []
        assert literal.errors(PIPELINES_CALLS["track"], track("User Deleted")) != []
        assert pipelines_spec.errors(PIPELINES_BATCH_BODY, batch(track())) == []

    def test_the_track_person_actions_sent_conform(
        self, sim: TrackAPISimulator, spec: Spec
    ) -> None:
        """The v2 person actions these tests send are the Track spec's batch items."""
        items = [
            v2_person("identify", attributes={"plan": "pro"}, timestamp=WHEN_SECONDS),
            v2_person("page", name="/pricing", id=str(ULID()), attributes={"ref": "ad"}),
            v2_person("screen", name="feed"),
            v2_person("suppress"),
            v2_person("unsuppress"),
            v2_person("delete"),
        ]
        assert post(sim, "/api/v2/batch", batch(*items), auth=TRACK_AUTH).status_code == 200
        assert spec.errors(BATCH_BODY, batch(*items)) == []
        assert len(sim.accepted) == len(items)

    @pytest.mark.parametrize(
        ("item", "field"),
        [
            (v2_person("add_device"), "device"),
            (v2_person("add_device", device={"token": "t"}), "device.platform"),
            (
                v2_person("add_device", device={"token": "t", "platform": "windows"}),
                "device.platform",
            ),
            (
                v2_person(
                    "add_device", device={"token": "t", "platform": "ios", "attributes": {"n": 1}}
                ),
                "device.attributes",
            ),
            (v2_person("delete_device", device={"platform": "ios"}), "device.token"),
            (
                {
                    "type": "person",
                    "action": "merge",
                    "primary": {"id": "1", "email": "a@b.c"},
                    "secondary": {"id": "2"},
                },
                "primary",
            ),
            ({"type": "person", "action": "merge", "primary": {"id": "1"}}, "primary"),
            (v2_person("add_relationships"), "cio_relationships"),
            (
                v2_person(
                    "add_relationships",
                    cio_relationships=[
                        {
                            "identifiers": {
                                "object_type_id": "1",
                                "object_id": "a",
                                "cio_object_id": "b",
                            }
                        }
                    ],
                ),
                "cio_relationships[0].identifiers",
            ),
            (
                v2_person(
                    "delete_relationships",
                    cio_relationships=[
                        {"identifiers": {"cio_object_id": "b"}, "relationship_attributes": 1}
                    ],
                ),
                "cio_relationships[0].relationship_attributes",
            ),
        ],
    )
    def test_the_track_person_actions_the_spec_refuses_are_refused(
        self, sim: TrackAPISimulator, spec: Spec, item: dict[str, Any], field: str
    ) -> None:
        """Devices, merges and relationships: each invalid shape is a 207 item error
        naming the field, and the published batch schema refuses it too."""
        response = post(sim, "/api/v2/batch", batch(item), auth=TRACK_AUTH)
        assert response.status_code == 207
        [error] = response.json()["errors"]
        assert (error["batch_index"], error["field"]) == (0, field)
        assert sim.accepted == []
        assert spec.errors(BATCH_BODY, batch(item)) != []


class TestWithoutThePipelinesSpec:
    """A fresh clone, with no shared/spec beside it: the skip says why, and CI=true fails."""

    SELECTION = "TestAgainstThePublishedSpec and not track_person"

    def test_the_skip_says_why_in_the_summary(self, tmp_path: Path) -> None:
        result = run_in_a_fresh_clone(
            tmp_path, "tests/e2e/test_simulator_pipelines.py", self.SELECTION
        )
        assert result.returncode == 0, result.stdout + result.stderr
        skipped = 5 + len(INVALID_CALLS)
        assert f"{skipped} skipped" in result.stdout
        summary = " ".join(result.stdout.split())
        assert f"{skipped} test(s) skipped: Customer.io's Pipelines API spec is absent" in summary
        assert f"put it at {tmp_path / 'clone' / 'shared' / 'spec'}" in summary
        assert "or set CIO_PIPELINES_SPEC to its path" in summary

    def test_under_ci_a_missing_spec_fails(self, tmp_path: Path) -> None:
        result = run_in_a_fresh_clone(
            tmp_path, "tests/e2e/test_simulator_pipelines.py", self.SELECTION, CI="true"
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"{5 + len(INVALID_CALLS)} errors" in result.stdout
        assert "Pipelines API spec is absent" in result.stdout
        assert "skipped" not in result.stdout
