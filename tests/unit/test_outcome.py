"""The outcome policy: an answer in, a decision out (a table; no HTTP, no sleeping)."""

from __future__ import annotations

import pytest

from cio_logging.sender.outcome import (
    Answer,
    Decision,
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

BARE_400 = Answer(400, "http_400", "HTTP 400: Bad Request")
NAMED_400 = Answer(400, "http_400", "HTTP 400: data.email: invalid", names_a_call=True)
SEEN_ACCEPTED = Evidence(accepted=True)

TABLE: list[tuple[str, Answer, int, Evidence, bool, Decision]] = [
    ("200", Answer(200), 10, Evidence(), False, Deliver()),
    ("204", Answer(204), 1, Evidence(), False, Deliver()),
    (
        "207 naming items",
        Answer(207, item_errors={1: "invalid name", 3: "too long"}),
        5,
        Evidence(),
        False,
        Deliver(
            {
                1: Reason("item_rejected", 207, "rejected in a 207 batch answer: invalid name"),
                3: Reason("item_rejected", 207, "rejected in a 207 batch answer: too long"),
            }
        ),
    ),
    (
        "207 naming nothing the request carried",
        Answer(207, unmatched_errors=2),
        5,
        Evidence(),
        False,
        Deliver({}, 2),
    ),
    (
        "207 naming an index past the request",
        Answer(207, item_errors={9: "invalid"}),
        5,
        Evidence(),
        False,
        Deliver({}, 1),
    ),
    (
        "400 on many calls: split",
        BARE_400,
        10,
        Evidence(),
        False,
        Split(5, Reason("http_400", 400, "HTTP 400: Bad Request")),
    ),
    (
        "413 on many calls: split",
        Answer(413, "http_413", "HTTP 413"),
        3,
        Evidence(),
        False,
        Split(1, Reason("http_413", 413, "HTTP 413")),
    ),
    (
        "400 naming a call, on one call: reject",
        NAMED_400,
        1,
        Evidence(),
        False,
        Reject(Reason("http_400", 400, "HTTP 400: data.email: invalid")),
    ),
    (
        "422 on one call after another was accepted: reject",
        Answer(422, "http_422", "HTTP 422"),
        1,
        SEEN_ACCEPTED,
        False,
        Reject(Reason("http_422", 422, "HTTP 422")),
    ),
    (
        "bare 400 on one call, nothing accepted: the server's fault",
        BARE_400,
        1,
        Evidence(refused=7),
        False,
        Retry(
            Reason(
                "http_400",
                400,
                "HTTP 400: Bad Request (refused whatever was sent: the server's fault, "
                "not a call's; retried)",
            ),
            count_attempt=True,
            breaker_failures=7,
        ),
    ),
    (
        "503",
        Answer(503, "http_503", "HTTP 503"),
        10,
        Evidence(),
        False,
        Retry(Reason("http_503", 503, "HTTP 503")),
    ),
    (
        "503 with Retry-After",
        Answer(503, "http_503", "HTTP 503", retry_after=30.0),
        10,
        Evidence(),
        False,
        Retry(Reason("http_503", 503, "HTTP 503"), hold=30.0),
    ),
    (
        "503 on the probe: no attempt",
        Answer(503, "http_503", "HTTP 503"),
        1,
        Evidence(),
        True,
        Retry(Reason("http_503", 503, "HTTP 503"), count_attempt=False),
    ),
    (
        "429: no attempt",
        Answer(429, "http_429", "HTTP 429"),
        10,
        Evidence(),
        False,
        Retry(Reason("http_429", 429, "HTTP 429"), count_attempt=False),
    ),
    (
        "429 with Retry-After 3600: a hold for everyone",
        Answer(429, "http_429", "HTTP 429", retry_after=3600.0),
        10,
        Evidence(),
        False,
        Retry(Reason("http_429", 429, "HTTP 429"), count_attempt=False, hold=3600.0),
    ),
    (
        "timeout",
        Answer(None, "ReadTimeout", "no answer within 5 s"),
        10,
        Evidence(),
        False,
        Retry(Reason("ReadTimeout", None, "no answer within 5 s")),
    ),
    (
        "connection refused",
        Answer(None, "ConnectionError", "refused"),
        10,
        Evidence(),
        False,
        Retry(Reason("ConnectionError", None, "refused")),
    ),
    (
        "401",
        Answer(401, "http_401", "HTTP 401"),
        10,
        Evidence(),
        False,
        Pause(Reason("http_401", 401, "HTTP 401"), "auth"),
    ),
    (
        "403",
        Answer(403, "http_403", "HTTP 403"),
        1,
        Evidence(),
        False,
        Pause(Reason("http_403", 403, "HTTP 403"), "auth"),
    ),
    (
        "TLS",
        Answer(None, "SSLError", "TLS failed"),
        10,
        Evidence(),
        False,
        Pause(Reason("SSLError", None, "TLS failed"), "config"),
    ),
    (
        "breaker open",
        Answer(None, "circuit_open", "not sent"),
        10,
        Evidence(),
        False,
        NotSent(Reason("circuit_open", None, "not sent")),
    ),
    (
        "shutting down",
        Answer(None, "stopped", "not sent"),
        10,
        Evidence(),
        False,
        NotSent(Reason("stopped", None, "not sent")),
    ),
]


class TestDecide:
    """Every kind of answer, and the decision it gets."""

    @pytest.mark.parametrize(
        ("answer", "calls", "evidence", "probe", "expected"),
        [row[1:] for row in TABLE],
        ids=[row[0] for row in TABLE],
    )
    def test_table(
        self, answer: Answer, calls: int, evidence: Evidence, probe: bool, expected: Decision
    ) -> None:
        """The answer's decision, as the table says."""
        assert decide(answer, calls, evidence, probe=probe) == expected

    def test_a_split_is_halves(self) -> None:
        """A refused request of n calls splits at n // 2, down to one call."""
        sizes = [1000]
        while sizes[-1] > 1:
            decision = decide(BARE_400, sizes[-1])
            assert isinstance(decision, Split)
            sizes.append(decision.at)
        assert len(sizes) == 10  # 1000 -> 1 in nine splits: about 20 requests for one bad call

    def test_decide_is_pure(self) -> None:
        """The same answer twice, the same decision: nothing remembered between calls."""
        answer = Answer(503, "http_503", "HTTP 503", retry_after=5.0)
        assert decide(answer, 3) == decide(answer, 3)
