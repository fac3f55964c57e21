"""The Runner refuses to start when its dedupe window (inbox retention) is shorter than what Kafka
can still redeliver (the topic's retention.ms), against the real broker's topic configuration."""

from __future__ import annotations

import logging
import math
import time
import uuid

import pytest

from inbox import InboxError, Runner
from outbox.core.settings import load_settings
from tests.support.inbox import CLIENTS, Background, caught_up, create_topic, deposit, headers_for, produce

DAY_MS = 86_400_000


def runner(db, kafka, topic, **kw):
    return Runner("windowed", lambda conn, msg: None, dsn=db, bootstrap=kafka, topics=[topic], poll_timeout_s=0.2, **kw)


def test_runner_refuses_to_start_when_the_inbox_window_is_shorter_than_the_topic_retention(db, kafka, topic_prefix):
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, configs={"retention.ms": str(3 * DAY_MS)})
    with pytest.raises(InboxError) as err:
        runner(db, kafka, topic, retention_window_s=86_400).run()
    text = str(err.value)
    assert "dedupe window (inbox retention, 1 day) is shorter" in text
    assert f"topic {topic} keeps records for 3 days (retention.ms={3 * DAY_MS})" in text
    assert "OUTBOX_INBOX_RETENTION_DAYS=5" in text and "lower the topic's retention.ms" in text
    assert "allow_short_dedupe_window=True" in text

    # The window from the settings, as the CLI and from_settings() use it.
    settings = load_settings(database_url=db.secret(), kafka_bootstrap=kafka, inbox_retention_days=2)
    with pytest.raises(InboxError, match=r"inbox retention, 2 days"):
        Runner.from_settings(settings, "windowed", lambda conn, msg: None, topics=[topic]).run()

    # Long enough: it starts and consumes.
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))])
    bg = Background(runner(db, kafka, topic, retention_window_s=6 * 86_400))
    try:
        caught_up(db, "windowed", kafka, topic)
    finally:
        totals = bg.stop()  # a runner left behind would join the next test's consumer group
    assert totals.processed == 1


def test_short_dedupe_window_starts_with_a_loud_warning_when_explicitly_allowed(db, kafka, topic_prefix, caplog):
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, configs={"retention.ms": str(3 * DAY_MS)})
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))])
    with caplog.at_level(logging.WARNING, logger="inbox"):
        bg = Background(runner(db, kafka, topic, retention_window_s=86_400, allow_short_dedupe_window=True))
        caught_up(db, "windowed", kafka, topic)
        assert bg.stop().processed == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "inbox"]
    assert any("STARTING ANYWAY" in m and f"topic {topic} keeps records for 3 days" in m for m in warnings), warnings


def test_topic_with_infinite_retention_is_covered_only_by_an_inbox_that_is_never_purged(db, kafka, topic_prefix):
    topic = f"{topic_prefix}.forever"
    create_topic(kafka, topic, configs={"retention.ms": "-1"})
    with pytest.raises(InboxError, match=r"keeps records forever \(retention.ms=-1"):
        runner(db, kafka, topic, retention_window_s=365 * 86_400).run()
    compacted = f"{topic_prefix}.compacted"
    create_topic(kafka, compacted, configs={"cleanup.policy": "compact", "retention.ms": str(DAY_MS)})
    with pytest.raises(InboxError, match=rf"topic {compacted} keeps records forever"):
        runner(db, kafka, compacted, retention_window_s=365 * 86_400).run()
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))])
    bg = Background(runner(db, kafka, topic, retention_window_s=math.inf))
    caught_up(db, "windowed", kafka, topic)
    assert bg.stop().processed == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_pattern_subscription_checks_each_topic_as_it_is_assigned_and_refuses_a_short_window(db, kafka, topic_prefix,
                                                                                            client):
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, configs={"retention.ms": str(3 * DAY_MS)})
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))])
    handled = []
    bg = Background(Runner("windowed", lambda conn, msg: handled.append(msg), dsn=db, bootstrap=kafka,
                           pattern=f"{topic_prefix}\\..*", poll_timeout_s=0.2, retention_window_s=86_400,
                           kafka_client=client))
    bg.thread.join(60)
    assert not bg.thread.is_alive(), "the runner kept running"
    assert len(bg.error) == 1 and isinstance(bg.error[0], InboxError), bg.error
    assert f"topic {topic} keeps records for 3 days" in str(bg.error[0])
    assert handled == []


@pytest.mark.parametrize("client", CLIENTS)
def test_runner_started_before_its_topic_exists_checks_the_window_once_the_relay_creates_it(db, kafka, topic_prefix,
                                                                                           client):
    """A fresh `outbox demo` once stopped its shipping consumer: it started before the relay had
    created the topic, and an unreadable configuration counted as a short window. A topic that
    does not exist yet is checked when it is assigned, and the Runner does not create it."""
    from kafka.admin import KafkaAdminClient

    short, fine = f"{topic_prefix}.later-short", f"{topic_prefix}.later-fine"
    refused = Background(Runner("windowed-short", lambda conn, msg: None, dsn=db, bootstrap=kafka, topics=[short],
                                poll_timeout_s=0.2, retention_window_s=86_400, kafka_client=client))
    accepted = Background(Runner("windowed-fine", lambda conn, msg: None, dsn=db, bootstrap=kafka, topics=[fine],
                                 poll_timeout_s=0.2, retention_window_s=6 * 86_400, kafka_client=client))
    time.sleep(3)  # both subscribed to topics nobody created
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    try:
        assert not {short, fine} & set(admin.list_topics()), "a Runner created its topic"
    finally:
        admin.close()
    assert refused.thread.is_alive() and accepted.thread.is_alive()

    create_topic(kafka, short, partitions=2, configs={"retention.ms": str(3 * DAY_MS)})
    create_topic(kafka, fine, partitions=2, configs={"retention.ms": str(DAY_MS)})
    produce(kafka, fine, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4()))])
    refused.thread.join(120)
    assert not refused.thread.is_alive(), "the runner kept running on a topic its window does not cover"
    assert len(refused.error) == 1 and f"topic {short} keeps records for 3 days" in str(refused.error[0])
    caught_up(db, "windowed-fine", kafka, fine, timeout=120)
    assert accepted.stop().processed == 1
