"""`outbox migrate --inbox-only` applies INBOX_VERSIONS alone, so those files must stand alone;
and `outbox grants` prints what each role needs, REPLICATION named for the relay only."""

from __future__ import annotations

import re

import pytest

from outbox.core.grants import INBOX_TABLES, RELAY_TABLES, ROLES, render
from outbox.core.migrate import INBOX_VERSIONS, available


def test_inbox_migrations_reference_only_inbox_objects():
    inbox = [m for m in available() if m.version in INBOX_VERSIONS]
    assert [m.version for m in inbox] == sorted(INBOX_VERSIONS)
    created = set()
    for m in inbox:
        created |= set(re.findall(r"CREATE (?:TABLE|VIEW|INDEX \w+ ON) outbox\.(\w+)", m.sql))
    for m in inbox:
        referenced = set(re.findall(r"\boutbox\.(\w+)", m.sql))
        assert referenced <= created, f"{m.filename} needs {referenced - created}, which --inbox-only does not create"
    assert set(INBOX_TABLES) <= created


def inbox_objects() -> set[str]:
    created = set()
    for m in available():
        if m.version in INBOX_VERSIONS:
            created |= set(re.findall(r"CREATE (?:TABLE|VIEW|INDEX \w+ ON) outbox\.(\w+)", m.sql))
    return created


@pytest.mark.parametrize("migration", available(), ids=lambda m: m.filename)
def test_a_migration_that_changes_only_inbox_objects_is_an_inbox_migration(migration):
    """Otherwise a consumer-only database would lack it while the inbox code relies on it."""
    referenced = set(re.findall(r"\boutbox\.(\w+)", migration.sql))
    if referenced and referenced <= inbox_objects():
        assert migration.version in INBOX_VERSIONS, f"add {migration.version} to INBOX_VERSIONS (outbox/core/migrate.py)"


@pytest.mark.parametrize("role", list(ROLES))
def test_grants_name_the_login_quoted_and_only_the_relay_needs_replication(role):
    text = render(role, 'Odd"Name')
    assert '"Odd""Name"' in text or "'Odd\"Name'" in text
    assert ("ALTER ROLE \"Odd\"\"Name\" REPLICATION;" in text) == (role == "relay")
    assert ("rds_replication" in text) == (role == "relay")


def test_producer_gets_execute_on_emit_and_no_table():
    text = render("producer", "app")
    assert "GRANT EXECUTE ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb)" in text
    assert " ON outbox." not in text.replace("ON FUNCTION outbox.", "")


def test_relay_writes_only_its_own_tables():
    text = render("relay", "relay")
    written = re.search(r"GRANT SELECT, INSERT, UPDATE, DELETE ON (.*) TO", text).group(1)
    assert sorted(written.replace("outbox.", "").split(", ")) == sorted(RELAY_TABLES)
    assert "ON outbox.events TO" in text and "INSERT, UPDATE, DELETE ON outbox.events" not in text
