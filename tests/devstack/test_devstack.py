"""`outbox dev up|down|status` through the real CLI: starts, answers, survives a crash, stops cleanly."""

from __future__ import annotations

import signal

import psutil
import psycopg
import pytest
from kafka import KafkaProducer

from outbox.devstack.kafka import find_java
from tests.support.devstack import our_processes, outbox, parse_exports
from tests.support.helpers import read_topic


def assert_answers(env: dict[str, str], topic: str) -> None:
    with psycopg.connect(env["OUTBOX_DATABASE_URL"], connect_timeout=5) as conn:
        assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
        assert conn.execute("SELECT current_setting('server_version_num')::int").fetchone()[0] >= 180000
    producer = KafkaProducer(bootstrap_servers=env["OUTBOX_KAFKA_BOOTSTRAP"], acks="all")
    producer.send(topic, b"ping", key=b"k").get(timeout=30)
    producer.close()
    assert [m.value for m in read_topic(env["OUTBOX_KAFKA_BOOTSTRAP"], topic, expect=1)] == [b"ping"]


@pytest.mark.skipif(find_java() is None, reason="Apache Kafka needs Java 17+")
def test_up_is_idempotent_survives_kill_9_and_down_leaves_nothing(dev_dir):
    first = outbox(dev_dir, "dev", "up")
    env = parse_exports(first.stdout)
    assert set(env) == {"OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BOOTSTRAP"}
    assert (dev_dir / "dev.env").read_text() == first.stdout
    assert "Apache Kafka" in first.stderr and "Tansu" not in first.stderr
    assert_answers(env, "dev.one")

    # A second `up` reuses the running servers: same addresses, no new processes.
    pids_before = {p.pid for p in our_processes(dev_dir)}
    again = outbox(dev_dir, "dev", "up")
    assert parse_exports(again.stdout) == env
    assert {p.pid for p in our_processes(dev_dir)} == pids_before

    status = outbox(dev_dir, "dev", "status")
    assert "postgres  postgres 18." in status.stdout and "running" in status.stdout
    assert "kafka     apache 4.1.1: running" in status.stdout

    # Crash everything (stale postmaster.pid, Kafka's lock file), then come back up.
    for proc in our_processes(dev_dir):
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(our_processes(dev_dir), timeout=10)
    assert (dev_dir / "pg" / "data" / "postmaster.pid").exists()
    assert outbox(dev_dir, "dev", "status", check=False).returncode == 3
    recovered = parse_exports(outbox(dev_dir, "dev", "up").stdout)
    assert recovered["OUTBOX_DATABASE_URL"] == env["OUTBOX_DATABASE_URL"]
    assert_answers(recovered, "dev.two")

    down = outbox(dev_dir, "dev", "down")
    assert "stopped: apache, postgres" in down.stderr
    assert our_processes(dev_dir) == []
    assert "nothing was running" in outbox(dev_dir, "dev", "down").stderr


def test_tansu_fallback_runs_and_says_what_it_cannot_do(dev_dir):
    up = outbox(dev_dir, "dev", "up", env_extra={"OUTBOX_DEV_KAFKA": "tansu"})
    assert "Tansu" in up.stderr and "Exactly-once delivery (OUTBOX_DELIVERY=exactly-once) is NOT safe" in up.stderr
    env = parse_exports(up.stdout)
    assert_answers(env, "dev.tansu")
    assert "kafka     tansu" in outbox(dev_dir, "dev", "status").stdout
    outbox(dev_dir, "dev", "down")
    assert our_processes(dev_dir) == []


def test_status_json_of_a_stack_that_was_never_started(dev_dir):
    import json

    result = outbox(dev_dir, "dev", "status", "--json", check=False)
    assert result.returncode == 3
    assert json.loads(result.stdout) == {"dir": str(dev_dir)}


def test_kafka_cluster_ids_never_start_with_a_dash():
    """Regression: one storage format in 64 failed because argparse read the id as an option."""
    from outbox.devstack.kafka import kafka_cluster_id

    ids = [kafka_cluster_id() for _ in range(5000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == 5000
