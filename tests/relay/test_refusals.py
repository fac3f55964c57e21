"""The relay with least privileges: with exactly its grants it streams and publishes; a refused
login, a missing REPLICATION attribute, missing grants or a publication it may not create stop it
at once with a distinct exit code and the fix, never a retry loop "restarting from the slot"."""

from __future__ import annotations

import time

import psutil
import psycopg
import pytest

from outbox.core import grants
from outbox.core.exits import EXIT_LOGIN_REFUSED, EXIT_OK, EXIT_PRIVILEGE
from outbox.core.redact import Dsn
from outbox.devstack.procs import free_port
from tests.support.helpers import read_topic, wait_for
from tests.support.relay import (
    RelayThread,
    published,
    query,
    relay_env,
    relay_process,
    relay_settings,
    sigterm,
)
from tests.support.roles import outbox_cli, run_sql


def grant_relay_tables(db: Dsn, login: str) -> None:
    """The relay's grants without the REPLICATION attribute that `outbox grants --apply` also sets."""
    run_sql(db, "; ".join(grants.plan("relay", login).statements))


def run_relay_process(env: dict[str, str], tmp_path, timeout: float = 90) -> tuple[int, str]:
    proc = relay_process(env, tmp_path / "relay.log")
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, (tmp_path / "relay.log").read_text()


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_relay_with_only_its_grants_streams_and_publishes(db, kafka, topic_prefix, logins, delivery):
    """exactly-once also writes its checkpoint and batches inside Kafka transactions and runs its
    recovery queries at start: the same grants must cover both modes."""
    relay_name, relay_dsn = logins.create("relay")
    producer_name, producer_dsn = logins.create("producer")
    for role, name in (("relay", relay_name), ("producer", producer_name)):
        result = outbox_cli("grants", "--role", role, "--login", name, "--apply", env={"OUTBOX_DATABASE_URL": db.secret()})
        assert result.returncode == EXIT_OK, result.stderr
    assert query(db, "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = %s", (relay_name,)) == [(True, False)]
    settings = relay_settings(relay_dsn, kafka, topic_prefix, delivery=delivery)
    with RelayThread(settings) as relay:
        with psycopg.connect(producer_dsn.secret()) as conn:
            for i in range(3):
                conn.execute("SELECT outbox.emit('order', %s, 'Placed', '{}')", (str(i),))
        records = read_topic(kafka, f"{topic_prefix}.order", expect=3)
        wait_for(lambda: published(db) == 3, 30, "3 events recorded as published")
        assert relay.exit_code is None
        assert relay.stop() == EXIT_OK
    assert sorted(r.key for r in records) == [b"0", b"1", b"2"]
    # A restart with the same grants resumes (exactly-once: from its checkpoint) and repeats nothing.
    with RelayThread(relay_settings(relay_dsn, kafka, topic_prefix, delivery=delivery)) as relay:
        with psycopg.connect(producer_dsn.secret()) as conn:
            conn.execute("SELECT outbox.emit('order', '3', 'Placed', '{}')")
        records = read_topic(kafka, f"{topic_prefix}.order", expect=4, settle=2.0,
                             isolation="read_committed" if delivery == "exactly-once" else "read_uncommitted")
        assert relay.exit_code is None
    assert sorted(r.key for r in records) == [b"0", b"1", b"2", b"3"]


def test_wrong_password_stops_the_relay_with_exit_4_and_the_fix(db, kafka, topic_prefix, logins, tmp_path):
    name, login = logins.create("relay", "REPLICATION")
    wrong = login.with_params(password="Wr0ng-secret-relay-77")
    code, log = run_relay_process(relay_env(wrong, kafka, topic_prefix), tmp_path)
    assert code == EXIT_LOGIN_REFUSED, log
    assert f"refused the login of role '{name}'" in log
    assert "Fix: check the user and password in OUTBOX_DATABASE_URL" in log
    assert "restarting from the slot" not in log
    assert "Wr0ng-secret-relay-77" not in log and login.params()["password"] not in log


