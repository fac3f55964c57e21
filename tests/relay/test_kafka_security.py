"""Kafka with encryption, authentication and authorization: a SASL_SSL Apache Kafka broker (its
certificate signed by a CA made here) with StandardAuthorizer ACLs. The relay, the inbox and the
dashboard connect with OUTBOX_KAFKA_* settings; a topic the relay may not write is dead-lettered
(reason authorization) while the rest flows; a wrong password is reported with the fix; no
password ever reaches a log; a client that does not trust the CA gets nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourceType,
)

from dashboard.kafka_lag import EndOffsets
from inbox import InboxError, Runner
from inbox.horizon import topic_horizons
from outbox.core.settings import load_settings
from tests.support.helpers import read_topic, wait_for
from tests.support.inbox import Background
from tests.support.relay import (
    RelayThread,
    emit,
    query,
    relay_env,
    relay_process,
    relay_settings,
    sigterm,
    wait_streaming,
)
from tests.support.tls import ADMIN_PASSWORD, APP_PASSWORD, RELAY_PASSWORD


def sasl(user: str, password: str, ca: Path) -> dict[str, str]:
    return {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": user,
            "kafka_sasl_password": password, "kafka_ssl_cafile": str(ca)}


def test_relay_inbox_and_dashboard_over_sasl_with_a_forbidden_topic_dead_lettered(db, sasl_kafka, topic_prefix,
                                                                                   tmp_path):
    bootstrap, admin, ca = sasl_kafka
    allowed, forbidden = f"ok.{topic_prefix}", f"no.{topic_prefix}"
    admin.create_topics([NewTopic(allowed, 1, 1), NewTopic(forbidden, 1, 1)])
    env = relay_env(db, bootstrap, topic_prefix, topic_template="{aggregate_type}." + topic_prefix,
                    log_level="DEBUG", **sasl("relay", RELAY_PASSWORD, ca))
    log = tmp_path / "relay.log"
    proc = relay_process(env, log)
    try:
        wait_streaming(db)
        ids = emit(db, [("ok", "1", "Placed", {"n": 1}, {}), ("no", "1", "Placed", {"n": 2}, {}),
                        ("ok", "1", "Placed", {"n": 3}, {})])
        wait_for(lambda: query(db, "SELECT events_published, events_dead_lettered FROM outbox.relay_status")
                 == [(2, 1)], 60, "two published, one dead-lettered")
    finally:
        assert sigterm(proc) == 0, log.read_text()[-3000:]
    dead = query(db, "SELECT event_id::text, reason, error FROM outbox.relay_dead_letters")
    assert [(d[0], d[1]) for d in dead] == [(ids[1], "authorization")]
    assert "TopicAuthorizationFailedError" in dead[0][2] and "Fix: grant the relay's principal WRITE" in dead[0][2]

    # The inbox consumes as `app`, with the same OUTBOX_KAFKA_* settings mechanism. READ alone is
    # not enough: without DESCRIBE_CONFIGS the Runner cannot check its dedupe window and refuses.
    settings = load_settings(_env_file=None, database_url=db.secret(), kafka_bootstrap=bootstrap,
                             **sasl("app", APP_PASSWORD, ca))
    with pytest.raises(InboxError, match=rf"topic {allowed}: its configuration could not be read .*DESCRIBE_CONFIGS"):
        Runner.from_settings(settings, "app-billing", lambda conn, msg: None, topics=[allowed]).run()
    assert admin.create_acls([ACL("User:app", "*", ACLOperation.DESCRIBE_CONFIGS, ACLPermissionType.ALLOW,
                                  ResourcePattern(ResourceType.TOPIC, "ok.", ACLResourcePatternType.PREFIXED))]
                             )["failed"] == []
    admin_config = {"bootstrap_servers": bootstrap, **settings.kafka_security()}
    wait_for(lambda: isinstance(topic_horizons(admin_config, [allowed])[allowed], float), 30,
             "the DESCRIBE_CONFIGS grant to reach the broker's authorizer")
    seen = []
    runner = Runner.from_settings(settings, "app-billing", lambda conn, msg: seen.append(json.loads(msg.value)["n"]),
                                  topics=[allowed], poll_timeout_s=0.2)
    background = Background(runner)
    wait_for(lambda: len(seen) >= 2, 60, "the inbox to consume over SASL")
    background.stop()
    assert seen == [1, 3]

    ends = EndOffsets(bootstrap, settings.kafka_security())
    assert ends.fetch([(allowed, 0)]) == {(allowed, 0): 2}, ends.error

    text = log.read_text()
    assert "(SASL_SSL, PLAIN as 'relay')" in text
    for password in (RELAY_PASSWORD, ADMIN_PASSWORD, APP_PASSWORD):
        assert password not in text


def test_exactly_once_over_sasl_with_the_documented_acls(db, sasl_kafka, topic_prefix):
    """The ACLs docs/relay.md lists for exactly-once mode are enough: checkpoint topic (created by
    the relay), transactional id, and the event topics."""
    bootstrap, admin, ca = sasl_kafka
    topic = f"ok.{topic_prefix}"
    admin.create_topics([NewTopic(topic, 1, 1)])
    settings = relay_settings(db, bootstrap, topic_prefix, delivery="exactly-once",
                              topic_template="{aggregate_type}." + topic_prefix,
                              checkpoint_topic=f"ckpt.{topic_prefix}", **sasl("relay", RELAY_PASSWORD, ca))
    with RelayThread(settings):
        wait_streaming(db)
        ids = emit(db, [("ok", str(i), "Placed", {"n": i}, {}) for i in range(3)])
        wait_for(lambda: query(db, "SELECT events_published FROM outbox.relay_status") == [(3,)], 60, "published")
    records = read_topic(bootstrap, topic, expect=3, isolation="read_committed",
                         **admin_client(ca))
    assert [dict(r.headers)["event_id"].decode() for r in records] == ids


def test_a_wrong_password_is_reported_with_the_fix_and_nothing_is_acknowledged(db, sasl_kafka, topic_prefix,
                                                                             caplog):
    bootstrap, _, ca = sasl_kafka
    wrong = "not-the-Pa55word"
    settings = relay_settings(db, bootstrap, topic_prefix, **sasl("relay", wrong, ca))
    with RelayThread(settings):
        emit(db, [("ok", "1", "Placed", {"n": 1}, {})])
        error = wait_for(lambda: query(db, "SELECT last_error FROM outbox.relay_status WHERE last_error IS NOT NULL"),
                         60, "the relay to record why it cannot publish")[0][0]
    assert error.startswith("KafkaConnectionError: cannot reach Kafka: KafkaTimeoutError: Unable to bootstrap")
    assert "accepts SASL PLAIN for user 'relay' (OUTBOX_KAFKA_SASL_USERNAME, OUTBOX_KAFKA_SASL_PASSWORD" in error
    assert wrong not in error and wrong not in caplog.text
    assert query(db, "SELECT events_published FROM outbox.relay_status") == [(0,)]
    assert query(db, "SELECT count(*) FROM outbox.relay_dead_letters") == [(0,)]


def admin_client(ca: Path) -> dict[str, str]:
    return {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": "admin",
            "sasl_plain_password": ADMIN_PASSWORD, "ssl_cafile": str(ca)}


@pytest.mark.parametrize("drop", ["credentials", "trust in the CA", "TLS"])
def test_a_client_missing_any_part_gets_nowhere(sasl_kafka, drop):
    """The broker really enforces each part (the tests above would also pass on an open broker)."""
    bootstrap, _, ca = sasl_kafka
    options = admin_client(ca)
    if drop == "credentials":
        options = {"security_protocol": "SSL", "ssl_cafile": str(ca)}
    elif drop == "trust in the CA":
        del options["ssl_cafile"]  # the system's CAs never signed our broker
    else:
        options["security_protocol"] = "SASL_PLAINTEXT"
    with pytest.raises(Exception, match="Unable to bootstrap"):
        KafkaConsumer(bootstrap_servers=bootstrap, bootstrap_timeout_ms=3000, request_timeout_ms=3000, **options)
    KafkaConsumer(bootstrap_servers=bootstrap, bootstrap_timeout_ms=3000, **admin_client(ca)).close()
