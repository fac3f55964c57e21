"""Fixtures of the inbox tests."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.inbox import create_business_schema


@pytest.fixture
def conn(db):
    create_business_schema(db)
    with psycopg.connect(db.secret(), autocommit=True) as c:
        yield c