def test_role_without_replication_stops_with_the_alter_role_fix(db, kafka, topic_prefix, logins, tmp_path):
    name, login = logins.create("relay")
    grant_relay_tables(db, name)
    code, log = run_relay_process(relay_env(login, kafka, topic_prefix), tmp_path)
    assert code == EXIT_PRIVILEGE, log
    assert f"role '{name}' may not open a replication connection" in log
    assert f'ALTER ROLE "{name}" REPLICATION' in log and "rds_replication" in log
    assert "restarting from the slot" not in log
    assert login.params()["password"] not in log


@pytest.mark.parametrize("granted", ["nothing", "schema usage only"])
def test_relay_without_its_grants_stops_with_exit_5_and_the_grants_command(db, kafka, topic_prefix, logins, granted):
    name, login = logins.create("relay", "REPLICATION")
    if granted == "schema usage only":
        run_sql(db, f"GRANT USAGE ON SCHEMA outbox TO {name}")
    relay = RelayThread(relay_settings(login, kafka, topic_prefix)).start()
    assert relay.join(60) == EXIT_PRIVILEGE
    error = relay.relay.metrics.last_error
    assert f"outbox grants --role relay --login {name} --apply" in error
    assert relay.relay.metrics.restarts._value.get() == 0


def test_missing_publication_the_relay_may_not_create_stops_with_exit_5(db, kafka, topic_prefix, logins):
    name, login = logins.create("relay")
    assert grants.apply(db, "relay", name, log=lambda _: None) == EXIT_OK
    run_sql(db, "DROP PUBLICATION outbox_events")
    relay = RelayThread(relay_settings(login, kafka, topic_prefix)).start()
    assert relay.join(60) == EXIT_PRIVILEGE
    error = relay.relay.metrics.last_error
    assert "publication 'outbox_events' is missing and this role may not create it" in error
    assert "CREATE PUBLICATION outbox_events FOR TABLE outbox.events" in error


def test_unreachable_kafka_is_one_line_with_the_fix_not_reconnect_noise(db, topic_prefix, tmp_path):
    nowhere = f"127.0.0.1:{free_port()}"
    proc = relay_process(relay_env(db, nowhere, topic_prefix), tmp_path / "relay.log")
    try:
        # Each attempt waits for the bootstrap timeout (~10 s); three attempts are three chances to repeat.
        wait_for(lambda: query(db, "SELECT count(*) FROM outbox.relay_status WHERE last_error IS NOT NULL")[0][0],
                 60, "the first failure recorded")
        time.sleep(25)
        assert proc.poll() is None, "an unreachable broker is retried, not fatal"
    finally:
        assert sigterm(proc) == EXIT_OK
    log = (tmp_path / "relay.log").read_text()
    failures = [line for line in log.splitlines() if "restarting from the slot" in line]
    assert len(failures) == 1, log
    assert "cannot reach Kafka" in failures[0] and "Fix: check that a broker listens at" in failures[0]
    assert "kafka.net" not in log
    assert db.params()["password"] not in log


@pytest.mark.slow
def test_kafka_outage_at_start_is_one_line_when_it_begins_and_one_when_streaming_resumes(db, topic_prefix, own_broker,
                                                                                        tmp_path):
    broker, pid, port = own_broker
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(30)
    proc = relay_process(relay_env(db, f"127.0.0.1:{port}", topic_prefix), tmp_path / "relay.log")
    restarted = None
    try:
        time.sleep(30)  # two or three failed bootstraps
        restarted = broker.start(None, port)
        wait_for(lambda: "streams again" in (tmp_path / "relay.log").read_text(), 120, "the relay to stream again")
    finally:
        assert sigterm(proc) == EXIT_OK
        if restarted is not None:
            broker.stop(*restarted)
    log = (tmp_path / "relay.log").read_text()
    assert len([line for line in log.splitlines() if "restarting from the slot" in line]) == 1, log
    assert len([line for line in log.splitlines() if "streams again (it had failed with: " in line]) == 1, log
    assert "kafka.net" not in log
