"""The one real-browser test: `outbox dashboard` as a user starts it, against the running stack
the real relay and consumers filled, loaded view by view in Debian's headless Chromium. Asserts
on what is visible and saves the screenshots the README and docs/dashboard.md show.

Skips when Chromium or chromedriver is missing, unless OUTBOX_REQUIRE_BROWSER=1 (CI), where a
missing browser is a failure. Screenshots go to pytest's temporary directory; with
OUTBOX_UPDATE_SCREENSHOTS=1 they replace the ones in docs/ (so a test run leaves the tree clean)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from relay.devstack.procs import free_port

from .conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS = REPO / "docs"
# Flags this machine kind needs: no sandbox as root, no GPU, and nothing that reaches the internet.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1440,1800", "--hide-scrollbars"]


def _browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    reason = (f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver; "
              f".ci/run does it)")
    if os.environ.get("OUTBOX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"OUTBOX_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def dashboard_url(dashboard_scenario, tmp_path):
    """`outbox dashboard` in its own process, as an operator runs it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({"OUTBOX_DATABASE_URL": dashboard_scenario.db.secret(),
                "OUTBOX_KAFKA_BOOTSTRAP": dashboard_scenario.kafka,
                "OUTBOX_DASHBOARD_PORT": str(port), "OUTBOX_DASHBOARD_REFRESH_S": "3600"})
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "dashboard"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"outbox dashboard did not come up: {(tmp_path / 'dashboard.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def browser(tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for_text(driver, expected: list[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        running = driver.find_elements("css selector", "[data-testid='stStatusWidget']")
        if all(e in text for e in expected) and not running:
            return text
        time.sleep(0.3)
    missing = [e for e in expected if e not in text]
    raise AssertionError(f"not visible after {timeout:.0f} s: {missing}\n--- page text ---\n{text[:3000]}")


def test_each_view_in_headless_chromium(dashboard_url, browser, dashboard_scenario, tmp_path):
    shots = DOCS if os.environ.get("OUTBOX_UPDATE_SCREENSHOTS") == "1" else tmp_path
    events = dashboard_scenario.events
    pages = [
        ("overview", {"view": "Overview"}, ["Needs attention", "2 effects with an unknown outcome need a decision",
                                            "wal_status", "reserved", "Consumer lag", "Last updated"]),
        ("in-flight", {"view": "In flight"}, ["Events in flight", "Nothing in flight"]),
        ("duplicates", {"view": "Duplicates"}, ["Per consumer, last 24 hours", "Most duplicated events"]),
        ("unknown-outcome", {"view": "Unknown outcome"},
         ["Effects with an unknown outcome (2)", "charge:o-pay", "no answer from the provider", "Review decision",
          "Relay batches with an unknown outcome (2)"]),
        ("dead-letters", {"view": "Dead letters"}, ["Relay (1)", "Inbox (2)", "Open, by reason"]),
        ("event-trace", {"view": "Event trace", "q": events["charge"]},
         [f"Event {events['charge']}", "PaymentRequested", "Consumers", "Effects"]),
    ]
    for name, params, expected in pages:
        browser.get(f"{dashboard_url}/?{urlencode(params)}")
        text = _wait_for_text(browser, expected)
        assert "Traceback" not in text, name
        assert browser.save_screenshot(str(shots / f"dashboard-{name}.png")), name
