"""Regenerate the dashboard screenshots in docs/ from a live `outbox demo`: the seed's story (orders,
a payment worker charging a fake provider, shipping) with its faults, not test fixtures.

    .venv/bin/python docs/screenshots.py [--warmup 40] [--out docs]

Starts the demo on a dev stack of its own (.outbox/screenshots, removed at the end), waits until
the shop has run long enough to have duplicates, dead letters and resolved unknown outcomes, then
loads each dashboard view in Debian's headless Chromium (apt-get install chromium
chromium-driver; selenium comes with the [dev] extra) and saves it once the page has stopped
running (no grey loading placeholders). The event trace shows the most duplicated payment command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from outbox.devstack.procs import free_port  # noqa: E402
from tests.support.browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS  # noqa: E402

VIEWS = [("overview", "Overview", "Replication slot"), ("in-flight", "In flight", "Events in flight"),
         ("duplicates", "Duplicates", "Most duplicated events"), ("unknown-outcome", "Unknown outcome", "Recent operator decisions"),
         ("dead-letters", "Dead letters", "Open, by reason"), ("event-trace", "Event trace", "each consumer's inbox record")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=float, default=40, help="seconds of demo before the first screenshot")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go")
    args = parser.parse_args()
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        print(f"{' and '.join(missing)} not installed. Fix: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    dev_dir = REPO / ".outbox" / "screenshots"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({"OUTBOX_DEV_DIR": str(dev_dir), "OUTBOX_DASHBOARD_PORT": str(port),
                "OUTBOX_DASHBOARD_REFRESH_S": "3600"})
    demo = subprocess.Popen([sys.executable, "-m", "outbox.cli", "demo", "--rate", "4"], cwd=REPO, env=env,
                            start_new_session=True)
    try:
        print(f"demo running; screenshots in {args.warmup:.0f} s", file=sys.stderr)
        time.sleep(args.warmup)
        if demo.poll() is not None:
            print(f"the demo exited with {demo.returncode}", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}"
        _wait_http(url)
        trace_event = _most_duplicated_event(dev_dir / "dev.env")
        _shoot(url, trace_event, args.out)
        return 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)  # the demo settles what is in flight and stops
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "outbox.cli", "dev", "down"], cwd=REPO, env=env, check=False)
        shutil.rmtree(dev_dir, ignore_errors=True)


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=3).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _most_duplicated_event(env_file: Path) -> str:
    for line in env_file.read_text().splitlines():
        if line.startswith("export OUTBOX_DATABASE_URL="):
            dsn = line.split("=", 1)[1].strip("'")
            break
    else:
        raise SystemExit(f"no OUTBOX_DATABASE_URL in {env_file}")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT event_id::text FROM outbox.inbox_messages ORDER BY duplicates DESC, "
                           "last_seen DESC LIMIT 1").fetchone()
    return row[0] if row else ""


def _shoot(url: str, trace_event: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        for name, view, expected in VIEWS:
            params = {"view": view} | ({"q": trace_event} if view == "Event trace" else {})
            driver.get(f"{url}/?{urlencode(params)}")
            _settled(driver, expected)
            path = out / f"dashboard-{name}.png"
            driver.save_screenshot(str(path))
            print(f"saved {path}", file=sys.stderr)
    finally:
        driver.quit()


def _settled(driver, expected: str, timeout: float = 60) -> None:
    # Streamlit draws a grey skeleton while the script runs: wait for the text and the status widget to go.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        running = driver.find_elements("css selector", "[data-testid='stStatusWidget']")
        skeleton = driver.find_elements("css selector", "[data-testid='stSkeleton']")
        if expected in text and not running and not skeleton:
            time.sleep(1)  # charts animate in
            return
        time.sleep(0.3)
    raise SystemExit(f"{expected!r} not visible after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
