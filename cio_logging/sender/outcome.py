"""What an answer means: one pure policy, used wherever calls are sent.

The transport turns every request's result into an :class:`Answer` (the status, the
server's scrubbed words, a Retry-After, which items a 207 refused). :func:`decide` turns
an answer into a :class:`Decision`; it never sends, sleeps, reads a clock or writes
anything. The exchange (``exchange.py``) carries out a :class:`Split`; the effects
(``effects.py``) write every other decision into the stores. ``dlq replay`` puts entries
back in the queue and ``drain`` runs the sender, so both meet exactly these rules.

::

    Decision
     +-- Deliver        accepted: acknowledge, except the calls a 207 refused
     +-- Split          a refused request of several calls: send each half
     +-- Reject         this one call is at fault: dead-letter it
     +-- Retry          Customer.io or the network failed: retry later
     +-- Pause          ours to fix (credentials, TLS): pause, count nothing
     +-- NotSent        never sent (breaker open, shutting down): nothing happened

Rules, and why:

* A payload status (400, 413, 422) on a request of several calls is split in halves:
  one bad call must not take its neighbours down with it.
* A payload status on a single call is that call's fault only when something explains
  it: the answer names an item or a field, or another request of the same exchange was
  accepted (the server takes other content now). Otherwise it is the server's fault (a
  proxy, a bad deploy answering ``400 {"meta":{"error":"Bad Request"}}`` to everything):
  retried like a 5xx, counted by the breaker, nothing dead-lettered.
* A 429 counts no attempt against the calls (Customer.io asked us to slow down; the
  calls did nothing wrong), nor does a failed breaker probe: however long an outage
  lasts, nothing is dead-lettered before ``max_event_age``. A 429 with no Retry-After
  backs off like any retry (the calls' own exponential backoff).
* Retry-After (on any status) holds every request, not just these calls.
* A 207 whose errors name items of the request dead-letters those items alone; errors
  that name nothing the request carried are counted as uncertain and reported: the
  server accepted the request, and resending calls it accepted would not tell which
  ones it refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ..transport.answer import Answer

__all__ = [
    "Answer",
    "Decision",
    "Deliver",
    "Evidence",
    "NotSent",
    "Pause",
    "Reason",
    "Reject",
    "Retry",
    "Split",
    "decide",
]

#: Statuses that blame the request's content: retrying the same bytes cannot succeed.
PAYLOAD_STATUSES: Final = frozenset({400, 413, 422})
#: Statuses that refuse the credentials: ours to fix.
AUTH_STATUSES: Final = frozenset({401, 403})
#: Error types of a request that never left: nothing happened to its calls.
NOT_SENT_TYPES: Final = frozenset({"circuit_open", "stopped"})
#: Error types of a TLS set-up that does not verify: ours to fix, like credentials.
CONFIG_TYPES: Final = frozenset({"SSLError"})


@dataclass(frozen=True, slots=True)
class Reason:
    """Why calls failed, as stored with a retry or a dead letter."""

    error_type: str
    status: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Accepted. ``refused``: index -> reason of each call a 207 refused (dead-letter
    those); ``uncertain``: 207 errors that named no call of the request."""

    refused: Mapping[int, Reason] = field(default_factory=dict)
    uncertain: int = 0


@dataclass(frozen=True, slots=True)
class Split:
    """Send the first ``at`` calls, then the rest, as two requests (then decide each)."""

    at: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Reject:
    """The one call of the request is at fault: dead-letter it, never retry."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class Retry:
    """Sent and failed through no fault of the calls: retry each after its backoff.

    ``count_attempt``: whether this counts towards ``max_attempts``. ``hold``: seconds
    every request waits (Retry-After, or the 429 default), None for none.
    ``breaker_failures``: how many failed requests to report to the breaker.
    """

    reason: Reason
    count_attempt: bool = True
    hold: float | None = None
    breaker_failures: int = 1


@dataclass(frozen=True, slots=True)
class Pause:
    """Ours to fix (credentials refused, TLS does not verify): pause delivery, count
    no attempt, dead-letter nothing. ``kind``: ``"auth"`` or ``"config"``."""

    reason: Reason
    kind: str


@dataclass(frozen=True, slots=True)
class NotSent:
    """The request never left (breaker open, shutting down): nothing to record."""

    reason: Reason


Decision = Deliver | Split | Reject | Retry | Pause | NotSent


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the exchange so far says about the server, for :func:`decide`.

    ``accepted``: some request of this exchange was accepted (the server takes other
    content now, so a refusal is about content). ``refused``: requests of this exchange
    refused with a payload status so far, this answer's request included.
    """

    accepted: bool = False
    refused: int = 0


def decide(
    answer: Answer, calls: int, evidence: Evidence = Evidence(), *, probe: bool = False
) -> Decision:
    """The decision for ``answer`` to a request of ``calls`` calls.

    ``evidence``: what earlier requests of the same exchange showed (see
    :class:`Evidence`). ``probe``: the request was the breaker's half-open probe (its
    failure counts no attempt: the breaker already knows Customer.io is down).
    """
    reason = Reason(answer.error_type or _status_type(answer.status), answer.status, answer.message)
    if answer.accepted:
        return _accepted(answer, calls)
    if answer.error_type in NOT_SENT_TYPES:
        return NotSent(reason)
    if answer.status in AUTH_STATUSES:
        return Pause(reason, "auth")
    if answer.status is None and answer.error_type in CONFIG_TYPES:
        return Pause(reason, "config")
    if answer.status in PAYLOAD_STATUSES:
        if calls > 1:
            return Split(calls // 2, reason)
        if answer.names_a_call or evidence.accepted:
            return Reject(reason)
        # Nothing says this call is at fault, and nothing was accepted: the server
        # refuses whatever it is sent. Every request refused on the way counts.
        unexplained = Reason(
            reason.error_type,
            reason.status,
            f"{reason.message} (refused whatever was sent: "
            "the server's fault, not a call's; retried)",
        )
        return Retry(
            unexplained,
            count_attempt=not probe,
            hold=answer.retry_after,
            breaker_failures=max(1, evidence.refused),
        )
    if answer.status == 429:
        return Retry(reason, count_attempt=False, hold=answer.retry_after)
    return Retry(reason, count_attempt=not probe, hold=answer.retry_after)


def _accepted(answer: Answer, calls: int) -> Deliver:
    if not answer.item_errors and not answer.unmatched_errors:
        return Deliver()
    refused = {
        index: Reason("item_rejected", answer.status, f"rejected in a 207 batch answer: {words}")
        for index, words in answer.item_errors.items()
        if 0 <= index < calls
    }
    stray = len(answer.item_errors) - len(refused)
    return Deliver(refused, answer.unmatched_errors + stray)


def _status_type(status: int | None) -> str:
    return "no_answer" if status is None else f"http_{status}"
