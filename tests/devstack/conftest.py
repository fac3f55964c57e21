"""Fixtures of the devstack tests."""

from __future__ import annotations

import shutil
import uuid

import pytest

from tests.support.devstack import our_processes, outbox
from tests.support.paths import REPO


@pytest.fixture
def dev_dir():
    path = REPO / ".outbox" / f"devstack-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(exist_ok=True)  # a fresh clone has no .outbox/ yet
    yield path
    if path.exists():
        outbox(path, "dev", "down", check=False)
    for proc in our_processes(path):  # the test failed half-way: still leave nothing behind
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)
