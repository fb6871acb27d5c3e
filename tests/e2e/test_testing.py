"""cio_logging.testing and its pytest plugin, the plugin run by pytest itself (pytester)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import structlog

from cio_logging import cio_event, cio_group, cio_merge, cio_screen
from cio_logging.simulator import TrackAPISimulator
from cio_logging.testing import CioSimulator, capture_cio_events

from ..helpers import APIS, PROJECT_ROOT, HandlerFactory

pytest_plugins = ["pytester"]

EXAMPLE = PROJECT_ROOT / "examples" / "testing"

#: An ini file as strict as the project's own: any warning fails the inner session.
STRICT_INI = "[pytest]\nfilterwarnings = error\naddopts = --strict-markers -p no:cacheprovider\n"


class _RaisingTag(dict[str, object]):
    """A tag whose lookups raise, as a lazy object might."""

    def get(self, key: str, default: object = None) -> object:
        raise RuntimeError("secret")


def fresh_logger() -> logging.Logger:
    logger = logging.getLogger(f"test.testing.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def log_a_mix(logger: logging.Logger) -> None:
    """Records of every kind: events, refusals of each sort, untagged lines."""
    logger.info("purchase", extra=cio_event("user-1", amount=5))
    logger.info("ignored", extra=cio_event(anonymous_id="visitor-1", name="viewed"))
    logger.info("bad", extra=cio_event("user-1", ratio=float("nan")))
    logger.info("nobody", extra={"cio": {"data": {}}})
    logger.info("positional", cio_event("user-1"))
    logger.info('{"cio": {"customer_id": "user-1"}, "event": "rendered"}')
    logger.info({"event": "signup", **cio_event("user-2")})  # a structlog event dict
    logger.info("just a line mentioning cio_logging")
    logger.info("no event here", extra={"cio": None})


class TestCaptureCioEvents:
    """capture_cio_events sees what the handler would send, and what it would refuse."""

    def test_agrees_with_the_real_handler(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator
    ) -> None:
        logger = fresh_logger()
        handler = make_handler()
        logger.addHandler(handler)
        with capture_cio_events(logger) as captured:
            log_a_mix(logger)
        handler.flush()
        assert captured.names == ["purchase", "viewed", "signup"]
        assert sorted(captured.names) == sorted(e.name for e in simulator.accepted)
        dropped = handler.status()["dropped"]
        assert dropped == {"invalid_event": 2, "unreadable_tag": 2}
        assert len(captured.refusals) == sum(dropped.values())
        assert [r.shape for r in captured.refusals] == [None, None, "args", "rendered"]
        assert "Out of range float" in captured.refusals[0].reason
        assert captured.refusals[0].record.getMessage() == "bad"

    @pytest.mark.parametrize("api", APIS)
    def test_agrees_with_the_handler_on_what_each_api_carries(
        self, make_handler: HandlerFactory, simulator: TrackAPISimulator, api: str
    ) -> None:
        """What one API carries the other refuses (a merge, a group, a large screen
        view), and a record whose tag raises while read: the same refusals, by rule."""
        logger = fresh_logger()
        handler = make_handler()
        logger.addHandler(handler)
        with capture_cio_events(logger, api=api) as captured:
            logger.info("merged", extra=cio_merge("user-1", "user-2"))
            logger.info("joined", extra=cio_group("user-1", "acme"))
            logger.info("feed", extra=cio_screen("user-1", blob="x" * 40_000))
            logger.info("late", extra={"cio": _RaisingTag()})
            logger.info("fine", extra=cio_event("user-1"))
        handler.flush()
        assert sorted(captured.names) == sorted(e.name for e in simulator.accepted)
        refused = handler.status()["refused"]
        assert len(captured.refusals) == sum(refused.values()) == 3
        assert refused["unreadable_record"] == 1
        assert refused["unsupported_call"] == 1
        assert "secret" not in " ".join(refusal.reason for refusal in captured.refusals)

    def test_the_event_is_the_one_the_handler_would_queue(self) -> None:
        logger = fresh_logger()
        with capture_cio_events(logger) as captured:
            logger.info("purchase", extra=cio_event("user-1", amount=5, sku="A-1"))
        (event,) = captured.events
        assert (event.customer_id, event.anonymous_id) == ("user-1", None)
        assert event.data == {"amount": 5, "sku": "A-1"}
        assert len(event.id) == 26

    def test_captures_at_the_root_and_detaches_after(self) -> None:
        logger = logging.getLogger(f"test.testing.{time.monotonic_ns()}")
        logger.setLevel(logging.INFO)
        before = list(logging.getLogger().handlers)
        with capture_cio_events() as captured:
            logger.info("purchase", extra=cio_event("user-1"))
        logger.info("after", extra=cio_event("user-1"))
        assert captured.names == ["purchase"]
        assert logging.getLogger().handlers == before

    def test_leaves_levels_alone_unless_asked(self) -> None:
        logger = logging.getLogger(f"test.testing.{time.monotonic_ns()}")
        logger.setLevel(logging.WARNING)
        with capture_cio_events(logger) as untouched:
            logger.info("purchase", extra=cio_event("user-1"))
        with capture_cio_events(logger, level=logging.INFO) as lowered:
            logger.info("purchase", extra=cio_event("user-1"))
        assert untouched.events == []
        assert lowered.names == ["purchase"]
        assert logger.level == logging.WARNING

    def test_sees_structlog_records(self) -> None:
        logger = fresh_logger()
        structlog.configure(
            processors=[structlog.stdlib.render_to_log_kwargs],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=False,
        )
        try:
            with capture_cio_events(logger) as captured:
                structlog.get_logger(logger.name).info("purchase", extra=cio_event("user-1"))
        finally:
            structlog.reset_defaults()
        assert captured.names == ["purchase"]


class TestCioSimulator:
    """The object behind the cio_simulator fixture, used directly."""

    def test_a_handler_built_from_it_delivers_and_is_closed_and_detached(
        self, tmp_path: Path
    ) -> None:
        logger = fresh_logger()
        with CioSimulator(tmp_path) as sim:
            handler = sim.handler()
            logger.addHandler(handler)
            logger.info("purchase", extra=cio_event("user-1", amount=5))
            handler.flush()
            assert [(e.name, e.customer_id, e.data) for e in sim.events] == [
                ("purchase", "user-1", {"amount": 5})
            ]
        assert logger.handlers == []

    def test_its_environment_configures_a_handler(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from cio_logging import CustomerIOHandler

        logger = fresh_logger()
        with CioSimulator(tmp_path) as sim:
            for name, value in sim.environ().items():
                monkeypatch.setenv(name, value)
            handler = CustomerIOHandler()
            try:
                logger.addHandler(handler)
                logger.info("purchase", extra=cio_event("user-1"))
                handler.flush()
                assert sim.wait_for_events(1)
            finally:
                handler.close()
            assert [e.name for e in sim.events] == ["purchase"]


class TestPytestPlugin:
    """The pytest11 entry point, in a pytest run of its own (pytester, a subprocess)."""

    def test_the_example_passes_under_filterwarnings_error(self, pytester: pytest.Pytester) -> None:
        pytester.makeini(STRICT_INI)
        for name in ("shop.py", "test_shop.py"):
            shutil.copy(EXAMPLE / name, pytester.path / name)
        result = pytester.runpytest_subprocess("-q")
        result.assert_outcomes(passed=3)

    def test_the_recipe_shows_the_example_as_it_is(self) -> None:
        """docs/how-to/testing.md quotes examples/testing/test_shop.py: line for line."""

        def code(text: str) -> list[str]:
            return [line.split("  #")[0].rstrip() for line in text.splitlines() if line.strip()]

        page = (PROJECT_ROOT / "docs" / "how-to" / "testing.md").read_text()
        section = page.split("\n## Deliver to a simulator\n", 1)[1]
        shown = code(section.split("```python\n", 1)[1].split("```", 1)[0])
        example = code((EXAMPLE / "test_shop.py").read_text())
        assert len(shown) > 10
        assert [line for line in shown if line not in example] == []

    def test_a_wrong_expectation_fails_with_the_events_shown(
        self, pytester: pytest.Pytester
    ) -> None:
        pytester.makeini(STRICT_INI)
        pytester.makepyfile(
            test_wrong="""
            import logging
            from cio_logging import cio_event
            from cio_logging.testing import capture_cio_events

            def test_wrong_name():
                log = logging.getLogger("app.events")
                with capture_cio_events(log, level=logging.INFO) as captured:
                    log.info("purchased", extra=cio_event("user-1"))
                assert captured.names == ["purchase"]
            """
        )
        result = pytester.runpytest_subprocess("-q")
        result.assert_outcomes(failed=1)
        assert "AssertionError: assert ['purchased'] == ['purchase']" in result.stdout.str()

    def test_the_fixture_delivers_and_cleans_up(self, pytester: pytest.Pytester) -> None:
        pytester.makeini(STRICT_INI)
        pytester.makepyfile(
            test_fixture="""
            import logging
            from cio_logging import cio_event

            seen = {}

            def test_deliver(cio_simulator):
                log = logging.getLogger("app.events")
                log.setLevel(logging.INFO)
                handler = cio_simulator.handler()
                log.addHandler(handler)
                log.info("purchase", extra=cio_event("user-1"))
                handler.flush()
                assert [e.name for e in cio_simulator.events] == ["purchase"]
                assert cio_simulator.url.startswith("https://127.0.0.1:")
                seen["handler"] = handler

            def test_next_test_starts_clean(cio_simulator):
                assert logging.getLogger("app.events").handlers == []
                assert cio_simulator.events == []
            """
        )
        result = pytester.runpytest_subprocess("-q")
        result.assert_outcomes(passed=2)

    def test_inactive_without_the_testing_extra(self, pytester: pytest.Pytester) -> None:
        """Without trustme the plugin registers no fixture; capture_cio_events still works."""
        pytester.makeini(STRICT_INI)
        # Loaded with -p, before the entry points: trustme cannot be imported.
        pytester.makepyfile(hide_trustme="import sys\nsys.modules['trustme'] = None\n")
        pytester.makepyfile(
            test_app="""
            import logging
            from cio_logging import cio_event
            from cio_logging.testing import capture_cio_events

            def test_capture_needs_no_simulator():
                log = logging.getLogger("app.events")
                with capture_cio_events(log, level=logging.INFO) as captured:
                    log.info("purchase", extra=cio_event("user-1"))
                assert captured.names == ["purchase"]

            def test_wants_the_fixture(cio_simulator):
                pass
            """
        )
        result = pytester.runpytest_subprocess("-p", "hide_trustme", "-q")
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*fixture 'cio_simulator' not found*"])
        assert (
            "cio_logging._pytest_fixtures"
            not in pytester.runpytest_subprocess("-p", "hide_trustme", "--fixtures").stdout.str()
        )

    def test_active_fixture_is_listed_once_beside_pytests_own(
        self, pytester: pytest.Pytester
    ) -> None:
        result = pytester.runpytest_subprocess("--fixtures")
        fixtures = [line.split(" ")[0] for line in result.stdout.lines]
        assert fixtures.count("cio_simulator") == 1
        assert "simulator" not in fixtures  # the project's conftest fixtures stay its own


def test_this_session_has_both_the_plugin_and_its_own_simulator(
    request: pytest.FixtureRequest, simulator: TrackAPISimulator, cio_simulator: CioSimulator
) -> None:
    """The project's own session: the plugin is active, and its fixture is another server."""
    assert request.config.pluginmanager.has_plugin("cio_logging.fixtures")
    assert simulator.url != cio_simulator.url
