"""What a Runner refuses before it touches Kafka or PostgreSQL (no servers)."""

from __future__ import annotations

import pytest

from inbox import InboxError, Runner
from outbox.core.settings import load_settings

DSN = "postgresql://u@127.0.0.1:1/db"
CHECKPOINTS = "the relay's checkpoint topic 'outbox.relay.checkpoints', which holds the relay's exactly-once positions"


def runner(**kw):
    return Runner("c", lambda message, conn: None, dsn=DSN, bootstrap="127.0.0.1:1", **kw)


@pytest.mark.parametrize(("what", "expected"), [
    ({"pattern": r"outbox\..*"}, rf"pattern 'outbox\\\\..\*' matches {CHECKPOINTS}"),
    ({"pattern": "outbox"}, "matches the relay's checkpoint topic"),  # kafka-python matches a prefix
    ({"topics": ["orders", "outbox.relay.checkpoints"]}, f"topics include {CHECKPOINTS}"),
    ({"partitions": [("outbox.relay.checkpoints", 0)], "group_id": None}, f"topics include {CHECKPOINTS}"),
])
def test_a_subscription_that_would_read_the_relays_checkpoints_as_events_is_refused(what, expected):
    with pytest.raises(InboxError, match=expected) as err:
        runner(**what)
    assert r"Fix: read only the event topics (e.g. pattern r'outbox\.event\..*'" in str(err.value)


def test_the_checkpoint_topic_comes_from_the_settings_and_the_default_pattern_passes():
    runner(pattern=r"outbox\.event\..*")
    runner(pattern=r"outbox\..*", checkpoint_topic="relay.positions")
    settings = load_settings(_env_file=None, database_url=DSN, checkpoint_topic="relay.positions")
    with pytest.raises(InboxError, match="checkpoint topic 'relay.positions'"):
        Runner.from_settings(settings, "c", lambda message, conn: None, pattern=r"relay\..*")
    Runner.from_settings(settings, "c", lambda message, conn: None, pattern=r"outbox\..*")


def test_a_pattern_that_is_not_a_regular_expression_is_named():
    with pytest.raises(InboxError, match=r"pattern '\(' is not a regular expression"):
        runner(pattern="(")
