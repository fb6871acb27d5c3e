"""What a request came back with: the one value the transport hands the sender."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's result, as the transport read it; words safe to log.

    ``status`` is None when no answer came (``error_type`` names the cause:
    ``ConnectionError``, ``ReadTimeout``, ``SSLError``; ``circuit_open`` or
    ``stopped`` when it was never sent). ``item_errors`` maps the index of each call a
    207 refused to the server's reason; ``unmatched_errors`` counts 207 errors that
    name no call of the request. ``names_a_call``: a refusal whose body points at a
    field or an item (``{"errors": [{"field": ...}]}``), not a bare "Bad Request".
    """

    status: int | None
    error_type: str = ""
    message: str = ""
    retry_after: float | None = None
    item_errors: Mapping[int, str] = field(default_factory=dict)
    unmatched_errors: int = 0
    names_a_call: bool = False

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300
