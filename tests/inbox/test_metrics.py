"""The Runner's own metrics server against the real broker and PostgreSQL: exact counters over HTTP
for a known mix of new events, redeliveries and a poison event, lag back to 0, and the probes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inbox import RetryPolicy, Runner
from tests.support.helpers import wait_for
from tests.support.inbox import (
    CLIENTS,
    Background,
    apply_deposit,
    caught_up,
    create_business_schema,
    create_topic,
    deposit,
    headers_for,
    produce,
)

FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0)


def get(address, path: str) -> tuple[int, bytes]:
    host, port = address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(address) -> dict[tuple[str, tuple], float]:
    status, body = get(address, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@pytest.mark.parametrize("client", CLIENTS)
def test_metrics_server_counts_processed_duplicates_dead_letters_and_retries_exactly(db, kafka, topic_prefix, client):
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=1)
    ids = [uuid.uuid4() for _ in range(6)]
    poison = ids[3]
    sends = [(b"acc-1", deposit("acc-1", 1), headers_for(i)) for i in ids]
    sends += [(b"acc-1", deposit("acc-1", 1), headers_for(ids[0]))] * 2  # two redeliveries of the first event
    sends.append((b"acc-1", deposit("acc-1", 1), headers_for(ids[1])))  # and one of the second
    sends.append((b"acc-1", deposit("acc-1", 100), [("event_id", b"order-17")]))  # invalid envelope
    produce(kafka, topic, sends)

    def handler(conn, msg):
        if msg.event_id == poison:
            raise RuntimeError("ledger rejects this deposit")
        apply_deposit(conn, msg)

    runner = Runner("metered", handler, dsn=db, bootstrap=kafka, topics=[topic], policy=FAST, poll_timeout_s=0.2,
                    metrics_port=0, lag_interval_s=0.2, kafka_client=client)
    assert runner.metrics_address is None  # no server before run()
    bg = Background(runner)
    address = wait_for(lambda: runner.metrics_address, 30, "the metrics server to listen")
    assert address[0] == "127.0.0.1"  # loopback unless told otherwise
    wait_for(lambda: get(address, "/readyz")[0] == 200, 60, "/readyz to turn ready once partitions are assigned")
    caught_up(db, "metered", kafka, topic)
    labels = (("consumer", "metered"), ("topic", topic))

    def settled():
        s = samples(address)
        return s if s.get(("outbox_inbox_consumer_lag", (*labels[:1], ("partition", "0"), labels[1]))) == 0 else None

    s = wait_for(settled, 30, "the lag of the caught-up partition to read 0")
    assert s[("outbox_inbox_events_processed_total", labels)] == 5
    assert s[("outbox_inbox_duplicates_suppressed_total", labels)] == 3
    assert s[("outbox_inbox_events_dead_lettered_total", labels)] == 2  # the poison event and the invalid one
    assert s[("outbox_inbox_handler_retries_total", labels)] == 2  # 3 attempts: 2 of them retried
    # Every handler call is timed, including the poison's three attempts and calls rolled back with its batch.
    assert s[("outbox_inbox_handler_duration_seconds_count", labels)] >= 5 + 3
    assert s[("outbox_inbox_assigned_partitions", (("consumer", "metered"),))] == 1
    assert s[("outbox_inbox_database_up", (("consumer", "metered"),))] == 1
    assert s[("outbox_inbox_ready", (("consumer", "metered"),))] == 1
    status, body = get(address, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert json.loads(get(address, "/readyz")[1]) == {"status": "ready", "consumer": "metered",
                                                       "assigned_partitions": 1, "database_up": True, "reasons": []}
    totals = bg.stop()
    assert (totals.processed, totals.duplicates, totals.dead_lettered) == (5, 3, 2)


def test_a_metrics_port_already_taken_is_refused_before_the_runner_consumes_anything(db, kafka, topic_prefix):
    import socket

    from outbox.core.settings import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = Runner("taken", apply_deposit, dsn=db, bootstrap=kafka, topics=[f"{topic_prefix}.t"],
                        metrics_port=port)
        with pytest.raises(ConfigError, match=rf"cannot serve /metrics on 127.0.0.1:{port}: Address already in use\. "
                                              r"Fix: .* set metrics_port \(OUTBOX_INBOX_METRICS_PORT\) to a free port"):
            runner.run()


def test_two_runners_in_one_process_have_registries_of_their_own_and_no_server_by_default(db, kafka, topic_prefix):
    a = Runner("one", apply_deposit, dsn=db, bootstrap=kafka, topics=[f"{topic_prefix}.a"])
    b = Runner("two", apply_deposit, dsn=db, bootstrap=kafka, topics=[f"{topic_prefix}.b"])
    assert a.metrics.registry is not b.metrics.registry
    assert a.metrics_port is None and b.metrics_port is None
