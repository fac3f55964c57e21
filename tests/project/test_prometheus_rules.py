"""Prometheus rules and the Grafana dashboard over the relay's and the inbox's real metric names. promtool (Debian's
`prometheus` package) checks the rules and runs their unit tests (deploy/prometheus/outbox-rules.test.yml);
without it those tests skip, unless OUTBOX_REQUIRE_PROMTOOL=1 (CI) makes them fail. No servers."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from inbox.metrics import InboxMetrics
from inbox.process import BatchResult
from relay.metrics import RelayMetrics
from tests.support.paths import REPO

RULES = REPO / "deploy" / "prometheus" / "outbox-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "outbox-rules.test.yml"
GRAFANA = REPO / "deploy" / "grafana" / "outbox.json"
METRIC = re.compile(r"\b(outbox_(?:relay|inbox)_[a-z_]+)")


def exported_names() -> set[str]:
    """Every series name the relay's /metrics can carry (labelled children instantiated)."""
    m = RelayMetrics()
    m.dead_lettered.labels("too_large").inc()
    m.batches.labels("acked").inc()
    m.set_wal_status("reserved")
    inbox = InboxMetrics("billing")  # and an inbox Runner's
    inbox.count(BatchResult(transactions=1, tallies={("orders", 0): (1, 1, 1)}, retries={("orders", 0): 1}))
    inbox.set_lag({("orders", 0): 1})
    inbox.handler_seconds.labels("billing", "orders").observe(0.01)
    inbox.fetch_restarts.labels("billing", "orders").inc()
    return {sample.name for registry in (m.registry, inbox.registry) for family in registry.collect()
            for sample in family.samples}


def test_promtool_check_rules(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool):
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def grafana_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(GRAFANA.read_text())["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("source", ["rules", "grafana"])
def test_every_metric_named_is_one_the_relay_exports(source):
    exprs = rule_exprs() if source == "rules" else grafana_exprs()
    named = {name for expr in exprs for name in METRIC.findall(expr)}
    assert named and not named - exported_names(), sorted(named - exported_names())


def test_the_alerts_asked_for_exist_with_a_severity_and_a_summary():
    alerts = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    assert {"OutboxNoActiveRelay", "OutboxRelayAbsent", "OutboxSlotLagBytesHigh", "OutboxSlotLagSecondsHigh",
            "OutboxPipelineRestarting", "OutboxDeadLettersIncreasing", "OutboxPublishLatencyHigh",
            "OutboxInboxLagHigh", "OutboxInboxDeadLettersIncreasing", "OutboxInboxNotReady",
            "OutboxInboxFetchStalls"} <= alerts.keys()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert tested == alerts.keys(), "every alert has a unit test"


def test_grafana_dashboard_is_importable():
    dash = json.loads(GRAFANA.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 30
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_grafana_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses each panel's query (as a recording rule), with Grafana's variables filled in."""
    rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"grafana:panel_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*")}
        for i, expr in enumerate(grafana_exprs())]}]}
    path = tmp_path / "grafana-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
