"""How often and how patiently a failing handler is retried before its record is dead-lettered."""

from __future__ import annotations

import random
from dataclasses import dataclass

from inbox.errors import InboxError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    # Spread retries of many consumers hitting the same broken dependency; 0 makes delays exact.
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InboxError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise InboxError(f"need 0 < backoff_initial_s ({self.backoff_initial_s}) <= backoff_max_s "
                             f"({self.backoff_max_s})")
        if not 0 <= self.jitter < 1:
            raise InboxError(f"jitter must be in [0, 1), got {self.jitter}")

    @classmethod
    def from_settings(cls, settings) -> "RetryPolicy":
        return cls(settings.inbox_max_attempts, settings.inbox_backoff_initial_s, settings.inbox_backoff_max_s)

    def base_delay(self, failed_attempts: int) -> float:
        """initial * 2^(n-1), capped at backoff_max_s."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failed_attempts - 1))

    def delay(self, failed_attempts: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after the `failed_attempts`-th failure; jitter only ever shortens it."""
        base = self.base_delay(failed_attempts)
        return base * (1 - self.jitter * (rand or random).random()) if self.jitter else base

    def worst_case_wait(self) -> float:
        """Total sleep of one record that fails every attempt."""
        return sum(self.base_delay(n) for n in range(1, self.max_attempts))

    def check_fits(self, budget_s: float, what: str) -> None:
        """Refuse a policy whose retries of one record could outlast `budget_s` (e.g. half of Kafka's
        max.poll.interval): the consumer would be thrown out of its group mid-retry, forever."""
        wait = self.worst_case_wait()
        if wait > budget_s:
            raise InboxError(
                f"retry policy sleeps up to {wait:.1f} s on one failing record ({self.max_attempts} attempts, "
                f"backoff {self.backoff_initial_s}-{self.backoff_max_s} s) but {what} allows {budget_s:.1f} s. "
                f"Fix: lower OUTBOX_INBOX_MAX_ATTEMPTS or OUTBOX_INBOX_BACKOFF_MAX_S, or raise max_poll_interval_ms.")


DEFAULT_POLICY = RetryPolicy()
