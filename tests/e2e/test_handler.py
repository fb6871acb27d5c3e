"""The handler end to end: real SDK, real HTTPS to the simulator, real diskcache."""

from __future__ import annotations

import logging
import logging.config
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from ulid import ULID

from cio_logging import ConfigurationError, CustomerIOHandler, cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import HandlerFactory, handler_settings, wait_for

Logged = tuple[logging.Logger, CustomerIOHandler]


class TestDelivery:
    """What reaches Customer.io is what was logged."""

    def test_names_data_identifiers_timestamps_ids(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        explicit_id = str(ULID())
        logger.info("purchase", extra=cio_event("user-42", amount=9.99, sku="A-1"))
        logger.info(
            "ignored message",
            extra={
                "cio": {
                    "customer_id": 7,
                    "name": "signup",
                    "id": explicit_id,
                    "timestamp": 1_764_300_000,
                    "data": {"plan": "pro", "nested": {"list": [1, 2.5, None, True]}},
                }
            },
        )
        before = int(time.time())
        handler.flush()
        accepted = {event.name: event for event in simulator.accepted}
        purchase, signup = accepted["purchase"], accepted["signup"]
        assert (purchase.customer_id, purchase.data) == ("user-42", {"amount": 9.99, "sku": "A-1"})
        assert purchase.timestamp is not None
        assert before - 5 <= purchase.timestamp <= before
        assert purchase.id is not None
        assert str(ULID.from_str(purchase.id)) == purchase.id
        assert purchase.route == "v2_batch"
        assert (signup.customer_id, signup.id, signup.timestamp) == (
            "7",
            explicit_id,
            1_764_300_000,
        )
        assert signup.data == {"plan": "pro", "nested": {"list": [1, 2.5, None, True]}}
        assert handler.status()["queued"] == 0

    def test_anonymous_events_use_v1(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        logger.info("watched_video", extra=cio_event(anonymous_id="anon-9", video="intro"))
        handler.flush()
        (event,) = simulator.accepted
        assert (event.anonymous_id, event.customer_id, event.route, event.data) == (
            "anon-9",
            None,
            "v1_anonymous",
            {"video": "intro"},
        )

    def test_item_over_32_kb_goes_through_v1(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        logger.info("big", extra=cio_event("user-1", blob="x" * 60_000))
        logger.info("small", extra=cio_event("user-1"))
        handler.flush()
        routes = {event.name: event.route for event in simulator.accepted}
        assert routes == {"big": "v1", "small": "v2_batch"}

    def test_batches_respect_the_500_kb_limit(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        for number in range(40):
            logger.info("chunky", extra=cio_event(f"user-{number}", blob="y" * 30_000))
        handler.flush()
        assert len(simulator.accepted) == 40
        batches = [r for r in simulator.requests if r.path == "/api/v2/batch"]
        assert len(batches) >= 3
        assert all(r.body_bytes <= 500 * 1024 and r.status == 200 for r in batches)

    def test_customer_ids_with_reserved_characters(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        awkward = "a/b ?#c..%20"
        logger.info("v2", extra=cio_event(awkward))
        logger.info("v1", extra=cio_event(awkward, blob="z" * 40_000))  # forced through v1
        handler.flush()
        assert {(e.name, e.customer_id) for e in simulator.accepted} == {
            ("v2", awkward),
            ("v1", awkward),
        }

    def test_untagged_records_are_ignored(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        for number in range(50):
            logger.info("plain log line %d", number)
        logger.info("with other extra", extra={"user": "x"})
        handler.flush()
        assert handler.status()["enqueued"] == 0
        assert simulator.requests == []

    def test_many_threads_log_at_once(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger

        def log_some(thread: int) -> None:
            for number in range(50):
                logger.info("threaded", extra=cio_event(f"t{thread}", n=number))

        threads = [threading.Thread(target=log_some, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handler.flush()
        assert len(simulator.accepted) == 400
        assert simulator.duplicates == 0


class TestCioEventDelivery:
    """What cio_event's keywords become at Customer.io."""

    def test_id_timestamp_and_data_keys_named_like_fields(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        given = str(ULID())
        tag = cio_event("user-1", id=given, timestamp=1_700_000_000, data={"name": "Alice"})
        logger.info("profile_updated", extra=tag)
        logger.info("profile_updated", extra=tag)  # the same id again: delivered once
        handler.flush()
        [event] = simulator.accepted
        assert (event.id, event.name, event.timestamp) == (given, "profile_updated", 1_700_000_000)
        assert event.data == {"name": "Alice"}


class TestDictConfig:
    """The handler is configured the way applications configure logging."""

    def test_dictconfig_with_ext_values(
        self, simulator: TrackAPISimulator, queue_dir: Path
    ) -> None:
        values = types.ModuleType("cio_test_values")
        values.TRACK_URL = simulator.url  # type: ignore[attr-defined]
        values.CA_FILE = simulator.ca_file  # type: ignore[attr-defined]
        sys.modules["cio_test_values"] = values
        try:
            logging.config.dictConfig(
                {
                    "version": 1,
                    "disable_existing_loggers": False,
                    "handlers": {
                        "cio": {
                            "class": "cio_logging.CustomerIOHandler",
                            "level": "INFO",
                            "site_id": simulator.site_id,
                            "api_key": simulator.api_key,
                            "track_url": "ext://cio_test_values.TRACK_URL",
                            "ca_bundle": "ext://cio_test_values.CA_FILE",
                            "queue_dir": str(queue_dir),
                            "flush_interval": "0.05",
                        }
                    },
                    "loggers": {"app.dictconfig": {"handlers": ["cio"], "level": "INFO"}},
                }
            )
            logger = logging.getLogger("app.dictconfig")
            logger.info("signup", extra=cio_event("user-1", plan="pro"))
            (handler,) = logger.handlers
            assert isinstance(handler, CustomerIOHandler)
            handler.flush()
            assert [e.name for e in simulator.accepted] == ["signup"]
        finally:
            del sys.modules["cio_test_values"]

    def test_dictconfig_fails_loudly_without_credentials(
        self, monkeypatch: pytest.MonkeyPatch, queue_dir: Path
    ) -> None:
        monkeypatch.delenv("CUSTOMERIO_SITE_ID", raising=False)
        monkeypatch.delenv("CUSTOMERIO_API_KEY", raising=False)
        with pytest.raises(ValueError, match="Unable to configure handler 'cio'") as caught:
            logging.config.dictConfig(
                {
                    "version": 1,
                    "handlers": {
                        "cio": {
                            "class": "cio_logging.CustomerIOHandler",
                            "queue_dir": str(queue_dir),
                        }
                    },
                }
            )
        assert isinstance(caught.value.__cause__, ConfigurationError)
        assert "site_id is missing" in str(caught.value.__cause__)


class TestBadInput:
    """Bad events never raise into the caller; each is reported and counted."""

    @pytest.mark.parametrize(
        ("extra", "words"),
        [
            (cio_event("u", when=object()), "not JSON serializable"),
            (cio_event("u", ratio=float("nan")), "Out of range float"),
            ({"cio": {"data": {"x": 1}}}, "exactly one of customer_id"),
            (cio_event("u", blob="b" * 100_001), "Customer.io accepts at most 100,000"),
            ({"cio": "user-1"}, "must be a dict"),
        ],
    )
    def test_refused_at_emit_with_a_clear_message(
        self,
        event_logger: Logged,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
        extra: dict[str, object],
        words: str,
    ) -> None:
        logger, handler = event_logger
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            logger.info("bad", extra=extra)  # must not raise
        refusals = [r for r in caplog.records if r.name == "cio_logging"]
        assert len(refusals) == 1
        assert words in refusals[0].getMessage()
        assert "refused at emit" in refusals[0].getMessage()
        assert handler.status()["dropped"] == {"invalid_event": 1}
        logger.info("good", extra=cio_event("u"))
        handler.flush()
        assert [e.name for e in simulator.accepted] == ["good"]

    def test_a_clashing_data_key_is_refused_at_emit_and_never_raises(
        self, event_logger: Logged, simulator: TrackAPISimulator, caplog: pytest.LogCaptureFixture
    ) -> None:
        logger, handler = event_logger
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            logger.info("bad", extra=cio_event("u", data={"plan": "a"}, plan="b"))
        [refusal] = [r for r in caplog.records if r.name == "cio_logging"]
        assert "'plan' both in data= and as keywords" in refusal.getMessage()
        assert handler.status()["dropped"] == {"invalid_event": 1}

    def test_the_loggers_name_is_not_repeated_in_its_messages(
        self, event_logger: Logged, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With the examples' "%(name)s: %(message)s", a message reads "cio_logging: ..." once."""
        logger, _ = event_logger
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            logger.info("bad", extra={"cio": "user-1"})
        formatter = logging.Formatter("%(name)s: %(message)s")
        [line] = [formatter.format(r) for r in caplog.records if r.name == "cio_logging"]
        assert line.startswith("cio_logging: event refused at emit")
        assert "cio_logging: cio_logging:" not in line

    def test_no_library_message_starts_with_the_loggers_name(self) -> None:
        """Every message the package logs, found in its source: none repeats "cio_logging: "."""
        package = Path(__file__).resolve().parents[2] / "cio_logging"
        prefixed = [
            f"{path.name}:{number}"
            for path in sorted(package.glob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"""["']cio_logging[ :]""", line)
        ]
        assert prefixed == []

    def test_a_tag_passed_as_the_argument_is_reported_once_per_logger(
        self,
        event_logger: Logged,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        logger, handler = event_logger
        other = logging.getLogger(f"{logger.name}.other")
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            for _ in range(3):
                logger.info("purchase", cio_event("u"))  # not extra=: silently lost before
            other.info("signup", cio_event("u"))
        warnings = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert len(warnings) == 2, warnings
        assert f"logger {logger.name} carry" in warnings[0]
        assert f"logger {other.name} carry" in warnings[1]
        assert all("extra=cio_event(...)" in warning for warning in warnings)
        assert handler.status()["dropped"] == {"unreadable_tag": 4}
        handler.flush()
        assert simulator.accepted == []

    def test_a_tag_nested_under_its_own_key_is_refused_with_the_fix(
        self, event_logger: Logged, caplog: pytest.LogCaptureFixture
    ) -> None:
        logger, handler = event_logger
        with caplog.at_level(logging.WARNING, logger="cio_logging"):
            logger.info("purchase", extra={"cio": cio_event("u")})
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert "pass extra=cio_event(...), not" in warning
        assert handler.status()["dropped"] == {"invalid_event": 1}

    def test_a_failing_disk_keeps_events_in_memory_until_it_recovers(
        self,
        event_logger: Logged,
        simulator: TrackAPISimulator,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        logger, handler = event_logger
        working_append = handler._wal.append_rows

        def broken_append(rows: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(handler._wal, "append_rows", broken_append)
        with caplog.at_level(logging.ERROR, logger="cio_logging"):
            logger.info("purchase", extra=cio_event("u", n=1))  # must not raise
            logger.info("page_viewed", extra=cio_event("u", n=2))
        status = handler.status()
        assert status["buffered"] == 2
        assert "No space left on device" in status["disk_error"]
        assert status["dropped"] == {}
        errors = [r.getMessage() for r in caplog.records if r.name == "cio_logging"]
        assert len(errors) == 1
        assert "kept in memory" in errors[0]
        monkeypatch.setattr(handler._wal, "append_rows", working_append)
        assert wait_for(lambda: handler.status()["buffered"] == 0, 10)
        assert handler.status()["disk_error"] is None
        handler.flush()
        assert sorted(e.data["n"] for e in simulator.accepted) == [1, 2]


class TestOutages:
    """While Customer.io fails, events wait on disk; after recovery all arrive."""

    @pytest.mark.parametrize("fault", ["503", "500", "429", "reset", "refused", "slow"])
    def test_outage_then_recovery(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, fault: str
    ) -> None:
        # A short reset_timeout: the breaker opens during the outage and must probe soon.
        handler = make_handler(request_timeout=0.5, reset_timeout=0.3)
        logger = logging.getLogger(f"outage.{fault}")
        logger.propagate = False
        logger.addHandler(handler)
        if fault == "reset":
            simulator.reset_connections()
        elif fault == "refused":
            simulator.refuse_connections()
        elif fault == "slow":
            simulator.set_latency(1.5)
        else:
            simulator.fail(int(fault), retry_after="0" if fault == "429" else None)
        for number in range(20):
            logger.warning("during_outage", extra=cio_event(f"user-{number}", n=number))
        assert wait_for(lambda: handler.status()["failed_requests"] >= 2, 10)
        assert simulator.accepted == []
        assert handler.status()["queued"] == 20
        simulator.clear_faults()
        if fault == "refused":
            simulator.start()
        handler.flush()
        assert wait_for(lambda: len(simulator.accepted) == 20, 10)
        assert sorted(e.data["n"] for e in simulator.accepted) == list(range(20))
        # With "slow", the simulator accepted requests the client had given up on; the
        # client resends them (same ids, deduplicated) before its queue is empty.
        assert wait_for(lambda: handler.status()["queued"] == 0, 10)
        assert handler.status()["dead_letters"] == 0

    def test_wrong_certificate_is_refused(
        self, simulator: TrackAPISimulator, queue_dir: Path, tmp_path: Path
    ) -> None:
        other_ca = TrackAPISimulator(state_dir=tmp_path / "other")
        try:
            settings = handler_settings(simulator, queue_dir, ca_bundle=other_ca.ca_file)
            handler = CustomerIOHandler(**settings)
            logger = logging.getLogger("tls.wrong")
            logger.propagate = False
            logger.addHandler(handler)
            logger.warning("purchase", extra=cio_event("user-1"))
            assert wait_for(lambda: handler.status()["failed_requests"] >= 1, 10)
            assert "certificate" in str(handler.status()["last_error"])
            assert simulator.accepted == []
            assert handler.status()["queued"] == 1
            handler.close()
        finally:
            other_ca.close()

    def test_ca_bundle_wins_over_requests_ca_bundle(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
        monkeypatch.setenv("CURL_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
        handler = make_handler()
        logger = logging.getLogger("tls.pinned")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("purchase", extra=cio_event("user-1"))
        handler.flush()
        assert [e.name for e in simulator.accepted] == ["purchase"]

    def test_sdk_exception_text_never_reaches_a_log(
        self,
        make_handler: HandlerFactory,
        simulator: TrackAPISimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        handler = make_handler()
        logger = logging.getLogger("privacy")
        logger.propagate = False
        logger.addHandler(handler)
        simulator.fail(500, body={"meta": {"error": "boom for person-secret-77"}})
        with caplog.at_level(logging.DEBUG):
            logger.warning("purchase", extra=cio_event("person-secret-77", card="4111-secret"))
            assert wait_for(lambda: handler.status()["failed_requests"] >= 2, 10)
        # urllib3's own DEBUG lines name the request URL (documented in the README);
        # everything else, ours included, must carry no request data.
        ours = [r for r in caplog.records if not r.name.startswith("urllib3")]
        text = "\n".join(r.getMessage() for r in ours) + str(handler.status())
        assert "HTTP 500" in text
        for secret in ("person-secret-77", "4111-secret", "card", simulator.api_key):
            assert secret not in text


class TestPayloadErrors:
    """A poison event is dead-lettered alone; its neighbours are delivered."""

    def test_207_item_error_dead_letters_only_that_event(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        simulator.poison_names = {"poison"}
        for number in range(5):
            logger.info("poison" if number == 2 else "fine", extra=cio_event(f"u{number}"))
        handler.flush()
        assert sorted(e.customer_id or "" for e in simulator.accepted) == ["u0", "u1", "u3", "u4"]
        status = handler.status()
        assert (status["queued"], status["dead_letters"]) == (0, 1)
        (letter,) = list(handler._dead_letters)
        assert letter.event is not None
        assert letter.event["name"] == "poison"
        assert letter.status == 207
        assert letter.error_type == "item_rejected"
        assert letter.attempts == 1

    def test_whole_batch_400_is_bisected(
        self, event_logger: Logged, simulator: TrackAPISimulator
    ) -> None:
        logger, handler = event_logger
        simulator.fail(400, count=1)  # the first request is rejected whole
        for number in range(8):
            logger.info("fine", extra=cio_event(f"u{number}"))
        handler.flush()
        assert wait_for(lambda: handler.status()["queued"] == 0, 10)
        # the rejected request's events were resent in halves and accepted
        assert len(simulator.accepted) + handler.status()["dead_letters"] == 8
        assert len(simulator.accepted) >= 7


class TestLifecycle:
    """flush and close are bounded; close is idempotent and leaves unsent events on disk."""

    def test_close_twice_and_emit_after_close(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        logger = logging.getLogger("lifecycle.close")
        logger.propagate = False
        logger.addHandler(handler)
        handler.close()
        handler.close()
        logger.warning("after_close", extra=cio_event("u"))  # kept on disk for later
        assert handler.status()["queued"] == 1

    def test_close_is_bounded_during_an_outage(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        simulator.set_latency(5)
        handler = make_handler(request_timeout=10, close_timeout=0.5)
        logger = logging.getLogger("lifecycle.bounded")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("stuck", extra=cio_event("u"))
        time.sleep(0.3)  # let the worker start its slow request
        started = time.monotonic()
        handler.close()
        assert time.monotonic() - started < 2
        assert handler.status()["queued"] == 1

    def test_flush_is_bounded(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        simulator.set_latency(3)
        handler = make_handler(request_timeout=10, flush_timeout=0.3)
        logger = logging.getLogger("lifecycle.flush")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("slow", extra=cio_event("u"))
        started = time.monotonic()
        handler.flush()
        assert time.monotonic() - started < 1.5

    def test_a_new_handler_delivers_what_an_old_one_left(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        simulator.fail(503)
        first = make_handler()
        logger = logging.getLogger("lifecycle.restart")
        logger.propagate = False
        logger.addHandler(first)
        for number in range(10):
            logger.warning("left_behind", extra=cio_event(f"u{number}"))
        first.close()
        logger.removeHandler(first)
        simulator.clear_faults()
        second = make_handler()  # logs nothing itself
        assert wait_for(lambda: len(simulator.accepted) == 10, 10)
        # The simulator records an event before its answer leaves; the row goes after.
        assert wait_for(lambda: second.status()["queued"] == 0, 10)

    def test_repr_never_shows_the_api_key(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        handler = make_handler()
        assert simulator.api_key not in repr(handler)
        assert simulator.api_key not in repr(handler.settings)
        assert simulator.api_key not in str(handler.status())


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t for t in threading.enumerate() if t.name == "cio_logging-flush" and t.is_alive()]
    for thread in leaked:
        thread.join(5)
