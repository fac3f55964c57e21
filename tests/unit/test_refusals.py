"""Which PostgreSQL errors are refusals (stop with a code and the fix) and which may pass (retry)."""

from __future__ import annotations

import psycopg

from outbox.core.exits import EXIT_LOGIN_REFUSED, EXIT_PRIVILEGE
from outbox.core.redact import Dsn
from outbox.core.refusals import refusal

DSN = Dsn("postgresql://relay_app:S3cret-pw-9@db.internal:6432/orders")
PREFIX = 'connection failed: connection to server at "10.0.0.5", port 6432 failed: '


def test_wrong_password_is_a_login_refusal_naming_the_role_and_place_but_not_the_password():
    got = refusal(psycopg.OperationalError(PREFIX + 'FATAL:  password authentication failed for user "relay_app"'),
                  DSN, component="relay")
    assert got.code == EXIT_LOGIN_REFUSED
    assert "role 'relay_app'" in got.message and "db.internal:6432/orders" in got.message
    assert "OUTBOX_DATABASE_URL" in got.message and "S3cret-pw-9" not in got.message


def test_no_pg_hba_entry_is_a_login_refusal():
    error = psycopg.OperationalError(PREFIX + 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "relay_app"')
    assert refusal(error, DSN, component="relay").code == EXIT_LOGIN_REFUSED


def test_missing_replication_names_alter_role_and_the_managed_services():
    error = psycopg.OperationalError(PREFIX + "FATAL:  permission denied to start WAL sender\nDETAIL:  Only roles "
                                     "with the REPLICATION attribute may start a WAL sender process.")
    got = refusal(error, DSN, component="relay")
    assert got.code == EXIT_PRIVILEGE
    for fix in ('ALTER ROLE "relay_app" REPLICATION', 'GRANT rds_replication TO "relay_app"',
                'ALTER USER "relay_app" WITH REPLICATION', "azure_pg_admin"):
        assert fix in got.message


def test_transient_errors_are_not_refusals():
    for error in (psycopg.OperationalError(PREFIX + "Connection refused\n\tIs the server running on that host?"),
                  psycopg.OperationalError("server closed the connection unexpectedly"),
                  psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
                  TimeoutError("timed out"), None):
        assert refusal(error, DSN, component="relay") is None
