"""Customer.io's published Track API spec, for checking requests and answers against it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
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


class Spec:
    """Customer.io's OpenAPI document, validating instances against any JSON pointer in it."""

    def __init__(self, document: dict[str, Any]) -> None:
        resource = DRAFT202012.create_resource({**document, "$id": SPEC_ID})
        self._registry: Registry[Any] = Registry().with_resource(SPEC_ID, resource)

    def errors(self, pointer: str, instance: Any) -> list[str]:
        validator = Draft202012Validator({"$ref": f"{SPEC_ID}#{pointer}"}, registry=self._registry)
        return [error.message for error in validator.iter_errors(instance)]


def load_spec() -> Spec | None:
    """The spec from shared/, or from $CIO_TRACK_SPEC; None when neither exists."""
    candidates = [SPEC_PATH]
    if os.environ.get("CIO_TRACK_SPEC"):
        candidates.append(Path(os.environ["CIO_TRACK_SPEC"]))
    for path in candidates:
        if path.is_file():
            return Spec(json.loads(path.read_text(encoding="utf-8")))
    return None
