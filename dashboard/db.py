"""The dashboard's database access: one connection as the read-only dashboard role, one consistent
snapshot per page, and operator messages instead of driver errors.

Every page reads inside one REPEATABLE READ, READ ONLY transaction, so the numbers on a page agree
with each other (the in-flight count and the in-flight list come from the same snapshot).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import IsolationLevel, sql

from outbox.core.redact import Dsn, redact
from outbox.core.settings import Settings

# A page must never hang the app: a query running this long is cut off with an error.
STATEMENT_TIMEOUT_MS = 5_000
CONNECT_TIMEOUT_S = 5


class DashboardError(Exception):
    """Something the operator must fix; the message says what, without secrets."""


def dashboard_dsn(settings: Settings) -> Dsn:
    if settings.dashboard_database_url is not None:
        return settings.dashboard_database_url
    return settings.require_database_url()


def connect(dsn: Dsn, role: str, *, read_only: bool = True) -> psycopg.Connection:
    """A connection that has switched to `role` (SET ROLE): from here on it can do only what the
    role can, whatever the login may do."""
    try:
        conn = psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="outbox-dashboard")
    except psycopg.OperationalError as exc:
        raise DashboardError(f"cannot connect to PostgreSQL at {dsn.masked}: {redact(str(exc)).strip()}. "
                             f"Fix: check that the server runs and OUTBOX_DATABASE_URL (or "
                             f"OUTBOX_DASHBOARD_DATABASE_URL) is right.") from None
    try:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),))
        conn.execute("SELECT 1 FROM outbox.relay_status LIMIT 1")
    except psycopg.Error as exc:
        conn.close()
        raise DashboardError(_role_problem(exc, role, dsn)) from None
    if read_only:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    return conn


def _role_problem(exc: psycopg.Error, role: str, dsn: Dsn) -> str:
    user = dsn.params().get("user") or "your login"
    message = redact(str(exc)).strip().splitlines()[0]
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return f"the outbox schema is missing ({message}). Fix: run `outbox migrate`."
    if "does not exist" in message:
        return (f"the dashboard role {role!r} does not exist ({message}). Fix: as a role with CREATEROLE run "
                f"`CREATE ROLE {role} NOLOGIN;` then, as the schema owner, "
                f"`SELECT outbox.grant_dashboard('{role}');` (outbox migrate does both when it may create roles).")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (f"{user} may not act as the dashboard role {role!r} or read the outbox schema ({message}). "
                f"Fix: `GRANT {role} TO \"{user}\";` and, if the role was created after `outbox migrate`, "
                f"`SELECT outbox.grant_dashboard('{role}');` as the schema owner.")
    return f"the dashboard cannot use the database ({message})."


class Database:
    """One connection shared by every browser session of the dashboard process. Pages take turns
    (a lock): each holds it for one snapshot, well under a second at a million rows."""

    def __init__(self, dsn: Dsn, role: str):
        self.dsn = dsn
        self.role = role
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Database":
        return cls(dashboard_dsn(settings), settings.dashboard_role)

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = connect(self.dsn, self.role)
            try:
                with self._conn.transaction():
                    yield self._conn
            except psycopg.OperationalError as exc:
                # The server went away or a statement timed out: reconnect on the next page.
                self._conn.close()
                raise DashboardError(f"the database query failed: {redact(str(exc)).strip()}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
