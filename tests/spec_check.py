"""Customer.io's published Track API and Pipelines API specs, for checking requests and
answers against them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]
from referencing import Registry
from referencing.jsonschema import DRAFT202012

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The spec is not copied into the project: it lives in shared/ beside the checkout.
SPEC_PATH = PROJECT_ROOT.parent / "shared" / "spec" / "customerio-track-openapi.json"
SPEC_ID = "urn:cio-logging-tests:customerio-track-openapi"

BATCH = "/paths/~1api~1v2~1batch/post"
BATCH_BODY = f"{BATCH}/requestBody/content/application~1json/schema"
EVENTS_REQUEST = "/components/schemas/eventsRequest"
ANONYMOUS_EVENTS_REQUEST = "/components/schemas/anonymousEventsRequest"

PIPELINES_SPEC_PATH = SPEC_PATH.with_name("customerio-pipelines-openapi.json")
PIPELINES_SPEC_ID = "urn:cio-logging-tests:customerio-pipelines-openapi"
PIPELINES_BATCH_BODY = "/paths/~1batch/post/requestBody/content/application~1json/schema"
#: The schema of each Pipelines call type, as its single-call route takes it.
PIPELINES_CALLS = {
    kind: f"/components/schemas/{kind}"
    for kind in ("identify", "track", "page", "screen", "group", "alias")
}
#: The semantic track events the person calls send, by the call they stand for.
PIPELINES_SEMANTIC = {
    "delete": "/components/schemas/delete_person",
    "suppress": "/components/schemas/suppress_person",
    "unsuppress": "/components/schemas/unsuppress_person",
    "add_device": "/components/schemas/create_update_device",
    "delete_device": "/components/schemas/delete_device",
}
PIPELINES_RESPONSE_400 = "/components/responses/400/content/application~1json/schema"


class Spec:
    """Customer.io's OpenAPI document, validating instances against any JSON pointer in it.

    With a ``format_checker``, ``format`` keywords are asserted too (jsonschema only
    annotates them by default).
    """

    def __init__(
        self,
        document: dict[str, Any],
        spec_id: str = SPEC_ID,
        format_checker: FormatChecker | None = None,
    ) -> None:
        resource = DRAFT202012.create_resource({**document, "$id": spec_id})
        self._registry: Registry[Any] = Registry().with_resource(spec_id, resource)
        self._id, self._format_checker = spec_id, format_checker

    def errors(self, pointer: str, instance: Any) -> list[str]:
        validator = Draft202012Validator(
            {"$ref": f"{self._id}#{pointer}"},
            registry=self._registry,
            format_checker=self._format_checker,
        )
        return [error.message for error in validator.iter_errors(instance)]


def _read_spec(default: Path, variable: str) -> dict[str, Any] | None:
    candidates = [default]
    if os.environ.get(variable):
        candidates.append(Path(os.environ[variable]))
    for path in candidates:
        if path.is_file():
            document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return document
    return None


def load_spec(*, literal: bool = True) -> Spec | None:
    """The spec from shared/, or from $CIO_TRACK_SPEC; None when neither exists.

    ``literal=False`` reads its ``oneOf`` as ``anyOf``: its anonymous event's
    alternatives overlap too (a page view is both a "Standard anonymous event", whose
    ``type`` may be ``page``, and a "Page view"), so read literally it refuses every
    anonymous page and screen view it documents.
    """
    document = _read_spec(SPEC_PATH, "CIO_TRACK_SPEC")
    if document is None:
        return None
    return Spec(document if literal else any_of_for_one_of(document))


# RFC 3339, what JSON Schema's date-time means. jsonschema checks it only with the
# optional rfc3339-validator installed; without it the format would pass anything.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # format applies to strings only; "type" judges the rest
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper())  # the calendar: no February 30th
    return True


_DATE_TIME = FormatChecker(formats=())
_DATE_TIME.checks("date-time", raises=ValueError)(_is_date_time)


def any_of_for_one_of(schema: Any) -> Any:
    """The schema with every ``oneOf`` read as ``anyOf``.

    The Pipelines spec's ``oneOf`` alternatives overlap, so read literally it rejects
    calls it documents as valid: a batched track with a ``userId`` matches both its
    "Known User" and its "Anonymous User" (which requires no ``anonymousId``), every
    ``context`` matches both "Mobile" and "Non-mobile", a ``User Deleted`` track matches
    both the custom event and ``delete_person``, and every group matches both of its
    alternatives. Each alternative describes a valid call; a call is valid when one
    alternative takes it (``TestThePublishedSpec`` shows the literal reading failing).
    """
    if isinstance(schema, dict):
        return {
            "anyOf" if key == "oneOf" else key: any_of_for_one_of(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [any_of_for_one_of(value) for value in schema]
    return schema


#: Where the published ``oneOf`` alternatives overlap for requests the handler sends, so
#: that read literally the spec refuses calls it documents; everywhere else a request
#: must pass the literal reading (see :func:`load_as_published`).
#:
#: Track: an anonymous page or screen view is both a "Standard anonymous event" (whose
#: ``type`` may be ``page`` or ``screen``) and a "Page view" or "Mobile screen view".
TRACK_OVERLAPS = ("/components/schemas/anonymousEventsRequest",)
#: Pipelines: in a batch, a track call with a ``userId`` is both a "Known User" and an
#: "Anonymous User" (which does not require ``anonymousId``).
PIPELINES_OVERLAPS = ("/components/schemas/batch/properties/batch/items/anyOf/1",)


def any_of_at(document: dict[str, Any], pointers: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``document`` whose ``oneOf`` at each of ``pointers`` reads as ``anyOf``."""
    copy: dict[str, Any] = json.loads(json.dumps(document))
    for pointer in pointers:
        node: Any = copy
        for part in pointer.strip("/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        node["anyOf"] = node.pop("oneOf")
    return copy


def load_as_published(api: str) -> Spec | None:
    """The spec of ``api`` ("track" or "pipelines") read literally, except its ``oneOf``
    at the places listed in :data:`TRACK_OVERLAPS` / :data:`PIPELINES_OVERLAPS`;
    ``date-time`` formats are checked. None when the spec is absent."""
    if api == "track":
        document = _read_spec(SPEC_PATH, "CIO_TRACK_SPEC")
        if document is None:
            return None
        return Spec(any_of_at(document, TRACK_OVERLAPS), SPEC_ID, _DATE_TIME)
    document = _read_spec(PIPELINES_SPEC_PATH, "CIO_PIPELINES_SPEC")
    if document is None:
        return None
    return Spec(any_of_at(document, PIPELINES_OVERLAPS), PIPELINES_SPEC_ID, _DATE_TIME)


def load_pipelines_spec(*, literal: bool = False) -> Spec | None:
    """The Pipelines spec from shared/, or from $CIO_PIPELINES_SPEC; None when neither exists.

    Its ``oneOf`` are read as ``anyOf`` (see :func:`any_of_for_one_of`) unless
    ``literal``; ``date-time`` formats are checked.
    """
    document = _read_spec(PIPELINES_SPEC_PATH, "CIO_PIPELINES_SPEC")
    if document is None:
        return None
    if not literal:
        document = any_of_for_one_of(document)
    return Spec(document, PIPELINES_SPEC_ID, _DATE_TIME)


def run_in_a_fresh_clone(
    tmp_path: Path, test_file: str, selection: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``pytest test_file -k selection`` in a copy of tests/ with no shared/spec beside it
    and no spec variable set (``env`` adds variables, such as CI)."""
    clone = tmp_path / "clone" / "cio_logging_checkout"
    shutil.copytree(PROJECT_ROOT / "tests", clone / "tests")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", clone)
    unset = {"CI", "CIO_TRACK_SPEC", "CIO_PIPELINES_SPEC"}
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN"]
    return subprocess.run(
        [*command, test_file, "-k", selection],
        cwd=clone,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
