"""What the streaming relay's /metrics reports about its slot and itself, against the real servers."""

from __future__ import annotations

import math

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import wait_for
from tests.support.relay import RelayThread, emit, published, relay_settings, wait_streaming


def samples(metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_active_relay_reports_wal_status_safe_wal_size_build_and_process_metrics(db, kafka, topic_prefix):
    with RelayThread(relay_settings(db, kafka, topic_prefix)) as relay:
        wait_streaming(db)
        emit(db, [("order", "1", "Placed", {"n": 1}, {})])
        wait_for(lambda: published(db) == 1, 60, "the event to be published")
        m = relay.relay.metrics
        wait_for(lambda: samples(m).get(("outbox_relay_slot_wal_status", (("state", "reserved"),))) == 1, 30,
                 "the maintenance tick to report wal_status")
        got = samples(m)
    states = {labels[0][1]: v for (name, labels), v in got.items() if name == "outbox_relay_slot_wal_status"}
    assert states == {"reserved": 1, "extended": 0, "unreserved": 0, "lost": 0, "missing": 0}
    # The dev stack sets max_slot_wal_keep_size = 4GB: what is left is finite and about that (PostgreSQL
    # counts to the end of the current WAL segment, so a little more).
    safe = got[("outbox_relay_slot_safe_wal_size_bytes", ())]
    assert not math.isnan(safe) and 3 * 1024**3 < safe <= 4 * 1024**3 + 64 * 1024**2
    build = [labels for (name, labels), v in got.items() if name == "outbox_relay_build_info" and v == 1]
    assert len(build) == 1 and dict(build[0])["kafka_client"] == "kafka-python" and dict(build[0])["version"]
    assert got[("process_resident_memory_bytes", ())] > 10 * 1024**2
    assert ("python_info", ()) not in got  # labelled: present with implementation/version labels
    assert any(name == "python_info" for name, _ in got)
