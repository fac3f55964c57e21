"""relay/metrics.py's grouped latency observation against prometheus_client's own observe()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.metrics import RelayMetrics


def _histogram(m: RelayMetrics) -> tuple[list, float]:
    """(buckets and count, exact; the sum, which adds in another order)."""
    samples = [s for family in m.latency.collect() for s in family.samples]
    return ([(s.name, s.labels.get("le"), s.value) for s in samples if s.name.endswith(("_bucket", "_count"))],
            next(s.value for s in samples if s.name.endswith("_sum")))


@given(runs=st.lists(st.tuples(st.integers(0, 10**12), st.integers(1, 50)), max_size=40),
       base_s=st.floats(0, 2 * 10**6, allow_nan=False))
def test_grouped_latencies_give_the_histogram_per_event_observe_gives(runs, base_s):
    commit_ts = [ts for ts, n in runs for _ in range(n)]
    grouped, single = RelayMetrics(), RelayMetrics()
    grouped.observe_latencies(base_s, commit_ts)
    for ts in commit_ts:
        single.latency.observe(base_s - ts / 1e6)
    (buckets, total), (expected_buckets, expected_total) = _histogram(grouped), _histogram(single)
    assert buckets == expected_buckets
    assert total == pytest.approx(expected_total, rel=1e-9, abs=1e-9)
