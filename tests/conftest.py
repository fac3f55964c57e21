"""Shared fixtures: one real PostgreSQL 18 + Apache Kafka stack per test session, started by the
same code as `outbox dev up`, and per-test isolation through a fresh database and topic prefix."""

from __future__ import annotations

import shutil
import uuid

import psycopg
import pytest

from outbox.core.migrate import migrate
from outbox.core.redact import Dsn
from outbox.core.settings import load_settings
from outbox.devstack.stack import DevStack, StackUrls
from tests.support.databases import drop_database
from tests.support.inbox import stop_leftover_runners
from tests.support.paths import REPO, TEMPLATE_DB, TEST_STACK_DIR


@pytest.fixture(autouse=True)
def _no_runner_outlives_its_test():
    yield
    stop_leftover_runners()


@pytest.fixture(scope="session")
def stack() -> StackUrls:
    """A fresh stack for the whole session. Leftovers of a killed earlier session (servers, slots
    pinning WAL) are stopped and wiped first, so every run starts from the same state."""
    dev = DevStack(load_settings(dev_kafka="apache"), root=TEST_STACK_DIR)
    dev.down()
    shutil.rmtree(TEST_STACK_DIR, ignore_errors=True)
    urls = dev.up()
    with psycopg.connect(urls.database_url.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    migrate(urls.database_url.with_params(dbname=TEMPLATE_DB), log=lambda _: None)
    yield urls
    dev.down()


@pytest.fixture(scope="session")
def admin_dsn(stack: StackUrls) -> Dsn:
    return stack.database_url.with_params(dbname="postgres")


@pytest.fixture
def db(stack: StackUrls, admin_dsn: Dsn) -> Dsn:
    """A migrated database of its own for each test (cloned from a template: ~30 ms)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    yield stack.database_url.with_params(dbname=name)
    drop_database(admin_dsn, name)


@pytest.fixture
def empty_db(stack: StackUrls, admin_dsn: Dsn) -> Dsn:
    """A database without the outbox schema, for migration tests."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield stack.database_url.with_params(dbname=name)
    drop_database(admin_dsn, name)




@pytest.fixture(scope="module")
def ha_stack():
    """A separate stack for failure tests: 3 Kafka nodes (RF 3, min ISR 2) and a PostgreSQL primary
    with a streaming standby, under its own directory so that killing, pausing or promoting its
    servers never touches the session stack. One per module, stopped at its end (~10 s to start,
    ~1 GiB RSS). Tests that kill or promote must leave it running or say so."""
    from outbox.devstack.kafka import find_java

    if find_java() is None:
        pytest.skip("a Kafka cluster needs Java 17+")
    root = REPO / ".outbox" / f"ha-{uuid.uuid4().hex[:8]}"
    dev = DevStack(load_settings(dev_kafka="apache"), root=root, kafka_brokers=3, pg_standby=True)
    try:
        dev.urls = dev.up()
        yield dev
    finally:
        dev.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def kafka_cluster(ha_stack) -> DevStack:
    """The 3-node cluster of `ha_stack`: bootstrap in `.urls.kafka_bootstrap`, and kill_broker /
    pause_broker / resume_broker / restart_broker / leaders / partitions by node id."""
    return ha_stack


@pytest.fixture(scope="module")
def pg_pair(ha_stack) -> DevStack:
    """The PostgreSQL primary + standby of `ha_stack`: multi-host URL in `.urls.database_url`,
    pg_node_dsn(role), wait_standby_caught_up, wait_slot_synced, promote."""
    return ha_stack


@pytest.fixture
def kafka(stack: StackUrls) -> str:
    return stack.kafka_bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """Unique per test, so tests never read each other's records."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def dashboard_scenario(stack, admin_dsn):
    """A database filled by a real relay and real consumers, shared by a dashboard test module's
    read-only tests (building it takes ~6 s). Per module, so that its relay and Kafka clients are
    gone before other modules run: an idle Kafka client left in the process slows group joins
    enough to break the inbox's rebalance timing test. Tests that write make their own."""
    from tests.support.dashboard import build, teardown

    scenario = build(stack, admin_dsn, f"d{uuid.uuid4().hex[:10]}")
    yield scenario
    teardown(scenario, admin_dsn)


@pytest.fixture
def provider():
    """The fake payment provider, a real HTTP server on 127.0.0.1."""
    from outbox.demo.fake_provider import FakeProvider

    with FakeProvider(hang_s=2.0) as p:
        yield p


@pytest.fixture
def client(provider):
    from outbox.demo.fake_provider import ProviderClient

    return ProviderClient(provider.url, timeout_s=0.5)


@pytest.fixture
def effects(db):
    from inbox import Effects

    with Effects(db, lease_s=5, owner="worker-a") as e:
        yield e


@pytest.fixture
def logins(db, admin_dsn):
    """Login roles on `db`'s server (tests/support/roles.py), dropped after the test."""
    from tests.support.roles import Logins

    made = Logins(db, admin_dsn)
    yield made
    made.drop()
