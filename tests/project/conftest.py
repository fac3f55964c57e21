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


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: apt-get install prometheus (Debian) to check the alert rules"
        if os.environ.get("OUTBOX_REQUIRE_PROMTOOL") == "1":
            pytest.fail(message + " (OUTBOX_REQUIRE_PROMTOOL=1)")
        pytest.skip(message)
    return path
