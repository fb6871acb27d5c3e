"""One batch's requests and answers: send, ask the outcome policy, split as told.

:func:`exchange` sends a planned batch's requests in order through the client and the
breaker, asks :func:`~cio_logging.sender.outcome.decide` what each answer means and
carries out a :class:`~cio_logging.sender.outcome.Split` (the two halves, in order, the
second only once the first is settled). It decides nothing itself and writes nothing:
it returns what happened to each call, as a :class:`Result`, for the effects to apply.

After a failure that is not a call's own (a retry, a pause, a request never sent), the
batch's later requests are not sent: they stay queued as they were ("deferred"), and a
person's later call waits behind an earlier one that now waits for its retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..resilience import DeliveryBreaker
from ..transport.answer import Answer
from ..transport.base import DeliveryClient
from .outcome import (
    Deliver,
    Evidence,
    NotSent,
    Pause,
    Reason,
    Reject,
    Retry,
    Split,
    decide,
)
from .plan import Planned, Request

#: The answer to a request the breaker kept back.
_KEPT_BACK = Answer(None, "circuit_open", "circuit breaker open: not sent")


@dataclass(slots=True)
class Result:
    """What one batch's requests did to its calls (indices into the batch).

    ``delivered``: accepted. ``refused``: at fault, with the reason (dead-letter).
    ``retry``: failed through no fault of theirs, and the decision (when, counted).
    ``deferred``: never sent (after a failure, or kept back): left as they were.
    ``pause``: ours to fix (credentials, TLS). ``uncertain``: 207 errors that named no
    call. ``failure``: the first failure, for ``last_error``.
    """

    planned: Planned
    delivered: list[int] = field(default_factory=list)
    refused: list[tuple[int, Reason]] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    retry_decision: Retry | None = None
    deferred: list[int] = field(default_factory=list)
    pause: Pause | None = None
    uncertain: int = 0
    requests: int = 0
    failed_requests: int = 0
    failure: Reason | None = None

    @property
    def stopped(self) -> bool:
        """A failure not of a call's making: send nothing more for now."""
        return self.retry_decision is not None or self.pause is not None or bool(self.deferred)


def exchange(
    planned: Planned,
    client: DeliveryClient,
    breaker: DeliveryBreaker,
    *,
    probe: bool = False,
) -> Result:
    """Send ``planned``'s requests and read every answer through the outcome policy."""
    result = Result(planned)
    evidence = _Evidence()
    # Calls past Customer.io's 72-hour window are accepted and start no campaign: say
    # so (counted, and warned about once a minute at most) before they go.
    client.window.note(planned.late, planned.oldest)
    for request in planned.requests:
        if result.stopped:
            result.deferred.extend(request.indices)
        else:
            _send(request, 0, len(request.indices), client, breaker, evidence, result, probe)
    return result


class _Evidence:
    """What this exchange showed so far (see outcome.Evidence)."""

    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = False
        self.refused = 0

    def now(self) -> Evidence:
        return Evidence(self.accepted, self.refused)


def _send(
    request: Request,
    start: int,
    end: int,
    client: DeliveryClient,
    breaker: DeliveryBreaker,
    evidence: _Evidence,
    result: Result,
    probe: bool,
) -> None:
    """Send the calls ``request.indices[start:end]`` as one request, and settle them."""
    indices = request.indices[start:end]
    if not breaker.permits():
        answer = _KEPT_BACK
    else:
        if request.single is not None:
            answer = client.post_single(request.single)
        else:
            answer = client.post_batch(request.items[start:end])
        result.requests += 1
    decision = decide(answer, len(indices), evidence.now(), probe=probe)
    if isinstance(decision, Deliver):
        breaker.succeeded()
        evidence.accepted = True
        refused = {indices[position]: reason for position, reason in decision.refused.items()}
        result.refused.extend(refused.items())
        if refused:
            result.delivered.extend(index for index in indices if index not in refused)
        else:
            result.delivered.extend(indices)
        result.uncertain += decision.uncertain
    elif isinstance(decision, Reject):
        breaker.succeeded()
        result.refused.append((indices[0], decision.reason))
    elif isinstance(decision, Split):
        evidence.refused += 1
        result.failed_requests += 1
        middle = start + decision.at
        _send(request, start, middle, client, breaker, evidence, result, probe)
        if result.stopped:
            result.deferred.extend(request.indices[middle:end])
        else:
            _send(request, middle, end, client, breaker, evidence, result, probe)
    elif isinstance(decision, Retry):
        breaker.failed(decision.breaker_failures)
        result.failed_requests += 1
        result.retry.extend(indices)
        result.retry_decision = decision
        result.failure = result.failure or decision.reason
    elif isinstance(decision, Pause):
        result.failed_requests += 1
        result.pause = decision
        result.deferred.extend(indices)
        result.failure = result.failure or decision.reason
    else:
        assert isinstance(decision, NotSent)
        result.deferred.extend(indices)
