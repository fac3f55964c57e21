"""Fixtures of the relay tests."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourceType,
)

from outbox.core.migrate import migrate
from outbox.devstack.kafka import ApacheKafka, find_java
from outbox.devstack.postgres import EmbeddedPostgres
from outbox.devstack.procs import free_port
from relay.metrics import RelayMetrics, serve
from tests.support.paths import TEST_STACK_DIR
from tests.support.tls import ADMIN_PASSWORD, APP_PASSWORD, RELAY_PASSWORD, make_certificates


@pytest.fixture
def other_server(tmp_path):
    """A second PostgreSQL server (its own initdb, so its own system identifier and a WAL that
    starts low): what a database restored from a dump into a new cluster looks like."""
    pg = EmbeddedPostgres(tmp_path / "pg2")
    dsn = pg.start()
    migrate(dsn, log=lambda _: None)
    yield dsn
    pg.stop()


@pytest.fixture(scope="module")
def ha(ha_stack):
    return ha_stack, ha_stack.urls


@pytest.fixture
def ha_db(ha):
    dev, urls = ha
    name = f"h_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(urls.database_url.with_params(dbname="postgres").secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = urls.database_url.with_params(dbname=name)
    migrate(dsn, log=lambda _: None)
    return dsn


@pytest.fixture(scope="module")
def sasl_kafka(stack):
    """A broker of this module's own. ACLs: `relay` may describe and write topics starting with
    "ok.", use checkpoint topics starting with "ckpt." and transactional ids of relays; `app` may
    read "ok." topics in groups starting with "app-". Nothing else is allowed."""
    root = TEST_STACK_DIR / f"kafka-sasl-{time.time_ns()}"
    keystore, ca = make_certificates(root / "tls")
    broker = ApacheKafka(root, "4.1.1", None, "https://repo1.maven.org/maven2", find_java(),
                         sasl_users={"admin": ADMIN_PASSWORD, "relay": RELAY_PASSWORD, "app": APP_PASSWORD},
                         tls=(keystore, ca))
    pid, port = broker.start(None, None)
    bootstrap = f"127.0.0.1:{port}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **broker.client)
    ok_topics = ResourcePattern(ResourceType.TOPIC, "ok.", ACLResourcePatternType.PREFIXED)
    acls = [ACL("User:relay", "*", op, ACLPermissionType.ALLOW, ok_topics)
            for op in (ACLOperation.DESCRIBE, ACLOperation.WRITE)]
    acls += [ACL("User:relay", "*", op, ACLPermissionType.ALLOW,
                 ResourcePattern(ResourceType.TOPIC, "ckpt.", ACLResourcePatternType.PREFIXED))
             for op in (ACLOperation.DESCRIBE, ACLOperation.CREATE, ACLOperation.READ, ACLOperation.WRITE)]
    acls += [ACL("User:relay", "*", op, ACLPermissionType.ALLOW,
                 ResourcePattern(ResourceType.TRANSACTIONAL_ID, "outbox-relay-", ACLResourcePatternType.PREFIXED))
             for op in (ACLOperation.DESCRIBE, ACLOperation.WRITE)]
    acls += [ACL("User:app", "*", ACLOperation.READ, ACLPermissionType.ALLOW, ok_topics),
             ACL("User:app", "*", ACLOperation.READ, ACLPermissionType.ALLOW,
                 ResourcePattern(ResourceType.GROUP, "app-", ACLResourcePatternType.PREFIXED))]
    assert admin.create_acls(acls)["failed"] == []
    yield bootstrap, admin, ca
    admin.close()
    broker.stop(pid, port)


@pytest.fixture
def served():
    metrics = RelayMetrics()
    port = free_port()
    server = serve(metrics, port)
    yield metrics, port
    server.shutdown()
    server.server_close()


@pytest.fixture
def own_broker(stack):
    """A broker of this test's own, so stopping it disturbs no other test."""
    broker = ApacheKafka(TEST_STACK_DIR / f"kafka-outage-{time.time_ns()}", "4.1.1", None,
                         "https://repo1.maven.org/maven2", find_java())
    pid, port = broker.start(None, None)
    yield broker, pid, port
    broker.stop(pid, port)


@pytest.fixture(scope="module")
def replica_pg(stack):
    pg = EmbeddedPostgres(TEST_STACK_DIR / "pg-relay-replica", config={"wal_level": "replica",
                                                                        "max_replication_slots": "0"})
    dsn = pg.start()
    migrate(dsn, wal_check=False, log=lambda _: None)
    yield dsn
    pg.stop()


@pytest.fixture
def small_wal_pg(stack):
    """A server that invalidates slots retaining more than 1 MB of WAL."""
    pg = EmbeddedPostgres(TEST_STACK_DIR / f"pg-small-wal-{time.time_ns()}",
                          config={"max_slot_wal_keep_size": "'1MB'", "wal_keep_size": "0"})
    dsn = pg.start()
    migrate(dsn, log=lambda _: None)
    yield dsn
    pg.stop()
