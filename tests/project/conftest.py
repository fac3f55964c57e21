"""Fixtures of the project tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, capture_output=True)
    return next(out.glob("*.whl"))


def _prometheus_tool(name: str, purpose: str) -> str:
    """A binary of Debian's prometheus package; skipped without it, unless OUTBOX_REQUIRE_PROMTOOL=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: apt-get install prometheus (Debian) to {purpose}"
        if os.environ.get("OUTBOX_REQUIRE_PROMTOOL") == "1":
            pytest.fail(message + " (OUTBOX_REQUIRE_PROMTOOL=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _prometheus_tool("promtool", "check the alert rules")


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """The Prometheus server itself, to scrape a running relay."""
    return _prometheus_tool("prometheus", "scrape a running relay")
