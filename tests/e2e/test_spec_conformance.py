"""What the handler really sends validates against Customer.io's published spec."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from urllib.parse import unquote

from ulid import ULID

from cio_logging import cio_event
from cio_logging.simulator import TrackAPISimulator

from ..helpers import HandlerFactory
from ..spec_check import (
    ANONYMOUS_EVENTS_REQUEST,
    BATCH_BODY,
    EVENTS_REQUEST,
    Spec,
    run_in_a_fresh_clone,
)


def test_every_request_the_handler_sends_conforms(
    make_handler: HandlerFactory, simulator: TrackAPISimulator, spec: Spec
) -> None:
    simulator.record_bodies = True
    handler = make_handler()
    logger = logging.getLogger("spec.conformance")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("purchase", extra=cio_event("user-42", amount=9.99, items=[{"sku": "A"}]))
    logger.warning(
        "typed",
        extra={
            "cio": {"customer_id": 7, "id": str(ULID()), "timestamp": 1_764_300_000, "data": {}}
        },
    )
    logger.warning("anonymous", extra=cio_event(anonymous_id="anon-1", source="ad"))
    logger.warning("oversized", extra=cio_event("user/?#1", blob="x" * 40_000))
    handler.flush()
    assert len(simulator.accepted) == 4

    routes = set()
    for request in simulator.requests:
        assert request.status == 200
        if request.path == "/api/v2/batch":
            routes.add("v2")
            assert spec.errors(BATCH_BODY, request.payload) == []
            for item in request.payload["batch"]:
                assert set(item) == {
                    "type",
                    "identifiers",
                    "action",
                    "name",
                    "id",
                    "timestamp",
                    "attributes",
                }
        elif request.path == "/api/v1/events":
            routes.add("v1 anonymous")
            assert spec.errors(ANONYMOUS_EVENTS_REQUEST, request.payload) == []
        else:
            routes.add("v1")
            assert unquote(request.path) == "/api/v1/customers/user/?#1/events"
            assert spec.errors(EVENTS_REQUEST, request.payload) == []
            assert set(request.payload) == {"name", "data", "id", "timestamp"}
    assert routes == {"v2", "v1 anonymous", "v1"}


def test_the_spec_check_is_not_vacuous(spec: Spec) -> None:
    """Negative controls: bodies that break the spec are reported."""
    assert spec.errors(EVENTS_REQUEST, {"data": {}}) != []
    assert spec.errors(EVENTS_REQUEST, {"name": "x", "timestamp": "soon"}) != []
    assert spec.errors(BATCH_BODY, {"batch": [{"type": "person", "action": "event"}]}) != []


class TestWithoutTheSpec:
    """A fresh clone, with no shared/spec beside it: the skip says why, and CI=true fails."""

    @staticmethod
    def run_in_a_fresh_clone(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return run_in_a_fresh_clone(
            tmp_path, "tests/e2e/test_spec_conformance.py", "not TestWithoutTheSpec", **env
        )

    def test_the_skip_says_why_in_the_summary(self, tmp_path: Path) -> None:
        result = self.run_in_a_fresh_clone(tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 skipped" in result.stdout
        # Even with -rN (no skip reasons), the summary names the cause and the fix.
        summary = " ".join(result.stdout.split())
        assert "2 test(s) skipped: Customer.io's Track API spec is absent" in summary
        assert f"put it at {tmp_path / 'clone' / 'shared' / 'spec'}" in summary
        assert "or set CIO_TRACK_SPEC to its path" in summary

    def test_under_ci_a_missing_spec_fails(self, tmp_path: Path) -> None:
        result = self.run_in_a_fresh_clone(tmp_path, CI="true")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "2 errors" in result.stdout
        assert "Track API spec is absent" in result.stdout
        assert "skipped" not in result.stdout
