"""A real Prometheus scrapes a running relay and a running inbox consumer with our rules loaded:
the recording rules see the active relay and the consumer's processed events, no alert fires
while both work, and OutboxRelayAbsent fires after the relay is killed.

The rules are loaded as shipped except every `for:` shortened to 2 s (the expressions are
untouched), so the test waits seconds instead of the production minutes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.parse
import urllib.request
import uuid

from inbox import Runner
from outbox.devstack.procs import free_port
from tests.support.helpers import wait_for
from tests.support.inbox import (
    Background,
    apply_deposit,
    caught_up,
    create_business_schema,
    create_topic,
    deposit,
    headers_for,
    produce,
)
from tests.support.paths import REPO
from tests.support.relay import relay_env, relay_process, wait_streaming

RULES = REPO / "deploy" / "prometheus" / "outbox-rules.yml"


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def firing(port: int) -> set[str]:
    return {a["labels"]["alertname"] for a in api(port, "alerts")["alerts"] if a["state"] == "firing"}


def query(port: int, expr: str) -> list[tuple[dict, float]]:
    return [({k: v for k, v in r["metric"].items() if k != "__name__"}, float(r["value"][1]))
            for r in api(port, "query", query=expr)["result"]]


def test_prometheus_scrapes_the_relay_and_a_consumer_and_fires_relay_absent_after_the_relay_is_killed(
        prometheus_binary, db, kafka, topic_prefix, tmp_path):
    metrics_port, prom_port, inbox_port = free_port(), free_port(), free_port()
    rules = tmp_path / "outbox-rules.yml"
    rules.write_text(re.sub(r"(?m)^(\s+for:) \S+$", r"\1 2s", RULES.read_text()))
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{rules}]\n"
        "scrape_configs:\n"
        f"  - job_name: outbox\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        f"  - job_name: billing\n    static_configs: [{{targets: ['127.0.0.1:{inbox_port}']}}]\n")
    create_business_schema(db)
    topic = f"{topic_prefix}.deposits"
    create_topic(kafka, topic, partitions=2)
    produce(kafka, topic, [(b"acc-1", deposit("acc-1", 1), headers_for(uuid.uuid4())) for _ in range(7)])
    consumer = Background(Runner("billing", apply_deposit, dsn=db, bootstrap=kafka, topics=[topic], poll_timeout_s=0.2,
                                 metrics_port=inbox_port, lag_interval_s=0.5))
    relay = relay_process(relay_env(db, kafka, topic_prefix, metrics_port=metrics_port), tmp_path / "relay.log")
    prom_log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_streaming(db)
        caught_up(db, "billing", kafka, topic)
        wait_for(lambda: query(prom_port, 'sum by (job, consumer) (outbox_inbox_events_processed_total)')
                 == [({"job": "billing", "consumer": "billing"}, 7.0)], 60,
                 "Prometheus to see the consumer's 7 processed events")
        assert query(prom_port, "outbox_inbox_ready") == [
            ({"job": "billing", "instance": f"127.0.0.1:{inbox_port}", "consumer": "billing"}, 1.0)]
        wait_for(lambda: query(prom_port, "outbox:relay_active:sum") == [({"job": "outbox"}, 1.0)], 60,
                 "Prometheus to record one active relay")
        [(labels, _)] = query(prom_port, 'outbox_relay_slot_wal_status{state="reserved"} == 1')
        assert labels["instance"] == f"127.0.0.1:{metrics_port}"
        assert query(prom_port, "outbox_relay_build_info")[0][1] == 1.0
        # Before the first scrape the relay was absent for a moment: that alert resolves once it is seen.
        wait_for(lambda: firing(prom_port) == set(), 30, "no alert to fire while the relay streams")

        relay.send_signal(signal.SIGKILL)
        relay.wait(30)
        wait_for(lambda: "OutboxRelayAbsent" in firing(prom_port), 60, "OutboxRelayAbsent to fire")
        assert firing(prom_port) <= {"OutboxRelayAbsent"}  # absent, not a stale 'no active relay'
    finally:
        consumer.stop()
        for proc in (relay, prom):
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        prom_log.close()
