"""How long to wait before trying Customer.io again.

Exponential backoff with jitter, built on tenacity's wait policy so the curve is the
well-known one; a Retry-After from the server wins when it asks for longer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import RetryCallState, wait_exponential_jitter


@dataclass
class Backoff:
    """Consecutive-failure backoff: 1, 2, 4, 8 ... seconds (plus jitter), capped."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0
    failures: int = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """Record one more failure and return how long to wait before the next try."""
        self.failures += 1
        policy = wait_exponential_jitter(
            initial=self.initial, max=self.maximum, jitter=min(self.jitter, self.initial)
        )
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.failures
        delay = float(policy(state))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def reset(self) -> None:
        self.failures = 0
