"""Least privilege: each part's role can do its job and nothing else (`outbox grants`), a
consumer-only database migrates with --inbox-only, and `outbox migrate` refusals say the fix."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from outbox.core import grants
from outbox.core import migrate as migrate_mod
from outbox.core.exits import EXIT_LOGIN_REFUSED, EXIT_OK, EXIT_PRIVILEGE
from outbox.core.migrate import available, migrate
from outbox.core.redact import Dsn
from tests.support.databases import drop_database
from tests.support.inbox import Rec, apply_deposit, create_business_schema, deposit, headers_for
from tests.support.roles import outbox_cli, refused, run_sql


def granted(db: Dsn, role: str, login: str) -> None:
    assert grants.apply(db, role, login, log=lambda _: None) == EXIT_OK


def consume_twice(dsn: Dsn) -> tuple[int, int]:
    """The inbox's commit protocol as `dsn`'s role: one event delivered twice; (balance, inbox rows)."""
    from inbox import process

    event_id = uuid.uuid4()
    record = Rec("orders", 0, 0, deposit("acc-1", 10), headers_for(event_id))
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        process(conn, "payments", [record], apply_deposit)
        process(conn, "payments", [Rec("orders", 0, 1, record.value, record.headers)], apply_deposit)
        return (conn.execute("SELECT balance FROM balances").fetchone()[0],
                conn.execute("SELECT count(*) FROM outbox.inbox_messages").fetchone()[0])


def test_producer_can_call_emit_but_cannot_read_or_write_the_outbox_table(db, logins):
    name, producer = logins.create("producer")
    assert refused(producer, "SELECT outbox.emit('order', '1', 'Placed', '{}')") is not None  # nothing before
    granted(db, "producer", name)
    with psycopg.connect(producer.secret()) as conn:
        event_id = conn.execute("SELECT outbox.emit('order', '1', 'Placed', '{\"n\": 1}')").fetchone()[0]
    assert "permission denied for table events" in refused(producer, "SELECT * FROM outbox.events")
    assert "permission denied for table events" in refused(
        producer, "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type) VALUES ('o', '1', 'X')")
    assert "permission denied" in refused(producer, "SELECT * FROM outbox.inbox_messages")
    # emit() keeps its checks and hints under the owner's rights.
    assert "aggregate_type must be a non-empty string" in refused(producer, "SELECT outbox.emit('', '1', 'X', '{}')")
    with psycopg.connect(db.secret()) as conn:
        row = conn.execute("SELECT aggregate_id, payload FROM outbox.events WHERE event_id = %s", (event_id,)).fetchone()
    assert row == ("1", {"n": 1})


def test_emit_ignores_a_search_path_the_caller_controls(db, logins):
    """A SECURITY DEFINER function resolving names through the caller's search_path would run
    the caller's objects with the owner's rights."""
    name, producer = logins.create("producer")
    granted(db, "producer", name)
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA evil AUTHORIZATION {name}")
    with psycopg.connect(producer.secret()) as conn:
        conn.execute("CREATE FUNCTION evil.btrim(text) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$")
        conn.execute("SET search_path = evil, pg_catalog")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT outbox.emit(' ', '1', 'X', '{}')")


def test_roles_that_could_insert_before_the_upgrade_can_still_emit(empty_db, logins, monkeypatch):
    name, producer = logins.create("producer")
    older = [m for m in available() if m.version < 10]
    monkeypatch.setattr(migrate_mod, "available", lambda: older)
    migrate(empty_db, log=lambda _: None)
    with psycopg.connect(empty_db.secret(), autocommit=True) as conn:
        conn.execute(f"GRANT USAGE ON SCHEMA outbox TO {name}; GRANT INSERT ON outbox.events TO {name}")
    monkeypatch.undo()
    assert 10 in [m.version for m in migrate(empty_db, log=lambda _: None)]
    producer = producer.with_params(dbname=empty_db.params()["dbname"])
    assert refused(producer, "SELECT outbox.emit('order', '1', 'Placed', '{}')") is None


def test_dashboard_role_reads_and_writes_nothing(db, logins):
    name, dashboard = logins.create("dashboard")
    granted(db, "dashboard", name)
    assert refused(dashboard, "SELECT count(*) FROM outbox.events") is None
    assert refused(dashboard, "SELECT count(*) FROM outbox.inbox_messages") is None
    assert refused(dashboard, "SELECT * FROM outbox.in_flight") is None
    assert "permission denied" in refused(dashboard, "DELETE FROM outbox.events")
    assert "permission denied" in refused(dashboard, "SELECT outbox.emit('order', '1', 'Placed', '{}')")


def test_consumer_role_writes_the_inbox_and_cannot_touch_the_outbox(db, logins):
    name, consumer = logins.create("consumer")
    granted(db, "consumer", name)
    create_business_schema(db)
    run_sql(db, f"GRANT SELECT, INSERT, UPDATE ON balances, applied TO {name}")
    assert consume_twice(consumer) == (10, 1)
    assert refused(consumer, "SELECT * FROM outbox.effects_unresolved") is None
    assert "permission denied" in refused(consumer, "SELECT * FROM outbox.events")
    assert "permission denied" in refused(consumer, "SELECT outbox.emit('order', '1', 'Placed', '{}')")
    assert "permission denied" in refused(consumer, "UPDATE outbox.relay_status SET delivery = delivery")


def test_consumer_only_database_migrates_with_inbox_only_without_logical_wal_or_publication(replica_level_pg,
                                                                                           stack):
    """A consumer's own database, on a server with wal_level=replica, migrated by the consumer's
    login, which then owns its inbox tables."""
    admin = replica_level_pg.with_params(dbname="postgres")
    database, login, password = f"c_{uuid.uuid4().hex[:8]}", f"consumer_{uuid.uuid4().hex[:8]}", "pw-consumer-1234"
    with psycopg.connect(admin.secret(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {database} OWNER {login}")
    consumer = replica_level_pg.with_params(dbname=database, user=login, password=password)
    try:
        result = outbox_cli("migrate", "--inbox-only", env={"OUTBOX_DATABASE_URL": consumer.secret()})
        assert result.returncode == EXIT_OK, result.stderr
        assert "applied 003_inbox.sql" in result.stderr and "wal_level" not in result.stderr
        with psycopg.connect(consumer.secret()) as conn:
            assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
            assert conn.execute("SELECT to_regclass('outbox.events')").fetchone()[0] is None
            owners = conn.execute("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'outbox'").fetchall()
        assert owners == [(login,)]
        from inbox import Effects

        create_business_schema(consumer)
        assert consume_twice(consumer) == (10, 1)
        with Effects(consumer, owner="worker") as effects:
            assert effects.run("charge:order-1", {"amount": 5}, lambda _key: {"id": "ch_1"}).response \
                == {"id": "ch_1"}
        again = outbox_cli("migrate", "--inbox-only", env={"OUTBOX_DATABASE_URL": consumer.secret()})
        assert again.returncode == EXIT_OK and "schema is up to date" in again.stderr
    finally:
        drop_database(admin, database)
        with psycopg.connect(admin.secret(), autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {login}")


def test_wrong_password_stops_migrate_with_exit_4_and_the_fix(db, logins):
    name, login = logins.create("owner")
    wrong = login.with_params(password="not-the-Passw0rd-42")
    result = outbox_cli("migrate", env={"OUTBOX_DATABASE_URL": wrong.secret()})
    assert result.returncode == EXIT_LOGIN_REFUSED, result.stderr
    assert f"refused the login of role '{name}'" in result.stderr
    assert "Fix: check the user and password in OUTBOX_DATABASE_URL" in result.stderr
    assert "not-the-Passw0rd-42" not in result.stderr + result.stdout
    # Every other command that only reaches the database through the CLI says it the same way.
    for command in (("dead-letters", "list"), ("inbox", "purge"), ("prune",)):
        other = outbox_cli(*command, env={"OUTBOX_DATABASE_URL": wrong.secret()})
        assert other.returncode == EXIT_LOGIN_REFUSED, (command, other.stderr)
        assert f"refused the login of role '{name}'" in other.stderr
        assert "not-the-Passw0rd-42" not in other.stderr + other.stdout


def test_migrate_by_a_role_without_privileges_exits_5_and_names_the_owner(empty_db, logins):
    name, login = logins.create("app")
    login = login.with_params(dbname=empty_db.params()["dbname"])
    with psycopg.connect(empty_db.secret(), autocommit=True) as conn:
        conn.execute(f"REVOKE CREATE ON DATABASE {empty_db.params()['dbname']} FROM PUBLIC")
    result = outbox_cli("migrate", env={"OUTBOX_DATABASE_URL": login.secret()})
    assert result.returncode == EXIT_PRIVILEGE, result.stderr
    assert f"role '{name}' lacks a privilege" in result.stderr
    assert "run `outbox migrate` as the role that owns the schema `outbox`" in result.stderr
    assert login.params()["password"] not in result.stderr


def test_grants_apply_by_an_owner_who_may_not_set_replication_exits_5_with_the_alter_role(db, logins):
    relay_name, _ = logins.create("relay")
    owner_name, owner = logins.create("owner")
    with psycopg.connect(db.secret(), autocommit=True) as conn:
        conn.execute(f"ALTER SCHEMA outbox OWNER TO {owner_name}")
        for table in grants.RELAY_TABLES + ("events",):
            conn.execute(f"ALTER TABLE outbox.{table} OWNER TO {owner_name}")
        conn.execute(f"ALTER FUNCTION outbox.dead_lettered(uuid, text) OWNER TO {owner_name}")
    result = outbox_cli("grants", "--role", "relay", "--login", relay_name, "--apply",
                        env={"OUTBOX_DATABASE_URL": owner.secret()})
    assert result.returncode == EXIT_PRIVILEGE, result.stderr
    assert f'ALTER ROLE "{relay_name}" REPLICATION' in result.stderr
    assert "rds_replication" in result.stderr
    with psycopg.connect(db.secret()) as conn:  # the grants themselves were applied
        assert conn.execute("SELECT has_table_privilege(%s, 'outbox.relay_status', 'UPDATE')",
                            (relay_name,)).fetchone()[0]
