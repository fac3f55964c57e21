"""`outbox dead-letters replay` against the real PostgreSQL and Kafka: concurrent replays of the
same dead letters publish each exactly once; a replay that dies before its mark commits leaves
the dead letter replayable. Records are counted in Kafka by an independent consumer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from relay import dead_letters
from tests.support.helpers import read_topic
from tests.support.paths import REPO
from tests.support.relay import query, relay_env, relay_settings

DEAD_LETTERS = 6


def insert_dead_letters(db, prefix: str, count: int) -> list[str]:
    """Dead letters as the relay writes them (ledger.py), for events that were too large."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(db.secret()) as conn:
        for n, event_id in enumerate(ids):
            conn.execute(
                "INSERT INTO outbox.relay_dead_letters (event_id, slot_name, topic, reason, error, aggregate_type, "
                "aggregate_id, event_type, payload, headers, commit_lsn, txid, created_at) VALUES "
                "(%s, %s, %s, 'oversize', 'record too large', 'order', %s, 'OrderPlaced', %s, '{}', '0/16B3748', "
                "'4242', now())",
                (event_id, f"slot_{prefix}", f"{prefix}.order", str(n), f'{{"n": {n}}}'))
    return ids


class SlowProducer:
    """The real KafkaProducer, with each send held back a little, so two replays started together
    are both mid-way through the same dead letters (without it the race is a matter of luck)."""

    def __init__(self, real_class, delay_s: float):
        self.real_class, self.delay_s = real_class, delay_s

    def __call__(self, **config):
        producer = self.real_class(**config)
        send, delay = producer.send, self.delay_s

        def slow_send(*args, **kwargs):
            time.sleep(delay)
            return send(*args, **kwargs)

        producer.send = slow_send
        return producer


@pytest.mark.timeout(120)
def test_two_concurrent_replays_of_the_same_dead_letters_publish_each_exactly_once(db, kafka, topic_prefix,
                                                                                  monkeypatch):
    event_ids = insert_dead_letters(db, topic_prefix, DEAD_LETTERS)
    settings = relay_settings(db, kafka, topic_prefix)
    monkeypatch.setattr(dead_letters, "KafkaProducer", SlowProducer(dead_letters.KafkaProducer, 0.3))
    start = threading.Barrier(2)
    reports, logs = [None, None], [[], []]

    def operator(n: int) -> None:
        start.wait(10)
        reports[n] = dead_letters.replay(settings, None, log=logs[n].append)

    threads = [threading.Thread(target=operator, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r is not None for r in reports), logs
    records = read_topic(kafka, f"{topic_prefix}.order", expect=DEAD_LETTERS, settle=2.0)
    published = sorted(dict(r.headers)["event_id"].decode() for r in records)
    assert published == sorted(event_ids)  # every one exactly once: no duplicate, no gap
    assert sum(r.replayed for r in reports) == DEAD_LETTERS, logs
    assert sum(r.failed for r in reports) == 0, logs
    # Each replay saw every dead letter: what it did not publish it skipped or found done, and said so.
    assert sum(r.skipped for r in reports) >= 1, logs
    assert any("being replayed by another replay right now: skipped" in line for log in logs for line in log)

    rows = query(db, "SELECT count(*), count(replayed_at), count(DISTINCT replay_note) FROM outbox.relay_dead_letters")
    assert rows == [(DEAD_LETTERS, DEAD_LETTERS, DEAD_LETTERS)]

    # A dry run and a third replay find nothing left to do and publish nothing.
    dry = subprocess.run([sys.executable, "-m", "outbox.cli", "dead-letters", "replay", "--all", "--dry-run"],
                         cwd=REPO, env={**relay_env(db, kafka, topic_prefix), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "dry run: 0 dead letter(s) would be replayed" in dry.stderr, dry.stderr
    again = subprocess.run([sys.executable, "-m", "outbox.cli", "dead-letters", "replay", "--all"], cwd=REPO,
                           env={**relay_env(db, kafka, topic_prefix), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "replayed 0, failed 0" in again.stderr, again.stderr
    assert len(read_topic(kafka, f"{topic_prefix}.order", expect=DEAD_LETTERS, settle=1.0)) == DEAD_LETTERS


@pytest.mark.timeout(120)
def test_replay_that_dies_after_publishing_before_the_mark_commits_leaves_the_dead_letter_replayable(
        db, kafka, topic_prefix, monkeypatch):
    (event_id,) = insert_dead_letters(db, topic_prefix, 1)
    settings = relay_settings(db, kafka, topic_prefix)
    real = dead_letters._publish

    def publish_then_die(*args):
        real(*args)
        raise KeyboardInterrupt  # the operator's Ctrl-C, or a kill, between Kafka's ack and the commit

    monkeypatch.setattr(dead_letters, "_publish", publish_then_die)
    with pytest.raises(KeyboardInterrupt):
        dead_letters.replay(settings, None, log=lambda _: None)
    assert query(db, "SELECT replayed_at FROM outbox.relay_dead_letters") == [(None,)]
    monkeypatch.setattr(dead_letters, "_publish", real)
    assert dead_letters.replay(settings, None, log=lambda _: None).replayed == 1
    # At least once across the crash (consumers deduplicate on event_id), never marked unpublished.
    records = read_topic(kafka, f"{topic_prefix}.order", expect=2)
    assert [dict(r.headers)["event_id"].decode() for r in records] == [event_id, event_id]
    assert query(db, "SELECT count(replayed_at) FROM outbox.relay_dead_letters") == [(1,)]


def test_dry_run_lists_what_a_replay_would_publish_and_publishes_nothing(db, kafka, topic_prefix):
    first, second = insert_dead_letters(db, topic_prefix, 2)
    env = {**relay_env(db, kafka, topic_prefix), "PATH": "/usr/bin:/bin"}
    ids = [str(i) for (i,) in query(db, "SELECT id FROM outbox.relay_dead_letters ORDER BY id")]
    cli = [sys.executable, "-m", "outbox.cli", "dead-letters", "replay"]
    dry = subprocess.run([*cli, "--id", ids[1], "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"would replay #{ids[1]}: event {second} order/1 OrderPlaced (oversize)"]
    missing = subprocess.run([*cli, "--id", ids[0], "999999", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "no open dead letter 999999" in missing.stderr
    both = subprocess.run([*cli, ids[0], "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "not both" in both.stderr
    assert query(db, "SELECT count(replayed_at) FROM outbox.relay_dead_letters") == [(0,)]
    assert read_topic(kafka, f"{topic_prefix}.order", expect=1, timeout=3) == []
