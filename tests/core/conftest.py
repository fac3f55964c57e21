"""Fixtures of the core tests."""

from __future__ import annotations

import pytest

from outbox.devstack.postgres import EmbeddedPostgres
from tests.support.paths import TEST_STACK_DIR


@pytest.fixture(scope="module")
def replica_level_pg(stack):
    """A second server with wal_level=replica, the default of most installations."""
    pg = EmbeddedPostgres(TEST_STACK_DIR / "pg-replica", config={"wal_level": "replica", "max_wal_senders": "5",
                                                                   "max_replication_slots": "0"})
    dsn = pg.start()
    yield dsn
    pg.stop()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("OUTBOX_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env / .outbox/dev.env from the developer's checkout


@pytest.fixture
def fresh_warnings(monkeypatch):
    import outbox.core.settings as settings_module

    monkeypatch.setattr(settings_module, "_warned", set())
