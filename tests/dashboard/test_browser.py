"""The one real-browser test: `outbox dashboard` as a user starts it, against the running stack
the real relay and consumers filled, loaded view by view in Debian's headless Chromium. Asserts
on what is visible and saves a screenshot of each view into pytest's temporary directory (to look
at when it fails). The screenshots in docs/ come from a live demo instead: docs/screenshots.py.

Skips when Chromium or chromedriver is missing, unless OUTBOX_REQUIRE_BROWSER=1 (CI), where a
missing browser is a failure."""

from __future__ import annotations

import time
from urllib.parse import urlencode


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
    shots = tmp_path
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
