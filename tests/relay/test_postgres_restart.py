"""PostgreSQL shut down under load (fast and immediate, i.e. a crash) and started again: the relay
reconnects by itself and nothing committed is lost; exactly-once shows no duplicate."""

from __future__ import annotations

import collections
import threading
import time

import psycopg
import pytest

from outbox.core.migrate import migrate
from outbox.devstack.postgres import EmbeddedPostgres
from tests.support.helpers import read_topic, wait_for
from tests.support.relay import RelayThread, published, query, relay_settings, wait_streaming


def produce(dsn, stop: threading.Event, done: list) -> None:
    """Small transactions until told to stop, riding out the outage; the database is the truth of
    what committed (a commit cut off by the shutdown may or may not have happened)."""
    while not stop.is_set():
        try:
            with psycopg.connect(dsn.secret(), autocommit=True, connect_timeout=2) as conn:
                while not stop.is_set():
                    conn.execute("SELECT outbox.emit('order', (i % 13)::text, 'Placed', jsonb_build_object('i', i)) "
                                 "FROM generate_series(1, 5) i")
                    done.append(5)
                    time.sleep(0.005)
        except psycopg.OperationalError:
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("mode,delivery", [("fast", "at-least-once"), ("immediate", "exactly-once")])
def test_postgres_shut_down_under_load_and_restarted_loses_nothing(tmp_path, kafka, topic_prefix, mode, delivery):
    pg = EmbeddedPostgres(tmp_path / "pg")
    dsn = pg.start()
    port = pg.status().port
    migrate(dsn, log=lambda _: None)
    stop, done = threading.Event(), []
    producer = threading.Thread(target=produce, args=(dsn, stop, done), daemon=True)
    try:
        with RelayThread(relay_settings(dsn, kafka, topic_prefix, delivery=delivery)) as relay:
            wait_streaming(dsn)
            producer.start()
            wait_for(lambda: published(dsn) > 200, 60, "the relay to publish under load")
            result = pg._run([pg.bin / "pg_ctl", "stop", "-D", pg.data, "-m", mode, "-w", "-s"])
            assert result.returncode == 0, result.stderr
            time.sleep(2)
            pg.start(port)
            time.sleep(3)
            stop.set()
            producer.join(30)
            total = query(dsn, "SELECT count(*) FROM outbox.events")[0][0]
            wait_for(lambda: published(dsn) >= total and not query(dsn, "SELECT 1 FROM outbox.in_flight LIMIT 1"),
                     120, f"the relay to publish all {total} events after the restart")
            assert relay.exit_code is None
        isolation = "read_committed" if delivery == "exactly-once" else "read_uncommitted"
        records = read_topic(kafka, f"{topic_prefix}.order", expect=total, isolation=isolation, timeout=120,
                             settle=3.0)
        ids = collections.Counter(dict(r.headers)["event_id"].decode() for r in records)
        emitted = {r[0] for r in query(dsn, "SELECT event_id::text FROM outbox.events")}
        assert emitted - set(ids) == set()
        if delivery == "exactly-once":
            assert max(ids.values()) == 1 and len(ids) == total
        print(f"{mode} shutdown, {delivery}: {total} events, {sum(ids.values()) - len(ids)} duplicates")
    finally:
        stop.set()
        pg.stop()
