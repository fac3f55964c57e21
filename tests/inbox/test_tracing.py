"""One trace from producer to consumer: the producer's traceparent travels through outbox.emit,
the relay and Kafka, and the handler runs in a CONSUMER span that continues it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

from tests.support.helpers import wait_for
from tests.support.paths import REPO
from tests.support.relay import RelayThread, emit, published, relay_settings, wait_streaming


def run_consumer(db, kafka, topic, expect, *extra):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
           "OUTBOX_DATABASE_URL": db.secret(), "OUTBOX_KAFKA_BOOTSTRAP": kafka}
    result = subprocess.run([sys.executable, "-m", "tests.workers.traced_consumer", "--topic", topic, "--consumer",
                             "tracer", "--expect", str(expect), *extra], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_handler_span_continues_the_producers_trace_through_the_relay(db, kafka, topic_prefix):
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    traced, untraced = emit(db, [
        ("order", "1", "Placed", {"n": 1}, {"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": "shop=1"}),
        ("order", "1", "Placed", {"n": 2}, {}),
    ])
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        wait_streaming(db)
        wait_for(lambda: published(db) == 2, 60, "the relay to publish the two events")
    topic = f"{topic_prefix}.order"
    spans = {s["attributes"]["messaging.message.id"]: s for s in run_consumer(db, kafka, topic, 2)}
    assert set(spans) == {traced, untraced}
    first = spans[traced]
    assert first["trace_id"] == trace_id and first["parent_span_id"] == span_id
    assert first["name"] == f"process {topic}" and first["kind"] == "CONSUMER" and first["status"] == "UNSET"
    attributes = dict(first["attributes"])
    assert attributes.pop("messaging.destination.partition.id").isdigit()
    assert attributes == {"messaging.system": "kafka", "messaging.operation.type": "process",
                          "messaging.destination.name": topic, "messaging.kafka.offset": 0,
                          "messaging.consumer.group.name": "tracer", "messaging.message.id": traced,
                          "inbox.attempt": 1}
    # Without a traceparent: a trace of its own, no error.
    assert spans[untraced]["parent_span_id"] is None and spans[untraced]["trace_id"] != trace_id


def test_a_failed_attempt_is_an_error_span_and_the_retry_continues_the_same_trace(db, kafka, topic_prefix):
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    [event] = emit(db, [("order", "1", "Placed", {"n": 1}, {"traceparent": f"00-{trace_id}-{span_id}-01"})])
    with RelayThread(relay_settings(db, kafka, topic_prefix)):
        wait_streaming(db)
        wait_for(lambda: published(db) == 1, 60, "the relay to publish")
    spans = run_consumer(db, kafka, f"{topic_prefix}.order", 1, "--fail-first")
    assert [(s["status"], s["attributes"]["inbox.attempt"]) for s in spans] == [("ERROR", 1), ("UNSET", 2)]
    assert {(s["trace_id"], s["parent_span_id"], s["attributes"]["messaging.message.id"]) for s in spans} == \
        {(trace_id, span_id, event)}
