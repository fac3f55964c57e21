"""`outbox migrate`: apply sql/NNN_name.sql in order, once each, safely from concurrent callers.

Each file runs in its own transaction together with its row in outbox.schema_migrations, so a
failed file leaves no trace and the next run retries it. A session advisory lock serialises
concurrent runs (several replicas of an app migrating on boot). Applied files are checksummed:
editing one after it ran is reported instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from importlib import resources

import psycopg

from outbox.core.exits import EXIT_FAILED
from outbox.core.redact import Dsn
from outbox.core.refusals import refusal

# Any constant works; this one is "outbox" in ASCII, to be recognisable in pg_locks.
LOCK_KEY = 0x6F7574626F78
_FILENAME = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code  # the `outbox migrate` exit code (outbox.core.exits)


class WalLevelError(MigrationError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


# The files a consumer-only database needs (`outbox migrate --inbox-only`): the inbox, its offsets
# and the effects ledger. Kept as a list here rather than a marker inside the files, because adding
# a marker would change the checksum of files databases already applied. A file listed here must
# not reference the outbox's own objects, and a file that changes only inbox objects must be listed
# (tests/unit/test_migration_sets.py holds both).
INBOX_VERSIONS = frozenset({3, 14})


def available() -> list[Migration]:
    found = []
    for entry in resources.files("outbox.sql").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


WAL_LEVEL_FIX = (
    "wal_level is {level!r}, but the relay needs 'logical' to read the outbox through a replication slot. "
    "Fix: as a superuser run `ALTER SYSTEM SET wal_level = logical;` and restart PostgreSQL "
    "(self-hosted: `pg_ctl restart -D <datadir>` or `systemctl restart postgresql`; "
    "Amazon RDS/Aurora: set rds.logical_replication = 1 in the parameter group and reboot; "
    "Google Cloud SQL: set the flag cloudsql.logical_decoding = on; "
    "Azure: set wal_level = logical in the server parameters)."
)


def wal_level_problem(conn: psycopg.Connection) -> str | None:
    """What is wrong and the fix when this server cannot feed a logical replication slot, else None.
    Shared by `outbox migrate` and the relay's start-up check."""
    level = conn.execute("SHOW wal_level").fetchone()[0]
    return None if level == "logical" else WAL_LEVEL_FIX.format(level=level)


def check_wal_level(conn: psycopg.Connection) -> None:
    if (problem := wal_level_problem(conn)) is not None:
        raise WalLevelError(problem + " Use --no-wal-check to install the schema anyway.")


def migrate(dsn: Dsn, *, wal_check: bool = True, inbox_only: bool = False, log=print) -> list[Migration]:
    """Apply pending migrations; returns those applied by this call. `inbox_only`: a database that
    only consumers use gets the inbox files, no wal_level check and no publication."""
    try:
        return _migrate(dsn, wal_check=wal_check and not inbox_only, inbox_only=inbox_only, log=log)
    except psycopg.Error as exc:
        if (refused := refusal(exc, dsn, component="migrate")) is not None:
            raise MigrationError(refused.message, refused.code) from None
        raise


def _migrate(dsn: Dsn, *, wal_check: bool, inbox_only: bool, log) -> list[Migration]:
    migrations = [m for m in available() if m.version in INBOX_VERSIONS or not inbox_only]
    applied_now: list[Migration] = []
    # utf8: a SQL_ASCII database would otherwise hand every text value back as bytes.
    with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=15, client_encoding="utf8") as conn:
        if wal_check:
            check_wal_level(conn)
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute("CREATE SCHEMA IF NOT EXISTS outbox")
                conn.execute("""
                    CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
                        version    integer PRIMARY KEY,
                        name       text NOT NULL,
                        checksum   text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now()
                    )""")
            done = {v: (n, c) for v, n, c in conn.execute(
                "SELECT version, name, checksum FROM outbox.schema_migrations")}
            # A migration says with a NOTICE what it could not do and what to run instead (004 without
            # CREATEROLE); without this the operator would never see it.
            conn.add_notice_handler(lambda diag: log(f"note: {diag.message_primary}"
                                                     + (f". {diag.message_hint}" if diag.message_hint else "")))
            for m in migrations:
                if m.version in done:
                    if done[m.version][1] != m.checksum:
                        raise MigrationError(
                            f"{m.filename} was changed after it was applied (checksum differs). "
                            f"Fix: restore the original file and put the change in a new migration."
                        )
                    continue
                started = time.monotonic()
                try:
                    with conn.transaction():
                        conn.execute(m.sql)
                        conn.execute("INSERT INTO outbox.schema_migrations (version, name, checksum) "
                                     "VALUES (%s, %s, %s)", (m.version, m.name, m.checksum))
                except psycopg.Error as exc:
                    if (refused := refusal(exc, dsn, component="migrate")) is not None:
                        raise MigrationError(f"{m.filename} was rolled back: {refused.message}", refused.code) from None
                    raise MigrationError(f"{m.filename} failed and was rolled back: {exc}") from exc
                applied_now.append(m)
                log(f"applied {m.filename} ({(time.monotonic() - started) * 1000:.0f} ms)")
            unknown = sorted(set(done) - {m.version for m in available()})
            if unknown:
                log(f"note: the database has migrations this release does not know: {unknown} (newer release?)")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    if not applied_now:
        log(f"schema is up to date ({len(migrations)} migrations)")
    return applied_now
