"""Test helpers shared by the suites (kept out of conftest so they can be imported plainly)."""

from __future__ import annotations

import time

from kafka import KafkaConsumer


def read_topic(bootstrap: str, *topics: str, expect: int, isolation: str = "read_uncommitted",
               timeout: float = 60, settle: float = 1.0, pattern: str | None = None, **client) -> list:
    """Every record of `topics` (or topics matching `pattern`) from the beginning.

    Returns as soon as `expect` records arrived plus `settle` seconds more, so that a duplicate
    or an unexpected extra record is still caught without waiting for a long idle timeout.
    `client`: more KafkaConsumer options (credentials).
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level=isolation, group_id=None, metadata_max_age_ms=1000, **client)
    if pattern:
        consumer.subscribe(pattern=pattern)
    else:
        consumer.subscribe(list(topics))
    records: list = []
    deadline = time.monotonic() + timeout
    settle_until = None
    try:
        while time.monotonic() < (settle_until or deadline):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if settle_until is None and len(records) >= expect:
                settle_until = time.monotonic() + settle
    finally:
        consumer.close()
    return records


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
