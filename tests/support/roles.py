"""Login roles for least-privilege tests. Roles belong to the whole cluster, not to the per-test
database, so each test's logins have unique names and are dropped with everything they own."""

from __future__ import annotations

import secrets
import subprocess
import sys
import uuid

import psycopg
from psycopg import sql

from outbox.core.redact import Dsn
from tests.support.paths import REPO


class Logins:
    """Creates login roles with random passwords on `db`'s server; `drop()` removes them."""

    def __init__(self, db: Dsn, admin_dsn: Dsn):
        self.db = db
        self.admin = admin_dsn
        self.names: list[str] = []

    def create(self, kind: str, *attributes: str) -> tuple[str, Dsn]:
        """A new login (`attributes`: e.g. REPLICATION) and its DSN to `db`."""
        name = f"{kind}_{uuid.uuid4().hex[:8]}"
        password = f"pw-{secrets.token_hex(8)}"
        with psycopg.connect(self.admin.secret(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} " + " ".join(attributes)).format(
                sql.Identifier(name), sql.Literal(password)))
        self.names.append(name)
        return name, self.db.with_params(user=name, password=password)

    def drop(self) -> None:
        """DROP OWNED in every database of the server (a test may have used another one), then the roles."""
        names, self.names = self.names, []
        if not names:
            return
        with psycopg.connect(self.admin.secret(), autocommit=True) as conn:
            databases = [d for (d,) in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
        for database in databases:
            try:
                with psycopg.connect(self.admin.with_params(dbname=database).secret(), autocommit=True) as conn:
                    for name in names:
                        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            except psycopg.OperationalError:
                pass  # dropped meanwhile
        with psycopg.connect(self.admin.secret(), autocommit=True) as conn:
            for name in names:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def outbox_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`outbox ARGS` as a user runs it, with only `env`'s OUTBOX_* settings."""
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def run_sql(dsn: Dsn, statement: str) -> None:
    with psycopg.connect(dsn.secret(), autocommit=True) as conn:
        conn.execute(statement)


def refused(dsn: Dsn, statement: str) -> str | None:
    """The error `statement` gets as `dsn`'s role, or None when it is allowed (rolled back either way)."""
    with psycopg.connect(dsn.secret()) as conn:
        try:
            conn.execute(statement)
            return None
        except psycopg.Error as exc:
            return exc.diag.message_primary or str(exc)
        finally:
            conn.rollback()
