"""Fixtures of the dashboard tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import streamlit as st

from dashboard.db import Database
from outbox.devstack.postgres import EmbeddedPostgres
from outbox.devstack.procs import free_port
from tests.support.browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, browser_or_skip
from tests.support.dashboard import app
from tests.support.paths import TEST_STACK_DIR


@pytest.fixture(scope="module")
def release_the_apps_resources():
    """The app caches a database connection and a Kafka client per process; release them when
    this module is done (the app's on_release closes both)."""
    yield
    st.cache_resource.clear()


@pytest.fixture
def scenario_app(monkeypatch, dashboard_scenario):
    at = app(monkeypatch, dashboard_scenario.db, dashboard_scenario.kafka).run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def dashboard_url(dashboard_scenario, tmp_path):
    """`outbox dashboard` in its own process, as an operator runs it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({"OUTBOX_DATABASE_URL": dashboard_scenario.db.secret(),
                "OUTBOX_KAFKA_BOOTSTRAP": dashboard_scenario.kafka,
                "OUTBOX_DASHBOARD_PORT": str(port), "OUTBOX_DASHBOARD_REFRESH_S": "3600"})
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "dashboard"], cwd=tmp_path, env=env, stdout=log,
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
    browser_or_skip()
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


@pytest.fixture(scope="module")
def s(dashboard_scenario):
    return dashboard_scenario


@pytest.fixture(scope="module")
def dash(s):
    """Reads as the dashboard does: the read-only role, one snapshot per page."""
    database = Database(s.db, "outbox_dashboard")
    yield database
    database.close()


@pytest.fixture(scope="module")
def plain_cluster(stack):
    """A cluster of its own, where the dashboard role does not exist yet (roles are cluster-wide)."""
    pg = EmbeddedPostgres(TEST_STACK_DIR / "pg-nocreaterole")
    dsn = pg.start()
    yield dsn
    pg.stop()
