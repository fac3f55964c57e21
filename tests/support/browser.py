"""Debian's Chromium driven through chromedriver, for the dashboard's real-browser test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


CHROMEDRIVER = Path("/usr/bin/chromedriver")


# Flags this machine kind needs: no sandbox as root, no GPU, and nothing that reaches the internet.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1440,1800", "--hide-scrollbars"]


def browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    reason = (f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver; "
              f".ci/run does it)")
    if os.environ.get("OUTBOX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"OUTBOX_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)
