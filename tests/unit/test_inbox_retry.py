"""The retry policy (pure)."""

from __future__ import annotations

import random

import pytest

from inbox.errors import InboxError
from inbox.retry import RetryPolicy


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens():
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=3.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.worst_case_wait() == 9.5
    jittered = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=3.0, jitter=0.2)
    rand = random.Random(7)
    for n in range(1, 6):
        assert 0.8 * policy.delay(n) <= jittered.delay(n, rand) <= policy.delay(n)


def test_retry_policy_refuses_retries_longer_than_the_poll_budget():
    policy = RetryPolicy(max_attempts=10, backoff_initial_s=1, backoff_max_s=60)
    with pytest.raises(InboxError, match=r"sleeps up to 243\.0 s .* allows 150\.0 s.*OUTBOX_INBOX_MAX_ATTEMPTS"):
        policy.check_fits(150, "half of max_poll_interval_ms")
    RetryPolicy().check_fits(150, "x")  # the defaults fit the default budget
    with pytest.raises(InboxError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(InboxError):
        RetryPolicy(backoff_initial_s=5, backoff_max_s=1)

