"""outbox migrate: versioned, idempotent, concurrency-safe, and explicit about wal_level."""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import psycopg
import pytest

from outbox.core import migrate as migrate_mod
from outbox.core.migrate import Migration, MigrationError, WalLevelError, available, migrate
from tests.support.paths import REPO

SCHEMA_FINGERPRINT = """
SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
    SELECT format('%s.%s:%s:%s', table_name, column_name, data_type, column_default) AS x
      FROM information_schema.columns WHERE table_schema = 'outbox'
    UNION ALL SELECT format('fn:%s:%s', p.oid::regprocedure, md5(p.prosrc))
      FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
    UNION ALL SELECT format('idx:%s', indexdef) FROM pg_indexes WHERE schemaname = 'outbox'
    UNION ALL SELECT format('pub:%s:%s', pubname, pubinsert::text || pubupdate::text || pubdelete::text)
      FROM pg_publication
) s
"""


def fingerprint(dsn) -> tuple[str, list]:
    with psycopg.connect(dsn.secret()) as conn:
        fp = conn.execute(SCHEMA_FINGERPRINT).fetchone()[0]
        rows = conn.execute("SELECT version, name FROM outbox.schema_migrations ORDER BY version").fetchall()
    return fp, rows


def test_migrations_apply_once_and_second_run_changes_nothing(empty_db):
    first = migrate(empty_db, log=lambda _: None)
    assert [m.version for m in first] == [m.version for m in available()]
    before = fingerprint(empty_db)
    assert migrate(empty_db, log=lambda _: None) == []
    assert fingerprint(empty_db) == before
    assert before[1] == [(m.version, m.name) for m in available()]


def test_concurrent_migrations_apply_each_file_exactly_once(empty_db):
    errors, results = [], []

    def run():
        try:
            results.append(len(migrate(empty_db, log=lambda _: None)))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [0] * 5 + [len(available())]
    assert fingerprint(empty_db)[1] == [(m.version, m.name) for m in available()]


def test_edited_migration_is_reported_not_reapplied(empty_db, monkeypatch):
    migrate(empty_db, log=lambda _: None)
    original = available()
    changed = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in original]
    monkeypatch.setattr(migrate_mod, "available", lambda: changed)
    with pytest.raises(MigrationError, match=r"001_outbox\.sql was changed after it was applied"):
        migrate(empty_db, log=lambda _: None)


def test_failing_migration_rolls_back_and_is_retried(empty_db, monkeypatch):
    good = available()
    broken = good + [Migration(999, "broken", "CREATE TABLE outbox.half_done (id int); SELECT 1/0;")]
    monkeypatch.setattr(migrate_mod, "available", lambda: broken)
    with pytest.raises(MigrationError, match="999_broken.sql failed and was rolled back"):
        migrate(empty_db, log=lambda _: None)
    with psycopg.connect(empty_db.secret()) as conn:
        assert conn.execute("SELECT to_regclass('outbox.half_done')").fetchone()[0] is None
        assert conn.execute("SELECT max(version) FROM outbox.schema_migrations").fetchone()[0] == good[-1].version


def test_wrong_wal_level_is_refused_with_the_fix(replica_level_pg):
    with pytest.raises(WalLevelError) as err:
        migrate(replica_level_pg, log=lambda _: None)
    message = str(err.value)
    assert "wal_level is 'replica'" in message
    assert "ALTER SYSTEM SET wal_level = logical" in message and "restart" in message
    with psycopg.connect(replica_level_pg.secret()) as conn:
        assert conn.execute("SELECT to_regnamespace('outbox')").fetchone()[0] is None


def test_cli_reports_wal_level_and_exit_code(replica_level_pg, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUTBOX_DATABASE_URL": replica_level_pg.secret()}
    result = subprocess.run([sys.executable, "-m", "outbox.cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "ALTER SYSTEM SET wal_level = logical" in result.stderr
    assert replica_level_pg.params()["password"] not in result.stderr + result.stdout


def test_no_wal_check_installs_schema_anyway(replica_level_pg):
    assert [m.version for m in migrate(replica_level_pg, wal_check=False, log=lambda _: None)] == \
        [m.version for m in available()]


def test_wheel_ships_the_sql_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(Path(tmp_path).glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for m in available():
        assert f"outbox/sql/{m.filename}" in names
    assert "outbox/devstack/kafka-4.1.1.lock" in names
